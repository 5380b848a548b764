"""protocols.work and protocols.code_identity: what a run feeds through the ViT (one count for the
dry-run estimate and a record's GFLOPs per run), and what code a run records."""
import pytest

from pathlib import Path

from leaderboard import layout
from leaderboard.records import load_published
from methods import registry
from protocols.code_identity import code_identity, stale_reason
from protocols.runner import method_hparams
from protocols.schema import Protocol, load_protocol
from protocols.work import RunWork, record_run_gflops, run_gflops, run_work

# the repository's own records, read at import (conftest.py points sweeps elsewhere during a test)
RECORDS = Path(__file__).resolve().parent.parent / layout.RECORDS_DIR


def work(method: str, protocol: str) -> RunWork:
    proto = load_protocol(protocol)
    return run_work(proto, method, method_hparams(method, proto))


def test_run_work_counted_by_hand():
    """fmnist-5t: 200 training / 100 test images per class, 10 classes in 5 tasks of 2."""
    # SMoPE: 2 epochs over 2,000 images; task 0's dense warm-up, int(2 / 2) = 1 epoch over its 400;
    # one no-grad statistics pass per task over its 400; after task t, 200 t test images
    assert work("smope", "fmnist-5t") == RunWork(4000.0, 400.0, 2000.0, 3000.0)
    assert work("l2p", "fmnist-5t") == RunWork(6000.0, 0.0, 0.0, 3000.0)  # 3 epochs, no stage
    first = Protocol(**{**load_protocol("fmnist-5t").data_spec(), "first_tasks": 2})  # a reduced run
    assert run_work(first, "l2p", method_hparams("l2p", first)) == RunWork(2400.0, 0.0, 0.0, 600.0)


def test_run_gflops_and_the_dry_run_estimate_count_alike():
    """SMoPE's cifar100-10t run against L2P's: more epochs at half the passes, plus its stages."""
    cost = {"gflops_train": 33.72, "gflops_test": 33.72, "passes_test": 1}
    w = work("smope", "cifar100-10t")
    g = run_gflops(w, cost)
    assert g["train"] == pytest.approx(w.train_images * 33.72)
    assert g["stages"] == pytest.approx((w.stage_epoch_images + w.stage_pass_images) * 33.72)
    assert g["total"] == pytest.approx(g["train"] + g["stages"] + g["eval"])
    l2p = run_gflops(work("l2p", "cifar100-10t"), {"gflops_train": 67.44, "gflops_test": 67.44, "passes_test": 2})
    assert 1.8 < g["total"] / l2p["total"] < 3.0
    # a no-grad pass costs one of the test passes: half of a two-pass method's test GFLOPs
    hide = run_gflops(RunWork(0.0, 0.0, 10.0, 0.0), {"gflops_train": 1.0, "gflops_test": 2.0, "passes_test": 2})
    assert hide["stages"] == pytest.approx(10.0)


def test_published_records_get_their_gflops_per_run_from_their_spec():
    """Records made before the field are counted from their spec; the records made since carry
    exactly that count."""
    published = [r for r in load_published(RECORDS) if r["table"] == "main"]
    before = [r for r in published if "run_gflops" not in r]
    assert before, "no published record predates run_gflops"
    for r in published:
        g = record_run_gflops(r)
        proto = load_protocol(r["protocol"])
        assert g == run_gflops(run_work(proto, r["method"], r["spec"]["hparams"]), r["cost"])
        if "run_gflops" in r:
            assert r["run_gflops"] == pytest.approx(g)
    assert record_run_gflops({**before[0], "method": "not_registered"}) is None


def test_code_identity_covers_the_method_and_the_run_path_only():
    registry.names()
    code = code_identity("l2p")
    files = code["files"]
    assert {"methods.l2p", "methods.base", "methods.vit", "protocols.runner", "protocols.metrics",
            "benchmarks.streams", "benchmarks.transforms"} <= set(files)
    assert not {"methods.smope", "methods.dualprompt"} & set(files)  # other methods' code is not its code
    assert not any(name.startswith("leaderboard") for name in files)
    assert code_identity("l2p")["sha256"] == code["sha256"] != code_identity("smope")["sha256"]
    assert "plugin" not in code


def test_stale_reason_names_what_changed():
    now = {"sha256": "b", "files": {"methods.l2p": "2", "methods.base": "1"}}
    assert stale_reason({"sha256": "b", "files": now["files"]}, now) is None
    assert stale_reason({"sha256": "a", "files": {"methods.l2p": "1", "methods.base": "1"}}, now) == (
        "code changed: methods.l2p")
    assert stale_reason(None, now) == stale_reason({}, now) == "made before runs recorded their code"
