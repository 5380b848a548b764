"""The reference codes' batch-dependent behaviours as labelled modes (methods/reference_modes.py):
the batch vote and the prefix mixing give, for a fixed batch, what the reference algorithm gives
(expected values written by hand or rebuilt in the reference's own tensor layout); at batch size 1
every mode is the per-sample evaluation; without a mode nothing depends on the batch; the training
variants are off by default, keep the published run keys, and at batch 1 train as the plain
methods."""
import json
from pathlib import Path

import pytest
import torch

from methods import registry
from methods.l2p import L2PModel
from methods.reference_modes import batch_vote, majority_vote, mix_prefix_halves
from protocols.runner import spec_key
from protocols.sweep import SweepRequest, plan

from helpers import PROTOCOLS, assert_batch_size_invariant, hparams, make_strategy, stream

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
AFFECTED = {"l2p": ("batch_vote",), "dualprompt": ("batch_vote", "prefix_mixing"),
            "hide_prompt": ("prefix_mixing", "batch_vote")}
TRAINING_VARIANT = {"l2p": {"batch_vote": 1}, "dualprompt": {"prefix_mixing": True},
                    "hide_prompt": {"prefix_mixing": True}}


# ---------------------------------------------------------------------------- the vote, by hand
def test_vote_counts_every_chosen_id_and_keeps_the_most_voted_in_count_order():
    # 4 images, top-3 ids each, pool of 10: id 2 has 4 votes, id 1 three, id 7 two, ids 3/4/5 one
    idx = torch.tensor([[2, 1, 7], [2, 1, 7], [2, 1, 3], [2, 4, 5]])
    assert majority_vote(idx, pool_size=10, top_k=3).tolist() == [2, 1, 7]
    assert batch_vote(idx, pool_size=10, top_k=3).tolist() == [[2, 1, 7]] * 4
    # consecutive groups vote apart (the reference votes over its per-device batch): id 1 has
    # three votes in the first three images, id 5 two in the last two
    idx = torch.tensor([[1, 2], [1, 3], [1, 4], [5, 6], [5, 7]])
    assert batch_vote(idx, pool_size=10, top_k=1).flatten().tolist() == [1] * 5
    assert batch_vote(idx, pool_size=10, top_k=1, group=3).flatten().tolist() == [1] * 3 + [5] * 2
    top1 = torch.tensor([[4], [0], [4], [3], [0], [0]])  # DualPrompt / HiDe: one id per image
    assert batch_vote(top1, pool_size=5, top_k=1).flatten().tolist() == [0] * 6
    assert batch_vote(top1, pool_size=5, top_k=1, group=4).flatten().tolist() == [4] * 4 + [0] * 2


def test_vote_ties_are_resolved_by_topk_over_the_padded_counts():
    # ids 1 and 3 both have two votes. The reference pads the ascending unique ids [0, 1, 3] with
    # the smallest voted id and their counts [1, 2, 2] with zeros up to the pool size (5), then
    # takes torch.topk of that count vector: the winner is whichever tied position torch.topk
    # returns for [1, 2, 2, 0, 0] on this device (not necessarily the lowest id).
    idx = torch.tensor([[3], [1], [3], [1], [0]])
    padded_ids = torch.tensor([0, 1, 3, 0, 0])
    padded_counts = torch.tensor([1, 2, 2, 0, 0])
    expected = padded_ids[torch.topk(padded_counts, k=1).indices]
    assert expected.item() in (1, 3)
    assert torch.equal(majority_vote(idx, pool_size=5, top_k=1), expected)
    # ids 2 and 5 both have four votes, pool of 10: torch.topk sees the padded vector
    # [4, 4, 0, ..., 0], whose tied winner on CPU is not the one of [4, 4] (so the padding matters)
    idx = torch.tensor([[2], [5]] * 4)
    padded_ids = torch.tensor([2, 5] + [2] * 8)
    padded_counts = torch.tensor([4, 4] + [0] * 8)
    expected = padded_ids[torch.topk(padded_counts, k=1).indices]
    assert torch.equal(majority_vote(idx, pool_size=10, top_k=1), expected)


