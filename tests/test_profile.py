"""protocols.profile and protocols.estimate on the tiny ViT (random weights) and tiny shapes: the
profile record's schema and its FLOP accounting, the estimate's arithmetic and where its rates come
from, the per-task stages each method declares against the ViT passes it really runs, and stable
record files."""
import json
import random

import pytest
import torch

from helpers import make_strategy, stream
from protocols.estimate import estimate, format_estimates, total_seconds
from protocols.work import split_sizes
from leaderboard.records import add_measurements as write_records, load_measurements_file as read_records
from protocols.profile import loader_throughput, profile_method
from protocols.runner import RunSpec
from protocols.schema import load_protocol

torch.set_num_threads(1)

PROFILE_FIELDS = {"kind", "created", "device", "versions", "protocol", "backbone", "method",
                  "precision", "batch_size", "eval_batch_size", "threads", "train_img_s",
                  "eval_img_s", "peak_mem_mb", "matmul_tflops", "train_tflops", "eval_tflops",
                  "frac_peak_train", "frac_peak_eval", "cost"}
COST_FIELDS = {"trainable_params", "head_params", "passes_train", "passes_test", "gflops_train",
               "gflops_test"}


@pytest.fixture(scope="module")
def l2p_record(tiny):
    return profile_method("fmnist-5t", "tiny", "l2p", vit=tiny, device="cpu", batch_size=4,
                          eval_batch_size=8, steps=1, budget_s=1.0)


def test_profile_record_has_the_schema_with_sane_values(l2p_record):
    r = l2p_record
    assert PROFILE_FIELDS <= set(r) and set(r["cost"]) == COST_FIELDS
    assert (r["kind"], r["protocol"], r["backbone"], r["method"]) == (
        "profile", "fmnist-5t", "tiny", "l2p")
    assert r["device"].startswith("cpu (") and r["threads"] == 1
    # a smaller batch than the method's is recorded as such, never as the real one
    assert (r["batch_size"], r["hparams_batch_size"], r["eval_batch_size"]) == (4, 32, 8)
    assert r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["matmul_tflops"] > 0
    assert 0 < r["frac_peak_train"] <= 1.5 and 0 < r["frac_peak_eval"] <= 1.5
    assert r["train_tflops"] == pytest.approx(r["frac_peak_train"] * r["matmul_tflops"], rel=1e-2)
    assert r["peak_mem_mb"] is None and r["peak_mem_source"] == "not measured on CPU"
    assert 0 < r["cpu_share"] <= 1.1  # one thread: at most its whole time


def test_step_flops_count_every_pass_and_the_backward(l2p_record):
    r = l2p_record
    # evaluation runs both passes (query + prompted), exactly the cost table's test forward
    assert r["eval_gflops_per_img"] == pytest.approx(r["cost"]["gflops_test"], rel=1e-3)
    # a training step is the same two forward passes plus a backward through the prompted one
    assert r["train_gflops_per_img"] > 1.2 * r["cost"]["gflops_train"]


def test_profile_matches_the_strategy_step_for_a_one_pass_method(tiny):
    r = profile_method("fmnist-5t", "tiny", "smope", vit=tiny, device="cpu", batch_size=4,
                       eval_batch_size=4, steps=1, budget_s=1.0)
    assert r["cost"]["passes_test"] == 1
    assert r["eval_gflops_per_img"] == pytest.approx(r["cost"]["gflops_test"], rel=1e-3)
    assert r["train_gflops_per_img"] > 1.5 * r["cost"]["gflops_train"]


def _record(method="l2p", protocol="fmnist-5t", backbone="tiny", train=100.0, ev=200.0,
            created="2026-01-01T00:00:00+00:00"):
    return {"kind": "profile", "created": created, "device": "cpu (test)", "protocol": protocol,
            "backbone": backbone, "method": method, "precision": "fp32", "batch_size": 32,
            "hparams_batch_size": 32, "eval_batch_size": 256, "threads": 1,
            "train_img_s": train, "eval_img_s": ev}


def test_split_sizes_from_the_facts_and_the_subsample():
    assert split_sizes(load_protocol("fmnist-5t")) == (2000, 1000)  # 200 / 100 per class x 10
    assert split_sizes(load_protocol("cifar100-10t")) == (50_000, 10_000)
    assert split_sizes(load_protocol("imagenet-r-10t")) == (24_000, 6_000)
    assert split_sizes(load_protocol("cub200-10t")) == (5_994, 5_794)


