"""ImageNet-R from its folder-per-class tree ``imagenet-r/<wnid>/*.jpg``, with the suite's own split.

ImageNet-R ships no train/test split and the reference repos use three different ones, so the
suite makes one (protocols.md §1) and stores it as a file list that others can reuse or replace.

Split file format (what the suite writes and what ``split_file=`` accepts), UTF-8 text, one
image per line::

    train<TAB>n01443537/art_0.jpg
    test<TAB>n01443537/cartoon_3.jpg

The path is relative to the ``imagenet-r/`` folder (a leading ``imagenet-r/`` is tolerated),
its first component is the class wnid; blank lines and lines starting with ``#`` are ignored.
Classes are the sorted wnids named in the list and each needs at least one train and one test
image. The split's sha256 (over its entries, sorted, comments excluded) is the data hash.

The suite's split: per class, the class's files sorted by name, shuffled by
``random.Random(f"imagenet-r:0:{wnid}")`` (seed 0, one stream per class so that adding or losing
a class never reshuffles the others), the first ``round(20%)`` (at least 1) to test, the rest to
train. It is written to ``imagenet-r/promptcl_split.txt`` and reused whenever that file exists;
if the folder is read-only it goes to ``<cache>/imagenet-r-<hash of the folder path>/`` instead
(see ``common.cache_dir``) with a warning. Files added to the folder later are not in a reused
split: delete the split file to rebuild it.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path

from .common import (DataNotFoundError, ImageFileDataset, LoadedData, cache_dir, resolve_data_root,
                     sha256_bytes, sha256_lines)

SPLIT_NAME = "promptcl_split.txt"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_WNID = re.compile(r"^n\d{8}$")
HOW_TO_GET = (
    "Download imagenet-r.tar from https://github.com/hendrycks/imagenet-r "
    "(https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar) and extract it under --data-root, "
    "giving <data-root>/imagenet-r/<wnid>/*.jpg (200 wnid folders). The suite does not download it."
)


def candidate_dirs(data_root: str | os.PathLike | None) -> list[Path]:
    root = resolve_data_root(data_root)
    return [root / "imagenet-r", root]


def _wnid_dirs(d: Path) -> list[str]:
    if not d.is_dir():
        return []
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and _WNID.match(e.name))


def find_dir(data_root: str | os.PathLike | None) -> Path | None:
    for d in candidate_dirs(data_root):
        if _wnid_dirs(d):
            return d
    return None


def _class_files(d: Path, wnid: str) -> list[str]:
    return sorted(f"{wnid}/{e.name}" for e in os.scandir(d / wnid)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def make_split(d: Path, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> list[tuple[str, str]]:
    """Stratified per-class split of the folder ``d``: a list of (``train``|``test``, relpath)."""
    entries: list[tuple[str, str]] = []
    for wnid in _wnid_dirs(d):
        files = _class_files(d, wnid)
        if len(files) < 2:
            raise ValueError(f"ImageNet-R class folder {d / wnid} has {len(files)} image(s); "
                             "a train/test split needs at least 2")
        random.Random(f"imagenet-r:{seed}:{wnid}").shuffle(files)
        n_test = min(len(files) - 1, max(1, int(len(files) * test_fraction + 0.5)))
        entries += [("test", f) for f in sorted(files[:n_test])]
        entries += [("train", f) for f in sorted(files[n_test:])]
    return entries


def format_split(entries: list[tuple[str, str]]) -> list[str]:
    return [f"{s}\t{p}" for s, p in entries]


def write_split(path: Path, entries: list[tuple[str, str]]) -> None:
    """Atomic write, so a concurrent run never reads half a split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# promptcl ImageNet-R split: stratified {int(TEST_FRACTION * 100)}% test per class, "
              f"seed {SPLIT_SEED}. Format: train|test<TAB>wnid/file\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".split-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(header + "\n".join(format_split(entries)) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_split(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Parse a split list (format in the module docstring)."""
    entries: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or parts[0] not in ("train", "test"):
                raise ValueError(f"{path}:{n}: expected 'train|test<TAB>wnid/file', got {line!r}")
            rel = parts[1].replace("\\", "/")
            if rel.startswith("imagenet-r/"):
                rel = rel[len("imagenet-r/"):]
            entries.append((parts[0], rel))
    if not entries:
        raise ValueError(f"{path}: empty split list")
    return entries


def split_hash(entries: list[tuple[str, str]]) -> str:
    """sha256 of a split list's entries (sorted ``split<TAB>relpath`` lines): the data hash."""
    return sha256_lines(sorted(format_split(entries)))


def _cache_split_path(d: Path) -> Path:
    tag = sha256_bytes(str(d.resolve()).encode())[:16]
    return cache_dir() / f"imagenet-r-{tag}" / SPLIT_NAME


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK)


def resolve_split(d: Path, split_file: str | os.PathLike | None) -> tuple[Path, list[tuple[str, str]], list[str]]:
    """The split list to use: the user's, else an existing suite split, else a new one written."""
    notes: list[str] = []
    if split_file is not None:
        p = Path(split_file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"ImageNet-R split_file {p} does not exist "
                                    "(format: lines 'train|test<TAB>wnid/file', see benchmarks/imagenet_r.py)")
        return p, read_split(p), notes
    for p in (d / SPLIT_NAME, _cache_split_path(d)):
        if p.is_file():
            return p, read_split(p), notes
    entries = make_split(d)
    p = d / SPLIT_NAME
    try:
        if not _writable(d):
            raise PermissionError(d)
        write_split(p, entries)
    except OSError:
        p = _cache_split_path(d)
        write_split(p, entries)
    if p.parent != d:
        msg = f"ImageNet-R folder {d} is not writable; wrote the suite's split list to {p}"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    return p, entries, notes


def load_imagenet_r(data_root: str | os.PathLike | None = None, *,
                    split_file: str | os.PathLike | None = None) -> LoadedData:
    """Train / test image datasets per the split list; images are opened lazily."""
    d = find_dir(data_root)
    if d is None:
        raise DataNotFoundError("ImageNet-R", candidate_dirs(data_root), HOW_TO_GET)
    split_path, entries, notes = resolve_split(d, split_file)

    seen: set[str] = set()
    for s, rel in entries:
        if rel in seen:
            raise ValueError(f"{split_path}: {rel} listed twice")
        seen.add(rel)
    classes = sorted({rel.split("/", 1)[0] for _, rel in entries})
    missing = [rel for _, rel in entries if not (d / rel).is_file()]
    if missing:
        raise DataNotFoundError(
            "ImageNet-R", [str(d / m) for m in missing[:10]] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else []),
            f"{len(missing)} file(s) of the split list {split_path} are missing under {d}. "
            f"Re-extract the data, or delete {split_path} to rebuild the suite's split.\n{HOW_TO_GET}")
    cid = {w: i for i, w in enumerate(classes)}
    parts = {s: ([r for t, r in entries if t == s], [cid[r.split("/", 1)[0]] for t, r in entries if t == s])
             for s in ("train", "test")}
    for s in ("train", "test"):
        absent = sorted(set(classes) - {r.split("/", 1)[0] for r in parts[s][0]})
        if absent:
            raise ValueError(f"{split_path}: classes with no {s} image: {absent[:10]}")
    fp = split_hash(entries)
    return LoadedData(
        train=ImageFileDataset(d, *parts["train"]),
        test=ImageFileDataset(d, *parts["test"]),
        class_names=classes, fingerprint=fp, location=str(d), split_path=str(split_path), notes=notes,
    )
