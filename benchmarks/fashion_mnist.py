"""Fashion-MNIST from its IDX files, parsed with numpy (the suite's embedded default data set).

Lookup order (docs/sources.md#fashion-mnist): ``<data_root>/fashion-mnist/``, ``<data_root>/``,
``<data_root>/FashionMNIST/raw/`` (torchvision's layout), then the Debian package location
``/usr/share/datasets/fashion-mnist/`` (``dataset-fashion-mnist``) unless ``system_copy=False``
(a data root the user named explicitly is never replaced by it), then a torchvision download
into ``<data_root>`` only when ``download=True``. Each file may be gzipped (``.gz``) or not.
``LoadedData.source`` says which copy was read.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from .common import (FROM_DATA_ROOT, FROM_SYSTEM_COPY, ArrayImageDataset, DataError,
                     DataNotFoundError, LoadedData, file_stamp, path_kind, resolve_data_root,
                     sha256_bytes)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
#: System-wide locations searched after ``data_root`` (tests monkeypatch this).
SYSTEM_DIRS: list[str] = ["/usr/share/datasets/fashion-mnist"]
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
HOW_TO_GET = (
    "Get Fashion-MNIST in one of three ways:\n"
    "  1. apt-get install dataset-fashion-mnist   (Debian/Ubuntu; files land in "
    "/usr/share/datasets/fashion-mnist/)\n"
    "  2. put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz under <data-root>/fashion-mnist/ (--data-root; from "
    "https://github.com/zalandoresearch/fashion-mnist)\n"
    "  3. pass --download (download=True) to fetch them with torchvision into <data-root>/FashionMNIST/raw/"
)


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (gzipped or not), checking its magic number and its length; a file that
    cannot be used is a ``DataError`` naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    fix = ("replace it with a good copy (delete it and rerun with --download, or "
           "apt-get install --reinstall dataset-fashion-mnist for the system copy)")
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncated or damaged gzip stream
        raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e}); the file is truncated "
                        f"or corrupt: {fix}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); {fix}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(raw)} bytes); {fix}")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expected_magic}: not the "
                        f"{'images' if expected_magic == IMAGES_MAGIC else 'labels'} file it is named as; {fix}")
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path}: IDX header cut short ({len(raw)} bytes); {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    n = int(np.prod(dims))
    if len(raw) - offset != n:
        raise DataError(f"{path}: header says {dims} ({n} bytes) but {len(raw) - offset} bytes follow; "
                        f"the file is truncated or corrupt: {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = folder / name
        if path_kind(p) == "file":  # a link loop on the way is a DataError naming it
            return p
    return None


def candidate_dirs(data_root: str | os.PathLike | None, system_copy: bool = True) -> list[Path]:
    """The folders searched, in order (the system copy last, if it may be used)."""
    root = resolve_data_root(data_root)
    system = [Path(d) for d in SYSTEM_DIRS] if system_copy else []
    return [root / "fashion-mnist", root, root / "FashionMNIST" / "raw"] + system


def find_files(data_root: str | os.PathLike | None,
               system_copy: bool = True) -> tuple[dict[str, Path], str] | None:
    """The four IDX files from the first folder holding all of them, and which copy that is
    (``FROM_DATA_ROOT`` or ``FROM_SYSTEM_COPY``); None if no folder holds them."""
    dirs = candidate_dirs(data_root, system_copy)
    system = {Path(d) for d in SYSTEM_DIRS} if system_copy else set()
    for d in dirs:
        found = {k: _file_in(d, stem) for k, stem in FILES.items()}
        if all(found.values()):
            return found, FROM_SYSTEM_COPY if d in system else FROM_DATA_ROOT  # type: ignore[return-value]
    return None


def _download(data_root: str | os.PathLike | None) -> None:
    """torchvision fetches into ``<data_root>/FashionMNIST/raw/``; the only download in the suite."""
    import torchvision

    root = resolve_data_root(data_root)
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        torchvision.datasets.FashionMNIST(str(root), train=train, download=True)


@lru_cache(maxsize=2)
def _load_arrays(stamp: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    paths = {k: Path(p) for k, (p, _, _) in zip(FILES, stamp)}
    xtr = read_idx(paths["train_images"], IMAGES_MAGIC)
    ytr = read_idx(paths["train_labels"], LABELS_MAGIC)
    xte = read_idx(paths["test_images"], IMAGES_MAGIC)
    yte = read_idx(paths["test_labels"], LABELS_MAGIC)
    for x, y, name in ((xtr, ytr, "train"), (xte, yte, "test")):
        if len(x) != len(y):
            raise DataError(f"Fashion-MNIST {name}: {len(x)} images in {paths[name + '_images']} but "
                            f"{len(y)} labels in {paths[name + '_labels']}; one of them is from another "
                            "copy or damaged: get both again")
    # content hash, so the same data gzipped or not, here or in /usr/share, hashes the same
    fp = sha256_bytes(b"fashion_mnist", xtr.data, ytr.data, xte.data, yte.data)
    return xtr, ytr, xte, yte, fp


def load_fashion_mnist(data_root: str | os.PathLike | None = None, *, download: bool = False,
                       mode: str = "pil", system_copy: bool = True) -> LoadedData:
    """Official 60,000 / 10,000 split as uint8 arrays in memory (``mode``: see ArrayImageDataset).
    ``system_copy=False``: only the data root (and a download into it), never the system copy."""
    found = find_files(data_root, system_copy)
    if found is None and download:
        _download(data_root)
        found = find_files(data_root, system_copy)
    if found is None:
        how = HOW_TO_GET
        unused = [d for d in SYSTEM_DIRS if not system_copy
                  and all(_file_in(Path(d), stem) for stem in FILES.values())]
        if unused:
            how += (f"\n(The system copy in {unused[0]} was not used: the data root was given "
                    "explicitly. Leave out the data root to use it.)")
        raise DataNotFoundError("Fashion-MNIST", candidate_dirs(data_root, system_copy), how)
    files, source = found
    xtr, ytr, xte, yte, fp = _load_arrays(file_stamp(files[k] for k in FILES))
    return LoadedData(
        train=ArrayImageDataset(xtr, ytr.tolist(), mode),
        test=ArrayImageDataset(xte, yte.tolist(), mode),
        class_names=list(CLASS_NAMES),
        fingerprint=fp,
        location=str(files["train_images"].parent),
        source=source,
    )
