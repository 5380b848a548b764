"""Deep L2P++: CODA-Prompt's L2P++ with a prompt pool in each of layers 0-4 (`--prompt_param 30 20
1`, GT-RIPL/CODA-Prompt @ 6417d4f models/zoo.py:331-332; the "Deep L2P++" rows of CODA-Prompt,
VQ-Prompt and the SMoPE poster). Everything else is L2P++ (`methods/l2p_pp.py`): per layer its own
30 prompts of length 20 and 30 keys, per-image top-5 selection, the pull loss summed over the five
layers. Size on ViT-B/16: 5 x 483,840 = 2,419,200 (head excluded).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .l2p_pp import L2PPlusPlus, L2PPlusPlusHparams
from .registry import register


@dataclass
class DeepL2PPlusPlusHparams(L2PPlusPlusHparams):
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@register("deep_l2p_pp")
class DeepL2PPlusPlus(L2PPlusPlus):
    """Deep L2P++ as the suite runs it: L2P++'s defaults, sources and departures (see
    `L2PPlusPlus`), with prompts at layers 0-4.

    - fmnist-5t (tiny ViT, 6 blocks): layers 0-2, the first half of the blocks, as the suite's
      HiDe-Prompt maps 0-4 of 12; length 4, batch 32; 3 epochs at lr 0.005, the best FAA on
      seeds 0-1 among lr {0.005, 0.01, 0.02} x epochs {2, 3}, the rule shared with the other
      methods (docs/tuning.md).
    """

    description = ("Deep L2P++ (CODA-Prompt's L2P, layers 0-4): per-layer prompt pools as prefix "
                   "keys/values, per-image top-5 key-query selection, key pull loss")
    Hparams = DeepL2PPlusPlusHparams
    DEFAULTS = {
        "cifar100-10t": dict(epochs=20),
        "imagenet-r-5t": dict(epochs=50),
        "imagenet-r-10t": dict(epochs=50),
        "imagenet-r-20t": dict(epochs=50),
        "cub200-10t": dict(epochs=20),
        "fmnist-5t": dict(epochs=3, batch_size=32, lr=0.005, prompt_length=4, layers=[0, 1, 2]),
    }
