"""L2P on the tiny ViT with synthetic data: per-sample top-N selection, key pull, what training
touches, batch-size-invariant evaluation with mixed prompt sets. What every method must do (defaults
for every protocol, the stream run, the frozen backbone, the optimizer groups, the ViT-B/16 count)
is in test_methods.py."""
import pytest
import torch

from methods.l2p import L2PModel

torch.set_num_threads(1)
from helpers import assert_batch_size_invariant, hparams, make_strategy, stream, train_and_probe


def five_tasks(per_class: int = 16):
    """The synthetic 10-class stream in 5 tasks of 2 classes (the fmnist-5t shape)."""
    return stream(n_classes=10, per_task=2, train=per_class)


def make(tiny, **over):
    return make_strategy("l2p", tiny, **over)


def test_cifar_defaults_are_the_paper_setting():
    hp = hparams("l2p", "cifar100-10t")
    assert (hp["pool_size"], hp["prompt_length"], hp["top_k"]) == (10, 5, 5)
    assert hp["prompt_lr_mult"] == 1.0  # one lr for prompts, keys and head, as the code


def test_topk_selection_is_per_sample(tiny):
    torch.manual_seed(0)
    model = L2PModel(tiny, 10, pool_size=10, prompt_length=3, top_k=3).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():  # queries of a random-init ViT are nearly parallel: aim 6 keys at them
        model.keys[:6].copy_(tiny.query(x))
    idx, sim = model.select(tiny.query(x))
    assert idx.shape == (6, 3) and sim.shape == (6, 10)
    for b in range(6):  # each row: exactly that sample's own 3 best keys
        assert set(idx[b].tolist()) == set(sim[b].argsort(descending=True)[:3].tolist())
    rows = {tuple(sorted(r)) for r in idx.tolist()}
    assert len(rows) > 1, "the keys should give different selections across samples"
    feats = model.features(x)
    assert feats.shape == (6, tiny.embed_dim)
    # a prompt chosen by sample b but not by sample a changes b's feature only
    a, b = next((a, b) for a in range(6) for b in range(6) if set(idx[b].tolist()) - set(idx[a].tolist()))
    j = (set(idx[b].tolist()) - set(idx[a].tolist())).pop()
    with torch.no_grad():
        model.prompts[j] += torch.randn_like(model.prompts[j])
        after = model.features(x)
    assert torch.allclose(after[a], feats[a], atol=1e-6)
    assert not torch.allclose(after[b], feats[b], atol=1e-4)


def test_key_pull_reaches_only_selected_keys(tiny):
    torch.manual_seed(0)
    model = L2PModel(tiny, 10, pool_size=10, prompt_length=3, top_k=2).train()
    x = torch.randn(3, 1, 28, 28)
    model.features(x)
    model.pull.backward()
    idx, _ = model.select(tiny.query(x))
    touched = set(torch.nonzero(model.keys.grad.abs().sum(1)).flatten().tolist())
    assert touched == set(idx.flatten().tolist())
    assert model.pull.item() >= 0


def test_training_touches_only_prompts_keys_and_head(tiny):
    # several steps: at the first one the zero-initialised head passes no gradient to the prompts
    # (the backbone: test_methods.py)
    s = make(tiny, epochs=1, batch_size=4)
    bm = five_tasks(per_class=8)
    before = {k: v.clone() for k, v in s.model.method_state_dict().items()}
    s.train(bm.train_stream[0])
    after = s.model.method_state_dict()
    for name in ("prompts", "keys", "head.weight"):
        assert not torch.equal(before[name], after[name]), name
    # one explicit backward: gradients on prompts, keys and head, none on the backbone
    s.model.train()
    s.model.zero_grad()
    x, y = bm.train_stream[0].dataset[0][0][None], torch.tensor([0])
    loss = torch.nn.functional.cross_entropy(s.model(x), y) + s.hp.pull_coeff * s.model.pull
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (s.model.prompts, s.model.keys, s.model.head.weight))


def test_a_batch_mixing_prompt_sets_is_batch_size_invariant(tiny):
    s = make(tiny, epochs=1, batch_size=8)
    bm = five_tasks()
    x = train_and_probe(s, bm)  # trains all tasks, checks each evaluation
    s.model.eval()
    with torch.no_grad():
        # queries of a random-init ViT are nearly parallel; aim the keys at test images so that
        # the batch mixes prompt sets
        s.model.keys.copy_(tiny.query(x[::8]))
        assert len({tuple(sorted(r)) for r in s.model.select(tiny.query(x))[0].tolist()}) > 3
    assert_batch_size_invariant(s, x, bm.test_stream)



def test_prompt_init_pytorch_or_flax(tiny):
    m = make(tiny).model
    assert m.prompts.min() < -0.5 and m.prompts.max() > 0.5  # U[-1, 1], l2p-pytorch
    m = make(tiny, prompt_init="flax").model
    for p in (m.prompts, m.keys):  # U[0, 0.01), flax's uniform() as the JAX code
        assert 0 <= p.min() and p.max() < 0.01
    with pytest.raises(ValueError, match="prompt_init"):
        make(tiny, prompt_init="normal")
