"""OVOR (OnePrompt + virtual outlier regularization): the shared prefix forward against a
hand-written reference, the code's outlier synthesis and energy loss on fixed cases, the VOR stage
(head only, on the continuing schedule), and the published ViT-B/16 prompt count (the stream run
and batch-size invariance of every method: test_methods.py)."""
import math

import pytest
import torch

from helpers import PROTOCOLS, hparams, make_strategy, stream
from methods import registry
from methods.ovor import OnePromptModel, OVORHparams, synthesize_outliers, vor_loss
from prefix_reference import meta_vit_b16, reference_cls

torch.set_num_threads(1)


def test_defaults_cover_every_protocol():
    cls = registry.get("ovor")
    for p in PROTOCOLS:
        hp = hparams("ovor", p)
        assert (hp["g_layers"], hp["g_length"], hp["e_layers"], hp["e_length"]) == ([0, 1], 10, [2, 3, 4], 40)
        assert hp["vor_epochs"] >= 1
    for protocol, regular, vor in (("cifar100-10t", 16, 4), ("imagenet-r-10t", 40, 10)):
        hp = hparams("ovor", protocol)
        assert (hp["epochs"], hp["vor_epochs"]) == (regular, vor)
    assert (cls.passes_train, cls.passes_test) == (1, 1)
    assert cls.ABLATION[0] == ("OnePrompt", {"vor_epochs": 0}) and cls.ABLATION[-1][1] == {}


def test_forward_is_the_shared_prefix_of_the_code(tiny):
    """Layer l's prompt P_l: keys P_l[:len/2], values P_l[len/2:], the same for every image."""
    torch.manual_seed(0)
    m = OnePromptModel(tiny, 10, OVORHparams()).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        prefix = {}
        for layer, length in ((0, 10), (1, 10), (2, 40), (3, 40), (4, 40)):
            p = m.prompts[str(layer)]
            assert p.shape == (length, 64) and 0 <= p.min() and p.max() < 1
            prefix[layer] = (p[:length // 2].expand(3, -1, -1), p[length // 2:].expand(3, -1, -1))
        assert torch.allclose(m.features(x), reference_cls(tiny, x, prefix), atol=1e-5)


def test_outlier_synthesis_follows_the_code():
    """ood.py: offsets o ~ N(0, I), candidates 0.1 * o each repeated min(select, N) times, kept by
    the largest squared distance to the K-th nearest L2-normalised feature, largest first."""
    feats = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0],
                          [0.0, -4.0, 0.0]])
    out = synthesize_outliers(feats, num_points=7, knn_k=2, sample_from=4, select=3, cov=0.1,
                              generator=torch.Generator().manual_seed(5))
    offsets = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    normed = [f / math.sqrt(sum(float(v) ** 2 for v in f)) for f in feats]
    kth = []
    for o in offsets:
        c = 0.1 * o
        d2 = sorted(float(((c - n) ** 2).sum()) for n in normed)
        kth.append(d2[1])  # the 2nd nearest
    ranked = sorted(range(4), key=lambda i: -kth[i])
    expected = torch.stack([0.1 * offsets[i] for i in ranked for _ in range(3)][:7])
    assert out.shape == (7, 3)
    assert torch.allclose(out, expected)
    # fewer features than `select`: copies = N; fewer candidates than asked: all of them
    out = synthesize_outliers(feats[:2], num_points=100, knn_k=50, sample_from=4, select=3, cov=0.1,
                              generator=torch.Generator().manual_seed(5))
    assert out.shape == (8, 3)


def test_vor_loss_on_a_fixed_case():
    """lmda * (mean Huber(relu(E_id + 15)) + mean Huber(relu(-3 - E_ood))), E = -logsumexp."""
    id_logits = torch.tensor([[10.0, 9.0], [16.0, -2.0]])
    ood_logits = torch.tensor([[3.2, 1.0], [6.0, 0.0]])

    def huber(t):
        return 0.5 * t * t if abs(t) < 1 else abs(t) - 0.5

    e_id = [-math.log(math.exp(a) + math.exp(b)) for a, b in id_logits.tolist()]
    e_ood = [-math.log(math.exp(a) + math.exp(b)) for a, b in ood_logits.tolist()]
    id_term = sum(huber(max(e + 15, 0.0)) for e in e_id) / 2
    ood_term = sum(huber(max(-3 - e, 0.0)) for e in e_ood) / 2
    assert e_id[0] + 15 > 1 and 0 < -3 - e_ood[0] < 1  # both Huber branches are exercised
    got = vor_loss(id_logits, ood_logits, thres_id=-15, thres_ood=-3, lmda=0.1)
    assert got.item() == pytest.approx(0.1 * (id_term + ood_term), rel=1e-6)
    mse = vor_loss(id_logits, ood_logits, thres_id=-15, thres_ood=-3, lmda=0.1, huber=False)
    expected = 0.1 * (sum(max(e + 15, 0) ** 2 for e in e_id) / 2
                      + sum(max(-3 - e, 0) ** 2 for e in e_ood) / 2)
    assert mse.item() == pytest.approx(expected, rel=1e-6)


def test_vor_stage_trains_only_the_head_on_the_continuing_schedule(tiny):
    s = make_strategy("ovor", tiny, epochs=1, vor_epochs=1, vor_batch_size=8)
    bm = stream()
    calls = []
    original = s.vor_epoch

    def spy(v):
        prompts = {k: p.detach().clone() for k, p in s.model.prompts.items()}
        head = s.model.head.weight.detach().clone()
        original(v)
        calls.append(v)
        assert all(torch.equal(prompts[k], p) for k, p in s.model.prompts.items())
        assert not torch.equal(head, s.model.head.weight)
        # the last VOR step runs near the end of one cosine over the 2 epochs of the task
        steps = math.ceil(len(s.experience.dataset) / 8)
        position = (1 + (steps - 1) / steps) / 2
        assert s.optimizer.param_groups[0]["lr"] == pytest.approx(
            s.hp.lr * 0.5 * (1 + math.cos(math.pi * position)))

    s.vor_epoch = spy
    s.train(bm.train_stream[0])
    assert calls == [0]
    assert s._total_iters == 2 * math.ceil(len(bm.train_stream[0].dataset) / s.hp.batch_size)


def test_vit_b16_prompt_count():
    vit_b = meta_vit_b16()
    with torch.device("meta"):
        m = OnePromptModel(vit_b, 100, OVORHparams(**hparams("ovor", "cifar100-10t")))
    assert sum(p.numel() for _, p in m.added_parameters()) == 107_520
