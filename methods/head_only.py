"""`head_only`: the lower bound. The frozen backbone's [CLS] feature and one linear head trained
task after task with the same masked CE as every prompt method; nothing else is learned, so all
that separates a prompt method from this row is what its prompts (and stages) add."""
from __future__ import annotations

from .base import PromptStrategy
from .registry import register


@register("head_only")
class HeadOnly(PromptStrategy):
    description = "lower bound: frozen ViT + linear head trained sequentially (masked CE)"
    DEFAULTS = {
        "fmnist-5t": dict(epochs=2, batch_size=32, lr=1e-2),
    }
    passes_train = 1
    passes_test = 1
