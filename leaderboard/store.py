"""The run store: one SQLite file holding every complete RunRecord (docs/CONTRACTS.md).

Why SQLite from the standard library: a sweep must be able to skip keys it already has, survive
being killed half-way, and be copied around as one file; the leaderboard is rebuilt from it
without running anything. The record itself is kept verbatim as JSON; a few columns are pulled
out only to filter on.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RunStore", "RecordError", "REQUIRED_FIELDS", "REQUIRED_METRICS", "validate_record",
           "export_csv", "CSV_COLUMNS", "OutputError", "StoreError", "check_output_dir"]

#: Fields without which a record cannot be placed in a table or reproduced.
REQUIRED_FIELDS: tuple[str, ...] = (
    "key", "protocol", "backbone", "method", "label", "table", "seed",
    "spec", "metrics", "acc_matrix", "class_order", "created",
)
#: Metrics every table and test is built from (percent).
REQUIRED_METRICS: tuple[str, ...] = ("faa", "caa", "ffm", "bwt")
#: What a failed run's record holds instead of results (it is stored so a sweep goes on, can
#: list it and retries it; it never reaches a table).
FAILED_FIELDS: tuple[str, ...] = ("key", "protocol", "backbone", "method", "label", "table", "seed",
                                  "spec", "created", "error")

#: Filter names accepted by ``RunStore.records`` -> column.
_FILTER_COLUMNS = {"key": "key", "protocol": "protocol", "backbone": "backbone", "method": "method",
                   "label": "label", "table": "tbl", "tbl": "tbl", "seed": "seed", "status": "status"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key      TEXT PRIMARY KEY,
    protocol TEXT NOT NULL,
    backbone TEXT NOT NULL,
    method   TEXT NOT NULL,
    label    TEXT NOT NULL,
    tbl      TEXT NOT NULL,
    seed     INTEGER NOT NULL,
    created  TEXT NOT NULL,
    record   TEXT NOT NULL,
    status   TEXT NOT NULL DEFAULT 'ok'
);
CREATE INDEX IF NOT EXISTS runs_group ON runs (protocol, backbone, tbl, label, seed);
"""


class StoreError(ValueError):
    """The run store cannot be used (not a store, not writable, busy): nothing was changed."""


