"""ImageNet-R from its folder-per-class tree ``imagenet-r/<wnid>/*.jpg`` and a train/test split.

ImageNet-R ships no train/test split, and the reference repos use three different ones. Which one
a run uses (``split:`` / ``split_file:`` of the protocol, ``load_imagenet_r(split=, split_file=)``):

- ``coda`` (the default): the fixed 80/20 split and label order of the CODA-Prompt / VQ-Prompt /
  SMoPE code, shipped with the suite in ``benchmarks/splits/imagenet-r-coda/`` (see its README).
  Label i is line i of its ``classes.txt``, so with the suite's per-seed class shuffle seed s puts
  the same classes in the same tasks as that code. It needs every one of its 30,000 files: a
  partial tree is a ``DataNotFoundError`` naming the missing files (a smoke run on a few files
  per class gives ``split_file:`` a folder listing just those; ``synthetic.write_imagenet_r_coda``).
- ``stratified``: the suite's own split (docs/sources.md#imagenet-r). Per class, the class's files
  sorted by
  name, shuffled by ``random.Random(f"imagenet-r:0:{wnid}")`` (seed 0, one stream per class so
  that adding or losing a class never reshuffles the others), the first ``round(20%)`` (at least
  1) to test, the rest to train; labels in sorted wnid order. Written to
  ``imagenet-r/promptcl_split.txt`` and reused whenever that file exists; if the folder is
  read-only it goes to ``<cache>/imagenet-r-<hash of the folder path>/`` instead (see
  ``common.cache_dir``) with a warning. Files added to the folder later are not in a reused split:
  delete the split file to rebuild it.
- ``split_file``: a user's list, in one of two formats (all read as UTF-8 text, nothing executed):

  * a folder like the shipped one: ``train.txt`` and ``test.txt`` (one ``wnid/file`` path a line)
    and optionally ``classes.txt`` (the label order, one wnid a line; without it, sorted wnids);
  * a file of ``train|test<TAB>wnid/file`` lines (what ``stratified`` writes), labels in sorted
    wnid order.

  Paths are relative to the ``imagenet-r/`` folder (a leading ``imagenet-r/`` is tolerated), their
  first component is the class wnid; blank lines and lines starting with ``#`` are ignored. Each
  class needs at least one train and one test image.

The split's hash (``split_hash``: sha256 over its sorted ``split<TAB>path`` entries followed by the
label order) is the stream's data hash, so two runs with the same hash saw the same images under
the same labels.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path

from .common import (DataError, DataNotFoundError, ImageFileDataset, LoadedData, cache_dir,
                     entry_kind, path_kind, resolve_data_root, scan, sha256_bytes, sha256_lines)

SPLITS = ("coda", "stratified")
#: The shipped split of the CODA-Prompt / VQ-Prompt / SMoPE code (README.md there).
CODA_SPLIT_DIR = Path(__file__).resolve().parent / "splits" / "imagenet-r-coda"
#: ``split_hash`` of the shipped split: the data hash of every run on the whole of it.
CODA_SPLIT_SHA256 = "cbbd703a0ec7cd04630ff88dd841f28ba0b5c502aec43748b9ca615c1b146796"
SPLIT_NAME = "promptcl_split.txt"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
#: the name of a class folder (a WordNet id)
WNID = re.compile(r"^n\d{8}$")
HOW_TO_GET = (
    "Download imagenet-r.tar from https://github.com/hendrycks/imagenet-r "
    "(https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar) and extract it under --data-root, "
    "giving <data-root>/imagenet-r/<wnid>/*.jpg (200 wnid folders). The suite does not download it."
)


def candidate_dirs(data_root: str | os.PathLike | None) -> list[Path]:
    root = resolve_data_root(data_root)
    return [root / "imagenet-r", root]


def _wnid_dirs(d: Path) -> list[str]:
    """The class folders of ``d``; a link loop among them is a ``DataError`` naming it."""
    if path_kind(d) != "dir":
        return []
    return sorted(e.name for e in scan(d) if WNID.match(e.name) and entry_kind(e) == "dir")


def find_dir(data_root: str | os.PathLike | None) -> Path | None:
    for d in candidate_dirs(data_root):
        if _wnid_dirs(d):
            return d
    return None


def _class_files(d: Path, wnid: str) -> list[str]:
    return sorted(f"{wnid}/{e.name}" for e in scan(d / wnid)
                  if e.name.lower().endswith(IMAGE_EXTENSIONS) and entry_kind(e) == "file")


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


def _split_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines of a UTF-8 list file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text list ({e}); a split list is plain text, "
                        "one entry a line") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read this split list ({e.strerror or e})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def _relpath(rel: str) -> str:
    rel = rel.replace("\\", "/")
    return rel[len("imagenet-r/"):] if rel.startswith("imagenet-r/") else rel


def read_split(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Parse a ``train|test<TAB>wnid/file`` split file (format in the module docstring)."""
    path = Path(path)
    entries: list[tuple[str, str]] = []
    for n, line in _split_lines(path):
        parts = line.split("\t")
        if len(parts) != 2 or parts[0] not in ("train", "test"):
            raise DataError(f"{path}:{n}: expected 'train|test<TAB>wnid/file', got {line!r}")
        entries.append((parts[0], _relpath(parts[1])))
    if not entries:
        raise DataError(f"{path}: empty split list")
    return entries


