"""VQ-Prompt on the tiny ViT: quantisation, straight-through gradients, loss weights, alignment
stage, batch-size invariance. What every method must do (defaults for every protocol, the stream
run, the frozen backbone, the optimizer groups, the ViT-B/16 count) is in test_methods.py."""
import pytest
import torch
import torch.nn.functional as F

from methods import registry
from methods.vq_prompt import VQPromptHparams, VQPromptModel

from helpers import PROTOCOLS, stream, hparams

torch.set_num_threads(1)


def tiny_model(vit, **kw):
    torch.manual_seed(1)
    return VQPromptModel(vit, 4, VQPromptHparams(prompt_layers=[0, 1, 2], **kw))


def test_quantised_prompt_is_always_a_pool_element(vit):
    m = tiny_model(vit)
    q = torch.randn(64, vit.embed_dim) * 3
    p, idx, _ = m.quantise(q)
    assert p.shape == (3, 64, 8, vit.embed_dim) and idx.shape == (64, 3)
    for layer in range(3):
        cont = torch.einsum("bn,ntd->btd", torch.softmax(
            q @ F.normalize(m.keys[layer], dim=-1).T / m.tau, -1), m.prompts[layer])
        nearest = torch.cdist(cont.flatten(1), m.prompts[layer].flatten(1)).argmin(1)
        assert torch.equal(idx[:, layer], nearest)
        for b in range(64):
            assert torch.equal(p[layer, b], m.prompts[layer, idx[b, layer]])  # exactly, not close
    assert len(set(idx[:, 0].tolist())) > 1  # different samples, different elements


def test_prefix_fed_to_the_vit_is_the_pool_element(vit):
    m = tiny_model(vit).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        f = m.features(x)
        idx = m.last_index
        prefix = {l: (m.prompts[i, idx[:, i], :4], m.prompts[i, idx[:, i], 4:])
                  for i, l in enumerate(m.layers)}
        assert torch.allclose(f, vit(x, prefix=prefix), atol=1e-6)


def test_straight_through_gradient_reaches_keys_and_pool(vit):
    m = tiny_model(vit).train()
    torch.nn.init.normal_(m.head.weight, std=0.1)  # a trained head: a zero one passes no gradient
    x = torch.rand(6, 1, 28, 28)
    loss = F.cross_entropy(m(x), torch.tensor([0, 1, 2, 3, 0, 1]))  # CE alone, no VQ terms
    loss.backward()
    assert m.keys.grad is not None and m.keys.grad.abs().sum() > 0
    assert torch.isfinite(m.keys.grad).all()
    # the weighted sum spreads CE's gradient over every pool element, chosen or not
    assert (m.prompts.grad.flatten(2).abs().sum(-1) > 0).all()


def test_loss_weights_paper_and_code_swap(vit):
    """Keys get gradient only through p' (the commitment term): its weight is 0.1 in the paper
    and 0.4 in the code, so the key gradient of the VQ loss is 4x larger with the code's weights."""
    q = torch.randn(8, vit.embed_dim)
    grads = {}
    for code in (False, True):
        m = tiny_model(vit, code_loss_weights=code)
        _, _, loss = m.quantise(q)
        loss.backward()
        grads[code] = m.keys.grad.clone()
        assert (m.w_pool, m.w_commit) == ((0.1, 0.4) if code else (0.4, 0.1))
    assert grads[False].abs().sum() > 0
    assert torch.allclose(grads[True], 4 * grads[False], rtol=1e-4, atol=1e-9)


def test_training_two_tasks_alignment_and_batch_size_invariance(vit):
    bm = stream()
    torch.manual_seed(0)
    hp = hparams("vq_prompt", "fmnist-5t", {"epochs": 1, "batch_size": 8,
                                                             "align_epochs": 2})
    s = registry.create("vq_prompt", vit=vit, num_classes=4, hparams=hp, eval_mb_size=32)
    s.train(bm.train_stream[0])
    head_before = s.model.head.weight.detach().clone()
    keys_before = s.model.keys.detach().clone()
    assert s.alignment.stats.classes() == [0, 1]
    s.train(bm.train_stream[1])
    assert s.alignment.stats.classes() == [0, 1, 2, 3]
    assert not torch.equal(s.model.keys, keys_before)  # the shared pool keeps learning
    assert not torch.equal(s.model.head.weight[:2], head_before[:2])  # old rows re-fitted
    res = {}
    for mb in (1, 5, 32):
        s.eval_mb_size = mb
        r = s.eval(bm.test_stream)
        res[mb] = [r[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] for j in range(2)]
    assert res[1] == res[5] == res[32]
    s.model.eval()
    xs = torch.stack([bm.test_stream[1].dataset.eval()[i][0] for i in range(8)])
    with torch.no_grad():
        whole = s.model(xs)
        alone = torch.cat([s.model(xs[i:i + 1]) for i in range(8)])
    assert torch.allclose(whole, alone, atol=1e-5)


def test_pool_and_length_in_every_protocol_and_two_passes():
    cls = registry.get("vq_prompt")
    for p in PROTOCOLS:
        hp = hparams("vq_prompt", p)
        assert hp["pool_size"] == 10 and hp["prompt_length"] == 8
    assert hparams("vq_prompt", "cub200-10t")["tau"] == 5.0
    assert hparams("vq_prompt", "fmnist-5t")["epochs"] <= 4
    assert (cls.passes_train, cls.passes_test) == (2, 2)

