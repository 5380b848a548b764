"""Where the repository's results live: one root, the working directory.

The published records, the profile and smoke records and the pages are files of a checkout of
the repository, never of the installed package: run the suite from the checkout's root, or name
the folders on the command line (`--records-dir`, `--profiles-dir`, `--smoke-dir`,
`--leaderboard-dir`, `--local-leaderboard-dir`). Nothing is looked up or written beside the installed code, so a
non-editable install (`pip install .`) never writes into site-packages. The paths here are
relative: they resolve against the working directory when used.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["PAGES_DIR", "RECORDS_DIR", "PROFILES_DIR", "SMOKE_DIR", "LOCAL_PAGES_DIR"]

#: the committed pages and figures (`leaderboard/*.md`, `leaderboard/figures/`): rendered from the
#: published records alone, by `publish` and `report --published`
PAGES_DIR = Path("leaderboard")
#: the published run records, `<protocol>__<backbone>.jsonl`: the results (their reference records,
#: the same runs re-evaluated as the public codes evaluate, in its `reference/` subfolder)
RECORDS_DIR = PAGES_DIR / "records"
#: measurements kept apart from the results, `<device>.jsonl`: profile records (`profile`) ...
PROFILES_DIR = PAGES_DIR / "profiles"
#: ... and smoke records (`smoke`)
SMOKE_DIR = PAGES_DIR / "smoke"
#: the local pages (untracked, beside the default run store): the published records plus the local
#: store's runs not published yet, marked (local); what a sweep and `report` render
LOCAL_PAGES_DIR = Path("results") / "leaderboard"
