"""Published run records: the suite's results, kept in the repository as text.

Why JSON lines in `leaderboard/records/`: the local SQLite store is scratch space (per machine,
never committed); the published records are the results. One file per protocol x backbone, one
record per line, sorted, keys sorted: a new run is one added line, which diffs and merges like
code. Nothing here runs anything; the pages are rendered from these records (plus a local store's
runs that are not published yet), and a sweep compares the runs it shares with them.

Publishing only adds: a record whose key is already published with the same numbers is skipped,
one with other numbers is an error naming both (a run is a pure function of its spec, so two
results for one key mean a code, data or machine difference that a person must look at).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from protocols.record import RecordError, seal_record, validate_record

from .output import OutputError, slug, write_atomic, write_error

__all__ = ["load_measurements", "add_measurements", "RecordConflict", "PublishResult", "Reproduction",
           "config_id", "load_published", "merge", "publish", "reproduction", "same_result", "variant_text",
           "usable", "newest_created", "dumps", "locked", "LOCK_FILE", "read_record_line", "check_writable_file"]

#: accuracies are ratios of image counts: two runs agree when every entry agrees to this
_TOL = 1e-9


class RecordConflict(ValueError):
    """An incoming record has a published key but different numbers; nothing was written."""


def config_id(record: Mapping[str, Any]) -> str:
    """The id of a record's configuration: its resolved spec without the seed. Runs of one
    configuration over seeds form one table row; a row is never a name alone."""
    spec = {k: v for k, v in (record.get("spec") or {}).items() if k != "seed"}
    # a resolved spec holds its label and table already; records written by hand may not
    spec.setdefault("label", record.get("label"))
    spec.setdefault("table", record.get("table", "main"))
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def usable(record: Mapping[str, Any]) -> bool:
    """A run that may stand for its row on the papers and cost pages: not failed, and the default
    configuration (no variant)."""
    return record.get("status", "ok") in (None, "ok") and not record.get("variant")


def newest_created(records: Iterable[Mapping[str, Any]]) -> str | None:
    """The newest `created` of `records` (what a page is dated by), None without any."""
    stamps = [str(r["created"]) for r in records if r.get("created")]
    return max(stamps) if stamps else None


def variant_text(variant: Mapping[str, Any] | None, protocol: bool = False) -> str:
    """`top_k=3, lr=0.01` for the hyperparameter part of a variant, or, with `protocol=True`,
    `subsample.train_per_class=20` for its protocol part; "" when that part is the default."""
    items = []
    for k, v in sorted((variant or {}).items()):
        if k.startswith("protocol.") == protocol:
            items.append(f"{k.removeprefix('protocol.')}={_short(v)}")
    return ", ".join(items)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return str(v)


def dumps(record: Mapping[str, Any]) -> str:
    """One record as one line of canonical JSON (sorted keys: the same record, the same bytes)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)


def _sort_key(record: Mapping[str, Any]) -> tuple:
    return (record["table"], record.get("position", 0), record["label"], config_id(record),
            int(record["seed"]), record["key"])


def _file_for(record: Mapping[str, Any], directory: Path) -> Path:
    return directory / f"{slug(record['protocol'])}__{slug(record['backbone'])}.jsonl"


#: The lock file of a folder of records (published, profile or smoke): held across every
#: read-modify-write of the folder's files.
LOCK_FILE = ".publish.lock"
#: How long a publish waits for another one into the same folder (each holds it for a moment).
LOCK_TIMEOUT_S = 120.0
#: What git writes into a file it could not merge.
_CONFLICT_MARKERS = ("<<<<<<<", "=======", ">>>>>>>", "|||||||")


