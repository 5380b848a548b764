"""Records no one can lose or forge (issue 20): simultaneous publishes keep every run, a records
line that disagrees with itself, is cut short or carries merge-conflict markers is refused with
its file and line by every command (and no page renders from it), a full or read-only disk is
one error line with nothing torn, papers.yaml is checked before anything runs, and a dry run of
100,000 seeds plans per configuration.

The CLI runs in this process (`run_suite.main`), except where the test is about processes: the
publishes that race each other are forked processes released by one barrier, and one round runs
`python run_suite.py publish` as separate interpreters.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

import run_suite
from benchmarks.synthetic import write_fashion_mnist
from leaderboard import output, papers
from leaderboard.records import LOCK_FILE, add_measurements, load_measurements_file, load_published, publish
from leaderboard.store import RunStore
from protocols import runner
from protocols.code_identity import code_identity
from protocols.devices import device_name, device_slug, resolve_device
from protocols.metrics import summarize
from protocols.record import RecordError, record_problems, seal_record, validate_record
from protocols.runner import RunSpec, run_key, seed_keys, spec_key
from protocols.sweep import SweepRequest, configurations, keyed, seeds_to_run, plan
from test_leaderboard_store import make_record
from test_profile import _record as profile_record
from helpers import write_tiny_5t

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "leaderboard" / "records"
PUBLISHED = RECORDS / "fmnist-5t__tiny.jsonl"


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = run_suite.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ a record verifies itself

def published_line(n: int) -> dict:
    return json.loads(PUBLISHED.read_text().splitlines()[n - 1])


def test_the_published_records_verify_by_recomputation_alone():
    """The 95 published records carry no seal (made before it existed) and are left as they are:
    every number in them agrees with their accuracy matrices and per-class accuracies."""
    records = load_published(RECORDS)
    assert len([r for r in records if "record_sha256" not in r]) >= 95
    assert all(record_problems(r) == [] for r in records)


def test_a_number_that_disagrees_with_the_record_is_named():
    rec = next(r for r in load_published(RECORDS) if r["metrics"]["faa"] == 76.1)  # the record
    for path, value, says in [
        (("metrics", "faa"), 86.1, "metrics.faa is 86.1 but its accuracy matrix gives 76.1"),
        (("metrics", "ffm"), 0.0, "metrics.ffm is 0.0 but its accuracy matrix gives"),
        (("metrics", "bwt"), 5.0, "metrics.bwt is 5.0 but its accuracy matrix gives"),
        (("metrics", "caa"), 99.0, "metrics.caa is 99.0 but its accuracy matrix gives"),
        (("metrics", "final_acc"), 70.0, "metrics.final_acc is 70.0 but the mean of its classes' accuracies"),
        (("metrics", "tii"), 50.0, "is impossible with wtp"),  # below the final accuracy
        (("acc_matrix", 0), [99.0, 99.0, 99.0, 99.0, 99.0], "acc[0][4] (task 0 after the last task) is 99.0"),
        (("per_class_acc", "0"), float("nan"), "per_class_acc' must map class ids to finite numbers"),
    ]:
        bad = json.loads(json.dumps(rec))
        bad[path[0]][path[1]] = value
        if path[0] == "acc_matrix":  # the matrix and the metrics it gives edited together
            bad["metrics"].update(summarize(bad["acc_matrix"]))
        with pytest.raises(RecordError, match="rejected") as e:
            validate_record(bad)
        assert says in str(e.value), (path, str(e.value))


def test_a_sealed_record_finds_an_edit_the_numbers_cannot():
    """WTP and TII need the predictions to be recomputed: a consistent edit of them passes every
    check but the seal."""
    rec = seal_record(published_line(1))
    validate_record(rec)
    assert json.loads(json.dumps(rec)) == rec  # the seal survives a JSON round trip
    edited = {**rec, "metrics": {**rec["metrics"], "wtp": rec["metrics"]["wtp"] - 0.5}}
    assert record_problems({k: v for k, v in edited.items() if k != "record_sha256"}) == []
    with pytest.raises(RecordError, match="does not match its record_sha256"):
        validate_record(edited)
    with pytest.raises(RecordError, match="must be a sha256"):
        validate_record({**rec, "record_sha256": "abc"})


def test_a_sweep_seals_what_it_stores_and_publish_keeps_the_seal(tmp_path, capsys):
    data = tmp_path / "data"
    write_fashion_mnist(data / "fashion-mnist", train_per_class=12, test_per_class=4)
    proto = tmp_path / "tiny-5t.yaml"
    write_tiny_5t(proto)
    store = tmp_path / "runs.sqlite"
    code, _, err = cli("--protocols", str(proto), "--data-root", str(data), "--store", str(store),
                       "--records-dir", str(tmp_path / "records"), "--methods", "head_only", "--seeds", "1",
                       "--threads", "1", "--workers", "1", "--quiet", "--no-render", capsys=capsys)
    assert code == 0, err
    (stored,) = RunStore(store).records()
    assert stored["record_sha256"] == seal_record(stored)["record_sha256"]
    assert publish([stored], tmp_path / "records").added
    (line,) = load_published(tmp_path / "records")
    assert line == stored  # published as stored, seal included


def test_publish_seals_a_record_stored_before_seals(tmp_path):
    rec = make_record(seed=3)
    res = publish([rec], tmp_path)
    (published,) = load_published(tmp_path)
    assert "record_sha256" not in rec and published == seal_record(rec) == res.added[0]


# ------------------------------------------------------------------------------ damaged records files

def damage(path: Path, how: str) -> int:
    """Damage the records file `path` as a bad edit, merge or write would; the line to name."""
    lines = path.read_text().splitlines(keepends=True)
    if how == "tampered metric":  # the edit: faa 76.1 -> 86.1, the matrix left as it was
        n = next(i for i, line in enumerate(lines) if '"faa": 76.1,' in line)
        lines[n] = lines[n].replace('"faa": 76.1,', '"faa": 86.1,')
        path.write_text("".join(lines))
        return n + 1
    if how == "truncated line":
        path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
        return len(lines)
    assert how == "merge-conflict markers"
    path.write_text("".join(lines[:10] + ["<<<<<<< HEAD\n", lines[10], "=======\n", lines[11],
                                          ">>>>>>> other-branch\n"] + lines[12:]))
    return 11


@pytest.fixture()
def world(tmp_path):
    """A copy of the published records, tiny data, an empty store path and a pages folder holding
    one page (which a refused command must leave as it is)."""
    records = tmp_path / "records"
    records.mkdir()
    shutil.copy(PUBLISHED, records)
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "README.md").write_text("# the pages\n")
    return tmp_path


def pages_options(tmp: Path) -> list[str]:
    """A world of its own; `report` renders the local pages into tmp/lb (the committed ones, which
    `publish` renders too, into tmp/lb-committed)."""
    return ["--store", str(tmp / "runs.sqlite"), "--records-dir", str(tmp / "records"),
            "--leaderboard-dir", str(tmp / "lb-committed"), "--local-leaderboard-dir", str(tmp / "lb")]


@pytest.mark.parametrize("how", ["tampered metric", "truncated line", "merge-conflict markers"])
def test_a_damaged_records_file_is_refused_by_every_command(world, capsys, how):
    f = world / "records" / PUBLISHED.name
    line = damage(f, how)
    says = {"tampered metric": "metrics.faa is 86.1 but its accuracy matrix gives 76.1",
            "truncated line": "not a complete JSON record (the file's last line is cut short",
            "merge-conflict markers": "a merge-conflict marker ('<<<<<<< HEAD')"}[how]
    cluster = world / "cluster.sqlite"
    RunStore(cluster).put(make_record(seed=7))
    before = snapshot(world)
    commands = {
        "report": ["report", *pages_options(world)],
        "sweep": ["--protocols", "fmnist-5t", "--methods", "head_only", "--seeds", "1", "--data-root",
                  str(world / "data"), "--threads", "1", "--workers", "1", "--quiet", *pages_options(world)],
        "publish": ["publish", str(cluster), *pages_options(world)],
        "export": ["export", str(world / "runs.csv"), "--store", str(world / "runs.sqlite"),
                   "--records-dir", str(world / "records")],
    }
    for name, argv in commands.items():
        code, out, err = cli(*argv, capsys=capsys)
        error = one_error_line(code, err)
        assert error.startswith(f"error: {f}:{line}: ") and says in error, (name, error)
        assert "runs planned" not in out  # the sweep stopped before it planned a run
        assert snapshot(world) == before, name  # no page, no store, no record, no lock file written


# ------------------------------------------------------------------------------ publishing at once

def _publish_child(barrier, store: str, records: str) -> None:
    barrier.wait(timeout=120)
    os._exit(run_suite.main(["publish", store, "--records-dir", records, "--no-render"]))


def _many_published(folder: Path, n: int) -> None:
    publish([make_record(seed=i, key=f"base-{i:04d}", shift=(i % 7) / 10) for i in range(n)], folder)


def test_simultaneous_publishes_keep_every_run(tmp_path, capfd):
    """Rounds of four `publish` processes released together into one records folder (holding 200
    records, so that reading and writing it takes a while), each with its own store: every run
    of every store is published, every time, and each process says it published its one."""
    ctx = multiprocessing.get_context("fork")
    stores = []
    for i in range(4):
        stores.append(tmp_path / f"store{i}.sqlite")
        RunStore(stores[-1]).put(make_record(method=f"m{i}", seed=0, key=f"store-{i}"))
    for round_ in range(6):
        records = tmp_path / f"records{round_}"
        _many_published(records, 200)
        barrier = ctx.Barrier(len(stores))
        procs = [ctx.Process(target=_publish_child, args=(barrier, str(s), str(records))) for s in stores]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0] * len(stores), capfd.readouterr().err
        keys = {r["key"] for r in load_published(records)}
        assert keys == {f"base-{i:04d}" for i in range(200)} | {f"store-{i}" for i in range(4)}, round_
        assert capfd.readouterr().out.count("published 1 new run(s)") == len(stores)
        assert (records / LOCK_FILE).is_file() and not list(records.glob(".*.tmp"))


def test_simultaneous_publish_commands_keep_every_run(tmp_path):
    """The same with `python run_suite.py publish` interpreters started together."""
    records = tmp_path / "records"
    _many_published(records, 200)
    stores = []
    for i in range(2):  # two interpreters (each loads torch: seconds of CPU before it publishes)
        stores.append(tmp_path / f"store{i}.sqlite")
        RunStore(stores[-1]).put(make_record(method=f"m{i}", seed=0, key=f"store-{i}"))
    procs = [subprocess.Popen([sys.executable, "run_suite.py", "publish", str(s), "--records-dir", str(records),
                               "--no-render"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in stores]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert all("published 1 new run(s)" in o for o, _ in outs)
    assert {r["key"] for r in load_published(records)} >= {"store-0", "store-1"}
    assert len(load_published(records)) == 202


def _measure_child(barrier, path: str, record: dict) -> None:
    barrier.wait(timeout=120)
    add_measurements([record], Path(path))
    os._exit(0)


def test_simultaneous_profile_and_smoke_records_are_all_kept(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(6):
        path = tmp_path / f"round{round_}" / "cpu.jsonl"
        add_measurements([profile_record(method=f"old{i}") for i in range(300)], path)
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_measure_child, args=(barrier, str(path), profile_record(method=f"new{i}")))
                 for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0] * 4
        assert {r["method"] for r in load_measurements_file(path)} == (
            {f"old{i}" for i in range(300)} | {f"new{i}" for i in range(4)}), round_


# ------------------------------------------------------------------------------ full and read-only disks

class _FullDisk:
    """`leaderboard.output`'s `os`, whose files fail half-way through a write with `err`, as a
    full or read-only file system fails."""

    def __init__(self, err: int):
        self.err = err

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode, **kw):
        fh = os.fdopen(fd, mode, **kw)
        err = self.err

        class Failing:
            def __init__(self):
                self.fh = fh

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                self.fh.flush()
                raise OSError(err, os.strerror(err))

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()
        return Failing()


def rendered(tmp: Path, capsys) -> dict[str, bytes]:
    """Publish two methods x two seeds and render them; the pages folder's files."""
    publish([make_record(method=m, seed=s, shift=d + s) for m, d in (("a", 0), ("b", 1)) for s in (0, 1)],
            tmp / "records")
    code, _, err = cli("report", *pages_options(tmp), capsys=capsys)
    assert code == 0, err
    files = snapshot(tmp / "lb")
    assert any(name.endswith(".png") for name in files) and "fmnist-5t__tiny.md" in files
    return files


