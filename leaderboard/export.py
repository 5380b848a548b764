"""One CSV row per run, for spreadsheets and ad-hoc analysis (the `export` command)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from protocols.record import METRICS, TIMING_FIELDS

from .output import OutputError, same_file, write_atomic
from .records import config_id, variant_text

__all__ = ["export_csv", "CSV_COLUMNS", "HEADER_START", "written_by_export"]

#: The columns of the CSV, in order: every metric of a record, its timings and two of its costs.
CSV_COLUMNS: tuple[str, ...] = (
    "protocol", "backbone", "method", "label", "table", "seed", "key", "config", "variant",
    "published", *METRICS, *TIMING_FIELDS, "trainable_params", "gflops_test",
)


#: How an export's first line starts: an existing file is overwritten only when it starts so (a
#: CSV this command wrote; later versions may add columns after these).
HEADER_START = ",".join(CSV_COLUMNS[:7]) + ","


def written_by_export(path: Path) -> bool:
    """Whether the file `path` is a CSV an export wrote (recognised by its header line)."""
    try:
        with path.open("rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return False
    return first.startswith(HEADER_START.encode())


def export_csv(records: Iterable[Mapping[str, Any]], path: str | Path,
               protect: Iterable[str | Path] = ()) -> pd.DataFrame:
    """Write one row per run (atomically); returns the frame written.

    Fields a record lacks (e.g. no timings) are left empty rather than guessed. `published` says
    whether the run is a published record. Written only to a path that does not exist or to a CSV
    an export wrote before (its header); refused (OutputError, nothing written): a path in
    `protect` (the run store), a folder, a name without .csv, any other existing file (a database
    or a spreadsheet named x.csv included).
    """
    path = Path(path)
    if any(same_file(path, Path(p)) for p in protect):
        raise OutputError(f"export {path}: that is the run store; refusing to overwrite it with CSV")
    if path.is_dir():
        raise OutputError(f"export {path}: a folder; give a file name ending in .csv")
    if path.exists() and path.suffix.lower() != ".csv":
        raise OutputError(f"export {path}: exists and is not a .csv file; refusing to overwrite it")
    if path.suffix.lower() != ".csv":
        raise OutputError(f"export {path}: give a file name ending in .csv")
    if path.exists() and not written_by_export(path):
        raise OutputError(f"export {path}: exists and is not a CSV an export wrote (its first line is not "
                          f"the export's header {HEADER_START}...); refusing to overwrite it: give a new "
                          "file name, or move that file away")
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
            **{m: metrics.get(m) for m in METRICS},
            **{t: timings.get(t) for t in TIMING_FIELDS},
            "trainable_params": cost.get("trainable_params"), "gflops_test": cost.get("gflops_test"),
        })
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    if not df.empty:
        df["seed"] = df["seed"].astype("Int64")
        df["trainable_params"] = pd.to_numeric(df["trainable_params"]).astype("Int64")
    try:
        write_atomic(path, df.to_csv(index=False))
    except OutputError as e:
        raise OutputError(f"export {e}") from None
    return df
