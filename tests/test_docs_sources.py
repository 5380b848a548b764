"""Docs point at real files: nothing outside tests/ cites the planning notes users never get
(DESIGN.md, specs/*.md and their files protocols.md, baselines.md, smope.md, avalanche.md,
comparators.md), and every link into docs/sources.md (`sources.md#...`) names a heading of it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "docs" / "sources.md"

#: What a citation of the absent notes looks like. A page of the suite whose name merely ends in one
#: of those words (`...__ablation-smope.md`) is not one: the name must stand on its own.
ABSENT = re.compile(
    r"DESIGN\.md|\bDESIGN\b|specs/|/work/shared|\b[Ss]pecs? §"
    r"|(?<![\w./-])(?:avalanche|baselines|smope|protocols|comparators)\.md\b")
ANCHOR_LINK = re.compile(r"sources\.md#([\w-]+)")
LOCAL_LINK = re.compile(r"\]\(#([\w-]+)\)")


def _tracked_files() -> list[Path]:
    """The repository's files: `git ls-files` in a checkout, else every file under the root."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _text(path: Path) -> str | None:
    """A file's text, or None for a binary file (weights, figures)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _texts() -> dict[str, str]:
    out = {}
    for p in _tracked_files():
        t = _text(p)
        if t is not None:
            out[p.relative_to(ROOT).as_posix()] = t
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, every character that is not a
    letter, digit, space, '-' or '_' dropped, spaces made '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(markdown: str) -> set[str]:
    """The anchors of a markdown page's headings (outside code fences), a repeated heading getting
    GitHub's -1, -2, ... suffixes."""
    seen: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_github_slugs_of_the_headings_other_text_links_to():
    assert github_slug("Avalanche 0.6.0") == "avalanche-060"
    assert github_slug("CODA-Prompt's L2P++, Deep L2P++ and DualPrompt") == \
        "coda-prompts-l2p-deep-l2p-and-dualprompt"
    assert github_slug("The schedulers' last_epoch reset") == "the-schedulers-last_epoch-reset"
    assert headings("# A\n## B c\n```\n# not a heading\n```\n## B c\n") == {"a", "b-c", "b-c-1"}


def test_the_absent_notes_pattern_finds_citations_and_spares_real_page_names():
    for cited in ("(baselines.md §1.4)", "see DESIGN.md", "specs/smope.md", "protocols.md §2",
                  "avalanche.md B.2", "spec §6.5", "/work/shared/DESIGN.md", "(DESIGN: one rule)"):
        assert ABSENT.search(cited), cited
    for fine in ("fmnist-5t__tiny__ablation-smope.md", "leaderboard/papers.md", "docs/sources.md#smope",
                 "a resolved spec without the seed", "paper §5.2"):
        assert not ABSENT.search(fine), fine


def test_no_tracked_file_outside_tests_cites_the_absent_notes():
    hits = []
    for name, text in _texts().items():
        if name.startswith("tests/"):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if ABSENT.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not hits, ("these lines cite files users do not have; cite the paper, the public code "
                      "(repository file:line) or a section of docs/sources.md instead:\n" + "\n".join(hits))


def test_every_sources_anchor_used_in_the_repository_exists():
    assert SOURCES.is_file(), "docs/sources.md is missing"
    page = SOURCES.read_text(encoding="utf-8")
    anchors = headings(page)
    used: dict[str, list[str]] = {}
    for name, text in _texts().items():
        for i, line in enumerate(text.splitlines(), 1):
            for a in ANCHOR_LINK.findall(line):
                used.setdefault(a, []).append(f"{name}:{i}")
            if name == "docs/sources.md":
                for a in LOCAL_LINK.findall(line):
                    used.setdefault(a, []).append(f"{name}:{i}")
    # the papers data and the method docstrings cite it, so an empty scan means a broken scan
    assert len(used) >= 10 and any(w.startswith("leaderboard/papers.yaml:") for ws in used.values() for w in ws)
    missing = {a: where for a, where in used.items() if a not in anchors}
    assert not missing, "links to headings docs/sources.md does not have: " + "; ".join(
        f"#{a} (used at {', '.join(w[:3])})" for a, w in sorted(missing.items()))


@pytest.mark.parametrize("name", ["leaderboard/papers.md", "leaderboard/cost.md"])
def test_the_rendered_pages_point_readers_at_docs_sources(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    assert "docs/sources.md" in text