def test_estimate_arithmetic_and_linearity_in_epochs_and_seeds():
    profiles = [_record(), _record("smope")]
    one = estimate([RunSpec("fmnist-5t", "tiny", "l2p", 0, {"epochs": 1})], profiles)[0]
    # 2000 training images / 100 img/s per epoch; after task i, (i+1)/5 of 1000 test images at 200
    assert one.train_s == pytest.approx(20.0) and one.stages_s == 0.0
    assert one.eval_s == pytest.approx(1000 * (1 + 2 + 3 + 4 + 5) / 5 / 200)
    assert one.basis.startswith("profile 2026-01-01")
    by_epochs = [estimate([RunSpec("fmnist-5t", "tiny", "l2p", 0, {"epochs": e})], profiles)[0]
                 for e in (1, 2, 4)]
    assert [e.train_s for e in by_epochs] == pytest.approx([20.0, 40.0, 80.0])
    assert {e.eval_s for e in by_epochs} == {one.eval_s}
    seeds = estimate([RunSpec("fmnist-5t", "tiny", "l2p", s) for s in range(5)], profiles)
    assert total_seconds(seeds) == pytest.approx(5 * seeds[0].seconds)
    # SMoPE (2 epochs): task 0 adds int(2/2) = 1 dense epoch of its 400 images, and every task
    # one no-grad pass (counting + statistics) over its images at the eval rate of 200 img/s
    smope = estimate([RunSpec("fmnist-5t", "tiny", "smope", 0)], profiles)[0]
    assert smope.train_s == pytest.approx(2000 * 2 / 100)
    assert smope.stages_s == pytest.approx(400 / 100 + 2000 / 200)
    text = format_estimates(seeds + [smope], "cpu (test)")
    assert "l2p" in text and "smope" in text and "total: 6 runs" in text


def test_estimate_uses_the_latest_profile_and_shares_it_across_one_architecture():
    old, new = _record(train=50.0, created="2025-01-01T00:00:00+00:00"), _record(train=100.0)
    e = estimate([RunSpec("fmnist-5t", "tiny", "l2p", 0, {"epochs": 1})], [new, old])[0]
    assert e.train_s == pytest.approx(20.0)
    # sup1k is the same ViT-B/16 as sup21k: its profile serves, and the basis names it
    rec = _record("l2p", "cifar100-10t", "sup21k", train=10.0, ev=20.0)
    e = estimate([RunSpec("cifar100-10t", "sup1k", "l2p", 0)], [rec], measure=False)[0]
    assert e.train_s == pytest.approx(50_000 * 5 / 10.0) and "sup21k" in e.basis


def test_estimate_measures_when_no_profile_and_says_so():
    seen = []
    specs = [RunSpec("fmnist-5t", "tiny", "head_only", s) for s in range(2)]
    out = estimate(specs, [], device="cpu", batch_size=4, eval_batch_size=8, steps=1,
                   budget_s=1.0, progress=seen.append)
    assert len(seen) == 1  # measured once, shared by the seeds
    assert all(e.basis.startswith("measured now") and "batch 4 of 32" in e.basis for e in out)
    assert out[0].seconds == out[1].seconds > 0
    with pytest.raises(ValueError, match="run_suite.py profile"):
        estimate(specs, [], device="cpu", measure=False)


def _vit_images(strategy, run) -> int:
    """Images through the ViT's patch embedding (one per image per ViT pass) while `run()` runs."""
    count = [0]
    handle = strategy.model.vit.vit.patch_embed.register_forward_hook(
        lambda m, args, out: count.__setitem__(0, count[0] + args[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return count[0]


# ViT passes per image of one training step (query pass + prompted pass, or one pass)
STEP_PASSES = {"l2p": 2, "vq_prompt": 2, "hide_prompt": 1, "smope": 1}


@pytest.mark.parametrize("method,over", [
    ("l2p", {}), ("vq_prompt", {}), ("hide_prompt", {}),
    ("hide_prompt", {"tii_cache_features": False, "tii_epochs": 2}),
    ("smope", {}), ("smope", {"alignment": False}), ("smope", {"exclude_unused": True}),
])
def test_declared_task_stages_match_the_vit_passes_a_task_runs(tiny, method, over):
    over = {"epochs": 2, "batch_size": 16, **over}
    strategy = make_strategy(method, tiny, **over)
    bm = stream(n_classes=4, per_task=2, train=8, test=2)
    for t, exp in enumerate(bm.train_stream):
        n = len(exp.dataset)
        stages = type(strategy).task_stages(strategy.hp, t)
        expected = n * ((over["epochs"] + stages.extra_epochs) * STEP_PASSES[method]
                        + stages.no_grad_passes)
        assert _vit_images(strategy, lambda: strategy.train(exp)) == expected, t


def test_records_are_written_sorted_and_stable(tmp_path):
    records = [_record(m, p) for m in ("smope", "l2p") for p in ("fmnist-5t", "cifar100-10t")]
    records.append({"kind": "loader", "created": "2026-01-01T00:00:00+00:00",
                    "device": "cpu (test)", "protocol": "fmnist-5t", "workers": 2, "img_s": 10.0})
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(records, a)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    write_records(shuffled[:2], b)
    write_records(shuffled[2:], b)
    assert a.read_bytes() == b.read_bytes()
    write_records(records[:3], a)  # nothing new: the same bytes
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_text().splitlines()
    assert lines == [json.dumps(json.loads(l), sort_keys=True) for l in lines]
    kinds = [(r["kind"], r["protocol"], r.get("method", "")) for r in read_records(a)]
    assert kinds == sorted(kinds) and len(kinds) == 5


def test_loader_records_for_each_worker_count():
    recs = loader_throughput("fmnist-5t", "tiny", [0, 1], batch_size=100)
    assert [r["workers"] for r in recs] == [0, 1]
    for r in recs:
        assert r["kind"] == "loader" and r["protocol"] == "fmnist-5t" and r["image_size"] == 28
        assert r["images"] == 500 and r["img_s"] > 0  # 600 written, the first batch untimed
