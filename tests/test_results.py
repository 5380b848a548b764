"""Results that last (issues 9 and 19): published records, rows that are one configuration, committed
pages that only publishing changes (a sweep renders local pages beside them), the reproduction
check, publishing and its conflicts, and stale runs: a stored run whose code changed runs again."""
import json
from pathlib import Path

import pytest

import run_suite
from benchmarks.synthetic import write_fashion_mnist
from leaderboard.records import (RecordConflict, Reproduction, load_published, merge, publish, reproduction)
from leaderboard.render import render_all
from leaderboard.store import RunStore
from protocols.metrics import summarize
from protocols.record import seal_record
from helpers import write_tiny_5t
from test_leaderboard_render import parse_tables, pm
from test_leaderboard_stats import recs_for
from test_leaderboard_store import make_record


@pytest.fixture()
def env(tmp_path):
    """Tiny Fashion-MNIST in the real IDX format, and CLI arguments whose every output (store,
    published records, committed pages in lb/, local pages in local/) lives under tmp_path."""
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    args = ["--data-root", str(tmp_path / "data"), "--store", str(tmp_path / "runs.sqlite"),
            "--records-dir", str(tmp_path / "records"), "--leaderboard-dir", str(tmp_path / "lb"),
            "--local-leaderboard-dir", str(tmp_path / "local"), "--quiet", "--threads", "1", "--workers", "1"]
    return tmp_path, args


def page_options(tmp: Path) -> list[str]:
    """The options of `report` and `publish` that keep every output under tmp."""
    return ["--store", str(tmp / "runs.sqlite"), "--records-dir", str(tmp / "records"),
            "--leaderboard-dir", str(tmp / "lb"), "--local-leaderboard-dir", str(tmp / "local")]


def rows(page: Path) -> dict[str, dict]:
    return {r["method"]: r for r in parse_tables(page.read_text())[0]}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overrides_and_renamed_protocol_get_their_own_rows(env):
    """`--set` and a user's YAML reusing a shipped protocol's name with other data each land in
    rows labelled with what differs; the default row keeps its numbers."""
    tmp, args = env
    base = ["--protocols", "fmnist-5t", "--methods", "head_only", "--seeds", "2", "--set", "head_only.epochs=1"]
    assert run_suite.main(args + base) == 0
    page = tmp / "local" / "fmnist-5t__tiny.md"  # not published: the local pages
    default = rows(page)["head_only (epochs=1) (local)"]["FAA"]  # epochs=1 is itself an override

    assert run_suite.main(args + base + ["--set", "head_only.lr=0.02", "--seeds", "1"]) == 0
    after = rows(page)
    assert after["head_only (epochs=1) (local)"]["FAA"] == default  # not replaced, not averaged
    assert after["head_only (epochs=1, lr=0.02) (local)"]["seeds (n)"] == "1"
    assert after["head_only (epochs=1, lr=0.02) (local)"]["FAA"].endswith("± n/a")

    copy = tmp / "fmnist-copy.yaml"  # the shipped name, a tenth of the data
    text = (Path(run_suite.__file__).parent / "protocols" / "fmnist-5t.yaml").read_text()
    copy.write_text(text.replace("train_per_class: 200", "train_per_class: 6")
                    .replace("test_per_class: 100", "test_per_class: 2"))
    assert run_suite.main(args + ["--protocols", str(copy), "--methods", "head_only", "--seeds", "1",
                                  "--set", "head_only.epochs=1"]) == 0
    assert rows(page)["head_only (epochs=1) (local)"]["FAA"] == default
    (other,) = [p for p in (tmp / "local").glob("fmnist-5t-*__tiny.md")]
    text = other.read_text()
    assert "subsample.train_per_class=6" in text and "subsample.test_per_class=2" in text
    store = RunStore(tmp / "runs.sqlite").records()
    assert {json.dumps(r["variant"], sort_keys=True) for r in store} == {
        '{"epochs": 1}', '{"epochs": 1, "lr": 0.02}',
        '{"epochs": 1, "protocol.subsample.test_per_class": 2, "protocol.subsample.train_per_class": 6}'}


def published_world():
    """Records of two protocols and an ablation (5 seeds), plus a plugin method on one of them."""
    recs = recs_for() + recs_for(protocol="cifar100-10t", offset=4.0)
    recs += recs_for({"smope": [1.0, 1.4, 0.6], "smope-noprior": [-1.0, -0.2, -0.9]}, table="ablation:prior")
    recs += recs_for({"my_plugin": [0.2, 0.1, 0.4, 0.0, 0.3]})
    for r in recs:
        r["status"] = "ok"
    return recs


