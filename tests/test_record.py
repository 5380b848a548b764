"""protocols/record.py is the one definition of a run record: the store, publishing (in Python and
through the CLI) and loading the published records refuse a bad record with one and the same
message, and the producers build records only through it."""
import json
import sqlite3

import pytest

import run_suite
from leaderboard.records import load_published, publish
from leaderboard.store import RunStore
from protocols import record
from protocols.record import RecordError, complete_record, failed_record, validate_record
from protocols.schema import available, load_protocol
from test_leaderboard_store import make_record

IDENTITY = {"key": "k" * 64, "protocol": "fmnist-5t", "backbone": "tiny", "method": "l2p", "label": "l2p",
            "table": "main", "position": 0, "precision": "fp32", "seed": 0,
            "spec": {"method": "l2p", "seed": 0}}


def incomplete() -> dict:
    rec = make_record(seed=2)
    del rec["class_order"]
    return rec


def message(call) -> str:
    with pytest.raises(RecordError) as e:
        call()
    return str(e.value)


def test_a_record_missing_a_field_is_refused_with_one_message_everywhere(tmp_path, capsys):
    expected = message(lambda: validate_record(incomplete()))
    assert "missing fields ['class_order']" in expected and incomplete()["key"] in expected
    # the local store, and publishing, refuse it with exactly that message; nothing is written
    assert message(lambda: RunStore(tmp_path / "runs.sqlite").put(incomplete())) == expected
    assert message(lambda: publish([incomplete()], tmp_path / "records")) == expected
    assert len(RunStore(tmp_path / "runs.sqlite")) == 0 and not list((tmp_path / "records").glob("*"))

    # publish through the CLI: a store that holds such a record (written around RunStore.put)
    store = tmp_path / "cluster.sqlite"
    RunStore(store)
    rec = incomplete()
    with sqlite3.connect(store) as conn:
        conn.execute("INSERT INTO runs (key, protocol, backbone, method, label, tbl, seed, created, record) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (rec["key"], rec["protocol"], rec["backbone"], rec["method"], rec["label"], rec["table"],
                      rec["seed"], rec["created"], json.dumps(rec)))
    assert run_suite.main(["publish", str(store), "--records-dir", str(tmp_path / "records"),
                           "--no-render"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"

    # a published file holding it: the same message, after the file and line
    (tmp_path / "records").mkdir(exist_ok=True)
    (tmp_path / "records" / "fmnist-5t__tiny.jsonl").write_text(json.dumps(make_record(seed=1)) + "\n"
                                                               + json.dumps(rec) + "\n")
    loaded = message(lambda: load_published(tmp_path / "records"))
    assert loaded.startswith(f"{tmp_path / 'records' / 'fmnist-5t__tiny.jsonl'}:2: ") and loaded.endswith(expected)


def test_a_failed_record_is_the_identity_and_the_error():
    rec = failed_record(IDENTITY, error="ValueError: boom", traceback="Traceback ...", versions={"torch": "x"},
                        created=record.utc_now())
    assert rec["status"] == "failed" and {k: rec[k] for k in record.IDENTITY_FIELDS} == IDENTITY
    assert set(rec) == set(record.FAILED_RECORD_FIELDS) - {"argv", "record_sha256"}  # both stamped by the driver
    validate_record(rec)  # what the store requires of a failed run
    with pytest.raises(RecordError, match="'error'"):
        validate_record({**rec, "error": None})


def test_a_producer_cannot_invent_or_forget_a_field():
    """complete_record takes exactly the fields FIELDS defines (a bug in the suite otherwise)."""
    results = {f: None for f in record.FIELDS if f not in record.IDENTITY_FIELDS + ("status",)}
    results.update(metrics={**{m: 50.0 for m in record.METRICS}, "ffm": 0.0, "bwt": 0.0}, acc_matrix=[[50.0]],
                   class_order=[0],
                   cost={c: 1 for c in record.COST_FIELDS}, timings={t: 1.0 for t in record.TIMING_FIELDS},
                   created=record.utc_now())
    for optional in record.OPTIONAL_FIELDS:
        results.pop(optional)
    rec = complete_record(IDENTITY, **results)
    assert set(rec) == set(record.FIELDS) - set(record.OPTIONAL_FIELDS) and rec["status"] == "ok"
    with pytest.raises(ValueError, match="unknown fields \\['accuracy'\\]"):
        complete_record(IDENTITY, **results, accuracy=1.0)
    with pytest.raises(ValueError, match="without \\['class_order'\\]"):
        complete_record(IDENTITY, **{k: v for k, v in results.items() if k != "class_order"})
    with pytest.raises(ValueError, match="without \\['tii'\\]"):
        complete_record(IDENTITY, **{**results, "metrics": {m: 1.0 for m in record.METRICS if m != "tii"}})


def test_every_metric_has_a_title_a_definition_and_a_direction():
    assert set(record.REQUIRED_METRICS) <= set(record.METRICS)
    for name, m in record.METRICS.items():
        assert m.title and m.definition and "\n" not in m.definition, name
        assert record.HIGHER_IS_BETTER[name] is m.higher_is_better
    assert record.HIGHER_IS_BETTER["ffm"] is False  # forgetting: lower is better


def test_the_real_protocols_are_the_shipped_ones_on_real_data():
    """One list (the papers page and the smoke dry run read it): every shipped protocol but the
    embedded default, whose data set is the tiny Fashion-MNIST."""
    assert set(record.REAL_PROTOCOLS) == set(available()) - {"fmnist-5t"}
    assert all(load_protocol(p).dataset != "fashion_mnist" for p in record.REAL_PROTOCOLS)
