"""Files the leaderboard writes: checked before anything is written, written atomically, named
by a slug, and, for a render, written only when changed, with generated files no record backs any
more removed (and nothing else ever).

Every page, figure and records file is written the same way (`atomic_file`): into a temporary file
in the same folder, flushed and fsynced, then renamed over the old one, so a reader, a crash or a
full disk sees the old file or the new one, never a torn one. A write the file system refuses
(ENOSPC, EROFS, EACCES, ...) is an `OutputError` naming the file and the cause, with the
temporary file removed and the previous file as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .markdown import GENERATED_MARKERS

__all__ = ["OutputError", "check_output_dir", "same_file", "atomic_file", "write_atomic", "write_if_changed",
           "write_error", "slug", "is_generated", "RenderResult", "GeneratedFiles"]


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


#: what the user reads for the write errors a file system gives (anything else: its strerror)
_CAUSES = {errno.ENOSPC: "the disk is full: free space and rerun",
           errno.EDQUOT: "the disk quota is used up: free space and rerun",
           errno.EROFS: "the file system is read-only: write to another folder",
           errno.EACCES: "permission denied: make it writable or write to another folder",
           errno.EPERM: "not permitted: make it writable or write to another folder"}


def write_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """The one-line error for an OSError met while writing `path`."""
    cause = _CAUSES.get(e.errno, f"{e.strerror or e}: check the folder and rerun")
    return OutputError(f"cannot write {path} ({e.strerror or e}); {cause}; the previous file is unchanged")


def _new_file_mode(path: Path) -> int:
    """The mode the written file gets: the old file's, else what the umask allows (mkstemp's
    temporary file is private, 0o600, which a published file must not stay)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file object (text "w", or binary "wb") whose contents replace `path` only once the block
    ends without an error: a temporary file in the same folder, flushed, fsynced, renamed over
    `path`. On any error the temporary file is removed and `path` is as it was; an OSError (a full
    or read-only disk, a missing permission) becomes an `OutputError` naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` through `atomic_file`: a killed or concurrent
    writer, or a full disk, never leaves a torn file."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` (atomically) unless it already holds exactly that; True if written."""
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
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.root, e) from None
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
                _remove(p)
                removed.append(p)
        figdir = self.root / "figures"
        if figdir.is_dir():
            for p in figdir.glob("*.png"):
                if p not in self.paths and ("__" in p.name or p.name.startswith("cd_")):
                    _remove(p)
                    removed.append(p)
        return RenderResult(self.paths, self.changed, removed)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(f"cannot remove {path}, a page no record backs any more ({e.strerror or e}); "
                          "make the folder writable and rerun") from None