def test_pages_survive_other_sweeps_and_report_is_stable(env, capsys):
    tmp, args = env
    publish(published_world(), tmp / "records")
    assert run_suite.main(["report", "--published", *page_options(tmp)]) == 0
    first = snapshot(tmp / "lb")
    pages = [n for n in first if n.endswith(".md")]
    assert {"fmnist-5t__tiny.md", "cifar100-10t__tiny.md", "fmnist-5t__tiny__ablation-prior.md",
            "papers.md", "cost.md", "README.md"} <= set(pages)

    # report --published twice: byte-identical files, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp / "lb").rglob("*") if p.is_file()}
    assert run_suite.main(["report", "--published", *page_options(tmp)]) == 0
    assert snapshot(tmp / "lb") == first
    assert {p: p.stat().st_mtime_ns for p in (tmp / "lb").rglob("*") if p.is_file()} == mtimes
    assert "(0 changed, 0 removed)" in capsys.readouterr().out

    # a sweep of one method into a fresh store: the committed pages are left byte for byte; the
    # local pages show its run beside them
    proto = tmp / "tiny-5t.yaml"
    write_tiny_5t(proto)
    assert run_suite.main(args + ["--protocols", str(proto), "--methods", "head_only", "--seeds", "1",
                                  "--store", str(tmp / "fresh.sqlite")]) == 0
    assert snapshot(tmp / "lb") == first
    for name in ("fmnist-5t__tiny.md", "cifar100-10t__tiny.md", "fmnist-5t__tiny__ablation-prior.md"):
        assert (tmp / "local" / name).read_bytes() == first[name]  # no local run there: the same page
    assert "head_only (local)" in (tmp / "local" / "tiny-5t__tiny.md").read_text()

    # the plugin sits beside the others with a paired test against SMoPE, in the Holm family
    md = (tmp / "lb" / "fmnist-5t__tiny.md").read_text()
    tests = {r["method"]: r for r in parse_tables(md)[1]}
    assert "Reference: **smope**" in md and tests["my_plugin"]["n"] == "5"
    assert tests["my_plugin"]["p (Holm)"] not in ("", "not in family")
    assert "my_plugin" in md.split("The Holm family")[1].split(".")[0]


def test_bounds_stay_out_of_the_holm_family(tmp_path):
    recs = published_world()
    for r in recs_for({"head_only": [-5.0, -4.0, -6.0, -5.5, -4.5]}):
        r["role"] = "lower bound"
        recs.append(r)
    render_all(recs, out_dir=tmp_path, figures=False)
    md = (tmp_path / "fmnist-5t__tiny.md").read_text()
    tests = {r["method"]: r for r in parse_tables(md)[1]}
    assert tests["head_only (lower bound)"]["p (Holm)"] == "not in family"
    assert tests["head_only (lower bound)"]["p"] != ""
    family = md.split("The Holm family is the ")[1]
    assert family.startswith("4 comparison(s)") and "head_only" not in family.split(".")[0]


def test_publish_refuses_a_conflict_and_names_both(tmp_path):
    recs = published_world()
    publish(recs, tmp_path)
    n = len(load_published(tmp_path))
    assert publish(recs, tmp_path).already == len(recs)  # same key, same numbers: nothing to do
    other = [[12.0, 12.0, 12.0], [None, 12.0, 12.0], [None, None, 12.0]]  # consistent in itself
    bad = dict(recs[0], metrics={**summarize(other), "final_acc": 12.0}, acc_matrix=other,
               per_class_acc={"0": 12.0}, device="cuda:0 (elsewhere)")
    with pytest.raises(RecordConflict) as e:
        publish([make_record(method="new", seed=9), bad], tmp_path, source="cluster.sqlite")
    msg = str(e.value)
    assert recs[0]["key"][:12] in msg and "cluster.sqlite" in msg and "elsewhere" in msg
    assert ".jsonl" in msg and "nothing was published" in msg
    assert len(load_published(tmp_path)) == n  # all or nothing