def test_a_vote_of_one_image_keeps_its_own_ids():
    idx = torch.tensor([[6, 2, 9, 0, 4]])
    voted = majority_vote(idx, pool_size=10, top_k=5)
    assert sorted(voted.tolist()) == [0, 2, 4, 6, 9]


# ---------------------------------------------------------------------------- the mixing, by hand
def test_prefix_mixing_gives_each_image_the_halves_the_reference_reshape_gives_it():
    # image b's own halves hold 10 * b + d (d = 0 key, 1 value); image b gets slot d from
    # (half, image) = divmod(2b + d, B)
    kv = torch.tensor([[10.0 * b + d for d in (0, 1)] for b in range(3)])[..., None]
    assert mix_prefix_halves(kv)[..., 0].tolist() == [[0, 10], [20, 1], [11, 21]]
    kv = torch.tensor([[10.0 * b + d for d in (0, 1)] for b in range(4)])[..., None]
    assert mix_prefix_halves(kv)[..., 0].tolist() == [[0, 10], [20, 30], [1, 11], [21, 31]]
    assert torch.equal(mix_prefix_halves(kv[:1]), kv[:1])  # batch 1: unchanged


def test_prefix_mixing_matches_the_reference_layout_element_for_element():
    # the reference gathers (layers, key/value, batch, top_k, length, heads, head_dim) and calls
    # .reshape(layers, batch, key/value, top_k * length, heads, head_dim) on it
    layers, b, top_k, length, heads, hd = 3, 5, 1, 4, 2, 3
    pool = torch.randn(layers, 2, 7, length, heads, hd, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[6], [0], [3], [3], [5]])
    raw = pool[:, :, idx]
    assert raw.shape == (layers, 2, b, top_k, length, heads, hd)
    reference = raw.reshape(layers, b, 2, top_k * length, heads, hd)
    for layer in range(layers):  # the suite's per-image (B, 2, L, D) layout of the same prompts
        own = pool[layer, :, idx[:, 0]].transpose(0, 1).reshape(b, 2, length, heads * hd)
        assert torch.equal(mix_prefix_halves(own), reference[layer].reshape(b, 2, length, heads * hd))


# ---------------------------------------------------------------------------- the methods
def test_modes_are_declared_with_their_sources_and_reference_tests():
    for name, modes in AFFECTED.items():
        assert sorted(registry.get(name).REFERENCE_MODES) == sorted(modes), name
    for name in ("coda_prompt", "vq_prompt", "smope", "head_only", "joint"):  # per sample in their code
        assert registry.get(name).REFERENCE_MODES == {}, name
    for name in registry.names():
        cls = registry.get(name)
        for mode, text in cls.REFERENCE_MODES.items():
            assert ".py:" in text, (name, mode)  # file:line of the public code
        for protocol, test in cls.REFERENCE_TESTS.items():
            assert set(test.modes) <= set(cls.REFERENCE_MODES) and test.batch_size > 0
            assert ".py:" in test.source
        if name in AFFECTED:
            assert set(cls.REFERENCE_TESTS) == set(PROTOCOLS), name


def test_reference_mode_is_checked_scoped_and_never_reaches_training(tiny):
    s = make_strategy("dualprompt", tiny)
    with pytest.raises(ValueError, match="prefix_mixing"):
        with s.reference_mode("batch_votes"):
            pass
    with pytest.raises(ValueError, match="per sample"):
        with make_strategy("coda_prompt", tiny).reference_mode("batch_vote"):
            pass
    with s.reference_mode("prefix_mixing"):
        s.model.eval()
        assert s.model.in_reference_mode("prefix_mixing")
        s.model.train()
        assert not s.model.in_reference_mode("prefix_mixing")
    s.model.eval()
    assert not s.model.in_reference_mode("prefix_mixing")


