"""What a method costs: added parameters, ViT passes and forward GFLOPs per image (a run's `cost`).

`cost_row` builds the method on the given backbone (no training), counts what it adds to the
ViT (`PromptModel.added_parameters()`, head excluded; frozen-but-owned parts such as earlier CODA
components count) and the head, reads the declared passes per image, and measures forward FLOPs
of one image at the backbone's input size with `torch.utils.flop_counter.FlopCounterMode`, once
as a training step runs it and once as evaluation does (`PromptStrategy.cost_forward`), query pass
included. FLOPs are 2 x multiply-accumulates, forward only.

On CPU, `scaled_dot_product_attention` dispatches to ops the counter does not know
(`_scaled_dot_product_flash_attention_for_cpu` and its backward), which would silently drop the
attention matmuls; they are mapped to the counter's own SDPA formulas so that CPU and GPU counts
agree (`protocols.profile` counts whole training steps, backward included, with `count_flops`).
The `cost` command's table over protocols and backbones is `protocols.cost_table`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from methods import registry
from methods.vit import PromptedViT


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                            out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
        _cpu_sdpa_backward_flop)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn()` runs (forward only unless it calls backward)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def input_example(vit: PromptedViT, device: str | torch.device = "cpu") -> torch.Tensor:
    """One image (1, C, H, W) at the backbone's input size."""
    pe = vit.vit.patch_embed
    h, w = pe.img_size
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, pe.proj.in_channels, h, w, generator=g).to(device)


def count_vit_passes(strategy, x: torch.Tensor, training: bool) -> int:
    """ViT passes per image of `strategy.cost_forward(x, training)`: every pass through the
    backbone (the query pass included) embeds the patches once, so a hook on the patch embedding
    counts them. `x` is one image."""
    calls = []
    hook = strategy.model.vit.vit.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            strategy.cost_forward(x, training)
    finally:
        hook.remove()
    return len(calls)


def check_passes(method: str, vit: PromptedViT, num_classes: int, hparams: dict | None = None,
                 device: str | torch.device = "cpu") -> tuple[int, int]:
    """(train, test) ViT passes per image that `method`'s forward really runs; `ValueError` when
    they differ from its declared `passes_train` / `passes_test` (which the cost table reports).
    Runs on a fresh, untrained copy of the method, as the cost table does."""
    strategy = registry.create(method, vit=vit, num_classes=num_classes, hparams=hparams, device=device)
    strategy.model.to(device)
    x = input_example(vit, device)
    counted = (count_vit_passes(strategy, x, True), count_vit_passes(strategy, x, False))
    declared = (type(strategy).passes_train, type(strategy).passes_test)
    if counted != declared:
        raise ValueError(f"method {method!r} declares passes_train={declared[0]}, passes_test={declared[1]} "
                         f"but its training / evaluation forward runs the ViT {counted[0]} / {counted[1]} "
                         "time(s) per image: fix the class attributes (the cost table reports them)")
    return counted


def cost_row(method: str, vit: PromptedViT, num_classes: int, hparams: dict | None = None,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """`method`'s cost on `vit` (see the module docstring): {"method", *record.COST_FIELDS}."""
    strategy = registry.create(method, vit=vit, num_classes=num_classes, hparams=hparams,
                               device=device)
    model = strategy.model.to(device)
    x = input_example(vit, device)
    flops = {}
    for training in (True, False):
        flops[training] = count_flops(lambda: strategy.cost_forward(x, training))
    model.eval()
    return {
        "method": method,
        "trainable_params": sum(p.numel() for _, p in model.added_parameters()),
        "head_params": sum(p.numel() for p in model.head.parameters()),
        "passes_train": type(strategy).passes_train,
        "passes_test": type(strategy).passes_test,
        "gflops_train": flops[True] / 1e9,
        "gflops_test": flops[False] / 1e9,
    }

