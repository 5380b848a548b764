"""Shared pieces of the readers: the data errors, the two dataset kinds, hashing, caching.

Readers return plain map-style datasets (``(x, y)`` samples, a ``.targets`` list of ints) that
Avalanche wraps later in ``streams.py``; keeping them Avalanche-free lets a pretraining script or
a notebook use the same bytes the benchmark uses.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

#: Where data lives when the caller gives no ``data_root``: ``$PROMPTCL_DATA_ROOT``, else ``./data``
#: (the folder the Makefile's ``data`` target fills).
DEFAULT_DATA_ROOT_ENV = "PROMPTCL_DATA_ROOT"
#: Where files the suite derives from data (the ImageNet-R split) go when the data folder is
#: read-only: ``$PROMPTCL_CACHE``, else ``$XDG_CACHE_HOME/promptcl``, else ``~/.cache/promptcl``.
CACHE_ENV = "PROMPTCL_CACHE"


class DataNotFoundError(FileNotFoundError):
    """A data set is not on disk; the message names every path tried and how to get the data."""

    def __init__(self, dataset: str, paths_tried: Sequence[str | os.PathLike], how_to_get: str):
        self.dataset = dataset
        self.paths_tried = [str(p) for p in paths_tried]
        self.how_to_get = how_to_get
        tried = "\n".join(f"  - {p}" for p in self.paths_tried) or "  (no candidate path)"
        super().__init__(f"{dataset}: data not found. Looked in:\n{tried}\n{how_to_get}")

    def __reduce__(self):  # keep it picklable across Ray / Slurm / worker processes
        return (type(self), (self.dataset, self.paths_tried, self.how_to_get))


class DataError(ValueError):
    """A data file is there but cannot be used (truncated, corrupt, the wrong format, or holding
    something the suite refuses to load); the message names the file and what to do."""

    def __init__(self, message: str):
        # Raised in a DataLoader worker, torch re-raises it in the main process as
        # DataError("Caught DataError in DataLoader worker ...\n<worker traceback>"); keep only
        # the original message, so the user still reads one line naming the file.
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message.split(marker, 1)[1].rstrip()
        super().__init__(message)


#: ``LoadedData.source`` / ``StreamInfo.data_source``: the data came from under the data root
#: (or was downloaded into it) ...
FROM_DATA_ROOT = "data_root"
#: ... or from the system-wide copy (Fashion-MNIST's ``/usr/share/datasets/fashion-mnist``).
FROM_SYSTEM_COPY = "system"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """``data_root`` or, when None, ``$PROMPTCL_DATA_ROOT`` or ``./data``. A data root that exists
    but is not a folder (or loops) is a ``DataError`` naming it, never a silent miss; one that does
    not exist is left to the readers (their not-found error lists where they looked)."""
    if data_root is None:
        data_root = os.environ.get(DEFAULT_DATA_ROOT_ENV, "data")
    root = Path(data_root).expanduser()
    kind = path_kind(root)
    if kind not in (None, "dir"):
        raise DataError(f"data root {root} is not a folder; give the folder that holds the data sets "
                        "(e.g. <data-root>/fashion-mnist/, <data-root>/cifar-100-python/)")
    return root


def path_kind(path: str | os.PathLike) -> str | None:
    """``"dir"``, ``"file"``, ``"other"`` or None (nothing there, or a dangling link), following
    links. Where ``Path.is_file()`` would quietly say False, a symbolic link loop on the way (or a
    path that cannot be examined) is a ``DataError`` naming the link, so a broken data tree is an
    input error, not a data set silently looked for elsewhere."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise path_error(Path(path), e) from None
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


def entry_kind(entry: os.DirEntry) -> str | None:
    """``path_kind`` of a ``scandir`` entry, from the entry's cached type when it is not a link."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as e:  # a link loop: DirEntry raises where Path would return False
        raise path_error(Path(entry.path), e) from None
    return path_kind(entry.path) if entry.is_symlink() else "other"


def scan(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``; a folder that loops or cannot be listed is a ``DataError``."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise path_error(folder, e) from None


def path_error(path: Path, e: OSError) -> "DataError":
    """The ``DataError`` for an ``OSError`` met while looking at ``path``: for a link loop it names
    the first link on the path that loops."""
    if e.errno == errno.ELOOP:
        looping = path
        for prefix in [*reversed(path.parents), path]:
            try:
                os.stat(prefix)
            except OSError as inner:
                if inner.errno == errno.ELOOP:
                    looping = prefix
                    break
        return DataError(f"{looping}: a symbolic link loop (the link leads back to itself); remove "
                         "the link or point it at the data")
    return DataError(f"{path}: cannot be examined ({e.strerror or e}); check the path and its permissions")


def cache_dir() -> Path:
    """Writable folder for derived files when the data folder is read-only."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "promptcl"