def test_publish_merges_a_store_from_elsewhere_through_the_cli(env, capsys):
    tmp, args = env
    cluster = RunStore(tmp / "cluster.sqlite")
    cluster.put_many([{**r, "status": "ok"} for r in recs_for(protocol="cub200-10t")])
    assert run_suite.main(["publish", str(tmp / "cluster.sqlite"), *page_options(tmp)]) == 0
    assert "published 20 new run(s)" in capsys.readouterr().out
    lines = (tmp / "records" / "cub200-10t__tiny.jsonl").read_text().splitlines()
    assert len(lines) == 20 and lines == sorted(lines, key=lambda s: (json.loads(s)["label"], json.loads(s)["seed"]))
    assert (tmp / "lb" / "cub200-10t__tiny.md").exists()
    # the same store again: nothing new; a conflicting one: exit 2, nothing written
    assert run_suite.main(["publish", str(tmp / "cluster.sqlite"), *page_options(tmp)]) == 0
    bad = RunStore(tmp / "bad.sqlite")
    r = recs_for(protocol="cub200-10t")[0]
    other = [[1.0, 1.0, 1.0], [None, 1.0, 1.0], [None, None, 1.0]]  # another result, consistent in itself
    bad.put({**r, "acc_matrix": other, "per_class_acc": {"0": 1.0}, "metrics": {**summarize(other), "final_acc": 1.0}})
    before = (tmp / "records" / "cub200-10t__tiny.jsonl").read_bytes()
    capsys.readouterr()
    assert run_suite.main(["publish", str(tmp / "bad.sqlite"), *page_options(tmp)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and r["key"][:12] in err and "bad.sqlite" in err
    assert (tmp / "records" / "cub200-10t__tiny.jsonl").read_bytes() == before


def test_reproduction_line_counts_a_planted_difference(env, capsys):
    tmp, args = env
    proto = tmp / "tiny-5t.yaml"
    write_tiny_5t(proto)
    sweep = args + ["--protocols", str(proto), "--methods", "head_only", "--seeds", "2"]
    assert run_suite.main(sweep) == 0
    assert run_suite.main(["publish", *page_options(tmp)]) == 0
    # plant a difference in one published record: another result for its key, consistent in itself
    # and sealed (a hand edit is refused on load: tests/test_record_integrity.py)
    path = tmp / "records" / "tiny-5t__tiny.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["acc_matrix"][0][4] += 10.0  # task 0: +10 points, so FAA +2
    rec["metrics"] = {**summarize(rec["acc_matrix"]), "final_acc": rec["metrics"]["final_acc"] + 2.0}
    for c in rec["classes_per_task"][0]:
        rec["per_class_acc"][str(c)] += 10.0
    lines[1] = json.dumps(seal_record(rec), sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run_suite.main(sweep + ["--store", str(tmp / "fresh.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "reproduced 1/2 published runs (max |dFAA| 2.00)" in out
    assert f"differs: tiny-5t · tiny · head_only · seed {rec['seed']}" in out
    assert "FAA published" in out and "; 1 accuracy-matrix entry differs" in out
    assert "published on" not in out  # same device: no device named
    # the published record, not the local run, is what the local page shows
    page = rows(tmp / "local" / "tiny-5t__tiny.md")["head_only"]
    pub = [json.loads(s)["metrics"]["faa"] for s in lines]
    assert pm(page["FAA"])[0] == pytest.approx(round(sum(pub) / 2, 2))


def test_a_difference_names_the_two_devices():
    """A processor of another model can flip a near-tied prediction: the line says where each ran."""
    pub = {"protocol": "p", "backbone": "b", "label": "m", "seed": 1, "key": "k" * 64, "device": "cpu",
           "metrics": {"faa": 77.4}, "acc_matrix": [[97.0, 59.5], [None, 62.0]]}
    loc = {**pub, "device": "cpu (2 cores, Intel(R) Xeon(R) Processor)", "metrics": {"faa": 77.5},
           "acc_matrix": [[97.0, 60.0], [None, 62.0]]}
    line = Reproduction(compared=1, differing=[(pub, loc)], max_dfaa=0.1).lines()[1]
    assert line.endswith("FAA published 77.40, here 77.50; 1 accuracy-matrix entry differs; "
                         "published on cpu, run here on cpu (2 cores, Intel(R) Xeon(R) Processor)")


def test_reproduction_flags_a_changed_default_configuration():
    old = make_record(seed=0)
    new = dict(old, key="other-key", spec={**old["spec"], "hparams": {"lr": 1.0}})
    rep = reproduction([new], [old])
    assert rep.compared == 0 and len(rep.changed_config) == 1
    assert "new configuration" in "\n".join(rep.lines())


def test_seeds_must_be_positive_and_nothing_is_touched(env, capsys):
    tmp, args = env
    publish(published_world(), tmp / "records")
    assert run_suite.main(["report", "--published", *page_options(tmp)]) == 0
    first = snapshot(tmp / "lb")
    for bad in ("0", "-1"):
        assert run_suite.main(args + ["--seeds", bad]) == 2
        assert "--seeds" in capsys.readouterr().err
    assert snapshot(tmp / "lb") == first


def test_merge_published_wins():
    pub = make_record(seed=0)
    local = dict(pub, metrics={**pub["metrics"], "faa": 1.0})
    merged = merge([pub], [local, make_record(seed=1)])
    assert len(merged) == 2 and merged[0]["_published"] and merged[0]["metrics"]["faa"] == pub["metrics"]["faa"]


# ------------------------------------------------------------------------------ issue 19

PLUGIN = '''"""A plugin: the lower bound's learner, entered as a method."""
from methods import register
from methods.head_only import HeadOnly

VERSION = 1  # what the tests edit: a change of the plugin's source


@register("mine")
class Mine(HeadOnly):
    role = "method"
    DEFAULTS = {"*": {"epochs": 1}}
'''


def git(repo: Path, *argv: str) -> str:
    import subprocess

    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def fresh_process(name: str) -> None:
    """Forget a plugin as a new `run_suite.py` process would not know it (a test runs every command
    in one process, where the module of a plugin file is imported once)."""
    import sys

    from methods import registry

    module = registry.get(name).__module__
    registry._REGISTRY.pop(name)
    sys.modules.pop(module)


@pytest.fixture()
def plugin_world(tmp_path, monkeypatch):
    """A clone-like git repository whose published records are `published_world`'s (fmnist-5t has
    smope, vq, l2p, coda and my_plugin over 5 seeds), its committed pages rendered from them and
    committed, run from its root with the default folders; tiny Fashion-MNIST and a plugin file
    outside it. The registry is restored after the test."""
    from leaderboard import layout
    from methods import registry

    registry.names()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for name in ("RECORDS_DIR", "LOCAL_PAGES_DIR"):  # the defaults, not conftest's folders
        monkeypatch.setattr(layout, name, Path(*{"RECORDS_DIR": ("leaderboard", "records"),
                                                  "LOCAL_PAGES_DIR": ("results", "leaderboard")}[name]))
    clone = tmp_path / "clone"
    (clone / "leaderboard").mkdir(parents=True)
    (clone / ".gitignore").write_text((Path(run_suite.__file__).parent / ".gitignore").read_text())
    publish(published_world(), clone / "leaderboard" / "records")
    monkeypatch.chdir(clone)
    assert run_suite.main(["report", "--published"]) == 0
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "published")
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "mine.py").write_text(PLUGIN)
    sweep = ["--plugin", str(tmp_path / "plugins" / "mine.py"), "--methods", "mine", "--seeds", "2",
             "--data-root", str(tmp_path / "data"), "--quiet", "--threads", "1", "--workers", "1"]
    return clone, sweep


def holm_family(md: str) -> str:
    return md.split("The Holm family is the ")[1].split(".")[0]


def test_a_plugin_sweep_changes_no_tracked_file_and_only_publishing_changes_the_pages(plugin_world, capsys):
    clone, sweep = plugin_world
    committed = (clone / "leaderboard" / "fmnist-5t__tiny.md").read_text()
    holm_before = {r["method"]: r["p (Holm)"] for r in parse_tables(committed)[1]}

    assert run_suite.main(sweep + ["--store", "scratch.sqlite"]) == 0
    out = capsys.readouterr().out
    # every tracked file as it was, and nothing new under leaderboard/ (the run logs go beside the store)
    assert git(clone, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(clone, "status", "--porcelain", "leaderboard") == ""
    assert "local pages:" in out and "results/leaderboard/" in out  # where the local pages went
    local = (clone / "results" / "leaderboard" / "fmnist-5t__tiny.md").read_text()
    assert "mine (local)" in rows(clone / "results" / "leaderboard" / "fmnist-5t__tiny.md")
    note = next(line for line in local.splitlines() if line.startswith("> **Local pages"))
    assert "mine (local)" in note
    assert "mine (local)" in holm_family(local)  # a local page may test its local rows, marked
    assert "2 run(s) of the local store are not published" in (
        clone / "results" / "leaderboard" / "README.md").read_text()

    # report renders the local pages too; report --published is a no-op here
    assert run_suite.main(["report", "--store", "scratch.sqlite"]) == 0
    assert run_suite.main(["report", "--published"]) == 0
    assert git(clone, "status", "--porcelain", "--untracked-files=no") == ""

    # publishing changes the committed pages: the row, unmarked, and now in the Holm family
    assert run_suite.main(["publish", "--store", "scratch.sqlite"]) == 0
    changed = git(clone, "status", "--porcelain")
    assert " M leaderboard/fmnist-5t__tiny.md" in changed and "leaderboard/records/fmnist-5t__tiny.jsonl" in changed
    after = (clone / "leaderboard" / "fmnist-5t__tiny.md").read_text()
    assert "mine" in rows(clone / "leaderboard" / "fmnist-5t__tiny.md") and "(local)" not in after
    assert "mine" in holm_family(after)
    assert holm_before != {r["method"]: r["p (Holm)"] for r in parse_tables(after)[1] if r["method"] != "mine"}


def test_the_holm_family_of_a_committed_page_holds_published_rows_only(tmp_path):
    """Rendered as `publish` and `report --published` render them, the committed pages get no local
    run; given local runs (the local pages), every row of them is marked, in the family too."""
    world = published_world()
    local = recs_for({"mine": [0.5, 0.1, 0.9, 0.3, 0.2]})
    render_all(world, (), tmp_path / "committed", figures=False)
    render_all(world, local, tmp_path / "local", figures=False)
    committed = (tmp_path / "committed" / "fmnist-5t__tiny.md").read_text()
    assert "mine" not in committed
    family = holm_family(committed)
    assert all(r["method"] in family for r in parse_tables(committed)[1])
    marked = (tmp_path / "local" / "fmnist-5t__tiny.md").read_text()
    assert "mine (local)" in holm_family(marked)
    labels = {r["method"] for r in parse_tables(marked)[0]}
    assert "mine (local)" in labels and "mine" not in labels


def test_a_changed_method_reruns_its_stale_runs_and_nothing_else(plugin_world, capsys, monkeypatch):
    """A stored run is reused only if the code that made it is the code of now (its record's code
    hash): an unchanged tree reruns nothing, a changed plugin file reruns its runs and says so, a
    run that recorded no code reruns, --rerun reruns everything; the reproduction line then compares
    the new numbers with the published ones."""
    from protocols import executors

    clone, sweep = plugin_world
    store = ["--store", "scratch.sqlite"]
    assert run_suite.main(sweep + store) == 0
    first = {r["key"]: r for r in RunStore(clone / "scratch.sqlite").records()}
    assert len(first) == 2
    code = next(iter(first.values()))["code"]
    assert code["plugin"] == {"file": "mine.py"} and "plugin:mine.py" in code["files"]
    assert "methods.head_only" in code["files"] and "protocols.runner" in code["files"]
    assert "methods.smope" not in code["files"]  # another method's module is not this run's code
    assert len(code["commit"] or "") in (0, 40) and code["dirty"] in (None, True, False)
    assert run_suite.main(["publish", *store]) == 0
    git(clone, "add", "-A", "leaderboard")
    git(clone, "commit", "-qm", "publish mine")
    capsys.readouterr()

    # an unchanged tree reruns nothing
    calls = []
    real_run = executors.run
    monkeypatch.setattr(executors, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert run_suite.main(sweep + store) == 0
    assert capsys.readouterr().out.startswith("2 runs planned, 2 already in scratch.sqlite, 0 to run\n")
    assert calls == []

    # the plugin's source changes: its runs are stale, run again, and compared with the published ones
    plugin = Path(sweep[1])
    plugin.write_text(plugin.read_text().replace("VERSION = 1", "VERSION = 2"))
    fresh_process("mine")
    assert run_suite.main(sweep + store) == 0
    out = capsys.readouterr().out
    assert "2 runs planned, 0 already in scratch.sqlite, 2 to run" in out
    assert "2 stale run(s) run again: code changed: plugin:mine.py" in out
    assert "ran 2 stored run(s) again:" in out and "reproduced 2/2 published runs" in out
    assert len(calls) == 2
    again = {r["key"]: r for r in RunStore(clone / "scratch.sqlite").records()}
    assert set(again) == set(first)  # the run keys stay the resolved specs'
    assert all(r["code"]["sha256"] != code["sha256"] for r in again.values())

    # a stored run that recorded no code (made before the field): its code cannot be known, it runs
    scratch = RunStore(clone / "scratch.sqlite")
    old = next(iter(again.values()))
    # (an old run has no seal either: both fields came after it)
    scratch.put({k: v for k, v in old.items() if k not in ("code", "record_sha256")})
    calls.clear()
    assert run_suite.main(sweep + store) == 0
    assert "1 stale run(s) run again: made before runs recorded their code" in capsys.readouterr().out
    assert len(calls) == 1

    # --rerun runs everything, and says why
    calls.clear()
    assert run_suite.main(sweep + store + ["--rerun"]) == 0
    out = capsys.readouterr().out
    assert "2 to run" in out and "2 stored run(s) run again: --rerun" in out and len(calls) == 2
    assert git(clone, "status", "--porcelain", "--untracked-files=no") == ""  # no sweep wrote a tracked file