def test_l2p_vote_mode_gives_every_image_the_voted_prompts(tiny):
    torch.manual_seed(0)
    model = L2PModel(tiny, 10, pool_size=10, prompt_length=3, top_k=3).eval()
    x = torch.randn(6, 1, 28, 28)
    q = tiny.query(x)
    with torch.no_grad():
        model.keys.copy_(torch.cat([q, torch.randn(4, q.shape[1])]))  # images choose apart
        own, _ = model.select(q)
        assert len({tuple(r) for r in own.tolist()}) > 1
        model.reference_modes = frozenset({"batch_vote"})
        voted, _ = model.select(q)
        assert voted.tolist() == [majority_vote(own, 10, 3).tolist()] * 6
        prompts = model.prompts[voted].reshape(6, -1, tiny.embed_dim)
        expected = tiny.forward_features(x, prompt_tokens=prompts)[:, 1:1 + prompts.shape[1]].mean(1)
        assert torch.allclose(model.features(x), expected, atol=1e-6)


def test_dualprompt_modes_follow_the_reference_per_layer(tiny):
    s = make_strategy("dualprompt", tiny)
    m = s.model.eval()
    m.task_id = 4
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        m.e_key.copy_(tiny.query(x))  # image b's own E-prompt is b
        own = m.select(tiny.query(x))
        assert own.tolist() == [0, 1, 2, 3, 4]
        with s.reference_mode("prefix_mixing"):
            prefix = m.prefixes(m.select(tiny.query(x)))
        for i, layer in enumerate(m.e_layers):
            for b in range(5):
                for d in (0, 1):
                    half, image = divmod(2 * b + d, 5)
                    assert torch.equal(prefix[layer][d][b], m.e_prompt[i, image, half])
        for layer in m.g_layers:  # the G-prompt is never mixed (gathered per image in the code)
            assert torch.equal(prefix[layer][0], m.g_prompt[m.g_layers.index(layer), 0])
        with s.reference_mode("batch_vote"):
            voted = m.select(tiny.query(x[[0, 3, 3, 1, 3]]))
        assert voted.tolist() == [3] * 5


def test_hide_modes_follow_the_reference(tiny):
    s = make_strategy("hide_prompt", tiny)
    m = s.model.eval()
    x = torch.randn(4, 1, 28, 28)
    task = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        mixed = m.prompted(x, m.prompts[task], mixing=True)
        prefix = {}
        for i, layer in enumerate(m.layers):  # the reference: (key/value, batch) read as (batch, key/value)
            raw = m.prompts[task][:, i].transpose(0, 1).contiguous()  # (2, B, L, D)
            flat = raw.reshape(4, 2, *raw.shape[2:])
            prefix[layer] = (flat[:, 0], flat[:, 1])
        assert torch.allclose(mixed, tiny(x, prefix=prefix), atol=1e-6)
        m.class_task[:] = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
        with s.reference_mode("batch_vote"):
            voted = m.predict_task(x)
        assert len(set(voted.tolist())) == 1 and voted[0] in m.predict_task(x)


@pytest.fixture(scope="module")
def trained(tiny):
    """Each affected method trained on a 3-task stream, its keys aimed at test images so that one
    batch mixes prompt choices, and a test batch holding every task."""
    out = {}
    bm = stream(n_classes=6, per_task=2, train=16, test=8)
    for name in AFFECTED:
        s = make_strategy(name, tiny, epochs=1, batch_size=8,
                          **({"tii_epochs": 3} if name == "hide_prompt" else {}))
        for exp in bm.train_stream:
            s.train(exp)
        x = torch.stack([bm.test_stream[j].dataset[k][0] for j in range(3) for k in range(8)])
        with torch.no_grad():
            if name == "l2p":
                s.model.keys[:6].copy_(tiny.query(x[::4]))
            elif name == "dualprompt":
                s.model.e_key[:3].copy_(tiny.query(x[::8]))
        out[name] = (s, x, bm)
    return out


