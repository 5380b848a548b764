"""What every registered method must do, one test each, parametrized over the registry: a method
added later (a new file in methods/) gets these checks without editing this file. Each method's
own tests (its selection rule, its stages, its losses) stay in its test file.

- its defaults cover every shipped protocol;
- it learns a synthetic 5-task stream task by task, every evaluation returns accuracies, its
  evaluation does not depend on the evaluation batch size, and the backbone stays bit-equal,
  without gradients and out of the optimizer;
- its optimizer groups hold exactly its trainable parameters (`prompt_lr_mult` splits them);
- on ViT-B/16 (built on the `meta` device: shapes only, nothing computed), the parameters it adds
  and its head, with the counts the papers publish.
"""
import pytest
import torch
import torch.nn.functional as F

from methods import backbones, registry
from methods.base import PromptStrategy
from helpers import (PROTOCOLS, added_params, assert_batch_size_invariant, hparams, make_strategy,
                     stream, train_and_probe, vit_b16_strategy)

torch.set_num_threads(1)
registry.names()
METHODS = registry.names()

#: Added parameters on ViT-B/16 as the papers count them (prompts, keys and what else the method
#: trains besides the head), per method and protocol. HiDe-Prompt's breakdown (prompts, TII
#: model) is in test_hide_prompt.py, SMoPE's with its FLOPs in test_smope.py.
PUBLISHED_PARAMS = {
    ("head_only", "cifar100-10t"): 0,
    ("joint", "cifar100-10t"): 0,
    ("l2p", "cifar100-10t"): 46_080,  # 10 x 5 x 768 prompts + 10 x 768 keys
    ("dualprompt", "cifar100-10t"): 253_440,  # G 15,360 + keys 7,680 + E 230,400
    ("dualprompt", "imagenet-r-10t"): 944_640,  # E-prompts of length 20
    ("coda_prompt", "cifar100-10t"): 3_840_000,  # 5 layers x 100 x (8 x 768 + 768 + 768)
    ("vq_prompt", "cifar100-10t"): 345_600,  # 5 layers x 10 x (8 x 768 + 768)
}


def fast(name: str) -> dict:
    """Every epoch count of the method at 1 and small minibatches: the stream test's budget."""
    hp = hparams(name, "fmnist-5t")
    over = {k: 1 for k in hp if k == "epochs" or k.endswith("_epochs")}
    return {**over, "batch_size": 8}


@pytest.mark.parametrize("name", METHODS)
def test_defaults_cover_every_protocol(name):
    for protocol in PROTOCOLS:
        assert registry.has_defaults(name, protocol), (name, protocol)
        hp = hparams(name, protocol)
        assert registry.get(name).Hparams(**hp)  # the dataclass accepts what the run resolves


@pytest.mark.parametrize("name", METHODS)
def test_stream_run_and_batch_size_invariance(tiny, name):
    """Five tasks of two classes, one epoch per stage: every evaluation returns accuracies, a
    sample's logits do not depend on the rest of its batch, evaluation at batch 1 equals the
    default batch, and the backbone is frozen: bit-equal, no gradient, never in the optimizer."""
    s = make_strategy(name, tiny, **fast(name))
    bm = stream(n_classes=10, per_task=2)
    frozen = {k: v.clone() for k, v in tiny.state_dict().items()}
    before = {k: v.clone() for k, v in s.model.method_state_dict().items()}
    x = train_and_probe(s, bm)
    assert all(torch.equal(frozen[k], v) for k, v in tiny.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())
    backbone = {id(p) for p in tiny.parameters()}
    assert not any(id(p) in backbone for g in s.optimizer.param_groups for p in g["params"])
    after = s.model.method_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned something
    assert_batch_size_invariant(s, x, bm.test_stream)
    # one explicit backward through the trained model: gradient on the head, none on the backbone
    s.model.train()
    s.model.zero_grad()
    F.cross_entropy(s.model(x[:4]), torch.arange(4) % 2).backward()
    assert all(p.grad is None for p in tiny.parameters())
    assert s.model.head.weight.grad is not None and s.model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_optimizer_groups_hold_only_trainable_parameters(tiny, name):
    """The groups hold parameters that require grad, each once, none of the backbone (a method
    may train some elsewhere: HiDe's TII model has its own stage). With the base split, they are
    exactly the trainable ones: `prompt_lr_mult` puts what the method adds at lr * mult and the
    head at lr; 1.0 is one group at lr."""
    for mult in (1.0, 0.2):
        s = make_strategy(name, tiny, lr=0.01, prompt_lr_mult=mult)
        groups = s.param_groups()
        ids = [id(p) for g in groups for p in g["params"]]
        trainable = {id(p) for p in s.model.parameters() if p.requires_grad}
        assert len(ids) == len(set(ids)) and set(ids) <= trainable
        assert not set(ids) & {id(p) for p in tiny.parameters()}
        if type(s).param_groups is not PromptStrategy.param_groups:
            continue  # the method's own split (tested in its file)
        assert set(ids) == trainable
        head = {id(p) for p in s.model.head.parameters()}
        if mult == 1.0:
            assert len(groups) == 1 and "lr" not in groups[0]
        else:
            added, head_group = groups
            assert {id(p) for p in added["params"]} == set(ids) - head
            assert {id(p) for p in head_group["params"]} == head
            assert added["lr"] == pytest.approx(0.002) and head_group["lr"] == 0.01


@pytest.mark.parametrize("name", METHODS)
def test_vit_b16_parameters_on_the_meta_device(name):
    """On ViT-B/16 (the `meta` device: no weights, no compute) with each protocol's defaults:
    the head has one row per class, nothing of the backbone is counted as the method's, and the
    counts the papers publish hold."""
    for protocol in ("cifar100-10t", "imagenet-r-10t"):
        classes = 200 if protocol.startswith("imagenet") else 100
        s = vit_b16_strategy(name, protocol, classes)
        m = s.model
        assert all(p.is_meta for p in m.vit.parameters())
        assert sum(p.numel() for p in m.head.parameters()) == 768 * classes + classes
        names = [n for n, _ in m.added_parameters()]
        assert not any(n.startswith(("vit.", "head.")) for n in names)
        if (name, protocol) in PUBLISHED_PARAMS:
            assert added_params(m) == PUBLISHED_PARAMS[(name, protocol)]


def test_published_counts_name_registered_methods():
    assert {m for m, _ in PUBLISHED_PARAMS} <= set(METHODS)
    assert backbones.get_spec("sup21k").arch["embed_dim"] == 768
