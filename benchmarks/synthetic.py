"""Tiny data sets written in the exact real on-disk formats, for tests and smoke runs.

Tests never download (DESIGN); they write a few images per class the way the real archives lay
them out, so the readers are exercised on the real formats. Pixel values are random but
deterministic (``seed``); each image is tinted by its class so a probe could tell classes apart.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np


def _images(rng: np.random.Generator, labels: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    noise = rng.integers(0, 64, size=(len(labels), *shape), dtype=np.int64)
    tint = (np.asarray(labels, dtype=np.int64) * 37 % 192).reshape(-1, *([1] * len(shape)))
    return (noise + tint).clip(0, 255).astype(np.uint8)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """IDX file: magic ``0x0000 08 <ndim>`` (unsigned byte), big-endian uint32 dims, raw bytes; gz if ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_mnist(folder: str | os.PathLike, train_per_class: int = 6, test_per_class: int = 2,
                        num_classes: int = 10, seed: int = 0, gz: bool = True) -> Path:
    """The four IDX files (28 x 28 uint8 images) in ``folder``; labels cycle through the classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for prefix, per in (("train", train_per_class), ("t10k", test_per_class)):
        y = np.tile(np.arange(num_classes), per).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", _images(rng, y, (28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
    return folder


def write_cifar100(root: str | os.PathLike, train_per_class: int = 3, test_per_class: int = 1,
                   num_classes: int = 100, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` pickles with the real keys (bytes), N x 3072 rows."""
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for _ in range(per) for c in range(num_classes)]
        hwc = _images(rng, fine, (32, 32, 3))
        data = hwc.transpose(0, 3, 1, 2).reshape(len(fine), 3072)  # R plane, G plane, B plane
        blob = {b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
                b"batch_label": f"{name} batch".encode(), b"fine_labels": fine,
                b"coarse_labels": [c // 5 for c in fine], b"data": data}
        with open(d / name, "wb") as f:
            pickle.dump(blob, f)
    meta = {b"fine_label_names": [f"class_{c:03d}".encode() for c in range(num_classes)],
            b"coarse_label_names": [f"super_{c:02d}".encode() for c in range(20)]}
    with open(d / "meta", "wb") as f:
        pickle.dump(meta, f)
    return d


def _write_jpeg(path: Path, rng: np.random.Generator, label: int, size: tuple[int, int], gray: bool = False) -> None:
    from PIL import Image

    arr = _images(rng, [label], (size[1], size[0]) if gray else (size[1], size[0], 3))[0]
    Image.fromarray(arr).save(path, format="JPEG", quality=85)


def write_imagenet_r(root: str | os.PathLike, wnids: Sequence[str] = ("n01443537", "n01484850", "n01494475"),
                     per_class: Sequence[int] | int = 10, seed: int = 0) -> Path:
    """``root/imagenet-r/<wnid>/<style>_<i>.jpg`` small JPEGs of varying size, plus a README.txt."""
    d = Path(root) / "imagenet-r"
    d.mkdir(parents=True, exist_ok=True)
    (d / "README.txt").write_text("ImageNet-R (synthetic test fixture)\n")
    counts = [per_class] * len(wnids) if isinstance(per_class, int) else list(per_class)
    rng = np.random.default_rng(seed)
    styles = ("art", "cartoon", "sketch", "toy")
    for c, (w, n) in enumerate(zip(wnids, counts)):
        (d / w).mkdir(exist_ok=True)
        for i in range(n):
            size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
            _write_jpeg(d / w / f"{styles[i % 4]}_{i}.jpg", rng, c, size)
    return d


def write_cub200(root: str | os.PathLike, num_classes: int = 4, per_class: int = 5, seed: int = 0,
                 gray_every: int = 7) -> Path:
    """``root/CUB_200_2011/`` with images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt and images/<NNN.Name>/*.jpg; per class, every other image is train (``1``).
    Every ``gray_every``-th image is grayscale, as a few real CUB images are."""
    d = Path(root) / "CUB_200_2011"
    (d / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, labels, split, classes = [], [], [], []
    iid = 0
    for c in range(1, num_classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        (d / "images" / folder).mkdir(exist_ok=True)
        for i in range(per_class):
            iid += 1
            rel = f"{folder}/Bird_{c}_{i:04d}_{iid}.jpg"
            _write_jpeg(d / "images" / rel, rng, c - 1, (30, 24), gray=(iid % gray_every == 0))
            images.append(f"{iid} {rel}")
            labels.append(f"{iid} {c}")
            split.append(f"{iid} {1 if i % 2 == 0 else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", classes)):
        (d / name).write_text("\n".join(lines) + "\n")
    return d