@pytest.mark.parametrize("name", list(AFFECTED))
def test_at_batch_size_one_every_mode_is_the_per_sample_evaluation(trained, name):
    s, x, bm = trained[name]
    s.model.eval()
    s.eval_mb_size = 1
    per_sample = s.eval(bm.test_stream)
    with torch.no_grad():
        own = torch.cat([s.model(x[i:i + 1]) for i in range(len(x))])
    for modes in [(m,) for m in AFFECTED[name]] + [AFFECTED[name]]:
        with s.reference_mode(*modes):
            assert s.eval(bm.test_stream) == per_sample, modes
            with torch.no_grad():
                alone = torch.cat([s.model(x[i:i + 1]) for i in range(len(x))])
        if name == "l2p":
            # the vote lists an image's own N prompts by count (ties: torch.topk's order), not by
            # similarity; the head reads their mean, so only the summation order differs
            assert torch.equal(alone.argmax(1), own.argmax(1))
            assert torch.allclose(alone, own, atol=1e-6, rtol=0)
        else:
            assert torch.equal(alone, own), modes
    s.eval_mb_size = 64


@pytest.mark.parametrize("name", list(AFFECTED))
def test_without_a_mode_nothing_depends_on_the_batch_and_a_mode_does(trained, name):
    s, x, bm = trained[name]
    assert_batch_size_invariant(s, x, bm.test_stream)
    s.model.eval()
    with torch.no_grad():
        own = s.model(x)
        for mode in AFFECTED[name]:
            with s.reference_mode(mode):
                batch = s.model(x)
            assert not torch.allclose(batch, own, atol=1e-4), mode
    s.eval_mb_size = 64


# ---------------------------------------------------------------------------- training variants
@pytest.mark.parametrize("name", list(AFFECTED))
def test_training_variant_at_batch_one_trains_as_the_plain_method(tiny, name):
    bm = stream(n_classes=4, per_task=2, train=4, test=2)
    states = []
    hide = {"tii_epochs": 1, "tii_batch_size": 1} if name == "hide_prompt" else {}
    for variant in ({}, TRAINING_VARIANT[name]):
        s = make_strategy(name, tiny, epochs=1, batch_size=1, **variant, **hide)
        s.eval_mb_size = 1  # the plain statistics pass batches by it, the variant by batch_size
        for exp in bm.train_stream:
            s.train(exp)
        states.append(s.model.method_state_dict())
    plain, variant = states
    for k in plain:
        if name == "l2p":  # a vote of one image reorders its prompts (see above): summation order
            assert torch.allclose(plain[k], variant[k], atol=1e-5, rtol=1e-5), k
        else:
            assert torch.equal(plain[k], variant[k]), k


@pytest.mark.parametrize("name", list(AFFECTED))
def test_training_variant_changes_the_training_forward_only(tiny, name):
    plain = make_strategy(name, tiny)
    variant = make_strategy(name, tiny, **({"batch_vote": 4} if name == "l2p" else TRAINING_VARIANT[name]))
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        if name == "l2p":  # images choose apart
            plain.model.keys.copy_(torch.cat([tiny.query(x), torch.randn(2, tiny.embed_dim)]))
        variant.model.load_state_dict(plain.model.state_dict())
        outputs = {}
        for training in (True, False):
            for s in (plain, variant):
                s.model.task_id = 0
                s.model.train(training)
            outputs[training] = plain.model.features(x), variant.model.features(x)  # head is 0
    assert not torch.allclose(*outputs[True], atol=1e-5)  # the training forward as the code
    assert torch.equal(*outputs[False])  # evaluation stays per sample


def test_training_variants_are_off_by_default_and_keep_the_published_run_keys():
    """Every published record's key is still the key its run spec resolves to (added_hparam keeps
    the new hyperparameters out of the resolved spec at their defaults)."""
    for name, variant in TRAINING_VARIANT.items():
        for protocol in PROTOCOLS:
            assert not set(variant) & set(hparams(name, protocol)), (name, protocol)
        assert set(variant) <= set(hparams(name, "fmnist-5t", variant))
    records = [json.loads(line) for line in
               (ROOT / "leaderboard" / "records" / "fmnist-5t__tiny.jsonl").read_text().splitlines()]
    assert records
    request = SweepRequest(protocols=("fmnist-5t",), methods=sorted({r["method"] for r in records}),
                           ablations=("all",), seeds=5)
    planned = {(s.method, s.display_label, s.table, s.seed): spec_key(s) for s in plan(request)}
    for r in records:
        assert planned[(r["method"], r["label"], r["table"], r["seed"])] == r["key"], (
            r["method"], r["label"], r["seed"])
