"""leaderboard.store: the SQLite run store and the CSV export."""
import copy
import sqlite3

import pandas as pd
import pytest

from leaderboard.export import export_csv
from leaderboard.store import RunStore
from protocols.record import RecordError
from protocols.metrics import summarize


def make_record(method="smope", seed=0, protocol="fmnist-5t", backbone="tiny", label=None, table="main",
                shift=0.0, key=None, cost=True):
    """A RunRecord as in docs/CONTRACTS.md with metrics computed from a written matrix."""
    acc = [[90.0 + shift, 80.0 + shift, 70.0 + shift],
           [None, 85.0 + shift, 75.0 + shift],
           [None, None, 95.0 + shift]]
    m = summarize(acc)
    m["final_acc"] = m["faa"] + 0.5
    label = label or method
    rec = {
        "key": key or f"{protocol}-{backbone}-{label}-{table}-{seed}",
        "protocol": protocol, "backbone": backbone, "method": method, "seed": seed,
        "label": label, "table": table,
        "spec": {"protocol": {"name": protocol}, "backbone": backbone, "method": method, "hparams": {}, "seed": seed},
        "metrics": m, "acc_matrix": acc,
        "per_class_acc": {str(c): m["final_acc"] + (-1.0 if c % 2 else 1.0) for c in range(6)},  # mean final_acc
        "class_order": [3, 1, 0, 5, 2, 4],
        "timings": {"train_s": 10.0 + seed, "eval_s": 2.0, "total_s": 12.0 + seed},
        "versions": {"python": "3.11", "torch": "x", "timm": "x", "avalanche": "0.6.0", "promptcl": "0.1.0"},
        "backbone_sha256": "0" * 64, "device": "cpu", "data_hash": "abc",
        "created": f"2025-01-01T00:00:0{seed % 10}+00:00",
    }
    if cost:
        rec["cost"] = {"trainable_params": 230400, "head_params": 7690, "passes_train": 1, "passes_test": 1}
    return rec


def test_put_get_has_len_keys(tmp_path):
    path = tmp_path / "deep" / "dir" / "suite.sqlite"
    store = RunStore(path)
    assert path.exists() and len(store) == 0 and store.keys() == []
    r0, r1 = make_record(seed=0), make_record(seed=1)
    store.put(r0)
    store.put(r1)
    assert len(store) == 2
    assert store.has(r0["key"]) and r1["key"] in store and not store.has("nope")
    assert store.get(r0["key"]) == r0
    assert store.get("nope") is None
    assert store.keys() == sorted([r0["key"], r1["key"]])
    # same key again replaces, does not duplicate
    store.put(r0)
    assert len(store) == 2
    with pytest.raises(RecordError, match="already stored"):
        store.put(r0, overwrite=False)


def test_reopen_persists(tmp_path):
    path = tmp_path / "s.sqlite"
    rec = make_record(seed=3)
    RunStore(path).put(rec)
    again = RunStore(path)
    assert len(again) == 1 and again.get(rec["key"]) == rec


def test_records_filters(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    recs = [make_record(method=m, seed=s, protocol=p)
            for m in ("smope", "l2p") for s in (0, 1) for p in ("fmnist-5t", "cifar100-10t")]
    recs.append(make_record(method="smope", label="smope-noise", table="ablation:noise", seed=0))
    store.put_many(recs)
    assert len(store) == 9
    assert len(store.records()) == 9
    assert {r["method"] for r in store.records(method="l2p")} == {"l2p"}
    assert len(store.records(method="l2p")) == 4
    assert len(store.records(protocol="fmnist-5t", seed=1)) == 2
    assert len(store.records(seed=[0, 1], method="smope", table="main")) == 4
    assert [r["label"] for r in store.records(table="ablation:noise")] == ["smope-noise"]
    assert store.records(label=[]) == []
    assert store.records(backbone="sup21k") == []
    with pytest.raises(ValueError, match="unknown filter"):
        store.records(colour="red")


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.pop("metrics"), "metrics"),
    (lambda r: r.pop("key"), "key"),
    (lambda r: r.pop("acc_matrix"), "acc_matrix"),
    (lambda r: r["metrics"].pop("ffm"), "ffm"),
    (lambda r: r["metrics"].update(faa=float("nan")), "faa"),
    (lambda r: r.update(seed="0"), "seed"),
    (lambda r: r.update(table="extra"), "table"),
    (lambda r: r.update(acc_matrix=[[1.0, 2.0]]), "square"),
])
def test_incomplete_record_rejected(tmp_path, mutate, msg):
    store = RunStore(tmp_path / "s.sqlite")
    rec = make_record()
    mutate(rec)
    with pytest.raises(RecordError, match=msg):
        store.put(rec)
    assert len(store) == 0


