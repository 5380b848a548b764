"""A hand-written reference of the prefix-tuned ViT forward of the CODA-Prompt / OVOR / NoRGa code
(their models/vit.py `Attention.forward`: prefix keys and values concatenated in front of the
block's own, one explicit softmax), independent of `methods.vit.PromptedViT` (which runs the
blocks through `scaled_dot_product_attention`). Used by the tests of the methods built on it."""
from __future__ import annotations

import torch
from torch import Tensor


def reference_cls(pvit, x: Tensor, prefix: dict | None = None, gate: dict | None = None) -> Tensor:
    """Final-LN [CLS] of `pvit`'s frozen timm ViT on x, with `prefix` {layer: (pk, pv)} of shape
    (B, Lp, D) and, for NoRGa, `gate` {layer: (alpha, beta, fn)}: the prefix logits s become
    s + beta * fn(alpha * s) before the softmax."""
    prefix, gate = prefix or {}, gate or {}
    v = pvit.vit
    h = v.norm_pre(v._pos_embed(v.patch_embed(x)))
    heads = pvit.num_heads
    for i, blk in enumerate(v.blocks):
        a = blk.norm1(h)
        b, n, d = a.shape
        hd = d // heads
        qkv = (a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, heads, hd)
        q, k, val = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, H, N, hd)
        lp = 0
        if i in prefix:
            pk, pv = prefix[i]
            lp = pk.shape[1]
            k = torch.cat([pk.reshape(b, lp, heads, hd).transpose(1, 2), k], 2)
            val = torch.cat([pv.reshape(b, lp, heads, hd).transpose(1, 2), val], 2)
        logits = q @ k.transpose(-1, -2) * hd ** -0.5
        if i in gate:
            alpha, beta, fn = gate[i]
            s = logits[..., :lp]
            logits = torch.cat([s + beta * fn(alpha * s), logits[..., lp:]], -1)
        o = (logits.softmax(-1) @ val).transpose(1, 2).reshape(b, n, d)
        h = h + blk.attn.proj(o)
        h = h + blk.mlp(blk.norm2(h))
    return v.norm(h)[:, 0]


def meta_vit_b16():
    """ViT-B/16 (the `sup21k` architecture) on the meta device: shapes without weights, so the
    papers' parameter counts can be checked without allocating 86M parameters."""
    from methods import backbones
    from methods.vit import PromptedViT

    with torch.device("meta"):
        return PromptedViT(backbones.build_architecture("sup21k"))
