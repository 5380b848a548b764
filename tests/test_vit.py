"""The shared prompted ViT: equivalence with timm, per-sample prompts, frozen backbone."""
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from methods.vit import PromptedViT


def small_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=4, num_heads=4,
               qkv_bias=True, num_classes=0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": False}, {"class_token": True, "reg_tokens": 2}])
def test_no_prompts_equals_timm_forward(kw):
    vit = small_vit(**kw)
    pv = PromptedViT(vit)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        ours = pv.forward_features(x)
        theirs = vit.forward_features(x)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(pv.query(x), theirs[:, 0], atol=1e-6)


def test_backbone_is_frozen_and_stays_in_eval_mode():
    pv = PromptedViT(small_vit())
    assert not any(p.requires_grad for p in pv.parameters())
    pv.train()
    assert not pv.vit.training
    q = pv.query(torch.rand(2, 1, 28, 28))
    assert not q.requires_grad


def test_prefix_is_per_sample():
    """Sample b's output depends on its own prefix only, never on the other samples' prefixes."""
    pv = PromptedViT(small_vit())
    x = torch.rand(4, 1, 28, 28)
    pk, pv_ = torch.randn(4, 3, 32), torch.randn(4, 3, 32)
    prefix = {0: (pk, pv_), 2: (pk * 0.5, pv_ * 2)}
    with torch.no_grad():
        batched = pv.forward_features(x, prefix=prefix)
        for b in range(4):
            alone = pv.forward_features(x[b:b + 1], prefix={l: (k[b:b + 1], v[b:b + 1]) for l, (k, v) in prefix.items()})
            assert torch.allclose(batched[b:b + 1], alone, atol=1e-5)
        changed = {l: (k.clone(), v.clone()) for l, (k, v) in prefix.items()}
        changed[0][0][1:] = torch.randn(3, 3, 32)  # other samples' keys change
        again = pv.forward_features(x, prefix=changed)
    assert torch.allclose(again[0], batched[0], atol=1e-6)
    assert not torch.allclose(again[1], batched[1], atol=1e-3)


def test_prefix_matches_explicit_attention():
    """Prefix keys/values are prepended per head after the qkv projection (DualPrompt / CODA)."""
    pv = PromptedViT(small_vit(depth=1))
    x = torch.rand(2, 1, 28, 28)
    pk, pval = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        h = pv.embed(x)
        blk = pv.vit.blocks[0]
        q, k, v = pv.qkv(0, blk.norm1(h))
        split = lambda t: t.view(2, 3, 4, 8).transpose(1, 2)
        k2, v2 = torch.cat([split(pk), k], 2), torch.cat([split(pval), v], 2)
        att = ((q @ k2.transpose(-1, -2)) / 8 ** 0.5).softmax(-1) @ v2
        ref = blk.attn.proj(att.transpose(1, 2).reshape(2, h.shape[1], 32))
        ours = pv.attention(0, blk.norm1(h), prefix=(pk, pval))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_prompt_tokens_and_shared_prefix_shapes():
    pv = PromptedViT(small_vit())
    x = torch.rand(3, 1, 28, 28)
    out = pv.forward_features(x, prompt_tokens=torch.randn(3, 5, 32))
    assert out.shape == (3, 1 + 5 + 16, 32)
    shared = pv.forward_features(x, prompt_tokens=torch.randn(5, 32))
    assert shared.shape == (3, 22, 32)
    out = pv.forward_features(x, prefix={1: (torch.randn(6, 32), torch.randn(6, 32))})
    assert out.shape == (3, 17, 32)
    with pytest.raises(ValueError):
        pv.forward_features(x, prefix={9: (torch.randn(6, 32), torch.randn(6, 32))})


def test_replaceable_attention_core():
    pv = PromptedViT(small_vit())
    x = torch.rand(2, 1, 28, 28)
    calls = []

    def sdpa(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        same = pv.forward_features(x, attention={1: sdpa, 3: sdpa})
        ref = pv.forward_features(x)
    assert torch.allclose(same, ref, atol=1e-6)
    assert calls == [(2, 4, 17, 8), (2, 4, 17, 8)]


def test_gradients_reach_prompts_not_backbone():
    pv = PromptedViT(small_vit())
    prompt = torch.randn(4, 32, requires_grad=True)
    out = pv(torch.rand(2, 1, 28, 28), prefix={0: (prompt, prompt)})
    out.pow(2).sum().backward()  # (a plain sum of a LayerNorm output has zero gradient)
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in pv.parameters())
