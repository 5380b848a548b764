"""The run store: one SQLite file holding every run record, complete or failed (docs/CONTRACTS.md).

Why SQLite from the standard library: a sweep must be able to skip keys it already has, survive
being killed half-way, and be copied around as one file; the leaderboard is rebuilt from it
without running anything. The record itself is kept verbatim as JSON; a few columns are pulled
out only to filter on. What a record must hold is `protocols.record`'s to say: a record it
refuses is refused here with its message, the same as publishing gives.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from protocols.record import RecordError, validate_record

__all__ = ["RunStore", "StoreError"]

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
