"""`head_only`: the lower bound. The frozen backbone's [CLS] feature and one linear head trained
task after task with the same masked CE as every prompt method; nothing else is learned, so all
that separates a prompt method from this row is what its prompts (and stages) add.

fmnist-5t budget: 3 epochs, batch 32, lr 0.005, picked by the rule used for L2P, DualPrompt and
CODA-Prompt: the best FAA on seeds 0-1 among lr {0.005, 0.01, 0.02} x epochs {2, 3} (zero-init
head). A lower bound tuned like the methods it bounds, so that beating it means something.
Results: docs/tuning.md."""
from __future__ import annotations

from .base import PromptStrategy
from .registry import register


@register("head_only")
class HeadOnly(PromptStrategy):
    description = "lower bound: frozen ViT + linear head trained sequentially (masked CE)"
    # "*": the Hparams defaults serve any protocol without its own entry (a linear head needs
    # no per-data-set setting); fmnist-5t has its own budget
    DEFAULTS = {
        "*": {},
        "fmnist-5t": dict(epochs=3, batch_size=32, lr=5e-3),
    }
    passes_train = 1
    passes_test = 1
    role = "lower bound"
