"""NoRGa: the non-linear residual gate on a fixed case, the gated prefix forward against a
hand-written reference with each image's own key/value pair, act_scale trained at task 0 only,
the HiDe-Prompt stages, and the published ViT-B/16 counts (the stream run and batch-size
invariance of every method: test_methods.py)."""
import math

import pytest
import torch

from helpers import PROTOCOLS, hparams, make_strategy, stream
from methods import registry
from methods.norga import NoRGaHparams, NoRGaModel, gated_prefix_attention
from prefix_reference import meta_vit_b16, reference_cls

torch.set_num_threads(1)


def test_defaults_cover_every_protocol():
    tasks = {"cifar100-10t": 10, "imagenet-r-5t": 5, "imagenet-r-10t": 10, "imagenet-r-20t": 20,
             "cub200-10t": 10, "fmnist-5t": 5}
    for p in PROTOCOLS:
        hp = hparams("norga", p)
        assert hp["pool_size"] == tasks[p] and hp["gate_act"] == "sigmoid"
        assert (hp["covariance"], hp["n_centroids"]) == ("full", 1)
    cifar, imr = hparams("norga", "cifar100-10t"), hparams("norga", "imagenet-r-10t")
    assert (cifar["prompt_length"], cifar["epochs"], cifar["lr"], cifar["tap_lr"]) == (5, 50, 0.015, 0.05)
    assert (imr["prompt_length"], imr["epochs"], imr["reg"], imr["tap_lr"]) == (20, 150, 0.5, 0.005)
    assert hparams("norga", "cub200-10t")["head_lr_mult"] == 1.0
    cls = registry.get("norga")
    assert (cls.passes_train, cls.passes_test) == (2, 2)


def test_gate_formula_on_a_fixed_case():
    """One head, one query, one prefix key, two token keys: s = q.pk / sqrt(2) becomes
    s + beta * sigmoid(alpha * s); softmax over [s', q.k_1 / sqrt(2), q.k_2 / sqrt(2)]."""
    q = torch.tensor([[[[1.0, 2.0]]]])
    k = torch.tensor([[[[0.5, -1.0], [1.0, 1.0], [-2.0, 0.5]]]])  # prefix key first
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]]]])
    alpha, beta = 2.0, 0.5
    raw = [(1 * a + 2 * b) / math.sqrt(2) for a, b in k[0, 0].tolist()]
    s = raw[0] + beta / (1 + math.exp(-alpha * raw[0]))
    logits = [s, raw[1], raw[2]]
    w = [math.exp(t) / sum(math.exp(u) for u in logits) for t in logits]
    expected = [sum(w[j] * v[0, 0, j, c].item() for j in range(3)) for c in range(2)]
    got = gated_prefix_attention(q, k, v, 1, torch.tensor(alpha), torch.tensor(beta), torch.sigmoid)
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-6)


def test_gated_forward_pairs_each_image_with_its_own_prompt(tiny):
    torch.manual_seed(0)
    hp = NoRGaHparams(pool_size=3, prompt_length=2, prompt_layers=[0, 2])
    m = NoRGaModel(tiny, 10, hp).eval()
    with torch.no_grad():
        m.act_scale.copy_(torch.tensor([[1.5, 0.7], [0.3, 2.0]]))
    x = torch.rand(3, 1, 28, 28)
    task = torch.tensor([2, 0, 1])
    prompt = m.prompts[task]  # (B, layers, 2, L, D), per image
    with torch.no_grad():
        got = m.prompted(x, prompt)
        prefix = {l: (prompt[:, i, 0], prompt[:, i, 1]) for i, l in enumerate([0, 2])}
        gate = {0: (1.5, 0.7, torch.sigmoid), 2: (0.3, 2.0, torch.sigmoid)}
        expected = reference_cls(tiny, x, prefix, gate)
        alone = torch.cat([m.prompted(x[b:b + 1], prompt[b:b + 1]) for b in range(3)])
        ungated = reference_cls(tiny, x, prefix)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got, alone, atol=1e-5)
    assert not torch.allclose(got, ungated, atol=1e-3)  # the gate matters


def test_act_scale_learns_at_task_0_only_and_stages_run(tiny):
    s = make_strategy("norga", tiny, epochs=1, tii_epochs=1)
    torch.nn.init.normal_(s.model.head.weight)  # so that gradient reaches the prompts at once
    bm = stream()
    before = s.model.act_scale.detach().clone()
    s.train(bm.train_stream[0])
    after0 = s.model.act_scale.detach().clone()
    assert not torch.equal(before, after0)
    assert any(p is s.model.act_scale for g in s.optimizer.param_groups for p in g["params"])
    s.train(bm.train_stream[1])
    assert torch.equal(after0, s.model.act_scale) and not s.model.act_scale.requires_grad
    assert not any(p is s.model.act_scale for g in s.optimizer.param_groups for p in g["params"])
    # HiDe's stages: statistics of every seen class in both models, tasks mapped per class
    assert s.tii_alignment.stats.classes() == s.tap.stats.classes() == [0, 1, 2, 3]
    assert s.tap.stats.covariance == "full" and s.tap.stats.n_centroids == 1
    assert s.tii_alignment.stats.covariance == "full"
    assert s.model.class_task.tolist()[:4] == [0, 0, 1, 1]


def test_vit_b16_parameter_counts():
    """Prompts + act_scale + head, the published count (the TII model aside)."""
    vit_b = meta_vit_b16()
    counts = {}
    for protocol, classes in (("cifar100-10t", 100), ("imagenet-r-10t", 200)):
        with torch.device("meta"):
            m = NoRGaModel(vit_b, classes, NoRGaHparams(**hparams("norga", protocol)))
        head = sum(p.numel() for p in m.head.parameters())
        counts[protocol] = m.prompts.numel() + m.act_scale.numel() + head
        assert m.act_scale.numel() == 10
    assert counts == {"cifar100-10t": 460_910, "imagenet-r-10t": 1_689_810}
