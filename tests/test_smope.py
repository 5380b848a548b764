"""SMoPE (methods/smope.py) on the tiny ViT: routing, attention paths, noise state, losses,
schedule, batch invariance; and the published cost on ViT-B/16 (meta device). What every method
must do is in test_methods.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from methods import backbones, registry
from methods.smope import SMoPE, SMoPEHparams
from helpers import hparams, vit_b16

warnings.filterwarnings("ignore", message="No loggers specified")
torch.set_num_threads(1)

E, K = 6, 2  # experts per head and kept experts in most tests (tiny ViT: 3 layers x 4 heads x 16)


def tiny():
    return backbones.load("tiny", random_init=True).vit


def strategy(**hp) -> SMoPE:
    base = dict(num_experts=E, top_k=K, epochs=2, batch_size=16, lr=0.01, ca_epochs=2,
                alpha_router=1e-3, alpha_proto=1e-3)
    vit = tiny()
    torch.manual_seed(0)
    return registry.create("smope", vit=vit, num_classes=6, hparams={**base, **hp},
                           eval_mb_size=64)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def with_flags(m, seed: int = 0):
    """Pretend some tasks have run: random counts (some zero) and sticky flags from them."""
    g = torch.Generator().manual_seed(seed)
    m.counts.copy_(torch.randint(0, 5, m.counts.shape, generator=g))
    m.start_task()
    assert m.frequent.any() and not m.frequent.all()
    return m


# ---------------------------------------------------------------- routing and attention
@pytest.mark.parametrize("training", [False, True])
def test_exactly_k_experts_get_weight_and_the_rest_exactly_zero(training):
    s = strategy(attn_impl="reference", exclude_unused=True)
    m = with_flags(s.model)
    m.train(training)
    m.record_attention = True
    with torch.no_grad():
        m(images(5))
    assert sorted(m.attention_weights) == m.layers == [0, 1, 2]
    for i, layer in enumerate(m.layers):
        w = m.attention_weights[layer]  # (B, H, N, E)
        assert w.shape == (5, 4, 50, E)
        nonzero = w > 0
        assert (nonzero.sum(-1) == K).all()  # K per image, layer, head and token ...
        assert (nonzero == nonzero[:, :, :1]).all()  # ... the same K for every token of the image
        chosen = torch.zeros(5, 4, E, dtype=torch.bool).scatter_(-1, m.routing[i].selected[:, :, 0], True)
        assert torch.equal(nonzero[:, :, 0], chosen)
        assert (w[~nonzero] == 0).all()


@pytest.mark.parametrize("mode", ["sparse-eval", "sparse-train", "dense", "per-token", "per-token-dense"])
def test_fused_path_equals_reference_path(mode):
    hp = dict(aggregate=not mode.startswith("per-token"), sparse=not mode.endswith("dense"))
    x = images(4)
    readout = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for impl in ("fused", "reference"):
        s = strategy(attn_impl=impl, **hp)
        m = with_flags(s.model)
        m.train(mode != "sparse-eval")
        m.dense = mode == "dense"
        feats = m.features(x)
        # a random readout (the squared norm of a LayerNorm output would have ~zero gradient)
        (feats @ readout).logsumexp(-1).mean().backward()
        outs.append(feats.detach())
        grads.append(torch.cat([m.key.grad.flatten(), m.value.grad.flatten()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert grads[1].norm() > 1e-3
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[1].norm() + 1e-7


def test_routing_of_a_sample_ignores_the_rest_of_its_batch():
    for training in (True, False):  # training: the noise penalty; eval: the F = 0 exclusion
        m = with_flags(strategy(exclude_unused=True).model)
        m.train(training)
        x = images(6)
        with torch.no_grad():
            batch = m(x)
            sel = [r.selected for r in m.routing]
            for b in range(6):
                alone = m(x[b:b + 1])
                assert torch.allclose(alone, batch[b:b + 1], atol=1e-5)
                for i, r in enumerate(m.routing):
                    assert torch.equal(r.selected[0], sel[i][b])


def test_k_equal_to_n_experts_is_dense_prefix_attention_with_row_expanded_logits():
    s = strategy(top_k=E, noise=False)
    m = with_flags(s.model)
    m.train()
    x = images(3)
    vit = m.vit

    def dense(i):  # from docs/sources.md#smope-routing-and-attention, not from the module
        def fn(q, k, v):
            tau = q.shape[-1] ** -0.5
            s_ = q.mean(2, keepdim=True) @ m.key[i].transpose(-1, -2)  # (B, H, 1, E)
            logits = torch.cat([(tau * s_).expand(-1, -1, q.shape[2], -1),
                                tau * q @ k.transpose(-1, -2)], -1).softmax(-1)
            return logits[..., :E] @ m.value[i] + logits[..., E:] @ v
        return fn

    expected = vit(x, attention={layer: dense(i) for i, layer in enumerate(m.layers)})
    with torch.no_grad():
        assert torch.allclose(m.features(x), expected, atol=1e-5)
        m.dense = True  # the warm-up path: no selection at all
        assert torch.allclose(m.features(x), expected, atol=1e-5)


def test_without_aggregation_and_selection_it_is_plain_prefix_tuning():
    """The ablation's "one prompt" rung is ordinary prefix attention over the N_p prefix tokens."""
    m = strategy(aggregate=False, sparse=False).model
    x = images(3)
    prefix = {}
    for i, layer in enumerate(m.layers):  # (H, E, hd) -> (E, H * hd), the layout PromptedViT splits
        prefix[layer] = tuple(p[i].transpose(0, 1).reshape(E, -1) for p in (m.key, m.value))
    with torch.no_grad():
        assert torch.allclose(m.features(x), m.vit(x, prefix=prefix), atol=1e-5)