def add_a_run(tmp: Path) -> None:
    """A new published run: the next render changes pages and figures."""
    publish([make_record(method="c", seed=0, shift=2.0)], tmp / "records")


@pytest.mark.parametrize("err,says", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                      (errno.EACCES, "permission denied")])
def test_a_report_onto_a_full_or_read_only_disk_is_one_line_and_tears_nothing(tmp_path, capsys, monkeypatch,
                                                                             err, says):
    before = rendered(tmp_path, capsys)
    add_a_run(tmp_path)
    monkeypatch.setattr(output, "os", _FullDisk(err))
    code, _, errout = cli("report", *pages_options(tmp_path), capsys=capsys)
    line = one_error_line(code, errout)
    assert f"cannot write {tmp_path / 'lb'}" in line and says in line and "previous file is unchanged" in line
    assert snapshot(tmp_path / "lb") == before  # every page and figure as it was, no temporary file


@pytest.mark.parametrize("err,says", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_a_figure_that_cannot_be_saved_leaves_the_previous_one(tmp_path, capsys, monkeypatch, err, says):
    """savefig writes into the temporary file; when it fails half-way the figure in place is the
    previous one, byte for byte, and every other file is whole: the previous or the new one."""
    before = rendered(tmp_path, capsys)
    add_a_run(tmp_path)
    good = tmp_path / "good"  # what a render that succeeds writes
    shutil.copytree(tmp_path / "lb", good / "lb")
    shutil.copytree(tmp_path / "records", good / "records")
    assert cli("report", *pages_options(good), capsys=capsys)[0] == 0
    after = snapshot(good / "lb")
    savefig = Figure.savefig

    def failing(self, fname, *args, **kw):
        savefig(self, fname, *args, **kw)  # the PNG's bytes, half of them on the disk
        fname.seek(0)
        fname.truncate(100)
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(Figure, "savefig", failing)
    code, _, errout = cli("report", *pages_options(tmp_path), capsys=capsys)
    line = one_error_line(code, errout)
    assert ".png" in line and says in line
    now = snapshot(tmp_path / "lb")
    assert set(now) <= set(before) | set(after)  # no temporary file left
    for name, data in now.items():
        assert data in (before.get(name), after.get(name)), name
    failed = line.split("cannot write ", 1)[1].split(" (", 1)[0]
    assert now[Path(failed).relative_to(tmp_path / "lb").as_posix()] == before[
        Path(failed).relative_to(tmp_path / "lb").as_posix()]


@pytest.mark.parametrize("err,says", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_publish_onto_a_full_or_read_only_disk_is_one_line(tmp_path, capsys, monkeypatch, err, says):
    publish([make_record(seed=1)], tmp_path / "records")
    cluster = tmp_path / "cluster.sqlite"
    RunStore(cluster).put(make_record(seed=2))
    before = snapshot(tmp_path / "records")
    monkeypatch.setattr(output, "os", _FullDisk(err))
    code, _, errout = cli("publish", str(cluster), *pages_options(tmp_path), "--no-render", capsys=capsys)
    line = one_error_line(code, errout)
    assert f"cannot write {tmp_path / 'records' / 'fmnist-5t__tiny.jsonl'}" in line and says in line
    assert snapshot(tmp_path / "records") == before  # the lock file was there already


def test_publish_into_a_read_only_records_file_is_one_line(tmp_path, capsys):
    publish([make_record(seed=1)], tmp_path / "records")
    f = tmp_path / "records" / "fmnist-5t__tiny.jsonl"
    f.chmod(0o444)
    cluster = tmp_path / "cluster.sqlite"
    RunStore(cluster).put(make_record(seed=2))
    before = snapshot(tmp_path)
    code, _, errout = cli("publish", str(cluster), *pages_options(tmp_path), capsys=capsys)
    assert one_error_line(code, errout) == (f"error: {f} is read-only; make it writable (chmod u+w) to add "
                                            "records to it, or give another folder")
    assert snapshot(tmp_path) == before


def test_a_written_file_keeps_its_mode_and_a_new_one_is_not_private(tmp_path):
    """mkstemp's temporary file is 0o600: the file renamed into place must not stay so."""
    new = tmp_path / "new.md"
    output.write_atomic(new, "x\n")
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    new.chmod(0o640)
    output.write_atomic(new, "y\n")
    assert new.stat().st_mode & 0o777 == 0o640 and new.read_text() == "y\n"


# ------------------------------------------------------------------------------ papers.yaml

#: the first entry of papers.yaml, as the error line names it
FIRST = "results[0] (L2P / Split CIFAR-100, 10 tasks / sup21k)"
PAPERS_MISTAKES = {  # (text, replaced by, what the line says)
    "bad YAML": ("    faa: {mean: 83.83, std: 0.04}\n", "    faa: {mean: 83.83, std: 0.04\n", "not valid YAML"),
    "a number written as a string": ("faa: {mean: 83.83,", "faa: {mean: '83.83',",
                                     f"{FIRST}: faa.mean must be a number"),
    "a missing source": ("    source: L2P paper, Table 1\n", "", f"{FIRST}: missing keys ['source']"),
}


@pytest.mark.parametrize("mistake", list(PAPERS_MISTAKES))
def test_a_mistake_in_papers_yaml_is_one_line_before_anything_runs(world, capsys, monkeypatch, mistake):
    old, new, says = PAPERS_MISTAKES[mistake]
    text = (REPO / "leaderboard" / "papers.yaml").read_text()
    assert text.count(old) >= 1
    bad = world / "papers.yaml"
    bad.write_text(text.replace(old, new, 1))
    monkeypatch.setattr(papers, "_default_path", lambda: bad)
    cluster = world / "cluster.sqlite"
    RunStore(cluster).put(make_record(seed=7))
    before = snapshot(world)
    for argv in (["report", *pages_options(world)],
                 ["publish", str(cluster), *pages_options(world)],
                 ["--protocols", "fmnist-5t", "--methods", "head_only", "--seeds", "1", "--data-root",
                  str(world / "data"), "--threads", "1", "--workers", "1", "--quiet", *pages_options(world)]):
        code, out, err = cli(*argv, capsys=capsys)
        line = one_error_line(code, err)
        assert line.startswith(f"error: {bad}: ") and says in line, (argv[0], line)
        assert "runs planned" not in out  # the sweep stopped before it planned a run
        assert snapshot(world) == before, argv[0]


# ------------------------------------------------------------------------------ planning at scale

def test_keys_of_a_plan_are_the_keys_each_spec_resolves_to():
    """`keyed` resolves each configuration once and hashes the seeds into it: the same keys as
    resolving every spec (the old way), for main rows, ablation rungs, overrides and bf16."""
    req = SweepRequest(methods=["head_only", "l2p", "smope"], ablations=["all"], seeds=3,
                       overrides={"l2p": {"top_k": "3"}}, precision="bf16")
    specs = plan(req)
    assert keyed(specs) == [(s, spec_key(s)) for s in specs]
    assert len(specs) == len(configurations(req)) * 3


def test_the_published_keys_are_unchanged():
    """Every published run's key is what today's default sweep plans for it, and what
    `seed_keys` gives from its configuration."""
    published = load_published(RECORDS)
    planned = {k for _, k in keyed(plan(SweepRequest(methods=["all"], ablations=["all"], seeds=5)))}
    legacy = {r["key"] for r in published if "record_sha256" not in r}  # the 95 of the default sweep
    assert len(legacy) >= 95 and legacy <= planned
    for r in published:
        config = {k: v for k, v in r["spec"].items() if k != "seed"}
        assert seed_keys(config)(r["seed"]) == run_key(r["spec"]) == r["key"]


def test_a_dry_run_of_100000_seeds_resolves_each_configuration_once(tmp_path, capsys, monkeypatch):
    """Planning, counting what is stored and estimating work per configuration: the
    hyperparameters are resolved a handful of times per configuration, not once per run, and
    only the seeds the store holds are hashed."""
    profiles = tmp_path / "profiles"
    name = device_name(resolve_device("cpu"))
    add_measurements([{**profile_record(m), "device": name} for m in ("head_only", "l2p")],
                     profiles / f"{device_slug(name)}.jsonl")
    store = tmp_path / "runs.sqlite"
    stored = [make_record(method="head_only", seed=s) for s in (0, 1)]
    for s, rec in zip((0, 1), stored):  # made by the code of now: a sweep would keep them
        rec.pop("record_sha256", None)
        rec.update(key=spec_key(RunSpec("fmnist-5t", "tiny", "head_only", s)), code=code_identity("head_only"))
    RunStore(store).put_many(stored)
    calls = []
    resolve = runner.resolve
    monkeypatch.setattr(runner, "resolve", lambda *a, **k: calls.append(a) or resolve(*a, **k))
    code, out, err = cli("dry-run", "--methods", "head_only,l2p", "--seeds", "100000", "--device", "cpu",
                         "--threads", "1", "--workers", "1", "--store", str(store), "--profiles-dir",
                         str(profiles), "--quiet", capsys=capsys)
    assert code == 0, err
    assert out.startswith("200,000 runs planned, 2 already in") and "199,998 to run" in out
    assert "total: 199,998 runs" in out
    assert len(calls) <= 3 * 2  # a few resolutions per configuration, whatever the seed count
    assert seeds_to_run(configurations(SweepRequest(methods=["head_only"], seeds=10 ** 9)), 10 ** 9,
                   {}) == [(RunSpec("fmnist-5t", "tiny", "head_only", 0), 10 ** 9)]
