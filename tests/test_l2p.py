"""L2P on the tiny ViT with synthetic data: per-sample top-N selection, key pull, frozen backbone,
batch-size-invariant evaluation, the published ViT-B/16 parameter count."""
import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import DataAttribute, TransformGroups, make_avalanche_dataset

from methods import registry
from methods.l2p import L2PModel

torch.set_num_threads(1)
from helpers import (PROTOCOLS, added_params, assert_batch_size_invariant, hparams,
                     make_strategy, train_and_probe, vit_b16_strategy)


class Synthetic(torch.utils.data.Dataset):
    """10 classes, each a fixed random 28x28 pattern plus noise (separable, no download)."""

    def __init__(self, per_class: int, seed: int):
        patterns = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        self.targets = [c for c in range(10) for _ in range(per_class)]
        noise = torch.randn(len(self.targets), 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        self.x = patterns[self.targets] + 0.1 * noise

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def stream(per_class: int = 16):
    def wrap(d):
        return make_avalanche_dataset(d, data_attributes=[DataAttribute(d.targets, "targets")],
                                      transform_groups=TransformGroups({"train": None, "eval": None}))
    return class_incremental_benchmark({"train": wrap(Synthetic(per_class, 1)),
                                        "test": wrap(Synthetic(8, 2))},
                                       class_order=list(range(10)), num_classes_per_exp=[2] * 5)


def make(tiny, **over):
    return make_strategy("l2p", tiny, **over)


def test_defaults_cover_every_protocol():
    for p in PROTOCOLS:
        hparams("l2p", p)
    assert hparams("l2p", "cifar100-10t")["top_k"] == 5


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
    s = make(tiny, epochs=1, batch_size=4)
    bm = stream(per_class=8)
    frozen = {k: v.clone() for k, v in tiny.state_dict().items()}
    before = {k: v.clone() for k, v in s.model.method_state_dict().items()}
    s.train(bm.train_stream[0])
    assert all(torch.equal(frozen[k], v) for k, v in tiny.state_dict().items())
    assert all(p.grad is None for p in tiny.parameters())
    after = s.model.method_state_dict()
    for name in ("prompts", "keys", "head.weight"):
        assert not torch.equal(before[name], after[name]), name
    # one explicit backward: gradients on prompts, keys and head, none on the backbone
    s.model.train()
    s.model.zero_grad()
    x, y = bm.train_stream[0].dataset[0][0][None], torch.tensor([0])
    loss = torch.nn.functional.cross_entropy(s.model(x), y) + s.hp.pull_coeff * s.model.pull
    loss.backward()
    assert all(p.grad is None for p in tiny.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (s.model.prompts, s.model.keys, s.model.head.weight))


def test_stream_run_and_batch_size_invariance(tiny):
    s = make(tiny, epochs=1, batch_size=8)
    bm = stream()
    x = train_and_probe(s, bm)  # trains all tasks, checks each evaluation
    s.model.eval()
    with torch.no_grad():
        # queries of a random-init ViT are nearly parallel; aim the keys at test images so that
        # the batch mixes prompt sets
        s.model.keys.copy_(tiny.query(x[::8]))
        assert len({tuple(sorted(r)) for r in s.model.select(tiny.query(x))[0].tolist()}) > 3
    assert_batch_size_invariant(s, x, bm.test_stream)


def test_vit_b16_parameter_count():
    assert added_params(vit_b16_strategy("l2p", "cifar100-10t", 100).model) == 46_080


def test_prompt_lr_mult_splits_head_from_prompts(tiny):
    assert hparams("l2p", "cifar100-10t")["prompt_lr_mult"] == 1.0
    s = make(tiny, prompt_lr_mult=1.0)  # 1.0: one group at lr, as the code
    assert len(s.param_groups()) == 1 and "lr" not in s.param_groups()[0]
    s = make(tiny, lr=0.01, prompt_lr_mult=0.2)
    prompts, head = s.param_groups()
    assert {id(p) for p in prompts["params"]} == {id(s.model.prompts), id(s.model.keys)}
    assert {id(p) for p in head["params"]} == {id(p) for p in s.model.head.parameters()}
    assert prompts["lr"] == pytest.approx(0.002) and head["lr"] == 0.01


def test_prompt_init_pytorch_or_flax(tiny):
    m = make(tiny).model
    assert m.prompts.min() < -0.5 and m.prompts.max() > 0.5  # U[-1, 1], l2p-pytorch
    m = make(tiny, prompt_init="flax").model
    for p in (m.prompts, m.keys):  # U[0, 0.01), flax's uniform() as the JAX code
        assert 0 <= p.min() and p.max() < 0.01
    with pytest.raises(ValueError, match="prompt_init"):
        make(tiny, prompt_init="normal")
