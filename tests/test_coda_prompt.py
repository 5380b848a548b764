"""CODA-Prompt on the tiny ViT with synthetic data: alpha = cos(q*A, K) without softmax,
Gram-Schmidt slices, earlier components bit-equal after later tasks, only the current slice
trained. What every method must do (defaults for every protocol, the stream run and batch-size
invariance, the frozen backbone, the optimizer groups, the ViT-B/16 count) is in test_methods.py."""
import pytest
import torch
import torch.nn.functional as F

from methods.coda_prompt import gram_schmidt, ortho_penalty
from helpers import make_strategy, hparams
from test_l2p import five_tasks  # the synthetic 5 x 2-class stream

torch.set_num_threads(1)


def make(tiny, **over):
    return make_strategy("coda_prompt", tiny, **over)


def slices(model, task):
    """Every tensor of task `task`'s slice, all layers, cloned."""
    return [g[task].detach().clone() for g in model._groups()]


def test_cifar_defaults_are_the_code_setting():
    hp = hparams("coda_prompt", "cifar100-10t")
    assert (hp["n_components"], hp["n_tasks"], hp["prompt_length"], hp["ortho_weight"]) == (100, 10, 8, 0.0)
    assert hp["prompt_lr_mult"] == 1.0  # one lr, as the code


def test_gram_schmidt_and_ortho_penalty():
    torch.manual_seed(0)
    old = torch.randn(6, 32)  # not orthogonal, as trained components drift
    new = gram_schmidt(torch.randn(4, 32), old)
    assert torch.allclose(new @ new.t(), torch.eye(4), atol=1e-5)
    assert (new @ old.t()).abs().max() < 1e-5
    assert ortho_penalty(new) < 1e-10 and ortho_penalty(old) > 0.1


def test_alpha_weighted_composition(tiny):
    s = make(tiny)
    model = s.model.eval()
    for t in range(1, 3):
        model.start_task(t)
    model.task_id = 2  # slices 0..2 (12 components) are in the sum
    with torch.no_grad():
        for group in model._groups():  # give the components arbitrary values
            for p in group[:3]:
                p.copy_(torch.randn_like(p))
    q = tiny.query(torch.randn(5, 1, 28, 28))
    prefix = model.prefixes(q)
    assert sorted(prefix) == [0, 1, 2, 3, 4]
    for i, layer in enumerate(model.layers):
        P = torch.cat(list(model.P[i][:3]))
        K = torch.cat(list(model.K[i][:3]))
        A = torch.cat(list(model.A[i][:3]))
        assert P.shape == (12, 8, tiny.embed_dim)
        # the paper's formula, term by term: normalise q*A_m, cosine with K_m, no softmax
        alpha = (F.normalize(q[:, None] * A[None], dim=-1) * F.normalize(K, dim=-1)[None]).sum(-1)
        assert (alpha < 0).any()  # raw cosines: no softmax, no top-k
        prompt = torch.einsum("bk,kld->bld", alpha, P)
        pk, pv = prefix[layer]
        assert pk.shape == pv.shape == (5, 4, tiny.embed_dim)
        assert torch.allclose(pk, prompt[:, :4], atol=1e-5)
        assert torch.allclose(pv, prompt[:, 4:], atol=1e-5)


def test_new_slice_orthogonal_to_earlier_ones(tiny):
    model = make(tiny).model
    with torch.no_grad():  # earlier components drift during training
        for group in model._groups():
            group[0].add_(0.3 * torch.randn_like(group[0]))
    model.start_task(1)
    for group in model._groups():
        old, new = group[0].flatten(1), group[1].flatten(1)
        assert torch.allclose(new @ new.t(), torch.eye(len(new)), atol=1e-5)
        assert (new @ old.t()).abs().max() < 1e-5
        assert [p.requires_grad for p in group] == [False, True, False, False, False]


def test_earlier_components_bit_equal_after_later_tasks(tiny):
    # weight decay and the orthogonality penalty both reach old components if they are not frozen
    s = make(tiny, epochs=1, batch_size=8, weight_decay=0.01, ortho_weight=0.1)
    bm = five_tasks(per_class=8)
    s.train(bm.train_stream[0])
    task0 = slices(s.model, 0)
    s.train(bm.train_stream[1])
    task1 = slices(s.model, 1)
    s.train(bm.train_stream[2])
    assert all(torch.equal(a, b) for a, b in zip(task0, slices(s.model, 0)))
    assert all(torch.equal(a, b) for a, b in zip(task1, slices(s.model, 1)))
    assert not any(torch.equal(a, b) for a, b in zip(task1, task0))
    # optimizer of task 2: the head and task 2's slice only
    in_opt = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    expected = {id(g[2]) for g in s.model._groups()} | {id(p) for p in s.model.head.parameters()}
    assert in_opt == expected
    # one explicit backward: grads on task 2's P, K, A and the head; none on the backbone
    s.model.train()
    s.model.zero_grad()
    x = bm.train_stream[2].dataset[0][0][None]
    (s.model(x)[:, 4:6].logsumexp(1).sum() + s.model.ortho).backward()
    for group in s.model._groups():
        assert group[2].grad is not None and group[2].grad.abs().sum() > 0
        assert all(group[j].grad is None for j in (0, 1, 3, 4))
    assert s.model.head.weight.grad.abs().sum() > 0


def test_sizes_must_fit_the_stream_and_the_vit(tiny):
    s = make(tiny, n_tasks=10, epochs=1)
    with pytest.raises(ValueError, match="n_tasks=5"):
        s.train(five_tasks(per_class=2).train_stream[0])
    with pytest.raises(ValueError, match="split evenly"):
        make(tiny, n_components=21)
    with pytest.raises(ValueError, match="embedding size"):
        make(tiny, n_components=100)  # 100 keys cannot be orthogonal in 64 dimensions

