"""Reference records (`protocols.reference_record`): where they live, how they are checked on load,
added locally and published.

Why beside the run records and not in them: the published run records are the suite's results,
per sample, and the tables, the paired tests and the reproduction check read them alone. A
reference record re-evaluates one of those runs as its method's public code evaluates (a batch
vote, the prefix mixing, at several test batch sizes); published, it lives in
`<records dir>/reference/<protocol>__<backbone>.jsonl` (one line per run key, sorted: it diffs and
merges like the run records; `load_published` reads only the records folder's own files, never
this subfolder), and before publishing in `<store>.reference.jsonl` beside the local store that
holds its run record (`results/suite.reference.jsonl` for `results/suite.sqlite`).

A reference record is accepted only for a run whose record is there (published, or local for the
local ones) and whose per-sample matrix it repeats exactly: the run was trained again to be
re-evaluated (no checkpoint is stored), and that matrix is the proof that the model re-evaluated
is the one the record describes. Every evaluation's metrics are recomputed from its matrix. A line
that breaks any of this is refused with its file and line.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.metrics import summarize
from protocols.record import RecordError, seal_record
from protocols.reference_record import REFERENCE_KEY, validate_reference

from .output import slug, write_atomic
from .records import PublishResult, RecordConflict, check_writable_file, dumps, locked

__all__ = ["REFERENCE_SUBDIR", "reference_dir", "local_reference_file", "check_reference", "read_reference",
           "load_reference", "add_reference", "plan_reference", "publish_reference", "same_reference", "ReferenceStore"]

#: the published reference records' folder, inside the published records' folder
REFERENCE_SUBDIR = "reference"
_IDENTITY = ("protocol", "backbone", "method", "label", "table", "seed")
_TOL = 1e-9


def reference_dir(records_dir: str | Path) -> Path:
    """Where the published reference records of `records_dir`'s runs are."""
    return Path(records_dir) / REFERENCE_SUBDIR


def local_reference_file(store: str | Path) -> Path:
    """The reference records of the runs of the local store `store` (not published yet)."""
    store = Path(store)
    return store.with_name(f"{store.stem}.reference.jsonl")


def check_reference(record: Mapping[str, Any], run: Mapping[str, Any] | None, where: str,
                    runs_from: str = "published") -> None:
    """Raise RecordError (starting with `where`, e.g. "file:line") unless `record` is a valid
    reference record of the run record `run` (None: no run of that key in `runs_from`)."""
    try:
        validate_reference(record)
    except RecordError as e:
        raise RecordError(f"{where}: not a valid reference record: {e}") from None
    key = record["key"]
    if run is None:
        raise RecordError(f"{where}: reference record of run {key[:12]}, which is not a {runs_from} run; "
                          "a reference record is kept only beside the record of the run it re-evaluates")
    differ = [f for f in _IDENTITY if record[f] != run.get(f)]
    if differ:
        raise RecordError(f"{where}: reference record of run {key[:12]} names another run ("
                          + ", ".join(f"{f} {record[f]!r} vs {run.get(f)!r}" for f in differ) + ")")
    if record["acc_matrix"] != run.get("acc_matrix"):
        raise RecordError(f"{where}: the re-run's per-sample accuracy matrix differs from the run record's "
                          f"(run {key[:12]}: {run['label']} seed {run['seed']}), so the model re-evaluated is "
                          "not the one recorded; remove this line and re-run it where the run reproduces")
    for n, ev in enumerate(record["evaluations"]):
        try:
            recomputed = summarize(ev["acc_matrix"])
        except ValueError as e:
            raise RecordError(f"{where}: evaluations[{n}]: {e}") from None
        off = [m for m, v in recomputed.items()
               if not isinstance(ev["metrics"].get(m), (int, float)) or not math.isclose(
                   ev["metrics"][m], v, rel_tol=_TOL, abs_tol=_TOL)]
        if off:
            raise RecordError(f"{where}: evaluations[{n}] ({ev['modes'] or 'per sample'} at batch "
                              f"{ev['batch_size']}): metrics {off} are not those of its accuracy matrix")


def read_reference(path: str | Path) -> list[tuple[dict[str, Any], str]]:
    """Each line of the JSON-lines file `path` with its "file:line" (not checked yet)."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: not a JSON record: {e}") from None
    return out


def _files(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_dir():
        return sorted(source.glob("*.jsonl"))
    return [source] if source.is_file() else []


def load_reference(sources: Iterable[str | Path], runs: Iterable[Mapping[str, Any]],
                   runs_from: str = "published") -> list[dict[str, Any]]:
    """Every reference record of `sources` (folders of JSON-lines files, or files; missing ones
    are skipped), each checked against its run in `runs` (`check_reference`); a key given twice is
    an error naming both lines."""
    by_key = {r["key"]: r for r in runs}
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for source in sources:
        for path in _files(source):
            for record, where in read_reference(path):
                check_reference(record, by_key.get(record.get("key")) if isinstance(record, dict) else None,
                                where, runs_from)
                if record["key"] in seen:
                    raise RecordError(f"{where}: run {record['key'][:12]} already has a reference record at "
                                      f"{seen[record['key']]}")
                seen[record["key"]] = where
                out.append(record)
    return out


def _sort_key(record: Mapping[str, Any]) -> tuple:
    return (record["table"], record["label"], int(record["seed"]), record["key"])


def _file_for(record: Mapping[str, Any], directory: Path) -> Path:
    return directory / f"{slug(record['protocol'])}__{slug(record['backbone'])}.jsonl"


def same_reference(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two reference records of one run hold the same evaluations (to float noise)."""
    def matrices(r):
        return {(tuple(ev["modes"]), ev["batch_size"]): ev["acc_matrix"] for ev in r["evaluations"]}

    def close(x, y):
        return all((u is None) == (v is None) and (u is None or abs(u - v) <= _TOL)
                   for ru, rv in zip(x, y) for u, v in zip(ru, rv)) and len(x) == len(y)

    ma, mb = matrices(a), matrices(b)
    return (close(a["acc_matrix"], b["acc_matrix"]) and ma.keys() == mb.keys()
            and all(close(ma[k], mb[k]) for k in ma))


