"""Files the leaderboard writes: checked before anything is written, written atomically, named
by a slug, and, for a render, written only when changed, with generated files no record backs any
more removed (and nothing else ever)."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .markdown import GENERATED_MARKERS

__all__ = ["OutputError", "check_output_dir", "same_file", "write_atomic", "write_if_changed", "slug",
           "is_generated", "RenderResult", "GeneratedFiles"]


class OutputError(ValueError):
    """An output path that must not be written (it would destroy something) or cannot be."""


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


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file (a symbolic or hard link to it included)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a killed or
    concurrent writer never leaves a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` (atomically) unless it already holds exactly that; True if written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_atomic(path, text)
    return True


def slug(s: str) -> str:
    """A name as a file-name part: runs of other characters than letters, digits, '.', '_' and '-'
    become one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x"


def is_generated(path: Path) -> bool:
    """Whether `path` is a page a render wrote (its first line is a generated-page marker)."""
    try:
        with path.open(encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") in GENERATED_MARKERS
    except (OSError, UnicodeDecodeError):
        return False


class RenderResult(list):
    """The paths of every generated file (a list), with `changed`: those actually (re)written,
    and `removed`: generated files that no record backs any more."""

    def __init__(self, paths: Iterable[Path] = (), changed: Iterable[Path] = (),
                 removed: Iterable[Path] = ()):
        super().__init__(sorted(paths))
        self.changed = sorted(changed)
        self.removed = sorted(removed)


class GeneratedFiles:
    """The files of one render into `root`: each page is written only when its text changed, each
    figure is recorded as drawn, and `finish()` removes the generated files of `root` that this
    render did not produce (pages with the marker, figures named as the renders name them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.paths: set[Path] = set()
        self.changed: list[Path] = []

    def page(self, name: str, text: str) -> None:
        path = self.root / name
        self.paths.add(path)
        if write_if_changed(path, text):
            self.changed.append(path)

    def figure(self, drawn: tuple[Path, bool]) -> str:
        """Record a figure `leaderboard.figures` drew (its `Drawn`: path, whether written); its path
        relative to the root, as pages link it."""
        path, written = drawn
        self.paths.add(path)
        if written:
            self.changed.append(path)
        return path.relative_to(self.root).as_posix()

    def finish(self) -> RenderResult:
        removed = []
        for p in self.root.glob("*.md"):
            if p not in self.paths and is_generated(p):
                p.unlink()
                removed.append(p)
        figdir = self.root / "figures"
        if figdir.is_dir():
            for p in figdir.glob("*.png"):
                if p not in self.paths and ("__" in p.name or p.name.startswith("cd_")):
                    p.unlink()
                    removed.append(p)
        return RenderResult(self.paths, self.changed, removed)