class RecordError(ValueError):
    """A record that does not follow the RunRecord contract; nothing was stored."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise RecordError naming every problem, so an incomplete run never reaches the leaderboard."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a run record must be a dict (docs/CONTRACTS.md), got {type(record).__name__}")
    problems: list[str] = []
    status = record.get("status", "ok")
    if status not in ("ok", "failed"):
        problems.append(f"'status' must be 'ok' or 'failed', got {status!r}")
    required = FAILED_FIELDS if status == "failed" else REQUIRED_FIELDS
    missing = [f for f in required if f not in record or record[f] is None]
    if missing:
        problems.append(f"missing fields {missing}")
    for f in ("key", "protocol", "backbone", "method", "label", "table", "created"):
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
    if problems:
        who = record.get("key", "<no key>")
        raise RecordError(f"run record {who!r} rejected: " + "; ".join(problems))


class RunStore:
    """Complete runs keyed by the hash of their resolved spec.

    Each call opens its own short connection, so a store object can be shared by a driver loop
    and pickled to workers without holding a file handle; only the driver is meant to write.
    """

    #: how long a write waits for another sweep's write to finish (each is one short transaction)
    busy_timeout_s: float = 30.0
    #: the columns a promptcl store's `runs` table has (a database without them is not one)
    _COLUMNS = frozenset({"key", "protocol", "backbone", "method", "label", "tbl", "seed", "created", "record"})

    def __init__(self, path: str | Path = "results/suite.sqlite", flag: str = "--store") -> None:
        """Open (creating if missing) the store at `path`; `flag` is how the user named it (the
        CLI option), for the messages. Raises StoreError, having changed nothing, for a folder, a
        file that is not SQLite, another program's database or a damaged store."""
        self.path = Path(path)
        self.flag = flag
        if self.path.is_dir():
            raise StoreError(f"{flag} {self.path} is a folder; give a file, e.g. {self.path / 'suite.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{flag} {self.path}: cannot create its folder ({e.strerror or e})") from None
        with self._connect() as conn:
            self._check_is_a_store(conn)
            conn.executescript(_SCHEMA)
            cols = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            if "status" not in cols:  # a store made before failed runs were kept
                conn.execute("ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'ok'")
                conn.commit()

    def _check_is_a_store(self, conn: sqlite3.Connection) -> None:
        """Refuse another program's SQLite database before anything is added to it."""
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if not name.startswith("sqlite_")}
        if tables and "runs" not in tables:
            raise StoreError(f"{self.flag} {self.path} is not a promptcl run store (an SQLite database "
                             f"with the tables {', '.join(sorted(tables)[:6])}); give another path")
        if "runs" in tables:
            cols = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            if not self._COLUMNS <= cols:
                raise StoreError(f"{self.flag} {self.path} is not a promptcl run store (its table 'runs' "
                                 f"has the columns {', '.join(sorted(cols))}); give another path")

    def check_writable(self) -> None:
        """Raise StoreError now, before any run starts, if a finished run could not be stored.

        `BEGIN IMMEDIATE` alone succeeds on a read-only database (SQLite takes the lock, and finds
        out it cannot write only when it writes), so the check writes a table and rolls it back."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("CREATE TABLE promptcl_write_check (x)")
            finally:
                conn.rollback()

    #: what SQLite says about a file it cannot use -> what the user reads (anything else SQLite
    #: raises is a bug in this module, and keeps its traceback)
    _SQLITE_PROBLEMS = (
        (("locked", "busy"), "is busy: another sweep (or program) held its write lock longer than "
                             "this one waits; wait for it to finish, or give another {flag}"),
        (("readonly", "read-only", "permission"), "is not writable ({msg}); fix its permissions or give "
                                                  "another {flag}"),
        (("unable to open",), "cannot be opened ({msg}); check the path and its folder's permissions"),
        (("disk is full", "disk full"), "cannot be written: the disk is full ({msg}); free space and rerun "
                                        "(stored runs are kept)"),
        (("not a database", "malformed", "disk i/o error", "file is encrypted", "corrupt"),
         "is damaged or not a promptcl run store (SQLite says: {msg}); give another path, or restore "
         "the file from a copy"),
    )

    def _store_error(self, e: sqlite3.Error) -> StoreError | None:
        msg = str(e)
        for needles, text in self._SQLITE_PROBLEMS:
            if any(n in msg.lower() for n in needles):
                return StoreError(f"{self.flag} {self.path} " + text.format(msg=msg, flag=self.flag))
        return None

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection; SQLite's complaints about the file become one StoreError.
        The busy timeout lets sweeps share a store: each write is one short transaction."""
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s)
        except sqlite3.Error as e:
            raise (self._store_error(e) or e) from None
        try:
            yield conn
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.IntegrityError) or (err := self._store_error(e)) is None:
                raise
            raise err from None
        finally:
            conn.close()

    # -- writing -------------------------------------------------------------------------------
    def put(self, record: Mapping[str, Any], overwrite: bool = True) -> None:
        """Store one complete run atomically.

        A key already present is replaced (a run is a pure function of its spec, so a repeat is
        the same run); pass ``overwrite=False`` to get an error instead.
        """
        self.put_many([record], overwrite=overwrite)

    def put_many(self, records: Iterable[Mapping[str, Any]], overwrite: bool = True) -> int:
        """Store several runs in one transaction: all of them or, on any error, none."""
        rows = []
        for rec in records:
            validate_record(rec)
            try:
                blob = json.dumps(rec, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise RecordError(f"run record {rec.get('key')!r} is not plain JSON: {e}") from None
            rows.append((rec["key"], rec["protocol"], rec["backbone"], rec["method"], rec["label"],
                         rec["table"], int(rec["seed"]), rec["created"], blob, rec.get("status", "ok")))
        if not rows:
            return 0
        verb = "INSERT OR REPLACE" if overwrite else "INSERT"
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    f"{verb} INTO runs (key, protocol, backbone, method, label, tbl, seed, created, record,"
                    " status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                conn.commit()
            except BaseException as e:  # KeyboardInterrupt included: leave nothing half-written
                conn.rollback()
                if isinstance(e, sqlite3.IntegrityError) and not overwrite:
                    raise RecordError(f"a run with one of the keys {[r[0] for r in rows]} is already stored "
                                      "(pass overwrite=True to replace it)") from None
                raise
        return len(rows)

    def delete(self, key: str) -> bool:
        """Remove one run (e.g. one found to be wrong); True if it existed."""
        with self._connect() as conn, conn:
            return conn.execute("DELETE FROM runs WHERE key = ?", (key,)).rowcount > 0

    # -- reading -------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether a complete run with this key is stored (a sweep skips it; a failed run it
        retries)."""
        with self._connect() as conn:
            return conn.execute("SELECT 1 FROM runs WHERE key = ? AND status = 'ok'",
                                (key,)).fetchone() is not None

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record for ``key``, or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT record FROM runs WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.has(key)

    def keys(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute("SELECT key FROM runs ORDER BY key")]

    def __len__(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        """Records matching all filters, ordered by protocol, backbone, table, label, seed.

        Filters: key, protocol, backbone, method, label, table, seed; a value may be a single
        value or a list/tuple/set meaning "any of these".
        """
        where, args = [], []
        for name, value in filters.items():
            col = _FILTER_COLUMNS.get(name)
            if col is None:
                raise ValueError(f"unknown filter {name!r}; valid filters: {sorted(set(_FILTER_COLUMNS) - {'tbl'})}")
            if isinstance(value, (list, tuple, set, frozenset)):
                values = list(value)
                if not values:
                    return []
                where.append(f"{col} IN ({', '.join('?' * len(values))})")
                args.extend(values)
            else:
                where.append(f"{col} = ?")
                args.append(value)
        sql = "SELECT record FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY protocol, backbone, tbl, label, seed, created, key"
        with self._connect() as conn:
            return [json.loads(r[0]) for r in conn.execute(sql, args)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())


#: The record's metrics that export_csv writes, and all its columns, in order.
CSV_METRICS: tuple[str, ...] = ("faa", "caa", "ffm", "bwt", "final_acc", "wtp", "tii")
CSV_COLUMNS: tuple[str, ...] = (
    "protocol", "backbone", "method", "label", "table", "seed", "key", "config", "variant",
    "published", *CSV_METRICS, "train_s", "eval_s", "total_s", "trainable_params", "gflops_test",
)


class OutputError(ValueError):
    """An output path that must not be written (it would destroy something)."""


def export_csv(records: Iterable[Mapping[str, Any]], path: str | Path,
               protect: Iterable[str | Path] = ()) -> "pd.DataFrame":
    """Write one row per run (for spreadsheets and ad-hoc analysis); returns the frame written.

    Fields a record lacks (e.g. no timings) are left empty rather than guessed. `published` says
    whether the run is a published record. Refused (OutputError, nothing written): a path in
    `protect` (the run store), a folder, or an existing file that is not a .csv.
    """
    import pandas as pd

    from .records import config_id, variant_text

    path = Path(path)
    if any(_same_file(path, Path(p)) for p in protect):
        raise OutputError(f"--export {path} is the run store: refusing to overwrite it with CSV")
    if path.is_dir():
        raise OutputError(f"--export {path} is a folder; give a file name ending in .csv")
    if path.exists() and path.suffix.lower() != ".csv":
        raise OutputError(f"--export {path} exists and is not a .csv file: refusing to overwrite it")
    if path.suffix.lower() != ".csv":
        raise OutputError(f"--export {path}: give a file name ending in .csv")
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        timings = r.get("timings") or {}
        cost = r.get("cost") or {}
        rows.append({
            "protocol": r.get("protocol"), "backbone": r.get("backbone"), "method": r.get("method"),
            "label": r.get("label"), "table": r.get("table"), "seed": r.get("seed"), "key": r.get("key"),
            "config": config_id(r),
            "variant": "; ".join(t for t in (variant_text(r.get("variant"), protocol=True),
                                             variant_text(r.get("variant"))) if t),
            "published": bool(r.get("_published", False)),
            **{m: metrics.get(m) for m in CSV_METRICS},
            **{t: timings.get(t) for t in ("train_s", "eval_s", "total_s")},
            "trainable_params": cost.get("trainable_params"), "gflops_test": cost.get("gflops_test"),
        })
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    if not df.empty:
        df["seed"] = df["seed"].astype("Int64")
        df["trainable_params"] = pd.to_numeric(df["trainable_params"]).astype("Int64")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
    except OSError as e:
        raise OutputError(f"--export {path}: cannot write it ({e.strerror or e})") from None
    return df



def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file (a symbolic or hard link to it included)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_dir(path: str | Path, flag: str) -> None:
    """Raise OutputError now if files cannot be written into the folder `path` (it need not exist
    yet): before a sweep runs or anything is published, not after. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; give a folder")
    existing = path
    while not existing.exists():  # the folder that would hold the ones still to be made
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, so no folder can be made there; "
                          "give another folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write into {existing} ({e.strerror or e}); give a "
                          "folder you can write to") from None