@contextlib.contextmanager
def locked(directory: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of a folder of records across a read-modify-write of its files, so that any
    number of simultaneous `publish` (two shells, two cluster jobs ending together) each add to
    what the others wrote instead of overwriting it. An exclusive `flock` on `LOCK_FILE` in the
    folder (through `filelock`, the library the field uses): released when the holder exits,
    however it exits, so a killed publish never leaves a stale lock."""
    directory = Path(directory)
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory / LOCK_FILE, timeout=timeout)
        lock.acquire()
    except Timeout:
        raise OutputError(f"{directory} is locked by another publish (it holds {directory / LOCK_FILE} "
                          f"for longer than {timeout:g} s); wait for it to finish and rerun") from None
    except OSError as e:
        raise write_error(directory / LOCK_FILE, e) from None
    try:
        yield
    finally:
        lock.release()


def read_record_line(line: str, where: str) -> dict[str, Any]:
    """One line of a records file as a validated record; RecordError naming `where` (file:line)
    for a line that does not parse (cut short, edited by hand, a merge-conflict marker) or a
    record that breaks the contract or disagrees with itself (`protocols.record.record_problems`)."""
    if line.startswith(_CONFLICT_MARKERS):
        raise RecordError(f"{where}: a merge-conflict marker ({line.strip()[:40]!r}): the file was merged "
                          "and the conflict left unresolved; keep every record's line, remove the markers "
                          "(published records only add lines) and rerun")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        cut = "" if line.endswith("\n") else " (the file's last line is cut short: a truncated write?)"
        raise RecordError(f"{where}: not a complete JSON record{cut}: {e}; restore the file from "
                          "version control") from None
    try:
        validate_record(record)
    except RecordError as e:
        raise RecordError(f"{where}: not a valid published record: {e}") from None
    return record


def load_published(directory: str | Path) -> list[dict[str, Any]]:
    """Every published record, each verified (`read_record_line`): a bad line is an error naming
    the file and line, and nothing is returned, so nothing renders from a damaged file."""
    directory = Path(directory)
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                record = read_record_line(line, where)
                if record["key"] in seen:
                    raise RecordError(f"{where}: key {record['key'][:12]} is already published at "
                                      f"{seen[record['key']]}")
                seen[record["key"]] = where
                out.append(record)
    return out


def merge(published: Iterable[Mapping[str, Any]], local: Iterable[Mapping[str, Any]]
          ) -> list[dict[str, Any]]:
    """What the pages show: every published record (marked `_published`), plus the local runs
    whose key is not published (complete ones only). A published record always wins over a local
    run of the same key, so a local run can add rows but never change a published number."""
    out = [{**r, "_published": True} for r in published]
    keys = {r["key"] for r in out}
    out += [dict(r) for r in local if r["key"] not in keys and r.get("status", "ok") == "ok"]
    return out


def same_result(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two records of one key hold the same result: every accuracy matrix entry and
    every metric both have agree (to float noise)."""
    ma, mb = a.get("acc_matrix") or [], b.get("acc_matrix") or []
    if len(ma) != len(mb):
        return False
    for ra, rb in zip(ma, mb):
        for x, y in zip(ra, rb):
            if (x is None) != (y is None) or (x is not None and abs(x - y) > _TOL):
                return False
    ka, kb = a.get("metrics") or {}, b.get("metrics") or {}
    return all(abs(ka[m] - kb[m]) <= 1e-6 for m in set(ka) & set(kb)
               if isinstance(ka[m], (int, float)) and isinstance(kb[m], (int, float)))


def _describe(record: Mapping[str, Any], where: str) -> str:
    m = record.get("metrics") or {}
    return (f"{where}: FAA {m.get('faa', float('nan')):.2f}, created {record.get('created')}, "
            f"device {record.get('device')}, code {(record.get('versions') or {}).get('promptcl')}")


@dataclass
class PublishResult:
    added: list[dict[str, Any]] = field(default_factory=list)
    already: int = 0  # same key, same numbers: nothing to do
    not_ok: int = 0  # failed runs are never published
    files: list[Path] = field(default_factory=list)


def publish(records: Iterable[Mapping[str, Any]], directory: str | Path,
            source: str = "the store") -> PublishResult:
    """Add complete runs to the published records; all or nothing, under the folder's lock
    (`locked`): simultaneous publishes each keep every run.

    A run whose key is published with the same numbers is skipped; with other numbers it raises
    `RecordConflict` naming both, before anything is written. A run without a seal (stored before
    records carried one) is sealed as it is published, so every line added from now on carries
    its `record_sha256`."""
    records, directory = list(records), Path(directory)
    for rec in records:
        if rec.get("status", "ok") == "ok":
            validate_record(rec)
    # first without the lock: a refusal (a conflict, a damaged or read-only file) creates nothing,
    # not even the lock file, and a store with nothing new takes no lock
    dry = _publish(records, directory, source, write=False)
    if not dry.added:
        return dry
    with locked(directory):  # then for real: what another publish added meanwhile is kept
        return _publish(records, directory, source, write=True)


def _publish(records: list[Mapping[str, Any]], directory: Path, source: str, write: bool) -> PublishResult:
    published = {r["key"]: r for r in load_published(directory)}
    result = PublishResult()
    incoming: dict[str, dict[str, Any]] = {}
    conflicts = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            result.not_ok += 1
            continue
        rec = dict(rec) if "record_sha256" in rec else seal_record(rec)
        old = published.get(rec["key"]) or incoming.get(rec["key"])
        if old is not None:
            if same_result(old, rec):
                result.already += 1
                continue
            conflicts.append(f"run {rec['key'][:12]} ({rec['protocol']} · {rec['backbone']} · "
                             f"{rec['label']} · seed {rec['seed']}):\n  published  "
                             + _describe(old, str(_file_for(old, directory)))
                             + "\n  incoming   " + _describe(rec, source))
            continue
        incoming[rec["key"]] = rec
    if conflicts:
        raise RecordConflict(f"{len(conflicts)} run(s) conflict with published records; nothing was "
                             "published. A published record is never replaced: find out why the "
                             "numbers differ.\n" + "\n".join(conflicts))
    by_file: dict[Path, list[dict[str, Any]]] = {}
    for rec in incoming.values():
        by_file.setdefault(_file_for(rec, directory), []).append(rec)
    for path in sorted(by_file):
        check_writable_file(path)
    for path, new in sorted(by_file.items()):
        old = [r for r in published.values() if _file_for(r, directory) == path]
        if write:
            write_atomic(path, "".join(dumps(r) + "\n" for r in sorted(old + new, key=_sort_key)))
        result.files.append(path)
    result.added = sorted(incoming.values(), key=_sort_key)
    return result


@dataclass
class Reproduction:
    """How a sweep's runs compare with the published records of the same keys."""

    compared: int = 0
    differing: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    max_dfaa: float = 0.0
    # default-configuration runs with no published key while the same row and seed is published:
    # the default configuration changed since publishing
    changed_config: list[dict[str, Any]] = field(default_factory=list)

    @property
    def same(self) -> int:
        return self.compared - len(self.differing)

    def lines(self) -> list[str]:
        out = [f"reproduced {self.same}/{self.compared} published runs (max |dFAA| {self.max_dfaa:.2f})"]
        for pub, loc in self.differing:
            out.append(f"  differs: {pub['protocol']} · {pub['backbone']} · {pub['label']} · seed "
                       f"{pub['seed']} (key {pub['key'][:12]}): FAA published "
                       f"{pub['metrics']['faa']:.2f}, here {loc['metrics']['faa']:.2f}"
                       + _where_it_differs(pub, loc))
        if self.changed_config:
            names = sorted({f"{r['protocol']} · {r['backbone']} · {r['label']}" for r in self.changed_config})
            out.append(f"  {len(self.changed_config)} run(s) of a published default row have a new "
                       f"configuration (not compared, not published): {', '.join(names)}")
        return out


def _where_it_differs(pub: Mapping[str, Any], loc: Mapping[str, Any]) -> str:
    """How many accuracy-matrix entries differ, and the two devices when they are not the same: a
    different processor can flip a near-tied prediction (floating-point kernels differ)."""
    entries = sum(a != b for row_p, row_l in zip(pub["acc_matrix"], loc["acc_matrix"])
                  for a, b in zip(row_p, row_l))
    out = f"; {entries} accuracy-matrix {'entry differs' if entries == 1 else 'entries differ'}"
    if pub.get("device") != loc.get("device"):
        out += f"; published on {pub.get('device')}, run here on {loc.get('device')}"
    return out


def reproduction(local: Iterable[Mapping[str, Any]], published: Iterable[Mapping[str, Any]]
                 ) -> Reproduction:
    """Compare `local` runs (a sweep's, status ok) with the published records of the same key."""
    pub = {r["key"]: r for r in published}
    rows = {(r["protocol"], r["backbone"], r["table"], r["label"], r["seed"])
            for r in pub.values() if not r.get("variant")}
    rep = Reproduction()
    for rec in local:
        if rec.get("status", "ok") != "ok":
            continue
        old = pub.get(rec["key"])
        if old is None:
            if not rec.get("variant") and (rec["protocol"], rec["backbone"], rec["table"],
                                           rec["label"], rec["seed"]) in rows:
                rep.changed_config.append(dict(rec))
            continue
        rep.compared += 1
        d = abs(float(old["metrics"]["faa"]) - float(rec["metrics"]["faa"]))
        rep.max_dfaa = max(rep.max_dfaa, d if math.isfinite(d) else math.inf)
        if not same_result(old, rec):
            rep.differing.append((dict(old), dict(rec)))
    return rep


def check_writable_file(path: Path) -> None:
    """OutputError, before anything is written, for a records file that is read-only: its
    owner made it so (no write bit: root's writes would ignore it, and a rename would replace
    it), or this user may not write it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise write_error(path, e) from None
    if not mode & 0o222 or not os.access(path, os.W_OK):
        raise OutputError(f"{path} is read-only; make it writable (chmod u+w) to add records to it, "
                          "or give another folder")


def load_measurements(directory: str | Path) -> list[dict[str, Any]]:
    """Every record of the JSON-lines files in `directory` (profile or smoke records)."""
    out = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        out += load_measurements_file(path)
    return out


def _measurement_order(r: Mapping[str, Any]) -> tuple:
    return (r.get("kind", ""), r.get("protocol", ""), r.get("backbone", ""), r.get("method", ""),
            r.get("precision", ""), r.get("workers", -1), r.get("batch_size", 0),
            r.get("created", ""), dumps(r))


def add_measurements(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Add profile or smoke records to the JSON-lines file `path` (one per device: measurements
    accumulate per device, like results): the union with what is there, exact duplicates dropped,
    sorted by kind, protocol, backbone, method, precision, workers, batch and date, so the same
    records always give the same bytes."""
    path = Path(path)
    records = list(records)
    with locked(path.parent):  # two profile or smoke commands ending together keep both
        old = load_measurements_file(path) if path.is_file() else []
        merged = {dumps(r): dict(r) for r in [*old, *records]}
        check_writable_file(path)
        write_atomic(path, "".join(dumps(r) + "\n" for r in sorted(merged.values(), key=_measurement_order)))
    return path


def load_measurements_file(path: Path) -> list[dict[str, Any]]:
    """The records of one profile or smoke file; RecordError naming the file and line for a line
    that is not one JSON object (cut short, a merge-conflict marker, edited by hand)."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            if line.startswith(_CONFLICT_MARKERS):
                raise RecordError(f"{where}: a merge-conflict marker ({line.strip()[:40]!r}): resolve the "
                                  "conflict (keep every record's line) and rerun")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not a JSON record: {e}; restore the file from version "
                                  "control") from None
            if not isinstance(record, dict):
                raise RecordError(f"{where}: not a JSON object (a record), got {type(record).__name__}")
            out.append(record)
    return out