def test_noise_penalty_is_selection_only_and_training_only():
    m = strategy(eps=10.0).model  # eps * range > range: a flagged expert ranks below all others
    x = images(4)
    with torch.no_grad():
        m.eval()
        m(x)  # flag, per layer and head, exactly the experts that sample 0 picks without noise
        for i, r in enumerate(m.routing):
            m.frequent[i] = torch.zeros(4, E, dtype=torch.bool).scatter_(-1, r.selected[0, :, 0], True)
        m.train()
        feats = m.features(x)
        for i, r in enumerate(m.routing):
            picked = m.frequent[i].unsqueeze(0).expand(4, -1, -1).gather(-1, r.selected[:, :, 0])
            assert not picked.any()  # E - K >= K unflagged experts: no flagged one is kept
            if i == 0:
                assert not torch.equal(r.scores.topk(K, -1).indices, r.selected)
        before = m.counts.clone()
        m.count_selection()  # counting uses the raw top-K, never the penalised selection
        for i, r in enumerate(m.routing):
            raw = torch.zeros(4, 4, E, dtype=torch.long).scatter_(-1, r.scores.topk(K, -1).indices[:, :, 0], 1)
            assert torch.equal(m.counts[i] - before[i], raw.sum(0))
        m.eval()  # no penalty at test (exclude_unused is off by default): the raw top-K
        assert not torch.allclose(m.features(x), feats)
        for r in m.routing:
            assert torch.equal(r.scores.topk(K, -1).indices, r.selected)


@pytest.mark.parametrize("rule,expected", [("code", [1, 0, 0, 0, 1, 0]), ("paper", [1, 0, 0, 1, 1, 0])])
def test_frequent_threshold_rules(rule, expected):
    m = strategy(noise_threshold=rule).model
    m.counts.zero_()
    m.counts[0, 0] = torch.tensor([6, 0, 2, 4, 6, 0])  # sum 18: code mean 18/4 = 4.5, paper 18/6 = 3
    m.start_task()
    assert m.frequent[0, 0].long().tolist() == expected
    assert not m.frequent[1:].any() and not m.frequent[0, 1:].any()  # nothing counted: no flags
    m.counts[0, 0] = torch.tensor([0, 0, 0, 0, 0, 100])
    m.start_task()
    assert m.frequent[0, 0, 5] and m.frequent[0, 0, 0] == bool(expected[0])  # sticky


