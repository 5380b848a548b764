"""CIFAR-100 from the official ``cifar-100-python/`` pickles (train, test, meta).

Looked for in ``<data_root>/cifar-100-python/``, then ``<data_root>/`` itself. Never downloaded:
the suite only reads what the user has put on disk.
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from .common import (ArrayImageDataset, DataNotFoundError, LoadedData, file_stamp,
                     resolve_data_root, sha256_bytes)

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
        if all((d / f).is_file() for f in FILES):
            return d
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _split(d: dict, path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        data, labels = d[b"data"], d[b"fine_labels"]
    except KeyError as e:
        raise ValueError(f"{path}: not a CIFAR-100 python pickle (missing key {e})") from None
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected N x 3072 uint8 data and N labels, got {data.shape}, {len(labels)}")
    # rows are 1024 R, 1024 G, 1024 B values, each plane row-major 32 x 32 -> N x 32 x 32 x 3
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, [int(y) for y in labels]


@lru_cache(maxsize=1)
def _load(stamp: tuple):
    d = Path(stamp[0][0]).parent
    xtr, ytr = _split(_unpickle(d / "train"), d / "train")
    xte, yte = _split(_unpickle(d / "test"), d / "test")
    meta = _unpickle(d / "meta")
    if b"fine_label_names" not in meta:
        raise ValueError(f"{d / 'meta'}: missing key b'fine_label_names'")
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
