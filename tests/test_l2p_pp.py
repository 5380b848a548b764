"""L2P++ and Deep L2P++ (CODA-Prompt's L2P): per-image top-k prefix selection and the pull loss
against a hand-written reference of the code's algorithm, which parameters each loss trains, and
the published ViT-B/16 parameter counts (the stream run and batch-size invariance of every method:
test_methods.py)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import PROTOCOLS, hparams
from methods import registry
from methods.l2p_pp import L2PPlusPlusHparams, L2PPlusPlusModel
from prefix_reference import meta_vit_b16, reference_cls

torch.set_num_threads(1)
NAMES = ("l2p_pp", "deep_l2p_pp")


def small_model(vit, **over):
    torch.manual_seed(0)
    hp = L2PPlusPlusHparams(**{**dict(pool_size=6, prompt_length=4, top_k=2, layers=[0, 2]), **over})
    return L2PPlusPlusModel(vit, 10, hp).eval()


@pytest.mark.parametrize("name", NAMES)
def test_defaults_cover_every_protocol(name):
    for p in PROTOCOLS:
        hp = hparams(name, p)
        assert (hp["pool_size"], hp["top_k"]) == (30, 5)
    assert hparams(name, "cifar100-10t")["epochs"] == 20
    assert hparams(name, "imagenet-r-10t")["epochs"] == 50
    assert hparams(name, "cifar100-10t")["prompt_length"] == 20
    layers = hparams(name, "imagenet-r-10t")["layers"]
    assert layers == ([0] if name == "l2p_pp" else [0, 1, 2, 3, 4])
    cls = registry.get(name)
    assert (cls.passes_train, cls.passes_test) == (2, 2)


def test_forward_and_pull_loss_match_the_code_algorithm(tiny):
    """For each image and layer, by hand: cosine of the normalised frozen query to the
    normalised keys, the 2 best prompts in decreasing order, each giving its first half as keys
    and its second half as values (prompt-major); the prompted forward; the pull loss per image
    and in the code's (B, B, N) form."""
    m = small_model(tiny)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        q = reference_cls(tiny, x)
        assert torch.allclose(q, tiny.query(x), atol=1e-5)  # the reference itself
        prefix, selection, pull_image, pull_batch = {}, [], 0.0, 0.0
        for i, layer in enumerate([0, 2]):
            keys, prompts = m.keys[i], m.prompts[i]
            cos = torch.tensor([[float(q[b] @ keys[j] / (q[b].norm() * keys[j].norm()))
                                 for j in range(6)] for b in range(3)])
            chosen = [sorted(range(6), key=lambda j: -cos[b, j])[:2] for b in range(3)]
            selection.append(chosen)
            pk = torch.stack([torch.cat([prompts[j][:2] for j in chosen[b]]) for b in range(3)])
            pv = torch.stack([torch.cat([prompts[j][2:] for j in chosen[b]]) for b in range(3)])
            prefix[layer] = (pk, pv)
            pull_image += sum(1 - cos[b, j] for b in range(3) for j in chosen[b])
            pull_batch += sum(1 - cos[b, j] for b in range(3) for c in range(3) for j in chosen[c])
        expected = reference_cls(tiny, x, prefix)
        got = m.features(x)
    assert m.last_selection.transpose(0, 1).tolist() == selection
    assert torch.allclose(got, expected, atol=1e-5)
    assert m.pull.item() == pytest.approx(float(pull_image), rel=1e-5)
    mb = small_model(tiny, pull_form="batch")
    with torch.no_grad():
        mb.features(x)
    assert mb.pull.item() == pytest.approx(float(pull_batch), rel=1e-5)


def test_each_loss_trains_its_own_parameters(tiny):
    """The keys learn from the pull loss alone, the prompts from the CE alone (query detached,
    top-k not differentiable)."""
    m = small_model(tiny).train()
    torch.nn.init.normal_(m.head.weight)  # from the zero init nothing behind the head gets gradient
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
    F.cross_entropy(m(x), y).backward(retain_graph=True)
    assert m.keys.grad is None or not m.keys.grad.any()
    assert m.prompts.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    m(x)
    m.pull.backward()
    assert m.prompts.grad is None or not m.prompts.grad.any()
    assert m.keys.grad.abs().sum() > 0


def test_vit_b16_parameter_counts():
    vit_b = meta_vit_b16()
    counts = {}
    for name in NAMES:
        hp = registry.get(name).Hparams(**hparams(name, "cifar100-10t"))
        with torch.device("meta"):
            model = L2PPlusPlusModel(vit_b, 100, hp)
        counts[name] = sum(p.numel() for _, p in model.added_parameters())
    assert counts == {"l2p_pp": 483_840, "deep_l2p_pp": 2_419_200}