def test_counts_flags_and_snapshot_survive_a_state_dict_round_trip():
    m = with_flags(strategy().model)
    with torch.no_grad():
        m.key.add_(1.0)  # keys move after the snapshot
    state = m.method_state_dict()
    assert {"counts", "frequent", "old_key", "key", "value"} <= set(state)
    fresh = strategy().model
    fresh.load_method_state_dict(state)
    for name in ("counts", "frequent", "old_key", "key", "value"):
        assert torch.equal(getattr(fresh, name), getattr(m, name)), name
    assert not torch.equal(fresh.old_key, fresh.key)


# ---------------------------------------------------------------- losses
def test_prototype_targets_are_the_current_routing_of_unmoved_keys():
    m = with_flags(strategy().model)
    logits, targets, used = m.prototype_routing()
    assert targets.shape == (3, 4, E, K) and used.dtype == torch.bool
    current = logits.topk(K, -1).indices
    assert torch.equal(targets.sort(-1).values, current.sort(-1).values)
    # after the keys move, targets stay those of the snapshot, logits follow the current keys
    with torch.no_grad():
        m.key.add_(torch.randn_like(m.key))
    logits2, targets2, _ = m.prototype_routing()
    assert torch.equal(targets2, targets) and not torch.allclose(logits2, logits)
    m.proto_loss().backward()
    assert m.key.grad.abs().sum() > 0 and m.value.grad is None


def test_losses_match_a_per_head_loop_as_in_the_code():
    s = strategy(eps=0.4)
    m = with_flags(s.model)
    m.train()
    m(images(5))
    expected = 0.0
    for r in m.routing:  # the code: for each head and each selected rank, CE over the batch
        s_ = r.scores[:, :, 0]
        spread = (s_.max(-1, keepdim=True).values - s_.min(-1, keepdim=True).values).detach()
        for h in range(4):
            idx = r.selected[:, h, 0]
            not_sel = torch.ones(5, E).scatter_(-1, idx, 0.0)
            z = s_[:, h] + 0.4 * not_sel * spread[:, h]
            expected += sum(F.cross_entropy(z, idx[:, t]) for t in range(K))
    assert torch.allclose(m.router_loss(), expected, rtol=1e-5)
    expected = 0.0
    for i in range(3):
        for h in range(4):
            p = m.old_key[i, h][m.frequent[i, h]]
            tgt = (p @ m.old_key[i, h].T).topk(K, -1).indices
            expected += sum(F.cross_entropy(p @ m.key[i, h].T, tgt[:, t]) for t in range(K))
    assert torch.allclose(m.proto_loss(), expected, rtol=1e-5)


# ---------------------------------------------------------------- the strategy on a stream
class Synth(Dataset):
    def __init__(self, classes, n, seed):
        g = torch.Generator().manual_seed(seed)
        proto = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(123))
        self.targets = [c for c in classes for _ in range(n)]
        self.x = torch.stack([proto[c] + 0.3 * torch.randn(1, 28, 28, generator=g) for c in self.targets])

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def stream(tasks=3, n_train=16, n_test=8):
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import DataAttribute, TransformGroups, make_avalanche_dataset

    def wrap(d):
        return make_avalanche_dataset(d, data_attributes=[DataAttribute(d.targets, "targets")],
                                      transform_groups=TransformGroups({"train": None, "eval": None}))
    classes = list(range(2 * tasks))
    return class_incremental_benchmark(
        {"train": wrap(Synth(classes, n_train, 0)), "test": wrap(Synth(classes, n_test, 1))},
        class_order=classes, num_classes_per_exp=[2] * tasks)


