"""Sweeps that hold up (issue 11): a sweep SIGKILLed mid-run resumes to the same store as an
uninterrupted one, two sweeps share one store, a locked store is a clear "busy" error, and a
failed run is a record (listed, never shown, retried) rather than the end of the sweep.

The sweeps run as `python run_suite.py` subprocesses on a tiny Fashion-MNIST written in the real
format, at 1 epoch, one run at a time (`--workers 1 --threads 1`).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_suite
from benchmarks.synthetic import write_fashion_mnist
from helpers import write_tiny_5t
from leaderboard.store import RunStore
from methods import registry

REPO = Path(__file__).resolve().parent.parent
# what must be identical between two runs of one key
RESULT = ("acc_matrix", "metrics", "per_class_acc", "class_order", "classes_per_task", "cost",
          "spec", "variant", "data_hash", "backbone_sha256")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, a 5-task protocol at 1 epoch, and the store of an uninterrupted sweep of
    head_only and smope over 3 seeds (made by a subprocess, as the sweeps under test are)."""
    tmp = tmp_path_factory.mktemp("crash")
    write_fashion_mnist(tmp / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    proto = tmp / "tiny-5t.yaml"
    write_tiny_5t(proto, "head_only", "smope")
    proc = subprocess.run(sweep(tmp, "reference"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # quiet by default: with no terminal, one line per run between the plan and the summary, and
    # nothing on stderr (Avalanche's per-experience logs go to each run's log file)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("6 runs planned, 0 already in") and len(lines) == 1 + 6 + 1, proc.stdout
    assert all(": FAA " in line for line in lines[1:7]) and lines[7].startswith("reproduced")
    assert proc.stderr == ""
    logs = sorted((tmp / "reference" / "logs").glob("*.log"))
    assert len(logs) == 6 and all("Top1_Acc_Stream" in p.read_text() for p in logs)
    return tmp, records(tmp / "reference" / "suite.sqlite")


def sweep(tmp: Path, name: str, methods: str = "head_only,smope", seeds: str = "3") -> list[str]:
    return [sys.executable, "run_suite.py", "--protocols", str(tmp / "tiny-5t.yaml"),
            "--data-root", str(tmp / "data"), "--store", str(tmp / name / "suite.sqlite"),
            "--records-dir", str(tmp / name / "records"), "--leaderboard-dir", str(tmp / name / "lb"),
            "--methods", methods, "--seeds", seeds, "--workers", "1", "--threads", "1", "--no-render"]


def records(store: Path) -> dict[str, dict]:
    """key -> record, read with plain SQLite (as another program would)."""
    with sqlite3.connect(store) as conn:
        return {k: json.loads(r) for k, r in conn.execute("SELECT key, record FROM runs")}


def stored_ok(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(store, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:  # the sweep is creating the schema
        return 0


def assert_same_results(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert sorted(got) == sorted(want)
    for key, rec in got.items():
        assert rec["status"] == "ok"
        for field in RESULT:
            assert rec[field] == want[key][field], (rec["method"], rec["seed"], field)


def test_a_sigkilled_sweep_resumes_to_the_uninterrupted_store(world):
    tmp, reference = world
    store = tmp / "killed" / "suite.sqlite"
    proc = subprocess.Popen(sweep(tmp, "killed"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while stored_ok(store) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before it was killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a power cut or the OOM killer
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr.close()
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done = records(store)
    assert 1 <= len(done) < 6 and all(r["status"] == "ok" for r in done.values())
    assert_same_results(done, {k: reference[k] for k in done})  # what was stored is complete

    resumed = subprocess.run(sweep(tmp, "killed"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"6 runs planned, {len(done)} already in")  # none redone
    assert_same_results(records(store), reference)


def _children(pid: int) -> set[int]:
    return {int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_a_sigkilled_driver_leaves_no_worker_behind(world):
    """`--workers 2`: the driver SIGKILLed mid-sweep cannot stop its pool; the workers notice
    they lost their parent and exit (they would otherwise wait forever, holding memory or a
    GPU). The workers print nothing either (quiet by default, as the driver)."""
    tmp, reference = world
    store = tmp / "pool" / "suite.sqlite"
    cmd = sweep(tmp, "pool", "smope", "3")
    cmd[cmd.index("--workers") + 1] = "2"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        deadline = time.time() + 300
        while stored_ok(store) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) >= 2  # two workers (and the resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        left = [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # a failing check must not leave them running either
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert left == []
    err = proc.stderr.read()
    proc.stderr.close()
    # the only line: the semaphore tracker's note that the killed driver left its semaphores
    assert all("resource_tracker" in line for line in err.splitlines() if line.strip()), err
    done = records(store)
    assert_same_results(done, {k: reference[k] for k in done})


def test_two_sweeps_on_one_store_both_land(world):
    """Two sweeps (smope x 3 seeds, head_only x 6 seeds) start while a third writer holds the
    store's write lock, so both wait on it and then run side by side; each stored run is one short
    transaction and a writer waits up to 30 s for the lock, so both land every run."""
    tmp, reference = world
    store = tmp / "shared" / "suite.sqlite"
    RunStore(store)
    lock = sqlite3.connect(store, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the write lock: each sweep's store check waits for it
    procs = [subprocess.Popen(sweep(tmp, "shared", method, seeds), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for method, seeds in (("smope", "3"), ("head_only", "6"))]
    try:
        for p in procs:  # both have planned, and now wait for the lock
            assert "runs planned" in p.stdout.readline()
        time.sleep(1.0)
        lock.execute("ROLLBACK")
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        lock.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    got = records(store)
    assert sorted((r["method"], r["seed"]) for r in got.values()) == [
        *(("head_only", s) for s in range(6)), *(("smope", s) for s in range(3))]
    assert_same_results({k: r for k, r in got.items() if r["seed"] < 3}, reference)
    with sqlite3.connect(store) as conn:  # the order the runs were stored in
        order = [m for (m,) in conn.execute("SELECT method FROM runs ORDER BY rowid")]
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches >= 2, f"the sweeps did not write side by side: {order}"


def test_a_busy_store_is_one_clear_error(world, monkeypatch, capsys):
    """A write lock held longer than a sweep waits: exit 2, "busy", nothing run."""
    tmp, _ = world
    store = tmp / "busy" / "suite.sqlite"
    RunStore(store)
    monkeypatch.setattr(RunStore, "busy_timeout_s", 0.5)
    lock = sqlite3.connect(store, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        code = run_suite.main(sweep(tmp, "busy")[2:])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --store {store} is busy") and "another sweep" in err
    assert len(RunStore(store)) == 0


PLUGIN = '''
"""Two methods that fail while the file $PROMPTCL_TEST_FAIL exists: a NaN auxiliary loss, and a
bug at the start of task 1."""
import os
from pathlib import Path

import torch

from methods import register
from methods.head_only import HeadOnly


def failing() -> bool:
    return Path(os.environ["PROMPTCL_TEST_FAIL"]).exists()


@register("nan_aux_loss")
class NanAuxLoss(HeadOnly):
    def aux_loss(self):
        return torch.tensor(float("nan")) if failing() else None


@register("crash_at_task1")
class CrashAtTask1(HeadOnly):
    def task_start(self):
        if self.task_id == 1 and failing():
            raise RuntimeError("simulated bug at the start of task 1")
'''


def test_a_failed_run_is_stored_listed_never_shown_and_retried(world, monkeypatch, capsys):
    tmp, _ = world
    d = tmp / "failing"
    d.mkdir()
    flag = d / "fail-now"
    flag.touch()
    monkeypatch.setenv("PROMPTCL_TEST_FAIL", str(flag))
    registry.names()  # the built-ins, discovered; the plugin's methods are forgotten after the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (d / "failing_plugin.py").write_text(PLUGIN)
    proto = d / "tiny-5t.yaml"
    proto.write_text((tmp / "tiny-5t.yaml").read_text() + "  nan_aux_loss: {epochs: 1}\n"
                     "  crash_at_task1: {epochs: 1}\n")
    args = ["--protocols", str(proto), "--data-root", str(tmp / "data"), "--store", str(d / "suite.sqlite"),
            "--records-dir", str(d / "records"), "--leaderboard-dir", str(d / "lb"),
            "--local-leaderboard-dir", str(d / "local"), "--quiet",
            "--workers", "1", "--threads", "1", "--plugin", str(d / "failing_plugin.py"),
            "--methods", "head_only,nan_aux_loss,crash_at_task1", "--seeds", "1"]

    assert run_suite.main(args) == 1  # the sweep went on, and says that runs failed
    out = capsys.readouterr().out
    store = RunStore(d / "suite.sqlite")
    by_method = {r["method"]: r for r in store.records()}
    assert {m: r["status"] for m, r in by_method.items()} == {
        "head_only": "ok", "nan_aux_loss": "failed", "crash_at_task1": "failed"}
    nan, crash = by_method["nan_aux_loss"], by_method["crash_at_task1"]
    assert nan["error"].startswith("FloatingPointError: nan_aux_loss: training loss is nan at task 0, "
                                   "epoch 0, step 0")
    assert crash["error"] == "RuntimeError: simulated bug at the start of task 1"
    assert "failing_plugin.py" in crash["traceback"] and "task_start" in crash["traceback"]
    # the summary lists both, each with its error, and says the next sweep retries them
    assert "2 run(s) failed" in out and "retries them" in out
    assert "nan_aux_loss seed 0: FloatingPointError" in out and "crash_at_task1 seed 0: RuntimeError" in out
    # ... and each run's log ends with its traceback
    (log,) = (d / "logs").glob(f"crash_at_task1-seed0-{crash['key'][:12]}.log")
    assert "FAILED: RuntimeError" in log.read_text() and "Traceback" in log.read_text()
    page = (d / "local" / "tiny-5t__tiny.md").read_text()  # the local pages: nothing here is published
    assert "head_only" in page and "nan_aux_loss" not in page and "crash_at_task1" not in page

    flag.unlink()  # the cause is fixed: the same command retries exactly the failed runs
    assert run_suite.main(args) == 0
    assert capsys.readouterr().out.startswith("3 runs planned, 1 already in")
    again = {r["method"]: r for r in store.records()}
    assert {m: r["status"] for m, r in again.items()} == dict.fromkeys(by_method, "ok")
    assert again["nan_aux_loss"]["key"] == nan["key"] and "error" not in again["nan_aux_loss"]
    assert again["head_only"] == by_method["head_only"]  # not rerun
    page = (d / "local" / "tiny-5t__tiny.md").read_text()
    assert "nan_aux_loss" in page and "crash_at_task1" in page
