"""Results that last (issue 9): published records, rows that are one configuration, pages that no
sweep can erase, the reproduction check, publishing and its conflicts."""
import json
from pathlib import Path

import pytest

import run_suite
from benchmarks.synthetic import write_fashion_mnist
from leaderboard.records import (RecordConflict, load_published, merge, publish, reproduction)
from leaderboard.render import render_all
from leaderboard.store import RunStore
from protocols.metrics import summarize
from protocols.record import seal_record
from test_leaderboard_render import parse_tables, pm
from test_leaderboard_stats import recs_for
from test_leaderboard_store import make_record


@pytest.fixture()
def env(tmp_path):
    """Tiny Fashion-MNIST in the real IDX format, and CLI arguments whose every output (store,
    published records, pages) lives under tmp_path."""
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    args = ["--data-root", str(tmp_path / "data"), "--store", str(tmp_path / "runs.sqlite"),
            "--records-dir", str(tmp_path / "records"), "--leaderboard-dir", str(tmp_path / "lb"),
            "--quiet", "--threads", "1", "--workers", "1"]
    return tmp_path, args


def page_options(tmp: Path) -> list[str]:
    """The options of `report` and `publish` that keep every output under tmp."""
    return ["--store", str(tmp / "runs.sqlite"), "--records-dir", str(tmp / "records"),
            "--leaderboard-dir", str(tmp / "lb")]


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
    page = tmp / "lb" / "fmnist-5t__tiny.md"
    default = rows(page)["head_only (epochs=1)"]["FAA"]  # epochs=1 is itself an override

    assert run_suite.main(args + base + ["--set", "head_only.lr=0.02", "--seeds", "1"]) == 0
    after = rows(page)
    assert after["head_only (epochs=1)"]["FAA"] == default  # not replaced, not averaged
    assert after["head_only (epochs=1, lr=0.02)"]["seeds (n)"] == "1"
    assert after["head_only (epochs=1, lr=0.02)"]["FAA"].endswith("± n/a")

    copy = tmp / "fmnist-copy.yaml"  # the shipped name, a tenth of the data
    text = (Path(run_suite.__file__).parent / "protocols" / "fmnist-5t.yaml").read_text()
    copy.write_text(text.replace("train_per_class: 200", "train_per_class: 6")
                    .replace("test_per_class: 100", "test_per_class: 2"))
    assert run_suite.main(args + ["--protocols", str(copy), "--methods", "head_only", "--seeds", "1",
                                  "--set", "head_only.epochs=1"]) == 0
    assert rows(page)["head_only (epochs=1)"]["FAA"] == default
    (other,) = [p for p in (tmp / "lb").glob("fmnist-5t-*__tiny.md")]
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
    assert run_suite.main(["report", *page_options(tmp)]) == 0
    first = snapshot(tmp / "lb")
    pages = [n for n in first if n.endswith(".md")]
    assert {"fmnist-5t__tiny.md", "cifar100-10t__tiny.md", "fmnist-5t__tiny__ablation-prior.md",
            "papers.md", "cost.md", "README.md"} <= set(pages)

    # --report twice: byte-identical files, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp / "lb").rglob("*") if p.is_file()}
    assert run_suite.main(["report", *page_options(tmp)]) == 0
    assert snapshot(tmp / "lb") == first
    assert {p: p.stat().st_mtime_ns for p in (tmp / "lb").rglob("*") if p.is_file()} == mtimes
    assert "(0 changed, 0 removed)" in capsys.readouterr().out

    # a sweep of one method into a fresh store: every page is still there with the same numbers
    proto = tmp / "tiny-5t.yaml"
    proto.write_text("name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                     "methods:\n  head_only: {epochs: 1}\n")
    assert run_suite.main(args + ["--protocols", str(proto), "--methods", "head_only", "--seeds", "1",
                                  "--store", str(tmp / "fresh.sqlite")]) == 0
    for name in pages:
        assert (tmp / "lb" / name).exists(), name
    for name in ("fmnist-5t__tiny.md", "cifar100-10t__tiny.md", "fmnist-5t__tiny__ablation-prior.md"):
        assert (tmp / "lb" / name).read_bytes() == first[name]
    assert (tmp / "lb" / "tiny-5t__tiny.md").exists()

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
    proto.write_text("name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                     "methods:\n  head_only: {epochs: 1}\n")
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
    # the published record, not the local run, is what the page shows
    page = rows(tmp / "lb" / "tiny-5t__tiny.md")["head_only"]
    pub = [json.loads(s)["metrics"]["faa"] for s in lines]
    assert pm(page["FAA"])[0] == pytest.approx(round(sum(pub) / 2, 2))


def test_reproduction_flags_a_changed_default_configuration():
    old = make_record(seed=0)
    new = dict(old, key="other-key", spec={**old["spec"], "hparams": {"lr": 1.0}})
    rep = reproduction([new], [old])
    assert rep.compared == 0 and len(rep.changed_config) == 1
    assert "new configuration" in "\n".join(rep.lines())


def test_seeds_must_be_positive_and_nothing_is_touched(env, capsys):
    tmp, args = env
    publish(published_world(), tmp / "records")
    assert run_suite.main(["report", *page_options(tmp)]) == 0
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