def test_failed_batch_leaves_nothing(tmp_path):
    """An error inside the transaction (here a trigger failing on the second row) rolls back all rows."""
    path = tmp_path / "s.sqlite"
    store = RunStore(path)
    store.put(make_record(seed=9))
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON runs WHEN NEW.seed = 1 "
                     "BEGIN SELECT RAISE(ABORT, 'interrupted'); END")
    with pytest.raises(sqlite3.IntegrityError, match="interrupted"):
        store.put_many([make_record(seed=0), make_record(seed=1), make_record(seed=2)])
    assert len(store) == 1 and store.keys() == [make_record(seed=9)["key"]]
    with pytest.raises(sqlite3.IntegrityError):
        store.put(make_record(seed=1))
    assert len(store) == 1
    store.put(make_record(seed=0))  # the store is still usable afterwards
    assert len(store) == 2


def test_interrupt_during_write_leaves_nothing(tmp_path, monkeypatch):
    """A KeyboardInterrupt after the rows are written but before commit stores nothing."""
    store = RunStore(tmp_path / "s.sqlite")
    real_connect = sqlite3.connect

    class Interrupting:
        def __init__(self, conn):
            self._c = conn

        def __getattr__(self, name):
            return getattr(self._c, name)

        def commit(self):
            raise KeyboardInterrupt

    monkeypatch.setattr("leaderboard.store.sqlite3.connect", lambda *a, **k: Interrupting(real_connect(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        store.put_many([make_record(seed=0), make_record(seed=1)])
    monkeypatch.undo()
    assert len(RunStore(tmp_path / "s.sqlite")) == 0


def test_put_does_not_mutate_and_roundtrips_json(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    rec = make_record()
    before = copy.deepcopy(rec)
    store.put(rec)
    assert rec == before
    got = store.get(rec["key"])
    assert got["acc_matrix"][2][0] is None and got["metrics"] == rec["metrics"]


def test_export_csv(tmp_path):
    recs = [make_record(method="smope", seed=0), make_record(method="l2p", seed=1, shift=-5.0, cost=False)]
    out = tmp_path / "csv" / "runs.csv"
    df = export_csv(recs, out)
    back = pd.read_csv(out)
    assert list(back.columns) == ["protocol", "backbone", "method", "label", "table", "seed", "key", "config",
                                  "variant", "published", "faa", "caa", "ffm", "bwt", "final_acc", "wtp", "tii",
                                  "train_s", "eval_s", "total_s", "trainable_params", "gflops_test"]
    assert len(back) == 2 and len(df) == 2
    row = back.iloc[0]
    assert row["method"] == "smope" and row["seed"] == 0 and row["table"] == "main"
    assert row["faa"] == pytest.approx(80.0) and row["ffm"] == pytest.approx(15.0)
    assert row["bwt"] == pytest.approx(-15.0) and row["final_acc"] == pytest.approx(80.5)
    assert row["train_s"] == 10.0 and row["total_s"] == 12.0 and row["trainable_params"] == 230400
    assert back.iloc[1]["faa"] == pytest.approx(75.0)
    assert pd.isna(back.iloc[1]["trainable_params"])  # no cost in the record: left empty, not guessed


def test_export_refuses_to_destroy(tmp_path):
    """--export never overwrites the store or any existing non-CSV file (issue 11)."""
    from leaderboard.output import OutputError

    store = RunStore(tmp_path / "runs.sqlite")
    store.put(make_record())
    before = (tmp_path / "runs.sqlite").read_bytes()
    for bad in (tmp_path / "runs.sqlite", tmp_path / "notes.txt", tmp_path, tmp_path / "out.json"):
        if bad.name == "notes.txt":
            bad.write_text("keep me")
        with pytest.raises(OutputError):
            export_csv(store.records(), bad, protect=[tmp_path / "runs.sqlite"])
    assert (tmp_path / "runs.sqlite").read_bytes() == before and len(RunStore(tmp_path / "runs.sqlite")) == 1
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    export_csv(store.records(), tmp_path / "ok.csv", protect=[tmp_path / "runs.sqlite"])
