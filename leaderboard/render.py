"""The leaderboard, rendered: the one place that decides which pages are written where.

Why a generator with no numbers of its own: every figure in leaderboard/*.md must be traceable to
run records (the published ones in `leaderboard/records/`, plus a local store's runs not published
yet), so the pages can be deleted and rebuilt anywhere. Generated files carry a marker line; only
files with that marker are ever overwritten or removed, a file is written only when its content
changes, and a page is dated by its newest record, never by the time it was rendered: rendering
the same records twice gives the same bytes and leaves a clean git tree.

The pages themselves are built below this module and know nothing of each other's files: the
result tables (`tables`), the papers' numbers beside the suite's (`papers`) and the costs
(`cost_page`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .cost_page import render_cost
from .output import GeneratedFiles, RenderResult
from .papers import render_papers
from .records import merge
from .reference_page import PAGE as REFERENCE_PAGE
from .reference_page import render_reference
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
               reference: Iterable[Mapping[str, Any]] = ()) -> RenderResult:
    """The whole leaderboard into `out_dir`: the tables from the published records merged with the
    local runs not published yet (`records.merge`), the papers page and the cost page beside them,
    and, given reference records of those runs (checked), the reference behaviours page, which the
    papers page's rows of those methods link."""
    records = merge(published, local)
    reference = list(reference)
    linked = {r["method"]: REFERENCE_PAGE for r in reference}
    extra = {"papers.md": render_papers(records, linked=linked), "cost.md": render_cost(records, profiles, smoke)}
    return render(records, out_dir, figures=figures, extra_pages=extra, reference=reference)