def test_schedule_counts_flags_alignment_and_batch_size_invariant_evaluation():
    bm = stream()
    s = strategy(epochs=2)
    m = s.model
    phases = []  # (dense?, router loss present?, optimizer id) per training iteration
    aux = s.aux_loss

    def spy():
        loss = aux()
        phases.append((m.dense, any(r.selected is not None for r in m.routing), id(s.optimizer)))
        return loss
    s.aux_loss = spy

    s.train(bm.train_stream[0])
    # task 0: int(0.5 * 2) = 1 dense epoch (2 iterations of 16), then 2 sparse epochs, new optimizer
    assert [p[:2] for p in phases] == [(True, False)] * 2 + [(False, True)] * 4
    assert phases[0][2] != phases[-1][2]
    # counting pass: every training image adds K per layer and head (raw top-K)
    assert (m.counts.sum(-1) == 32 * K).all()
    counts0 = m.counts.clone()
    head0 = m.head.weight.detach().clone()

    phases.clear()
    s.train(bm.train_stream[1])
    assert [p[0] for p in phases] == [False] * 4  # later tasks: sparse only
    mean = counts0.sum(-1, keepdim=True) / (counts0 > 0).sum(-1, keepdim=True)
    assert torch.equal(m.frequent, counts0 >= mean)
    assert (m.counts.sum(-1) == 64 * K).all()
    assert sorted(s.alignment.stats.classes()) == [0, 1, 2, 3]
    assert not torch.equal(m.head.weight[:2], head0[:2])  # alignment re-fit old-class rows too

    accs = []
    for mb in (1, 5, 64):
        s.eval_mb_size = mb
        res = s.eval(bm.test_stream[:2])
        accs.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] for j in range(2)])
    assert accs[0] == accs[1] == accs[2]
    m.eval()
    x = torch.stack([bm.test_stream[1].dataset[i][0] for i in range(16)])
    with torch.no_grad():
        whole = m(x)
        parts = torch.cat([m(x[i:i + 3]) for i in range(0, 16, 3)])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_ablation_ladder_is_cumulative_and_valid():
    ABLATION = SMoPE.ABLATION
    labels = [label for label, _ in ABLATION]
    assert labels[0] == "one prompt" and labels[-1].startswith("+ prototype loss")
    assert len(labels) == 8 and ABLATION[-1][1] == {}
    off = [set(o) for _, o in ABLATION]
    assert all(off[i + 1] < off[i] and len(off[i]) - len(off[i + 1]) == 1 for i in range(7))
    assert off[0] == {"aggregate", "sparse", "noise", "alignment", "dense_warmup", "router_loss",
                      "proto_loss"}
    for _, overrides in ABLATION:
        assert all(v is False for v in overrides.values())
        hparams("smope", "fmnist-5t", overrides)  # every key is a valid hparam


def test_defaults_are_the_code_settings():
    hp = hparams("smope", "imagenet-r-10t")
    assert (hp["num_experts"], hp["top_k"], hp["eps"], hp["alpha_router"], hp["alpha_proto"]) == \
        (25, 5, 0.5, 5e-5, 1e-4)


# ---------------------------------------------------------------- ViT-B/16: the published cost
def test_vit_b16_parameters_passes_and_flops():
    vit = vit_b16()  # meta device: shapes only; FLOPs are counted from shapes too
    s = registry.create("smope", vit=vit, num_classes=200,
                        hparams=hparams("smope", "imagenet-r-10t"))
    m = s.model
    assert m.layers == [0, 1, 2, 3, 4, 5]
    assert sum(p.numel() for _, p in m.added_parameters()) == 230_400  # 6 x 25 x 12 x 64 x 2
    assert sum(p.numel() for p in m.head.parameters()) == 153_800  # 0.38M in total, as the poster
    assert SMoPE.passes_train == SMoPE.passes_test == 1
    from protocols import cost

    ours = cost.cost_row("smope", vit, 100, hparams("smope", "cifar100-10t"), device="meta")
    l2p = cost.cost_row("l2p", vit, 100, hparams("l2p", "cifar100-10t"), device="meta")
    assert ours["trainable_params"] == 230_400 and ours["passes_test"] == 1
    assert ours["gflops_test"] <= 0.52 * l2p["gflops_test"]


# ---------------------------------------------------------------- the counting pass's routing
def raw_topk_histogram(m) -> torch.Tensor:
    """(L, H, E) how often each expert is in an image's raw top-K in the last forward."""
    out = torch.zeros_like(m.counts)
    for i, r in enumerate(m.routing):
        top = r.scores.topk(K, dim=-1).indices  # (B, H, 1, K)
        for h in range(top.shape[1]):
            out[i, h] += torch.bincount(top[:, h].flatten(), minlength=E)
    return out