def sha256_bytes(*chunks: bytes | memoryview) -> str:
    """Hash of several byte strings, each prefixed by its length so boundaries can't shift."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(memoryview(c).nbytes.to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()


def sha256_lines(lines: Iterable[str]) -> str:
    """Hash of text lines joined by ``\\n``; used for file lists, so the hash follows content."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def file_stamp(paths: Iterable[Path]) -> tuple:
    """(path, size, mtime) of each file: a cheap cache key that changes when a file is replaced."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held as one uint8 array in memory (CIFAR, Fashion-MNIST).

    ``images`` is N x H x W (grayscale) or N x H x W x C. In ``"pil"`` mode a sample is a PIL image,
    so torchvision's PIL resizing matches the reference code; in ``"tensor"`` mode it is a uint8
    C x H x W tensor view, which costs nothing to produce and suits the no-resize path (the tiny
    backbone at the native 28 px) where a PIL round trip would dominate the data time.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], mode: str = "pil"):
        if mode not in ("pil", "tensor"):
            raise ValueError(f"mode must be 'pil' or 'tensor', got {mode!r}")
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"expected uint8 N x H x W [x C] images, got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets: list[int] = [int(t) for t in targets]
        self.mode = mode
        chw = torch.from_numpy(images)
        self._chw = chw.unsqueeze(1) if images.ndim == 3 else chw.permute(0, 3, 1, 2)

    @property
    def native_size(self) -> int | None:
        """Side of the (square) images, None if not square."""
        h, w = self.images.shape[1:3]
        return int(h) if h == w else None

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if self.mode == "tensor":
            return self._chw[i], self.targets[i]
        return Image.fromarray(self.images[i]), self.targets[i]

    def subset(self, indices: Sequence[int]) -> "ArrayImageDataset":
        """A compact copy holding only ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayImageDataset(self.images[idx], [self.targets[i] for i in idx], self.mode)

    def with_mode(self, mode: str) -> "ArrayImageDataset":
        return ArrayImageDataset(self.images, self.targets, mode)

    def __getstate__(self):  # the tensor view is rebuilt on unpickling; don't ship it twice
        return {"images": self.images, "targets": self.targets, "mode": self.mode}

    def __setstate__(self, state):
        self.__init__(state["images"], state["targets"], state["mode"])


class ImageFileDataset(torch.utils.data.Dataset):
    """Images read lazily from files with PIL and converted to RGB (ImageNet-R, CUB-200)."""

    def __init__(self, root: str | os.PathLike, relpaths: Sequence[str], targets: Sequence[int]):
        if len(relpaths) != len(targets):
            raise ValueError(f"{len(relpaths)} files but {len(targets)} targets")
        self.root = str(root)
        self.relpaths = list(relpaths)
        self.targets: list[int] = [int(t) for t in targets]

    native_size = None  # variable-size photos: always resized
    channels = 3

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        path = os.path.join(self.root, self.relpaths[i])
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: image file vanished after the data set was read; "
                            "restore it (re-extract the archive)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL raises UnidentifiedImageError / OSError("image file is truncated") / SyntaxError
            # for broken headers: all mean the file on disk is damaged
            raise DataError(f"{path}: cannot decode this image ({type(e).__name__}: {e}); the file is "
                            "corrupt or truncated: re-extract it from the original archive") from None
        return img, self.targets[i]

    def subset(self, indices: Sequence[int]) -> "ImageFileDataset":
        return ImageFileDataset(self.root, [self.relpaths[i] for i in indices],
                                [self.targets[i] for i in indices])


@dataclass
class LoadedData:
    """What a reader returns: the two splits and what identifies them."""

    train: ArrayImageDataset | ImageFileDataset
    test: ArrayImageDataset | ImageFileDataset
    class_names: list[str]
    fingerprint: str            # sha256 identifying the files and the train/test split
    location: str               # the folder the data was read from
    split_path: str | None = None  # ImageNet-R: the split list used
    notes: list[str] = field(default_factory=list)
    source: str = FROM_DATA_ROOT  # FROM_DATA_ROOT or FROM_SYSTEM_COPY

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
