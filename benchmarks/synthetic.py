"""Tiny data sets written in the exact real on-disk formats, for tests and smoke runs.

Tests never download; they write a few images per class the way the real archives lay
them out, so the readers are exercised on the real formats. Pixel values are random but
deterministic (``seed``); each image is tinted by its class so a probe could tell classes apart.

``real_size=True`` writes photos at the real data sets' resolutions (ImageNet-R: a few hundred
pixels a side, varied aspect ratios; CUB: about 500 x 375, some grayscale), for a real-shape dry
run (decoding, RandomResizedCrop and Resize(256) + CenterCrop(224) on real-sized inputs); CIFAR is
always its real 32 x 32. ``write_imagenet_r_coda`` lays out files named as in the shipped CODA
split, with a split folder listing just them, so that split's path runs end to end.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from .imagenet_r import CODA_SPLIT_DIR, read_split_folder


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


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR files: protocol 2, every string
    a Python 2 ``str`` (``BINSTRING``, read back as bytes with ``encoding="bytes"``), and numpy's
    array constructor under its numpy 1.x name ``numpy.core.multiarray._reconstruct``. (Python 3
    would write bytes through ``_codecs.encode`` and the constructor as ``numpy._core``, which the
    real files never contain.) The pure-Python pickler, because only it can be given opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct" and "numpy" in getattr(obj, "__module__", ""):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def write_cifar100(root: str | os.PathLike, train_per_class: int = 3, test_per_class: int = 1,
                   num_classes: int = 100, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` as the official files: Python 2 protocol-2
    pickles of dicts with bytes keys, ``data`` an N x 3072 uint8 numpy array (R, G, B planes)."""
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
        _dump_py2(blob, d / name)
    meta = {b"fine_label_names": [f"class_{c:03d}".encode() for c in range(num_classes)],
            b"coarse_label_names": [f"super_{c:02d}".encode() for c in range(20)]}
    _dump_py2(meta, d / "meta")
    return d


def _write_jpeg(path: Path, rng: np.random.Generator, label: int, size: tuple[int, int], gray: bool = False) -> None:
    """A JPEG of ``size`` (width, height) tinted by ``label``. Large images are noise at 1/8 the
    resolution, upsampled: as fast to make and encode as a thumbnail, and photo-like in file size."""
    from PIL import Image

    w, h = size
    if max(w, h) <= 64:
        arr = _images(rng, [label], (h, w) if gray else (h, w, 3))[0]
        Image.fromarray(arr).save(path, format="JPEG", quality=85)
        return
    small = _images(rng, [label], (h // 8 + 1, w // 8 + 1) if gray else (h // 8 + 1, w // 8 + 1, 3))[0]
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, format="JPEG", quality=85)


def _imagenet_r_size(rng: np.random.Generator, real_size: bool) -> tuple[int, int]:
    if real_size:  # renditions: a few hundred pixels a side, portrait to wide
        return int(rng.integers(180, 640)), int(rng.integers(180, 640))
    return int(rng.integers(20, 40)), int(rng.integers(20, 40))


def write_imagenet_r(root: str | os.PathLike, wnids: Sequence[str] = ("n01443537", "n01484850", "n01494475"),
                     per_class: Sequence[int] | int = 10, seed: int = 0, real_size: bool = False) -> Path:
    """``root/imagenet-r/<wnid>/<style>_<i>.jpg`` JPEGs of varying size, plus a README.txt."""
    d = Path(root) / "imagenet-r"
    d.mkdir(parents=True, exist_ok=True)
    (d / "README.txt").write_text("ImageNet-R (synthetic test fixture)\n")
    counts = [per_class] * len(wnids) if isinstance(per_class, int) else list(per_class)
    rng = np.random.default_rng(seed)
    styles = ("art", "cartoon", "sketch", "toy")
    for c, (w, n) in enumerate(zip(wnids, counts)):
        (d / w).mkdir(exist_ok=True)
        for i in range(n):
            _write_jpeg(d / w / f"{styles[i % 4]}_{i}.jpg", rng, c, _imagenet_r_size(rng, real_size))
    return d


def write_imagenet_r_coda(root: str | os.PathLike, train_per_class: int = 4, test_per_class: int = 1,
                          classes: Sequence[str] | None = None, seed: int = 0,
                          real_size: bool = True) -> tuple[Path, Path]:
    """A partial ImageNet-R tree with files named as in the shipped CODA split: per class (all 200
    by default, else ``classes``) the first ``train_per_class`` / ``test_per_class`` paths of its
    train / test lists. Also writes ``root/imagenet-r-split/`` (train.txt, test.txt and classes.txt
    in the shipped label order, restricted to these files and classes) to give as ``split_file``.
    Returns (the imagenet-r folder, the split folder)."""
    entries, order = read_split_folder(CODA_SPLIT_DIR)
    assert order is not None
    chosen = list(order) if classes is None else [w for w in order if w in set(classes)]
    unknown = sorted(set(classes or ()) - set(order))
    if unknown:
        raise ValueError(f"not ImageNet-R classes of the CODA split: {unknown[:5]}")
    take = {"train": train_per_class, "test": test_per_class}
    picked: dict[str, list[str]] = {"train": [], "test": []}
    for w in chosen:
        for part in ("train", "test"):
            mine = [rel for s, rel in entries if s == part and rel.split("/", 1)[0] == w]
            if len(mine) < take[part]:
                raise ValueError(f"class {w} has only {len(mine)} {part} images in the CODA split")
            picked[part] += mine[:take[part]]
    d = Path(root) / "imagenet-r"
    d.mkdir(parents=True, exist_ok=True)
    (d / "README.txt").write_text("ImageNet-R (synthetic fixture, file names of the CODA split)\n")
    label = {w: i for i, w in enumerate(order)}
    rng = np.random.default_rng(seed)
    for rel in picked["train"] + picked["test"]:
        w = rel.split("/", 1)[0]
        (d / w).mkdir(exist_ok=True)
        _write_jpeg(d / rel, rng, label[w], _imagenet_r_size(rng, real_size))
    split = Path(root) / "imagenet-r-split"
    split.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train.txt", picked["train"]), ("test.txt", picked["test"]), ("classes.txt", chosen)):
        (split / name).write_text("\n".join(lines) + "\n")
    return d, split


def _cub_size(rng: np.random.Generator, real_size: bool) -> tuple[int, int]:
    if real_size:  # CUB photos: the longer side 500 px, mostly landscape 4:3 / 3:2, some portrait
        short = int(rng.integers(250, 500))
        return (500, short) if rng.random() < 0.8 else (short, 500)
    return 30, 24


def write_cub200(root: str | os.PathLike, num_classes: int = 4, per_class: int = 5, seed: int = 0,
                 gray_every: int = 7, real_size: bool = False) -> Path:
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
            _write_jpeg(d / "images" / rel, rng, c - 1, _cub_size(rng, real_size),
                        gray=(iid % gray_every == 0))
            images.append(f"{iid} {rel}")
            labels.append(f"{iid} {c}")
            split.append(f"{iid} {1 if i % 2 == 0 else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", classes)):
        (d / name).write_text("\n".join(lines) + "\n")
    return d