def read_split_folder(folder: str | os.PathLike) -> tuple[list[tuple[str, str]], list[str] | None]:
    """Parse a split folder (``train.txt``, ``test.txt``, optional ``classes.txt``): the entries
    and the label order (None without ``classes.txt``)."""
    folder = Path(folder)
    entries: list[tuple[str, str]] = []
    for part in ("train", "test"):
        f = folder / f"{part}.txt"
        if not f.is_file():
            raise DataError(f"{folder}: a split folder needs train.txt and test.txt (one wnid/file "
                            f"path a line); {f.name} is missing")
        entries += [(part, _relpath(line)) for _, line in _split_lines(f)]
    if not entries:
        raise DataError(f"{folder}: empty split lists")
    classes = None
    if (folder / "classes.txt").is_file():
        classes = [line for _, line in _split_lines(folder / "classes.txt")]
        bad = [w for w in classes if not WNID.match(w)]
        if bad:
            raise DataError(f"{folder / 'classes.txt'}: expected one wnid (n########) a line, got {bad[:3]}")
        if len(set(classes)) != len(classes):
            raise DataError(f"{folder / 'classes.txt'}: a wnid is listed twice")
    return entries, classes


def split_hash(entries: list[tuple[str, str]], classes: list[str]) -> str:
    """sha256 of a split: its sorted ``split<TAB>relpath`` lines, then ``label<TAB>i<TAB>wnid``
    for the label order (the data hash of a run on the whole split)."""
    return sha256_lines(sorted(format_split(entries)) + [f"label\t{i}\t{w}" for i, w in enumerate(classes)])


def _cache_split_path(d: Path) -> Path:
    tag = sha256_bytes(str(d.resolve()).encode())[:16]
    return cache_dir() / f"imagenet-r-{tag}" / SPLIT_NAME


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK)


def _stratified(d: Path) -> tuple[Path, list[tuple[str, str]], list[str]]:
    """The suite's split of ``d``: an existing split file, else a new one written."""
    notes: list[str] = []
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
        warnings.warn(msg, stacklevel=4)
        notes.append(msg)
    return p, entries, notes


def resolve_split(d: Path, split: str = "coda", split_file: str | os.PathLike | None = None
                  ) -> tuple[Path, list[tuple[str, str]], list[str] | None, list[str]]:
    """The split to use: (its path, entries, label order or None for sorted wnids, notes)."""
    if split_file is not None:
        p = Path(split_file).expanduser()
        if p.is_dir():
            return (p, *read_split_folder(p), [])
        if not p.is_file():
            raise FileNotFoundError(
                f"ImageNet-R split_file {p} does not exist (a folder with train.txt / test.txt "
                "[/ classes.txt], or a file of 'train|test<TAB>wnid/file' lines; see benchmarks/imagenet_r.py)")
        return p, read_split(p), None, []
    if split == "coda":
        return (CODA_SPLIT_DIR, *read_split_folder(CODA_SPLIT_DIR), [])
    if split == "stratified":
        p, entries, notes = _stratified(d)
        return p, entries, None, notes
    raise ValueError(f"ImageNet-R split must be one of {', '.join(SPLITS)}, got {split!r}")


