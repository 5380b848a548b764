"""Trained runs evaluated again as the public codes evaluate (protocols/reference_eval.py), their
reference records (protocols/reference_record.py, leaderboard/reference_records.py), the page
(leaderboard/reference_page.py) and the `reference` command, on the tiny ViT and a small copy of
fmnist-5t written in the real IDX format: the re-evaluations leave a run's record bit-identical,
every mode at batch 1 and the per-sample evaluation at every batch size give the run's own
matrix exactly, a reference record that does not repeat its run's matrix is refused with file and
line, and the page renders from the record files alone."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import run_suite
from benchmarks import SAMPLE_INDEX, build_stream, load_fashion_mnist
from benchmarks.synthetic import write_fashion_mnist
from leaderboard.records import RecordConflict, publish
from leaderboard.reference_records import (ReferenceStore, add_reference, load_reference, local_reference_file,
                                           publish_reference, reference_dir)
from leaderboard.store import RunStore
from protocols import smoke
from protocols.errors import SweepError
from protocols.record import RecordError
from protocols.reference_eval import Evaluation, in_dataset_order, plan_evaluations
from protocols.reference_record import REFERENCE_KEY, validate_reference
from protocols.runner import RunOptions, RunSpec, run

ROOT = Path(__file__).resolve().parent.parent
AFFECTED = ("l2p", "dualprompt", "hide_prompt", "norga")
#: every epoch count of the affected methods at 1: the mechanics, not the accuracy, are tested
FAST = ("methods:\n  l2p: {epochs: 1}\n  dualprompt: {epochs: 1}\n"
        + "".join(f"  {m}: {{epochs: 1, tii_epochs: 1, tap_epochs: 1, tii_align_epochs: 1}}\n"
                  for m in ("hide_prompt", "norga")))


def small_fmnist(tmp: Path) -> Path:
    """Fashion-MNIST files with 12 train / 8 test images per class (labels cycling through the
    classes, so the data set's order interleaves a task's classes) and a copy of fmnist-5t under
    its shipped name (so the methods' fmnist-5t defaults and reference configurations apply) that
    reads them whole, every epoch count at 1."""
    write_fashion_mnist(tmp / "data" / "fashion-mnist", train_per_class=12, test_per_class=8)
    text = (ROOT / "protocols" / "fmnist-5t.yaml").read_text()
    proto = tmp / "fmnist-small.yaml"
    proto.write_text(text.replace("train_per_class: 200", "train_per_class: 12")
                     .replace("test_per_class: 100", "test_per_class: 8") + FAST)
    return proto


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Each affected method, seed 0, run without and with the re-evaluations (batch sizes 4, 16)."""
    tmp = tmp_path_factory.mktemp("reference")
    proto = small_fmnist(tmp)
    options = RunOptions(data_root=str(tmp / "data"), system_copy=False, threads=1, quiet=True)
    runs = {}
    for method in AFFECTED:
        spec = RunSpec(str(proto), "tiny", method, 0)
        plain = run(spec, options)
        again = run(spec, replace(options, reference_batch_sizes=(4, 16)))
        runs[method] = (plain, again)
    return tmp, proto, runs


def without_times(record: dict) -> dict:
    """A record but for when it ran and how long it took, and the code identity each run reads as it
    starts (an edit of the checkout between the two runs would change it)."""
    return {k: v for k, v in record.items() if k not in ("timings", "created", "versions", "code")}


# ---------------------------------------------------------------------------- inside the run
@pytest.mark.parametrize("method", AFFECTED)
def test_the_reevaluations_leave_the_run_bit_identical(world, method):
    _, _, runs = world
    plain, again = runs[method]
    reference = again[REFERENCE_KEY]
    assert REFERENCE_KEY not in plain
    rest = {k: v for k, v in again.items() if k != REFERENCE_KEY}
    assert without_times(rest) == without_times(plain)  # every number, the matrix to the last bit
    assert reference["acc_matrix"] == plain["acc_matrix"]
    assert reference["key"] == plain["key"] and reference["seed"] == 0
    validate_reference(reference)


@pytest.mark.parametrize("method", AFFECTED)
def test_at_batch_one_every_mode_and_per_sample_at_every_batch_give_the_run_s_matrix(world, method):
    _, _, runs = world
    plain, again = runs[method]
    reference = again[REFERENCE_KEY]
    evaluations = {(tuple(ev["modes"]), ev["batch_size"]): ev for ev in reference["evaluations"]}
    assert [Evaluation(m, b) for m, b in evaluations] == plan_evaluations(method, "fmnist-5t", (4, 16))
    ones = [ev for (modes, b), ev in evaluations.items() if b == 1]
    assert ones and all(ev["modes"] for ev in ones)
    for ev in ones:  # no image shares a batch: every mode is the per-sample evaluation, exactly
        assert ev["acc_matrix"] == plain["acc_matrix"], ev["modes"]
    flat = [ev for (modes, _), ev in evaluations.items() if not modes]
    assert {ev["batch_size"] for ev in flat} >= {4, 16}
    for ev in flat:  # per sample, nothing depends on the batch size
        assert ev["acc_matrix"] == plain["acc_matrix"], ev["batch_size"]
    for ev in evaluations.values():  # a full matrix after every task, its metrics its own
        t = len(ev["acc_matrix"])
        assert all((ev["acc_matrix"][j][i] is None) == (j > i) for i in range(t) for j in range(t))
        assert ev["order"] == "dataset"


def test_the_plan_follows_the_reference_configurations():
    def plan(method, protocol="fmnist-5t", sizes=(16, 64)):
        return {(" + ".join(e.modes) or "-", e.batch_size) for e in plan_evaluations(method, protocol, sizes)}

    assert plan("l2p") == {("-", 16), ("-", 64), ("batch_vote", 16), ("batch_vote", 64), ("batch_vote", 1)}
    # DualPrompt's CIFAR configuration votes and mixes at 24: each mode, both together, and the check at 1
    assert plan("dualprompt") == {(m, b) for m in ("-", "batch_vote", "prefix_mixing", "batch_vote + prefix_mixing")
                                  for b in (16, 24, 64)} | {("batch_vote + prefix_mixing", 1)}
    assert plan("dualprompt", "imagenet-r-10t") == {
        (m, b) for m in ("-", "batch_vote", "prefix_mixing") for b in (16, 24, 64)} | {("prefix_mixing", 1)}
    assert ("prefix_mixing", 128) in plan("norga") and ("prefix_mixing", 1) in plan("norga")
    assert ("-", 1) in plan("l2p", sizes=(1, 16))  # batch 1 asked: every set at 1, nothing twice
    with pytest.raises(SweepError, match="coda_prompt: no reference modes"):
        plan_evaluations("coda_prompt", "fmnist-5t")
    with pytest.raises(SweepError, match="positive integers"):
        plan_evaluations("l2p", "fmnist-5t", (0, 16))


def test_the_stream_gives_each_test_image_its_index_in_the_data_set(tmp_path):
    """`SAMPLE_INDEX` points every test image of a (subsampled) stream at its reader's image; the
    stream groups a task's images by class, the data set's order interleaves them."""
    write_fashion_mnist(tmp_path / "fashion-mnist", train_per_class=4, test_per_class=6)
    info = build_stream("fashion_mnist", data_root=tmp_path, seed=3, num_tasks=5, image_size=28, in_chans=1,
                        subsample={"test_per_class": 5}, system_copy=False)
    reader = load_fashion_mnist(tmp_path, system_copy=False).test
    for exp in info.benchmark.test_stream:
        index = [int(v) for v in getattr(exp.dataset, SAMPLE_INDEX)]
        stream_labels = [int(exp.dataset[k][1]) for k in range(len(exp.dataset))]
        for k, i in enumerate(index):
            x = exp.dataset[k][0]
            assert torch.equal((x[0] * 255).round().to(torch.uint8), torch.from_numpy(reader.images[i]))
            assert reader.targets[i] == stream_labels[k]
        ordered, indices = in_dataset_order(exp.dataset)
        assert indices == sorted(index) and indices != index  # the stream's order is class-grouped
        assert [int(ordered[k][1]) for k in range(len(ordered))] == [reader.targets[i] for i in indices]


# ---------------------------------------------------------------------------- the records
def published_pair(world, tmp: Path, method: str = "l2p") -> tuple[Path, dict, dict]:
    """A records folder holding `method`'s plain run, and that run's reference record."""
    _, _, runs = world
    plain, again = runs[method]
    records = tmp / "records"
    publish([plain], records)
    return records, plain, again[REFERENCE_KEY]


def test_a_reference_record_that_does_not_repeat_its_run_is_refused_with_file_and_line(world, tmp_path):
    records, plain, reference = published_pair(world, tmp_path)
    folder = reference_dir(records)
    assert publish_reference([reference], folder, [plain]).added == [reference]
    (path,) = folder.glob("*.jsonl")
    assert [r["key"] for r in load_reference([folder], [plain])] == [plain["key"]]

    good = path.read_text()
    other = json.loads(good)
    other["acc_matrix"][0][0] -= 0.5  # the model re-evaluated is not the published one
    bad = dict(other, key="0" * 64)  # a second line, for a run never published
    path.write_text(good + json.dumps(other) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2: .*per-sample accuracy matrix differs"):
        load_reference([folder], [plain])
    path.write_text(good + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2: .*not a published run"):
        load_reference([folder], [plain])
    wrong = json.loads(good)
    wrong["evaluations"][1]["metrics"]["faa"] += 1.0
    path.write_text("\n" + json.dumps(wrong) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2: evaluations\[1\].*metrics \['faa'\]"):
        load_reference([folder], [plain])
    path.write_text(json.dumps({**json.loads(good), "seed": 3}) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:1: .*names another run \(seed 3 vs 0\)"):
        load_reference([folder], [plain])


def test_publishing_adds_once_and_refuses_other_evaluations_of_a_published_run(world, tmp_path):
    records, plain, reference = published_pair(world, tmp_path)
    folder = reference_dir(records)
    publish_reference([reference], folder, [plain])
    assert publish_reference([reference], folder, [plain]).already == 1
    changed = json.loads(json.dumps(reference))
    changed["evaluations"][-2]["acc_matrix"][0][0] += 1.0
    changed["evaluations"][-2]["metrics"] = __import__("protocols.metrics").metrics.summarize(
        changed["evaluations"][-2]["acc_matrix"])
    before = {p: p.read_bytes() for p in folder.glob("*")}
    with pytest.raises(RecordConflict, match="differ from the published ones"):
        publish_reference([changed], folder, [plain])
    assert {p: p.read_bytes() for p in folder.glob("*")} == before


def test_a_rerun_that_does_not_reproduce_is_kept_nowhere(world, tmp_path):
    _, _, runs = world
    plain, again = runs["dualprompt"]
    published = json.loads(json.dumps(plain))
    published["acc_matrix"][1][1] = 12.5
    store = RunStore(tmp_path / "runs.sqlite")
    keeper = ReferenceStore(store, local_reference_file(tmp_path / "runs.sqlite"), {plain["key"]: published})
    keeper.put(json.loads(json.dumps(again)))
    assert keeper.refused and not keeper.added
    assert not store.has(plain["key"]) and not keeper.path.exists()
    keeper = ReferenceStore(store, keeper.path, {plain["key"]: plain})
    keeper.put(json.loads(json.dumps(again)))
    assert store.get(plain["key"])["acc_matrix"] == plain["acc_matrix"] and REFERENCE_KEY not in store.get(plain["key"])
    assert [r["key"] for r in load_reference([keeper.path], [plain])] == [plain["key"]]


# ---------------------------------------------------------------------------- the page
def test_the_page_renders_from_the_record_files_alone(world, tmp_path):
    """In a process where torch cannot be imported: the published run records and their reference
    records give the page, its figures and the index's link; rendering twice changes nothing."""
    _, _, runs = world
    records = tmp_path / "records"
    publish([plain for plain, _ in runs.values()], records)
    publish_reference([again[REFERENCE_KEY] for _, again in runs.values()], reference_dir(records),
                      [plain for plain, _ in runs.values()])
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch imported while rendering')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from leaderboard.records import load_published\n"
        "from leaderboard.reference_records import load_reference, reference_dir\n"
        "from leaderboard.render import render_all\n"
        f"runs = load_published({str(records)!r})\n"
        f"refs = load_reference([reference_dir({str(records)!r})], runs)\n"
        f"res = render_all(runs, (), {str(tmp_path / 'lb')!r}, reference=refs)\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(res.changed))\n")
    for changed in ("changed", "unchanged"):
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert (int(out.stdout.split()[-1]) > 0) == (changed == "changed")
    page = (tmp_path / "lb" / "reference-behaviours.md").read_text()
    assert "reference-behaviours.md" in (tmp_path / "lb" / "README.md").read_text()
    assert "exactly the per-sample accuracy matrix in 4 of 4 evaluations" in page
    for method in AFFECTED:
        assert f"### {method}\n" in page
        assert (tmp_path / "lb" / "figures" / f"reference__fmnist-5t__tiny__{method}.png").is_file()
    section = page.split("### dualprompt\n", 1)[1].split("###", 1)[0]
    assert "dualprompt-pytorch configs/cifar100_dualprompt.py:4,100" in section
    assert "| main table (epochs=1) | 0 | per sample |" in section  # its hyperparameters differ from the shipped ones
    assert "| batch 1 | batch 4 | batch 16 | batch 24 | batch 256 (the run's own) |" in section
    assert "batch_vote + prefix_mixing" in section and "**" in section  # the reference configuration's cell
    assert "What it means (main table (epochs=1))" in section


# ---------------------------------------------------------------------------- the command
def test_the_reference_command_runs_publishes_and_renders(tmp_path, capsys):
    proto = small_fmnist(tmp_path)
    common = ["--store", str(tmp_path / "runs.sqlite"), "--records-dir", str(tmp_path / "records"),
              "--leaderboard-dir", str(tmp_path / "lb"), "--local-leaderboard-dir", str(tmp_path / "local")]
    args = ["reference", "--protocols", str(proto), "--data-root", str(tmp_path / "data"), "--quiet", "--threads",
            "1", "--workers", "1", "--batch-sizes", "8", *common]
    assert run_suite.main(args + ["--ablation", "l2p-trained-as-the-code", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 runs planned, 0 already have reference records, 4 to run" in out
    assert "batch_vote @8" in out and "@16" in out and "@1 " in out
    local = local_reference_file(tmp_path / "runs.sqlite")
    assert len(local.read_text().splitlines()) == 4
    stored = RunStore(tmp_path / "runs.sqlite").records()
    assert len(stored) == 4 and not any(REFERENCE_KEY in r for r in stored)
    assert not (tmp_path / "lb").exists()  # the committed pages change only by publishing
    page = (tmp_path / "local" / "reference-behaviours.md").read_text()
    # the rungs, labelled with what this copy of fmnist-5t changes (epochs=1), marked local (not published)
    assert "| trained per sample (epochs=1) (local) | 0, 1 | per sample |" in page
    assert "| trained as the code (epochs=1) (local) | 0, 1 | per sample |" in page
    assert "| trained per sample (epochs=1) (local) | batch_vote @ 16 | 2 |" in page  # paired over both seeds
    assert "[l2p-trained-as-the-code](fmnist-5t__tiny__ablation-l2p-trained-as-the-code.md)" in page
    # the code's training and evaluation together against the suite's, paired over both seeds
    assert "Trained and evaluated as the public code does (trained as the code (epochs=1) (local); batch_vote at " \
           "test batch 16)" in page and "(n = 2, p " in page

    assert run_suite.main(args + ["--ablation", "l2p-trained-as-the-code", "--seeds", "2"]) == 0
    assert "4 runs planned, 4 already have reference records, 0 to run" in capsys.readouterr().out
    assert run_suite.main(args + ["--methods", "joint", "--seeds", "1"]) == 2
    assert "error: joint: no reference modes" in capsys.readouterr().err

    assert run_suite.main(["publish", *common]) == 0
    assert "published 4 new reference record(s)" in capsys.readouterr().out
    published = reference_dir(tmp_path / "records") / "fmnist-5t__tiny.jsonl"
    assert len(published.read_text().splitlines()) == 4
    committed = (tmp_path / "lb" / "reference-behaviours.md").read_text()
    assert committed == page.replace(" (local)", "")  # the same page, its runs published now
    assert "reference-behaviours.md" in (tmp_path / "lb" / "README.md").read_text()
    (tmp_path / "lb" / "reference-behaviours.md").unlink()  # rebuilt from the published files alone
    assert run_suite.main(["report", "--published", *common[2:-2]]) == 0
    assert (tmp_path / "lb" / "reference-behaviours.md").read_text() == committed


# ---------------------------------------------------------------------------- the real shape
def test_the_real_shape_dry_run_re_evaluates(tmp_path):
    """cifar100-10t's first 2 tasks on ViT-B/16 fed 32 px (the reduced dry run of
    tests/test_smoke.py) with the re-evaluations on, for DualPrompt (both modes, and together):
    every planned evaluation gives a full matrix, and at batch 1 and per sample the run's own.
    (`run_suite.py smoke --tasks 2 --protocols cifar100-10t --methods l2p,dualprompt,hide_prompt,norga
    --batch-sizes 16,64` runs every affected method at 224 px.)"""
    methods = ["dualprompt"]
    done = list(smoke.run_smoke(["cifar100-10t"], methods, store=RunStore(tmp_path / "s.sqlite"),
                                data_root=tmp_path / "data", tasks=2, train_per_class=1, test_per_class=2,
                                backbone=smoke.REDUCED_BACKBONE, reference_batch_sizes=(4,)))
    assert [s.spec.method for s in done] == methods
    for s in done:
        assert s.smoke["complete"], s.error
        ref = s.reference
        validate_reference(ref)
        assert ref["acc_matrix"] == s.record["acc_matrix"] and len(ref["acc_matrix"]) == 2
        assert s.smoke["reference_evaluations"] == len(plan_evaluations(s.spec.method, "cifar100-10t", (4,)))
        for ev in ref["evaluations"]:
            if ev["batch_size"] == 1 or not ev["modes"]:
                assert ev["acc_matrix"] == ref["acc_matrix"], (s.spec.method, ev["modes"], ev["batch_size"])
