"""The reference codes' batch-dependent behaviours, as pure tensor functions.

The suite selects and applies prompts per sample, so its results never depend on how test images
are batched. Some public codes behind published numbers do not, and a reference mode of a method
(`PromptStrategy.reference_mode`) reproduces them on the same trained model, element for element:

- `batch_vote`: one prompt set per batch by majority vote over the per-image choices, as
  l2p-pytorch `prompt.py:71-82`, dualprompt-pytorch `prompt.py:100-111` and HiDe-Prompt
  `peft/prompt/hide_prompt.py:81-90` compute it (the official JAX code, google-research/l2p
  `models/prompt.py:211-215`, does the same with `jnp.unique(size=pool_size)` and `lax.top_k`);
- `mix_prefix_halves`: the prefix reshape of dualprompt-pytorch `prompt.py:118-122` and
  HiDe-Prompt `peft/prompt/hide_prompt.py:105-119` (also HiDe-Prompt `peft/prompt/dp_prompt.py:124,130`
  and NoRGa, MoE_PromptCL `peft/prompt/norga_prompt.py:108,117,125`), which reads the per-image
  (key, value) halves, laid out (key/value, batch), as if they were laid out (batch, key/value).

Both leak across a batch; the reference codes evaluate one task's test set at a time, so a test
batch holds one task's images and whatever crosses the batch carries the task identity.
"""
from __future__ import annotations

import torch
from torch import Tensor


def majority_vote(idx: Tensor, pool_size: int, top_k: int) -> Tensor:
    """The `top_k` prompt ids a batch votes for, in the reference code's order: (top_k,).

    `idx` (B, k) holds each image's own choice (k ids per image). As the reference: every id of
    `idx` counts one vote (`torch.unique(..., sorted=True, return_counts=True)`: ids ascending);
    with fewer distinct ids than `pool_size`, ids are padded with the smallest voted id and counts
    with 0 up to `pool_size` (the code's imitation of `jnp.unique(size=pool_size)`); then
    `torch.topk(counts, top_k)` picks the winners. Ties between equal counts are resolved as
    `torch.topk` resolves them on the device it runs on, which is not the lowest id first and
    differs between CPU and CUDA (pytorch/pytorch#127196): reproducing the padding matters, since
    the length of the count vector changes which of the tied ids `torch.topk` returns. The padded
    entries have count 0 and never win (each image contributes k >= top_k distinct ids)."""
    ids, counts = torch.unique(idx, sorted=True, return_counts=True)
    missing = pool_size - ids.shape[0]
    if missing > 0:
        ids = torch.cat([ids, ids.new_full((missing,), int(idx.min()))])
        counts = torch.cat([counts, counts.new_zeros(missing)])
    return ids[torch.topk(counts, k=top_k).indices]


def batch_vote(idx: Tensor, pool_size: int, top_k: int, group: int | None = None) -> Tensor:
    """`idx` (B, k) per-image choices -> (B, top_k): every image gets its group's `majority_vote`.

    `group`: consecutive images that vote together (None: the whole batch, as a test batch of the
    reference code; at training time the reference votes over its per-device batch, a slice of
    the suite's larger batch)."""
    group = idx.shape[0] if group is None else group
    return torch.cat([majority_vote(chunk, pool_size, top_k).expand(chunk.shape[0], -1)
                      for chunk in idx.split(group)])


def mix_prefix_halves(kv: Tensor) -> Tensor:
    """`kv` (B, 2, ...): image b's own (key, value) prefix halves -> the halves the reference code
    gives image b.

    The reference gathers the prefixes as (key/value, batch, ...) and reshapes that to
    (batch, key/value, ...) without a permute, so image b's slot d (0 = key, 1 = value) is the
    element at flat position 2b + d of the (key/value, batch) order: half (2b + d) // B of image
    (2b + d) % B. Image b therefore gets key halves as both keys and values when 2b + 1 < B,
    value halves as both when 2b >= B, and (for odd B, the middle image) the key half of image
    B - 1 with the value half of image 0; at B = 1 nothing changes. Differentiable."""
    return kv.transpose(0, 1).reshape(kv.shape)