def add_reference(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Add reference records to the local file `path`: one per run key (a newer re-run of a key
    replaces the older), sorted, written atomically."""
    path = Path(path)
    merged = {r["key"]: dict(r) for r, _ in (read_reference(path) if path.is_file() else [])}
    merged.update({r["key"]: dict(r) for r in records})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(dumps(r) + "\n" for r in sorted(merged.values(), key=_sort_key)))
    return path


def plan_reference(records: Iterable[Mapping[str, Any]], directory: str | Path,
                   runs: Iterable[Mapping[str, Any]], source: str = "the store") -> PublishResult:
    """What `publish_reference` would add (`added`) and skip (`already`), or the error it would
    raise, without writing anything: run it before publishing anything else, so that a publish
    is all or nothing. `runs`: the run records the reference records must extend."""
    directory = Path(directory)
    runs = list(runs)
    by_key = {r["key"]: r for r in runs}
    published = {r["key"]: r for r in load_reference([directory], runs)}
    result = PublishResult()
    incoming: dict[str, dict[str, Any]] = {}
    conflicts = []
    for n, rec in enumerate(records):
        run = by_key.get(rec.get("key")) if isinstance(rec, Mapping) else None
        check_reference(rec, run, f"{source} (reference record {n + 1})")
        old = published.get(rec["key"]) or incoming.get(rec["key"])
        if old is not None:
            if same_reference(old, rec):
                result.already += 1
            else:
                conflicts.append(f"run {rec['key'][:12]} ({rec['protocol']} · {rec['backbone']} · {rec['label']} · "
                                 f"seed {rec['seed']}): published on {old.get('device')} ({old.get('created')}), "
                                 f"incoming on {rec.get('device')} ({rec.get('created')})")
            continue
        incoming[rec["key"]] = dict(rec)
    if conflicts:
        raise RecordConflict(f"{len(conflicts)} reference record(s) differ from the published ones of the same "
                             "runs; nothing was published. A published record is never replaced: find out why "
                             "the evaluations differ.\n" + "\n".join(conflicts))
    result.added = sorted(incoming.values(), key=_sort_key)
    return result


def publish_reference(records: Iterable[Mapping[str, Any]], directory: str | Path,
                      published_runs: Iterable[Mapping[str, Any]], source: str = "the store") -> PublishResult:
    """Add reference records to the published ones in `directory`; all or nothing. Each must
    re-evaluate a published run and repeat its matrix (`check_reference`); one whose key already
    has a published reference record is skipped when it holds the same evaluations and raises
    `RecordConflict` otherwise, before anything is written (`plan_reference`)."""
    directory, records, runs = Path(directory), list(records), list(published_runs)
    if not plan_reference(records, directory, runs, source).added:  # nothing new: no lock, no file
        return plan_reference(records, directory, runs, source)
    with locked(directory):  # as the run records: what a simultaneous publish added is kept
        result = plan_reference(records, directory, runs, source)
        published = load_reference([directory], runs)
        by_file: dict[Path, list[dict[str, Any]]] = {}
        for rec in result.added:
            by_file.setdefault(_file_for(rec, directory), []).append(rec)
        for path in sorted(by_file):
            check_writable_file(path)
        for path, new in sorted(by_file.items()):
            old = [r for r in published if _file_for(r, directory) == path]
            write_atomic(path, "".join(dumps(r) + "\n" for r in sorted(old + new, key=_sort_key)))
            result.files.append(path)
    return result


@dataclass
class ReferenceStore:
    """The store the `reference` command hands its runs to (anything with has/put, as a sweep's):
    it takes each run record's reference record out (`REFERENCE_KEY`) before the run record goes
    to `store`, and adds it to the local file `path`. A run whose key already has a record (in
    `known`, the published runs, or in `store`) with another per-sample matrix did not reproduce:
    neither record is kept, and the pair is listed in `refused`."""

    store: Any
    path: Path
    known: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    added: list[dict[str, Any]] = field(default_factory=list)
    refused: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def has(self, key: str) -> bool:
        return self.store.has(key)

    def put(self, record: dict[str, Any]) -> None:
        reference = record.pop(REFERENCE_KEY, None)
        if reference is not None and "record_sha256" in record:  # sealed with it: sealed again without
            record = seal_record(record)
        if record.get("status", "ok") != "ok" or reference is None:
            if not self.store.has(record["key"]):  # a failed re-run never replaces a stored run
                self.store.put(record)
            return
        old = self.known.get(record["key"]) or self.store.get(record["key"])
        if old is not None and old.get("status", "ok") == "ok" and old.get("acc_matrix") != record["acc_matrix"]:
            self.refused.append((dict(old), record))
            return
        self.store.put(record)
        add_reference([reference], self.path)
        self.added.append(reference)
