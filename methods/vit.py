"""The one prompted ViT that every method shares.

`PromptedViT` wraps a frozen timm `VisionTransformer` and re-runs its forward block by block so
that a method can add, per call and per sample:

- `prompt_tokens` (B, Lp, D): prompt-tuning tokens inserted after [CLS] at the input (L2P);
- `prefix` {layer: (pk, pv)}, each (B, Lk, D) or (Lk, D): prefix-tuning keys/values prepended to
  that block's keys and values *after* the qkv projection (DualPrompt, CODA, HiDe, VQ);
- `attention` {layer: fn(q, k, v) -> out}: a replacement for the scaled-dot-product step of that
  block, given per-head q, k, v of shape (B, H, N, hd) (SMoPE's sparse expert attention).

Nothing is installed into the timm modules: the ViT object stays untouched and can be shared by
every method of a run. With none of the three, `forward_features` equals timm's own
`forward_features` (tested to 1e-6). The frozen query (the final-LN [CLS] without prompts, used by
L2P, DualPrompt, CODA, HiDe and VQ) is `query()`: it is a full extra ViT pass and is counted as one.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Prefix = tuple[Tensor, Tensor]


class PromptedViT(nn.Module):
    """A frozen timm ViT with injection points for prompts (see the module docstring)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"PromptedViT needs a timm VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        self.vit.requires_grad_(False)
        self.vit.eval()
        first = vit.blocks[0].attn
        self.embed_dim: int = vit.embed_dim
        self.depth: int = len(vit.blocks)
        self.num_heads: int = first.num_heads
        self.head_dim: int = first.head_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_patches: int = vit.patch_embed.num_patches

    def train(self, mode: bool = True) -> "PromptedViT":
        # The backbone is frozen: it stays in eval mode (no dropout / drop-path) whatever the
        # strategy does with the model it belongs to.
        super().train(False)
        return self

    # ------------------------------------------------------------------ embedding
    def embed(self, x: Tensor, prompt_tokens: Tensor | None = None) -> Tensor:
        """Patch embedding + position embedding (+ prompt tokens after the [CLS] token).

        Prompt tokens receive the [CLS] position embedding, as in the L2P PyTorch code (the
        pretrained table is extended with copies of the [CLS] entry), and sit between [CLS] and
        the patches: [CLS, prompts, patches].
        """
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        if prompt_tokens is not None:
            if prompt_tokens.dim() == 2:
                prompt_tokens = prompt_tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
            if v.pos_embed is not None and not v.no_embed_class:
                prompt_tokens = prompt_tokens + v.pos_embed[:, :1]
            n = self.num_prefix_tokens
            x = torch.cat([x[:, :n], prompt_tokens.to(x.dtype), x[:, n:]], dim=1)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    # ------------------------------------------------------------------ blocks
    def _split_heads(self, t: Tensor, batch: int) -> Tensor:
        """(B, L, D) or (L, D) -> (B, H, L, hd), per sample: a view over D, never across B."""
        if t.dim() == 2:
            t = t.unsqueeze(0).expand(batch, -1, -1)
        if t.shape[0] != batch:
            raise ValueError(f"prefix batch {t.shape[0]} does not match input batch {batch}")
        b, length, _ = t.shape
        return t.reshape(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q, k, v (B, H, N, hd) of block `layer` for its (already normed) input x."""
        attn = self.vit.blocks[layer].attn
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def attention(self, layer: int, x: Tensor, prefix: Prefix | None = None,
                  attention: AttentionFn | None = None) -> Tensor:
        """timm's `Attention.forward` with optional prefix keys/values and a replaceable core."""
        attn = self.vit.blocks[layer].attn
        b, n, _ = x.shape
        q, k, v = self.qkv(layer, x)
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat([self._split_heads(pk, b).to(k.dtype), k], dim=2)
            v = torch.cat([self._split_heads(pv, b).to(v.dtype), v], dim=2)
        if attention is not None:
            o = attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, n, -1)
        o = attn.norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(o))

    def block(self, layer: int, x: Tensor, prefix: Prefix | None = None,
              attention: AttentionFn | None = None) -> Tensor:
        blk = self.vit.blocks[layer]
        x = x + blk.drop_path1(blk.ls1(self.attention(layer, blk.norm1(x), prefix, attention)))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    # ------------------------------------------------------------------ forward
    def forward_features(
        self,
        x: Tensor,
        *,
        prompt_tokens: Tensor | None = None,
        prefix: Mapping[int, Prefix] | None = None,
        attention: Mapping[int, AttentionFn] | None = None,
    ) -> Tensor:
        """All output tokens after the final LayerNorm, (B, 1 + Lp + N, D)."""
        prefix = prefix or {}
        attention = attention or {}
        bad = [i for i in list(prefix) + list(attention) if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"prompt layers {bad} outside 0..{self.depth - 1}")
        h = self.embed(x, prompt_tokens)
        for i in range(self.depth):
            h = self.block(i, h, prefix.get(i), attention.get(i))
        return self.vit.norm(h)

    def forward(self, x: Tensor, **prompts) -> Tensor:
        """The [CLS] feature after the final LayerNorm (the usual head input)."""
        return self.forward_features(x, **prompts)[:, 0]

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """The frozen query: final-LN [CLS] of the un-prompted ViT, (B, D). One full ViT pass."""
        return self.forward_features(x)[:, 0]
