"""The reference record, defined once: a trained run's re-evaluations under its method's reference
modes, kept beside the run's record and never inside it.

Why a record of its own: a run record holds the suite's evaluation, per sample, and the tables,
the paired tests and the reproduction check read it alone. The re-evaluations under the public
codes' batch-dependent test behaviours (`PromptStrategy.REFERENCE_MODES`: a batch vote of the
prompt choice, the prefix mixing) are measurements of the same trained model, so they live in a
companion record per run key (`leaderboard/records/reference/<protocol>__<backbone>.jsonl` once
published) that names the run it extends and repeats its per-sample accuracy matrix: that
matrix, equal to the published one, is the proof that the model re-evaluated is the published
one (no checkpoint is stored; the run is trained again). This module imports the standard library
and `protocols.record` only (no torch): the runner builds these records and the leaderboard, which
never loads torch, reads them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .record import RecordError

__all__ = ["REFERENCE_FIELDS", "OPTIONAL_REFERENCE_FIELDS", "EVALUATION_FIELDS", "REFERENCE_KEY", "DATASET_ORDER",
           "PER_SAMPLE", "reference_problems", "validate_reference", "mode_set_name"]

#: Every field of a reference record, with what it holds.
REFERENCE_FIELDS: dict[str, str] = {
    "key": "the run key of the run record it extends (the run was trained again from its spec)",
    "protocol": "the protocol's name (as in the run record)",
    "backbone": "the backbone's name (as in the run record)",
    "method": "the method's registered name (as in the run record)",
    "label": "the row's label (as in the run record)",
    "table": "'main' or 'ablation:<name>' (as in the run record)",
    "seed": "the seed (as in the run record)",
    "acc_matrix": "the re-run's own evaluation, per sample (T x T, acc[j][i]): equal to the run "
                  "record's, entry for entry, or the record is refused",
    "reference_modes": "{mode: what the public code does, file:line} of the method "
                       "(`PromptStrategy.REFERENCE_MODES`)",
    "reference_test": "{modes, batch_size, source}: how the reference configuration of this protocol "
                      "evaluates (`PromptStrategy.REFERENCE_TESTS`), or null when none is known",
    "test_order": "{rule, sha256}: the order test images were batched in (DATASET_ORDER) and the sha256 "
                  "of the per-task lists of data-set indices in that order (JSON, one list per task)",
    "evaluations": "list of EVALUATION_FIELDS: one per (mode set, test batch size), each image scored "
                   "once, one task's test set at a time, after every task",
    "device": "the device of the re-run ('cuda:0 (<GPU name>)', 'cpu')",
    "threads": "torch CPU threads of the re-run",
    "versions": "python, torch, timm, avalanche, promptcl of the re-run",
    "code": "the code that ran (the run record's `code`: protocols.code_identity), when it has one",
    "timings": "{run_s: the run without the re-evaluations, reference_s: the re-evaluations}",
    "created": "when the re-run ended (ISO 8601, UTC, seconds)",
}
#: The fields a reference record may lack (a run record made before it had a code identity).
OPTIONAL_REFERENCE_FIELDS: tuple[str, ...] = ("code",)
#: The fields of one evaluation of a reference record.
EVALUATION_FIELDS: dict[str, str] = {
    "modes": "the reference modes on, sorted ([] = per sample, the suite's evaluation)",
    "batch_size": "test images per forward",
    "order": "the rule the images were batched in (DATASET_ORDER)",
    "acc_matrix": "T x T, acc[j][i]: accuracy (%) on task j's test images after training task i",
    "metrics": "faa, caa, ffm, bwt of that matrix (protocols.metrics.summarize)",
}
#: The key under which a run (`RunOptions.reference_batch_sizes`) hands its reference record back
#: inside its run record; the `reference` command moves it to the reference records before the run
#: record is stored, so a run record never holds it.
REFERENCE_KEY = "reference"
#: Test images batched in their data set's own order within each task (the order of the reader's
#: test set: the test file for CIFAR-100 and Fashion-MNIST, images.txt for CUB-200, the split's
#: test list for ImageNet-R), as the reference codes' sequential test loaders over one task's
#: subset batch them; not the stream's class-grouped order.
DATASET_ORDER = "dataset"
#: `mode_set_name(())`: the suite's own evaluation.
PER_SAMPLE = "per sample"

_TEXT = ("key", "protocol", "backbone", "method", "label", "table", "created")


def mode_set_name(modes: Any) -> str:
    """How pages and messages name a set of modes: "per sample" or "batch_vote + prefix_mixing"."""
    return " + ".join(modes) if modes else PER_SAMPLE


def _matrix_problem(matrix: Any, size: int | None, what: str) -> str | None:
    """None if `matrix` is a T x T list (T = `size` when given) with finite numbers on and above
    the diagonal (j <= i) and None below, else what is wrong."""
    if not isinstance(matrix, list) or not matrix or any(not isinstance(r, list) or len(r) != len(matrix)
                                                         for r in matrix):
        return f"{what} must be a non-empty square T x T list of lists"
    if size is not None and len(matrix) != size:
        return f"{what} is {len(matrix)} x {len(matrix)}, the run's is {size} x {size}"
    for j, row in enumerate(matrix):
        for i, v in enumerate(row):
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if (j <= i and not number) or (j > i and v is not None):
                return f"{what}[{j}][{i}] must be {'a finite number' if j <= i else 'null'}, got {v!r}"
    return None


def reference_problems(record: Mapping[str, Any]) -> list[str]:
    """Everything that makes `record` break the reference-record contract ([] for a valid one).
    Whether it matches its run record is the loader's to check (`leaderboard.reference_records`)."""
    if not isinstance(record, Mapping):
        return [f"a reference record must be a dict, got {type(record).__name__}"]
    problems: list[str] = []
    missing = [f for f in REFERENCE_FIELDS if f not in record and f not in OPTIONAL_REFERENCE_FIELDS]
    unknown = sorted(set(record) - set(REFERENCE_FIELDS))
    if missing:
        problems.append(f"missing fields {missing}")
    if unknown:
        problems.append(f"unknown fields {unknown} (the fields are defined in protocols/reference_record.py)")
    for f in _TEXT:
        if f in record and (not isinstance(record[f], str) or not record[f]):
            problems.append(f"{f!r} must be a non-empty string, got {record[f]!r}")
    if "seed" in record and (not isinstance(record["seed"], int) or isinstance(record["seed"], bool)):
        problems.append(f"'seed' must be an int, got {record['seed']!r}")
    size = None
    if "acc_matrix" in record:
        problem = _matrix_problem(record["acc_matrix"], None, "acc_matrix")
        if problem:
            problems.append(problem)
        else:
            size = len(record["acc_matrix"])
    modes = record.get("reference_modes")
    if "reference_modes" in record and (not isinstance(modes, Mapping) or not modes):
        problems.append("'reference_modes' must be a non-empty {mode: description}")
        modes = {}
    test = record.get("reference_test")
    if test is not None and (not isinstance(test, Mapping) or set(test) != {"modes", "batch_size", "source"}):
        problems.append("'reference_test' must be null or {modes, batch_size, source}")
    order = record.get("test_order")
    if "test_order" in record and (not isinstance(order, Mapping) or order.get("rule") != DATASET_ORDER
                                   or not isinstance(order.get("sha256"), str)):
        problems.append(f"'test_order' must be {{rule: {DATASET_ORDER!r}, sha256}}, got {order!r}")
    evaluations = record.get("evaluations")
    if "evaluations" in record:
        if not isinstance(evaluations, list) or not evaluations:
            problems.append("'evaluations' must be a non-empty list")
            evaluations = []
        seen = set()
        for n, ev in enumerate(evaluations):
            where = f"evaluations[{n}]"
            if not isinstance(ev, Mapping) or set(ev) != set(EVALUATION_FIELDS):
                problems.append(f"{where} must have exactly the fields {list(EVALUATION_FIELDS)}")
                continue
            if (not isinstance(ev["modes"], list) or ev["modes"] != sorted(ev["modes"])
                    or any(m not in (modes or {}) for m in ev["modes"])):
                problems.append(f"{where}.modes must be a sorted list of the method's reference modes, "
                                f"got {ev['modes']!r}")
                continue
            b = ev["batch_size"]
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                problems.append(f"{where}.batch_size must be a positive int, got {b!r}")
            if ev["order"] != DATASET_ORDER:
                problems.append(f"{where}.order must be {DATASET_ORDER!r}, got {ev['order']!r}")
            problem = _matrix_problem(ev["acc_matrix"], size, f"{where}.acc_matrix")
            if problem:
                problems.append(problem)
            if not isinstance(ev["metrics"], Mapping):
                problems.append(f"{where}.metrics must be a dict")
            ident = (tuple(ev["modes"]), b)
            if ident in seen:
                problems.append(f"{where} repeats modes {ev['modes']} at batch {b}")
            seen.add(ident)
    return problems


def validate_reference(record: Mapping[str, Any]) -> None:
    """Raise RecordError naming every problem of `record` (see `reference_problems`)."""
    problems = reference_problems(record)
    if problems:
        key = record.get("key", "<no key>") if isinstance(record, Mapping) else "<not a dict>"
        raise RecordError(f"reference record {key!r} rejected: " + "; ".join(problems))
