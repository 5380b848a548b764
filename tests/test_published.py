"""The committed results: the pages are what the published records render to, and the README
quotes them faithfully. These read the repository's own records (no runs)."""
import re
from pathlib import Path

import run_suite
from helpers import section_tables
from leaderboard import layout
from leaderboard.records import load_measurements, load_published
from leaderboard.reference_records import load_reference, reference_dir
from leaderboard.render import render_all

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# the repository's own folders, read at import (conftest.py points sweeps elsewhere during a test)
LEADERBOARD, RECORDS, PROFILES, SMOKE = (ROOT / d for d in (layout.PAGES_DIR, layout.RECORDS_DIR,
                                                            layout.PROFILES_DIR, layout.SMOKE_DIR))

# the README's names for the page's labels
README_NAMES = {"joint (upper bound)": "joint", "HiDe-Prompt": "hide_prompt", "SMoPE": "smope",
                "VQ-Prompt": "vq_prompt", "CODA-Prompt": "coda_prompt", "head_only (lower bound)": "head_only",
                "DualPrompt": "dualprompt", "L2P": "l2p", "NoRGa": "norga", "OVOR": "ovor", "L2P++": "l2p_pp",
                "Deep L2P++": "deep_l2p_pp"}


def test_the_committed_pages_are_what_the_records_render_to(tmp_path):
    """A page edited by hand, or records committed without their pages, fails here: the committed
    pages are what `report --published` renders from the published records alone (the GFLOPs per
    run of records made before that field counted from their specs, as it counts them)."""
    published = load_published(RECORDS)
    assert published, "no published records"
    render_all(published, (), tmp_path, profiles=load_measurements(PROFILES), smoke=load_measurements(SMOKE),
               run_costs=run_suite.run_costs(published), reference=load_reference([reference_dir(RECORDS)], published))
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.md"))
    assert fresh and all((LEADERBOARD / p).is_file() for p in fresh)
    for p in fresh:
        assert (tmp_path / p).read_text() == (LEADERBOARD / p).read_text(), (
            f"leaderboard/{p} is not what leaderboard/records/ renders to: publish the runs it shows, "
            "or re-render from the records alone (`python run_suite.py report --published`)")


def test_the_readme_quotes_the_main_table_and_has_no_placeholders():
    text = README.read_text()
    assert not re.findall(r"__[A-Z][A-Z_]+__", text), "README placeholders left"
    block = text.split("<!-- results-table: leaderboard/fmnist-5t__tiny.md -->", 1)[1]
    readme = section_tables("## x\n" + block)["x"]
    page = {r["method"]: r for r in section_tables((LEADERBOARD / "fmnist-5t__tiny.md").read_text(),
                                                   ("# ",))["fmnist-5t · tiny"]}
    assert [README_NAMES[r["method"]] for r in readme] == list(page)  # same rows, same order
    for r in readme:
        p = page[README_NAMES[r["method"]]]
        for col in ("FAA", "CAA", "FFM", "BWT", "WTP", "TII"):
            assert r[col] == p[col], (r["method"], col)
        assert r["added params"] == p["trainable params"] and r["passes (test)"] == p["passes (test)"]
        assert r["GFLOPs per run"] == p["GFLOPs per run (forward)"]
