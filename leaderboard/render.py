"""The leaderboard, rendered: the one place that decides which pages are written where.

Why a generator with no numbers of its own: every figure in leaderboard/*.md must be traceable to
run records (the published ones in `leaderboard/records/`, plus a local store's runs not published
yet), so the pages can be deleted and rebuilt anywhere. Generated files carry a marker line; only
files with that marker are ever overwritten or removed, a file is written only when its content
changes, and a page is dated by its newest record, never by the time it was rendered: rendering
the same records twice gives the same bytes and leaves a clean git tree.

Two views, one code path: the committed pages (`leaderboard/`) are rendered from the published
records alone, so they change only when records are published and their paired tests' Holm
families hold published rows only; the local pages (`results/leaderboard/`) add the local store's
runs not published yet, each row of them marked (local) (`render_all`'s `local`).

The pages themselves are built below this module and know nothing of each other's files: the
result tables (`tables`), the papers' numbers beside the suite's (`papers`) and the costs
(`cost_page`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from protocols.record import REAL_PROTOCOLS

from .cost_page import render_cost
from .output import GeneratedFiles, RenderResult
from .papers import render_papers
from .records import merge, usable
from .reference_page import PAGE as REFERENCE_PAGE
from .reference_page import render_reference
from .stats import LOCAL_MARK
from .tables import NO_RUNS, render_tables

__all__ = ["render", "render_all", "RenderResult"]


def render(records: Iterable[Mapping[str, Any]], out_dir: str | Path = "leaderboard",
           reference_label: str | None = None, figures: bool = True,
           extra_pages: Mapping[str, str] | None = None,
           reference: Iterable[Mapping[str, Any]] = ()) -> RenderResult:
    """Write one page per protocol x backbone (and per ablation), figures and README.md.

    `records` are run records (published ones may carry `_published: True`; see
    `records.merge`). `extra_pages` ({file name: markdown}) are written beside them and linked
    from the index (the papers and cost pages). `reference`: reference records of these runs
    (`leaderboard.reference_records`, checked), shown on `reference-behaviours.md` when there are
    any. Returns every generated path; files whose content is unchanged are not rewritten, and
    generated files that no record backs any more are removed.
    """
    recs = [r for r in records if r.get("status", "ok") == "ok"]
    files = GeneratedFiles(out_dir)
    pages = dict(extra_pages or {})
    reference = list(reference)
    if reference:
        pages[REFERENCE_PAGE] = render_reference(reference, recs, files, figures)
    for name, text in sorted(pages.items()):
        files.page(name, text)
    index = render_tables(recs, files, reference_label, figures) if recs else NO_RUNS
    files.page("README.md", index + _extra_index(pages))
    return files.finish()


def _extra_index(extra_pages: Mapping[str, str] | None) -> str:
    if not extra_pages:
        return ""
    titles = []
    for name, text in sorted(extra_pages.items()):
        heading = next((ln[2:] for ln in text.splitlines() if ln.startswith("# ")), name)
        titles.append(f"- [{heading}]({name})")
    return "\n## Beside the tables\n\n" + "\n".join(titles) + "\n"


def render_all(published: Iterable[Mapping[str, Any]], local: Iterable[Mapping[str, Any]] = (),
               out_dir: str | Path = "leaderboard", profiles: Iterable[Mapping[str, Any]] = (),
               smoke: Iterable[Mapping[str, Any]] = (), figures: bool = True,
               run_costs: Mapping[str, Mapping[str, float]] | None = None,
               reference: Iterable[Mapping[str, Any]] = ()) -> RenderResult:
    """The whole leaderboard into `out_dir`: the tables, the papers page and the cost page.

    With `local` runs (not published; the local pages), those whose key is not published join the
    published records (`records.merge`), each marked: its row's label ends with (local) and every
    page that uses one says so. Without (the committed pages), only published records are shown.
    `run_costs` ({key: run GFLOPs}, counted by `protocols.work` for records made before the
    `run_gflops` field) fills that field where a record lacks it. `reference`: reference records of
    these runs (`leaderboard.reference_records`, checked) give the reference behaviours page, which
    the papers page's rows of those methods link."""
    records = merge(published, local)
    for r in records:
        if not r.get("_published"):
            r["_local"] = True
        if "run_gflops" not in r and run_costs and r.get("key") in run_costs:
            r["run_gflops"] = dict(run_costs[r["key"]])
    reference = list(reference)
    linked = {r["method"]: REFERENCE_PAGE for r in reference}
    extra = {"papers.md": _with_local_note(render_papers(records, linked=linked), _local_used(records, papers=True)),
             "cost.md": _with_local_note(render_cost(records, profiles, smoke), _local_used(records, papers=False))}
    return render(records, out_dir, figures=figures, extra_pages=extra, reference=reference)


def _local_used(records: Iterable[Mapping[str, Any]], papers: bool) -> int:
    """How many local runs the papers page (`papers`) or the cost page uses."""
    return sum(1 for r in records if r.get("_local") and usable(r)
               and (r.get("protocol") in REAL_PROTOCOLS if papers else (r.get("table") or "main") == "main"))


def _with_local_note(text: str, n_local: int) -> str:
    """`text` with a note under its title when it uses local runs (not published)."""
    if not n_local:
        return text
    head, sep, rest = text.partition("\n\n")  # the marker line and the title, then the page
    note = (f"> **Local pages, not the committed leaderboard.** The suite's numbers here include {n_local} "
            f"run(s) of the local store that are not published (marked `{LOCAL_MARK.strip()}` where a table "
            "names runs); the committed page uses published records only.")
    return head + sep + note + "\n\n" + rest
