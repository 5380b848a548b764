"""CIFAR-100 from the official ``cifar-100-python/`` pickles (train, test, meta).

Looked for in ``<data_root>/cifar-100-python/``, then ``<data_root>/`` itself. Never downloaded:
the suite only reads what the user has put on disk.

The files are Python pickles (protocol 2, written by Python 2 numpy), and unpickling runs whatever
callables a file names, so a crafted file under ``--data-root`` could execute code. They are read
through ``SafeUnpickler``, which builds only what the real files hold (dicts, lists, strings, ints
and one numpy uint8 array, via ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
``numpy.dtype``) and refuses any other global before calling it. torchvision's reader does a plain
``pickle.load``; this one does not.
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from .common import (ArrayImageDataset, DataError, DataNotFoundError, LoadedData, file_stamp,
                     path_kind, resolve_data_root, sha256_bytes)

FILES = ("train", "test", "meta")
HOW_TO_GET = (
    "Download cifar-100-python.tar.gz (python version) from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it under --data-root, giving <data-root>/cifar-100-python/{train,test,meta}. "
    "The suite does not download CIFAR-100 (--download only fetches Fashion-MNIST)."
)


def candidate_dirs(data_root: str | os.PathLike | None) -> list[Path]:
    root = resolve_data_root(data_root)
    return [root / "cifar-100-python", root]


def find_dir(data_root: str | os.PathLike | None) -> Path | None:
    for d in candidate_dirs(data_root):
        if all(path_kind(d / f) == "file" for f in FILES):
            return d
    return None


def _numpy_reconstruct():
    try:  # numpy >= 2 keeps it in numpy._core; numpy.core only warns and forwards there
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only the globals the official CIFAR-100 files use (module docstring).

    Containers, strings and numbers are pickle opcodes, not globals, so they need no entry; the
    allowed globals only allocate arrays and dtypes. Everything else (``os.system``,
    ``builtins.open``, ``subprocess.Popen``, ...) raises before it is called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),   # written by numpy 1.x (the real files)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def _unpickle(path: Path) -> dict:
    """One CIFAR-100 file through ``SafeUnpickler``; any failure is a ``DataError`` naming it."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused"):
            raise DataError(
                f"{path}: {e}: the official CIFAR-100 files hold only dicts, lists, strings and numpy "
                f"arrays, so the suite will not load this one (it could run code). Replace it with the "
                f"original file. {HOW_TO_GET}") from None
        raise DataError(f"{path}: not a readable CIFAR-100 pickle ({e}); the file is corrupt or "
                        f"truncated: replace it with the original. {HOW_TO_GET}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError, OverflowError) as e:
        # what a truncated or garbled pickle stream raises (the allowed constructors included)
        raise DataError(f"{path}: not a readable CIFAR-100 pickle ({type(e).__name__}: {e}); the file "
                        f"is corrupt or truncated: replace it with the original. {HOW_TO_GET}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-100 python pickle (holds a {type(obj).__name__}, not a dict)")
    return obj


def _split(d: dict, path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        data, labels = d[b"data"], d[b"fine_labels"]
    except KeyError as e:
        raise DataError(f"{path}: not a CIFAR-100 python pickle (missing key {e})") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: expected the b'data' entry to be a uint8 numpy array, got "
                        f"{type(data).__name__} {getattr(data, 'dtype', '')}")
    if data.ndim != 2 or data.shape[1] != 3072 or not isinstance(labels, list) or len(data) != len(labels):
        raise DataError(f"{path}: expected N x 3072 uint8 data and N labels, got {data.shape}, "
                        f"{len(labels) if isinstance(labels, list) else type(labels).__name__}")
    # rows are 1024 R, 1024 G, 1024 B values, each plane row-major 32 x 32 -> N x 32 x 32 x 3
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    if not all(isinstance(y, int) and 0 <= y < 100 for y in labels):
        raise DataError(f"{path}: b'fine_labels' must be class ids 0..99")
    return images, [int(y) for y in labels]


@lru_cache(maxsize=1)
def _load(stamp: tuple):
    d = Path(stamp[0][0]).parent
    xtr, ytr = _split(_unpickle(d / "train"), d / "train")
    xte, yte = _split(_unpickle(d / "test"), d / "test")
    meta = _unpickle(d / "meta")
    if b"fine_label_names" not in meta:
        raise DataError(f"{d / 'meta'}: missing key b'fine_label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    fp = sha256_bytes(b"cifar100", xtr.data, np.asarray(ytr, np.int64).data,
                      xte.data, np.asarray(yte, np.int64).data)
    return xtr, ytr, xte, yte, names, fp


def load_cifar100(data_root: str | os.PathLike | None = None, *, mode: str = "pil") -> LoadedData:
    """Official 50,000 / 10,000 split, fine labels (100 classes), uint8 arrays in memory."""
    d = find_dir(data_root)
    if d is None:
        raise DataNotFoundError("CIFAR-100", candidate_dirs(data_root), HOW_TO_GET)
    xtr, ytr, xte, yte, names, fp = _load(file_stamp(d / f for f in FILES))
    return LoadedData(train=ArrayImageDataset(xtr, ytr, mode), test=ArrayImageDataset(xte, yte, mode),
                      class_names=names, fingerprint=fp, location=str(d))
