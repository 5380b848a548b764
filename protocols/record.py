"""The run record, defined once: its fields, its metrics and costs, its validation, and the record
of a run that failed.

A run record is a plain dict (JSON). The runner builds a complete one (`complete_record`), a sweep
builds a failed one (`failed_record`), the local store and the published records refuse one that
breaks the contract (`validate_record`, the same message in both), and the statistics and every
page read the names defined here.

A record verifies itself: every number derived from its accuracy matrix is recomputed
(`protocols.metrics.summarize`), the final accuracy and the matrix's last column are checked
against the per-class accuracies, WTP / TII against the final accuracy, and a record sealed by
the driver (`seal_record`) carries `record_sha256`, the hash of its own canonical JSON, so an edit
is found even where the numbers still agree. This module imports the standard library and the
metrics (numpy, no torch), so the leaderboard, which is built from records alone and never loads
torch, reads it too.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .metrics import summarize

__all__ = ["FIELDS", "OPTIONAL_FIELDS", "IDENTITY_FIELDS", "FAILED_RECORD_FIELDS", "REQUIRED_FIELDS", "FAILED_FIELDS", "Metric",
           "METRICS", "REQUIRED_METRICS", "HIGHER_IS_BETTER", "COST_FIELDS", "TIMING_FIELDS",
           "REAL_PROTOCOLS", "RecordError", "complete_record", "failed_record", "validate_record",
           "record_problems", "utc_now", "record_digest", "seal_record", "derived_problems", "seal_problems",
           "BALANCED_TEST_SETS"]

#: Every field of a complete run record, with what it holds.
FIELDS: dict[str, str] = {
    "key": "sha256 of the resolved spec: a sweep skips a stored key made by the code of now (`code`), "
           "publishing compares them",
    "protocol": "the protocol's name",
    "backbone": "the backbone's name",
    "method": "the method's registered name",
    "label": "the row's label: the method's name, or an ablation rung's label ('+ router loss')",
    "table": "'main' or 'ablation:<name>'",
    "position": "the rung of an ablation ladder (display order only)",
    "precision": "'fp32', or 'bf16' (autocast of the minibatch forward; part of the key)",
    "status": "'ok' (a run that raised leaves a failed record instead: FAILED_RECORD_FIELDS)",
    "variant": "{} for the default configuration of its row, else what differs: {'top_k': 3}, "
               "{'protocol.subsample.train_per_class': 20}, {'precision': 'bf16'}",
    "role": "'method', 'lower bound' or 'upper bound' (the bounds stay out of the Holm family)",
    "seed": "the seed (class order, initialisation, data order)",
    "spec": "the resolved spec: protocol data fields, backbone, method, hyperparameters, seed, label, "
            "table (and precision when not fp32); its hash is the key",
    "metrics": "METRICS, in percent",
    "acc_matrix": "T x T list: acc[j][i] = accuracy (%) on task j's test images after training task i, "
                  "null where j > i",
    "per_class_acc": "{class id (str): accuracy (%)} after the last task",
    "class_order": "the classes in the order the seed gives them",
    "classes_per_task": "the classes of each task, in order",
    "cost": "COST_FIELDS, counted on the run's own backbone and protocol",
    "timings": "TIMING_FIELDS, in seconds",
    "versions": "python, torch, timm, avalanche, and promptcl (the git commit, '-dirty' with local "
                "changes, else the package version)",
    "backbone_sha256": "sha256 of the checkpoint ('random-init' without one)",
    "backbone_source": "where the weights came from (a file, timm's hub, or random-init)",
    "device": "the device the run used ('cuda:0 (<GPU name>)', 'cpu (<cores> cores, <CPU model>)'; "
              "records before 2026-12-03 say 'cpu')",
    "threads": "torch CPU threads of the run",
    "data_hash": "sha256 over the file list / split the stream used",
    "split": "ImageNet-R only: {name, sha256} of the split",
    "data_source": "which copy of the data the run read: 'data_root' (under --data-root) or 'system' "
                   "(the system-wide Fashion-MNIST copy, used only when no --data-root was given)",
    "eval_batch_size": "the evaluation batch size (results never depend on it)",
    "created": "when the run ended (ISO 8601, UTC, seconds)",
    "argv": "the command line of the sweep that ran it (stamped by the driver, never by a worker)",
    "code": "the code that ran (protocols.code_identity): {commit, dirty, sha256, files: {module: "
            "sha256}, plugin?}; a stored run whose sha256 is not the code's of now is stale and rerun",
    "run_gflops": "forward GFLOPs of the whole run by part (protocols.work): {train, stages, eval, total}; "
                  "the counted figure (images x passes x GFLOPs per image), not a timing",
    "record_sha256": "sha256 of the record's canonical JSON without this field (`record_digest`): "
                     "sealed by the driver when it stores the run, verified wherever the record is read",
}
#: Fields a complete record may lack: the split (ImageNet-R only), the command line (stamped by
#: the driver after the run), and what records made before them lack: the data copy, the code
#: identity, the per-run GFLOPs and the seal (added by the driver last).
OPTIONAL_FIELDS: tuple[str, ...] = ("split", "argv", "data_source", "code", "run_gflops", "record_sha256")
#: What a run was asked to do: the fields a complete and a failed record share.
IDENTITY_FIELDS: tuple[str, ...] = ("key", "protocol", "backbone", "method", "label", "table", "position",
                                    "precision", "seed", "spec")
#: What a failed run's record holds instead of results: it is stored so that a sweep goes on, lists
#: it and retries it; it never reaches a table.
FAILED_RECORD_FIELDS: tuple[str, ...] = (*IDENTITY_FIELDS, "status", "error", "traceback", "versions",
                                         "created", "argv", "record_sha256")

#: The fields without which a complete record cannot be placed in a table or reproduced (records
#: written before the other fields existed are still valid).
REQUIRED_FIELDS: tuple[str, ...] = ("key", "protocol", "backbone", "method", "label", "table", "seed",
                                    "spec", "metrics", "acc_matrix", "class_order", "created")
#: The same for a failed record.
FAILED_FIELDS: tuple[str, ...] = ("key", "protocol", "backbone", "method", "label", "table", "seed",
                                  "spec", "created", "error")
_TEXT_FIELDS = ("key", "protocol", "backbone", "method", "label", "table", "created")


@dataclass(frozen=True)
class Metric:
    title: str
    definition: str  # one line, for the pages
    higher_is_better: bool
    #: the formula over acc[j][i] (task j after training task i; T tasks, 1-based), "" for a
    #: metric of the last evaluation's predictions (docs/sources.md#metrics)
    formula: str = ""
    #: which accuracy-matrix entries (or which predictions) it reads
    entries: str = ""


#: The metrics of a record (percent), in the order tables and exports list them. All come from the
#: run's own evaluation: the first four from its accuracy matrix (protocols/metrics.py), the others
#: from the predictions of the last evaluation.
METRICS: dict[str, Metric] = {
    "faa": Metric("FAA", "final average accuracy: the mean over tasks of each task's accuracy after the "
                         "last task", True,
                  "(1/T) Σ_j acc[j][T]", "the last column"),
    "caa": Metric("CAA", "cumulative average accuracy: the mean over tasks i of the average accuracy on "
                         "tasks 0..i after task i", True,
                  "(1/T) Σ_i (1/i) Σ_{j≤i} acc[j][i]", "every evaluated entry (j ≤ i), column means"),
    "ffm": Metric("FFM", "final forgetting: the mean over all tasks but the last of the best earlier "
                         "accuracy minus the final one", False,
                  "(1/(T-1)) Σ_{j<T} (max_{j≤i<T} acc[j][i] - acc[j][T])",
                  "rows j < T: the best entry before the last column, minus the last column"),
    "bwt": Metric("BWT", "backward transfer: the mean over all tasks but the last of the final accuracy "
                         "minus the accuracy just after learning the task", True,
                  "(1/(T-1)) Σ_{j<T} (acc[j][T] - acc[j][j])",
                  "rows j < T: the last column minus the diagonal"),
    "final_acc": Metric("final accuracy", "the accuracy over every test image after the last task", True,
                        "", "the last evaluation's predictions, every test image counted once"),
    "wtp": Metric("WTP", "within-task prediction: the final accuracy with each image's task given", True,
                  "", "the last evaluation's logits, argmax over the classes of the image's own task"),
    "tii": Metric("TII", "task-identity inference: the share of final predictions that fall in the "
                         "image's own task", True,
                  "", "the last evaluation's predictions (argmax over all seen classes)"),
}
#: The metrics every table and test is built from: a complete record without them is refused.
REQUIRED_METRICS: tuple[str, ...] = ("faa", "caa", "ffm", "bwt")
HIGHER_IS_BETTER: dict[str, bool] = {name: m.higher_is_better for name, m in METRICS.items()}

#: A record's `cost`: what the method adds to the frozen ViT (head excluded), its head, its ViT
#: passes per image and its forward GFLOPs per image (2 per multiply-add), training and test.
COST_FIELDS: tuple[str, ...] = ("trainable_params", "head_params", "passes_train", "passes_test",
                                "gflops_train", "gflops_test")
#: A record's `timings`, in seconds.
TIMING_FIELDS: tuple[str, ...] = ("train_s", "eval_s", "total_s")

#: The shipped protocols on real data sets at real resolution (the papers report on them; the
#: smoke dry run covers them), by data set, then task count.
REAL_PROTOCOLS: tuple[str, ...] = ("cifar100-10t", "imagenet-r-5t", "imagenet-r-10t", "imagenet-r-20t",
                                   "cub200-10t")


class RecordError(ValueError):
    """A record that does not follow the run-record contract; nothing was stored or published."""


def utc_now() -> str:
    """The time stamp records carry (`created`)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_names(record: Mapping[str, Any], allowed: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """A producer that builds a record with a field this module does not define, or without one
    it requires, is a bug in the suite (not the user's to fix)."""
    unknown = sorted(set(record) - set(allowed))
    missing = [f for f in allowed if f not in record and f not in optional]
    if unknown or missing:
        raise ValueError(f"run record built with unknown fields {unknown} / without {missing}; "
                         "the fields are defined in protocols/record.py")


def complete_record(identity: Mapping[str, Any], **results: Any) -> dict[str, Any]:
    """A complete run's record: `identity` (IDENTITY_FIELDS) and every result field of FIELDS
    (OPTIONAL_FIELDS may be left out), validated."""
    record = {**identity, "status": "ok", **results}
    _check_names(record, tuple(FIELDS), OPTIONAL_FIELDS)
    _check_names(record["metrics"], tuple(METRICS), ())
    _check_names(record["cost"], COST_FIELDS, ())
    _check_names(record["timings"], TIMING_FIELDS, ())
    validate_record(record)
    return record


def failed_record(identity: Mapping[str, Any], *, error: str, traceback: str, versions: Mapping[str, str],
                  created: str) -> dict[str, Any]:
    """The record of a run that raised: what was asked (`identity`), and why there is no result."""
    record = {**identity, "status": "failed", "error": error, "traceback": traceback,
              "versions": dict(versions), "created": created}
    _check_names(record, FAILED_RECORD_FIELDS, ("argv", "record_sha256"))
    validate_record(record)
    return record


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def record_problems(record: Mapping[str, Any]) -> list[str]:
    """Everything that makes `record` break the contract ([] for a valid record)."""
    problems: list[str] = []
    status = record.get("status", "ok")
    if status not in ("ok", "failed"):
        problems.append(f"'status' must be 'ok' or 'failed', got {status!r}")
    required = FAILED_FIELDS if status == "failed" else REQUIRED_FIELDS
    missing = [f for f in required if f not in record or record[f] is None]
    if missing:
        problems.append(f"missing fields {missing}")
    for f in _TEXT_FIELDS:
        if f in record and record[f] is not None and (not isinstance(record[f], str) or not record[f]):
            problems.append(f"{f!r} must be a non-empty string, got {record[f]!r}")
    seed = record.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        problems.append(f"'seed' must be an int, got {seed!r}")
    table = record.get("table")
    if isinstance(table, str) and table and table != "main" and not (
            table.startswith("ablation:") and len(table) > len("ablation:")):
        problems.append(f"'table' must be 'main' or 'ablation:<name>', got {table!r}")
    metrics = record.get("metrics")
    if metrics is not None and status == "ok":
        if not isinstance(metrics, Mapping):
            problems.append(f"'metrics' must be a dict, got {type(metrics).__name__}")
        else:
            bad = [m for m in REQUIRED_METRICS if not _is_number(metrics.get(m))]
            if bad:
                problems.append(f"metrics {bad} missing or not finite numbers (have {dict(metrics)})")
    matrix = record.get("acc_matrix")
    if matrix is not None and (not isinstance(matrix, list) or not matrix
                               or any(not isinstance(r, list) or len(r) != len(matrix) for r in matrix)):
        problems.append("'acc_matrix' must be a non-empty square T x T list of lists")
    if not problems and status == "ok":
        problems += derived_problems(record)
    if "record_sha256" in record:
        problems += seal_problems(record)
    return problems


# ------------------------------------------------------------------------------ verification

#: The data sets whose test sets hold the same number of images of every class (Fashion-MNIST
#: 1,000 and CIFAR-100 100 per class; a per-class subsample keeps that): there the final accuracy
#: is the mean of the per-class accuracies, and each task's final accuracy the mean over its
#: classes. Elsewhere (ImageNet-R, CUB-200) they are weighted means: bounded by those accuracies.
BALANCED_TEST_SETS: tuple[str, ...] = ("fashion_mnist", "cifar100")
#: Metrics recomputed from the accuracy matrix must agree to float noise (the same formulas).
_SAME = 1e-6
#: Per-class and final accuracies are averaged in float32 by the evaluation: agreement to this
#: many percentage points (float32 noise is about 1e-5 here; a hand edit moves a number by far more).
_FLOAT32 = 1e-3


def derived_problems(record: Mapping[str, Any]) -> list[str]:
    """What in a complete record disagrees with itself ([] when everything agrees): FAA, CAA,
    FFM and BWT recomputed from its accuracy matrix; the final accuracy, and each task's final
    accuracy, against the per-class accuracies; WTP and TII against the final accuracy (an image
    is right exactly when both its within-task prediction and its task are: final accuracy <=
    min(WTP, TII) and >= WTP + TII - 100). WTP and TII themselves need the predictions, which a
    record does not keep: the seal protects them (`seal_problems`)."""
    metrics, acc = record["metrics"], record["acc_matrix"]
    try:
        recomputed = summarize(acc)
    except ValueError as e:
        return [f"'acc_matrix' {e}"]
    problems = []
    for name, value in recomputed.items():
        if abs(float(metrics[name]) - value) > _SAME:
            problems.append(f"metrics.{name} is {metrics[name]!r} but its accuracy matrix gives {value!r}")
    for name in ("final_acc", "wtp", "tii"):
        if name in metrics and metrics[name] is not None and not _is_number(metrics[name]):
            problems.append(f"metrics.{name} must be a finite number, got {metrics[name]!r}")
    if problems:
        return problems
    final, wtp, tii = (metrics.get(m) for m in ("final_acc", "wtp", "tii"))
    if final is not None and wtp is not None and tii is not None and not (
            wtp + tii - 100 - _FLOAT32 <= final <= min(wtp, tii) + _FLOAT32):
        problems.append(f"metrics.final_acc {final!r} is impossible with wtp {wtp!r} and tii {tii!r} (an "
                        "image is right exactly when its task and its class within the task are)")
    per_class = record.get("per_class_acc")
    if isinstance(per_class, Mapping) and per_class:
        problems += _per_class_problems(record, per_class, final, acc)
    return problems


def _per_class_problems(record: Mapping[str, Any], per_class: Mapping[str, Any], final: Any,
                        acc: list) -> list[str]:
    if not all(_is_number(v) for v in per_class.values()):
        return ["'per_class_acc' must map class ids to finite numbers (percent)"]
    spec = record.get("spec") or {}
    protocol = spec.get("protocol") if isinstance(spec, Mapping) else None
    balanced = isinstance(protocol, Mapping) and protocol.get("dataset") in BALANCED_TEST_SETS
    problems = []

    def check(what: str, value: float, classes: list[str]) -> None:
        values = [float(per_class[c]) for c in classes]
        mean = sum(values) / len(values)
        if balanced and abs(value - mean) > _FLOAT32:
            problems.append(f"{what} is {value!r} but the mean of its classes' accuracies (per_class_acc) "
                            f"is {mean!r}")
        elif not min(values) - _FLOAT32 <= value <= max(values) + _FLOAT32:
            problems.append(f"{what} is {value!r}, outside its classes' accuracies "
                            f"({min(values)!r} .. {max(values)!r} in per_class_acc)")

    if final is not None:
        check("metrics.final_acc", float(final), list(per_class))
    t = len(acc)
    tasks = record.get("classes_per_task")
    if isinstance(tasks, list) and len(tasks) >= t:
        for j, classes in enumerate(tasks[:t]):
            names = [str(c) for c in classes] if isinstance(classes, list) else []
            if names and all(c in per_class for c in names):
                check(f"acc[{j}][{t - 1}] (task {j} after the last task)", float(acc[j][t - 1]), names)
    return problems


def _canonical(record: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return json.dumps(body, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of the record's canonical JSON (sorted keys, no spaces, UTF-8) without its
    `record_sha256`: what `seal_record` stores and every reader compares."""
    try:
        return hashlib.sha256(_canonical(record)).hexdigest()
    except (TypeError, ValueError) as e:
        raise RecordError(f"run record {record.get('key')!r} is not plain JSON: {e}") from None


def seal_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` with its `record_sha256`: the driver seals each record as the last thing before
    storing it (after stamping the command line), so any later edit of any field (WTP and TII
    included, which cannot be recomputed without the predictions) is found on load."""
    return {**{k: v for k, v in record.items() if k != "record_sha256"}, "record_sha256": record_digest(record)}


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def seal_problems(record: Mapping[str, Any]) -> list[str]:
    """[] when `record_sha256` is the hash of the record's content, else what is wrong."""
    seal = record.get("record_sha256")
    if not isinstance(seal, str) or not _HEX64.match(seal):
        return [f"'record_sha256' must be a sha256 (64 hex digits), got {seal!r}"]
    try:
        digest = record_digest(record)
    except RecordError as e:
        return [str(e)]
    if digest != seal:
        return ["its content does not match its record_sha256 (the record was changed after it was "
                "made: restore the line from version control, or rerun the run)"]
    return []


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise RecordError naming every problem, so that an incomplete run never reaches a table. The
    store (`RunStore.put`) and publishing (`leaderboard.records.publish`, `load_published`) both
    call this: a record is refused with the same message wherever it goes."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a run record must be a dict (docs/CONTRACTS.md), got {type(record).__name__}")
    problems = record_problems(record)
    if problems:
        raise RecordError(f"run record {record.get('key', '<no key>')!r} rejected: " + "; ".join(problems))