def test_official_counting_leaves_out_never_used_experts_where_suite_counting_does_not():
    """A hand-made case: layer 0's raw favourite of image 0 in head 0 has never been used. The
    code's counting forward (`count_rule="official"`) routes around it with the 2 * range penalty;
    the suite's default counting keeps it. Both count the raw top-K."""
    x = images(4)
    selected, counted = {}, {}
    for rule in ("suite", "official"):
        s = strategy(count_rule=rule)
        m = s.model.eval()
        with torch.no_grad():
            m(x)
        favourite = int(m.routing[0].scores[0, 0, 0].argmax())
        m.counts.fill_(1)
        m.counts[0, 0, favourite] = 0
        m.counting = True
        with torch.no_grad():
            m(x)
        r = m.routing[0]
        s_ = r.scores.detach()
        spread = s_.amax(-1, keepdim=True) - s_.amin(-1, keepdim=True)
        coef = 2.0 * (m.counts[0] == 0).float() if rule == "official" else torch.zeros(4, E)
        expected = (s_ - coef[None, :, None, :] * spread).topk(K, dim=-1).indices
        assert torch.equal(r.selected, expected)
        selected[rule] = favourite in r.selected[0, 0, 0].tolist()
        counted[rule] = raw_topk_histogram(m)[0]
    assert selected == {"suite": True, "official": False}
    assert torch.equal(counted["suite"], counted["official"])  # layer 0's raw top-K is the same


def test_official_counting_pass_equals_the_code_loop_batch_by_batch():
    """The code's loop (learners/prompt.py:408-419 with models/zoo.py:170-171, 215-228): per
    batch, route with the penalty on the experts whose count is still 0, then add the raw top-K
    to the counts; the next batch sees the new counts. Hand-made start: every head's favourite
    expert has never been used, every other expert once."""
    bm = stream(tasks=1, n_train=24)  # 48 images, 6 batches of 8
    s = strategy(count_rule="official", batch_size=8)
    s.experience = bm.train_stream[0]
    m = s.model.eval()
    batches = [x for x, _ in s.loader(s.experience.dataset, train_transform=True, batch_size=8)]
    with torch.no_grad():
        m(batches[0])
    start = torch.ones_like(m.counts)
    for i, r in enumerate(m.routing):
        start[i, torch.arange(start.shape[1]), r.scores[:, :, 0].mean(0).argmax(-1)] = 0

    def code_loop(per_batch: bool) -> torch.Tensor:
        counts = start.clone()
        rule = counts if per_batch else start.clone()  # the counts the penalty reads
        m.penalty = lambda i: 2.0 * (rule[i] == 0).float()
        for x in batches:
            with torch.no_grad():
                m(x)
            counts += raw_topk_histogram(m)
        del m.penalty  # back to the class's method
        return counts

    reference, frozen = code_loop(per_batch=True), code_loop(per_batch=False)
    assert not torch.equal(reference, frozen)  # the case tells batch-by-batch from frozen counts
    m.counts.copy_(start)
    s.training_pass(count=True)
    assert torch.equal(m.counts, reference) and not m.counting
    assert torch.equal(m.counts.sum(-1), start.sum(-1) + 48 * K)


def test_count_rule_passes_and_run_keys():
    suite, official = SMoPEHparams(), SMoPEHparams(count_rule="official")
    assert SMoPE.task_stages(suite, 1).no_grad_passes == 1  # counting shares the statistics pass
    assert SMoPE.task_stages(official, 1).no_grad_passes == 2  # its own pass first
    with pytest.raises(ValueError, match="count_rule"):
        SMoPEHparams(count_rule="paper")
    # at its default the field is left out of the resolved spec, so no published key changes
    assert "count_rule" not in hparams("smope", "fmnist-5t")
    assert hparams("smope", "fmnist-5t", {"count_rule": "official"})["count_rule"] == "official"


def test_every_published_smope_key_is_what_this_code_resolves():
    import json
    from pathlib import Path

    from protocols.runner import spec_key
    from protocols.sweep import SweepRequest, plan

    path = Path(__file__).resolve().parent.parent / "leaderboard" / "records" / "fmnist-5t__tiny.jsonl"
    published = {r["key"] for r in map(json.loads, path.read_text().splitlines())
                 if r["method"] == "smope"}
    assert len(published) >= 60
    planned = {spec_key(s) for s in plan(SweepRequest(methods=["smope"], ablations=["all"], seeds=5))}
    assert published <= planned