def _existing(d: Path, classes: list[str]) -> set[str]:
    """``wnid/file`` of every file in the class folders (one scandir per class, not a stat per
    file); a link loop in them is a ``DataError`` naming it, not a file that is merely missing."""
    out: set[str] = set()
    for w in classes:
        if path_kind(d / w) == "dir":
            out.update(f"{w}/{e.name}" for e in scan(d / w) if entry_kind(e) == "file")
    return out


def _missing_error(d: Path, split_path: Path, missing: list[str], total: int, coda: bool) -> DataNotFoundError:
    shown = [str(d / m) for m in missing[:10]] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else [])
    if coda:
        how = (f"{len(missing)} of the {total} files of the default ImageNet-R split (split: coda, "
               f"{split_path}) are missing under {d}. That split lists every image of imagenet-r.tar: "
               "re-extract it. To run on the files you have, give the protocol split_file: a folder "
               "with train.txt / test.txt [/ classes.txt] listing only those, or use split: stratified.")
    else:
        how = (f"{len(missing)} file(s) of the split list {split_path} are missing under {d}. "
               f"Re-extract the data, or fix the list (the suite's own split: delete {SPLIT_NAME} to rebuild it).")
    return DataNotFoundError("ImageNet-R", shown, f"{how}\n{HOW_TO_GET}")


def load_imagenet_r(data_root: str | os.PathLike | None = None, *, split: str = "coda",
                    split_file: str | os.PathLike | None = None) -> LoadedData:
    """Train / test image datasets per the split (module docstring); images are opened lazily.
    ``split_file``, when given, replaces ``split``."""
    if split not in SPLITS:
        raise ValueError(f"ImageNet-R split must be one of {', '.join(SPLITS)}, got {split!r}")
    d = find_dir(data_root)
    if d is None:
        raise DataNotFoundError("ImageNet-R", candidate_dirs(data_root), HOW_TO_GET)
    split_path, entries, order, notes = resolve_split(d, split, split_file)

    seen: set[str] = set()
    for _, rel in entries:
        if rel in seen:
            raise DataError(f"{split_path}: {rel} listed twice")
        seen.add(rel)
    named = sorted({rel.split("/", 1)[0] for _, rel in entries})
    bad = [w for w in named if not WNID.match(w)]
    if bad:
        raise DataError(f"{split_path}: paths must start with a class wnid (n########/file), got {bad[:3]}")
    if order is None:
        classes = named
    else:
        if set(order) != set(named):
            raise DataError(f"{split_path}: classes.txt and the lists name different classes "
                            f"(only in classes.txt: {sorted(set(order) - set(named))[:5]}; "
                            f"only in the lists: {sorted(set(named) - set(order))[:5]})")
        classes = list(order)
    there = _existing(d, classes)
    missing = [rel for _, rel in entries if rel not in there]
    if missing:
        raise _missing_error(d, split_path, missing, len(entries),
                             coda=split_file is None and split == "coda")
    cid = {w: i for i, w in enumerate(classes)}
    parts = {s: ([r for t, r in entries if t == s], [cid[r.split("/", 1)[0]] for t, r in entries if t == s])
             for s in ("train", "test")}
    for s in ("train", "test"):
        absent = sorted(set(classes) - {r.split("/", 1)[0] for r in parts[s][0]})
        if absent:
            raise DataError(f"{split_path}: classes with no {s} image: {absent[:10]}")
    return LoadedData(
        train=ImageFileDataset(d, *parts["train"]),
        test=ImageFileDataset(d, *parts["test"]),
        class_names=classes, fingerprint=split_hash(entries, classes), location=str(d),
        split_path=str(split_path), notes=notes,
    )
