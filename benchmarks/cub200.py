"""CUB-200-2011 from its official tree, with the official ``train_test_split.txt`` (5,994 / 5,794).

Looked for in ``<data_root>/CUB_200_2011/``, then ``<data_root>/`` itself. The tree needs
``images.txt`` (``id relpath``), ``image_class_labels.txt`` (``id label``, 1-based, made 0-based
here), ``train_test_split.txt`` (``id is_train``, 1 = train) and ``images/``; ``classes.txt``
(``id name``) is used for class names when present, else the image folder names.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import (DataError, DataNotFoundError, ImageFileDataset, LoadedData, path_kind,
                     resolve_data_root, sha256_bytes)

REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
HOW_TO_GET = (
    "Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
    "(https://data.caltech.edu/records/65de6-vp158) and extract it under --data-root, giving "
    "<data-root>/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,images/}. "
    "The suite does not download it."
)


def candidate_dirs(data_root: str | os.PathLike | None) -> list[Path]:
    root = resolve_data_root(data_root)
    return [root / "CUB_200_2011", root]


def find_dir(data_root: str | os.PathLike | None) -> Path | None:
    for d in candidate_dirs(data_root):
        if all(path_kind(d / f) == "file" for f in REQUIRED) and path_kind(d / "images") == "dir":
            return d
    return None


def _read_pairs(path: Path) -> dict[int, str]:
    """``id value`` lines -> {id: value}; the value may contain spaces (it never does officially)."""
    out: dict[int, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e}); it is damaged: re-extract CUB_200_2011.tgz") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check its permissions or re-extract "
                        "CUB_200_2011.tgz") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}:{n}: expected '<id> <value>', got {line!r}; the file is damaged: "
                            "re-extract CUB_200_2011.tgz")
        out[int(parts[0])] = parts[1]
    return out


def load_cub200(data_root: str | os.PathLike | None = None) -> LoadedData:
    """Official split; labels 0..199 in the order of the 1-based class ids; images read lazily."""
    d = find_dir(data_root)
    if d is None:
        raise DataNotFoundError("CUB-200-2011", candidate_dirs(data_root), HOW_TO_GET)
    images = _read_pairs(d / "images.txt")
    labels = _read_pairs(d / "image_class_labels.txt")
    is_train = _read_pairs(d / "train_test_split.txt")
    raw = {f: (d / f).read_bytes() for f in REQUIRED}  # readable: _read_pairs read them
    bad = next((i for i, v in labels.items() if not v.strip().isdigit()), None)
    if bad is not None:
        raise DataError(f"{d / 'image_class_labels.txt'}: image {bad} has class {labels[bad]!r}, "
                        "expected a class id; the file is damaged: re-extract CUB_200_2011.tgz")
    if not (images.keys() == labels.keys() == is_train.keys()):
        raise DataError(f"{d}: images.txt, image_class_labels.txt and train_test_split.txt list different image ids")
    label_ids = sorted({int(v) for v in labels.values()})
    if label_ids != list(range(1, len(label_ids) + 1)):
        raise DataError(f"{d / 'image_class_labels.txt'}: class ids are not 1..N")

    img_dir = d / "images"
    missing = [images[i] for i in sorted(images) if path_kind(img_dir / images[i]) != "file"]
    if missing:
        shown = [str(img_dir / m) for m in missing[:10]] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else [])
        raise DataNotFoundError("CUB-200-2011", shown, f"{len(missing)} image(s) listed in images.txt are missing. {HOW_TO_GET}")

    names: dict[int, str] = {}
    if path_kind(d / "classes.txt") == "file":
        names = {k: v for k, v in _read_pairs(d / "classes.txt").items()}
    for i in sorted(images):  # fall back to the folder name, e.g. "001.Black_footed_Albatross"
        names.setdefault(int(labels[i]), images[i].split("/", 1)[0])
    class_names = [names[c] for c in label_ids]

    split: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for i in sorted(images):
        flag = is_train[i].strip()
        if flag not in ("0", "1"):
            raise DataError(f"{d / 'train_test_split.txt'}: image {i} has flag {flag!r}, expected 0 or 1")
        rel, y = split["train" if flag == "1" else "test"]
        rel.append(images[i])
        y.append(int(labels[i]) - 1)
    fp = sha256_bytes(b"cub200", *(raw[f] for f in REQUIRED))
    return LoadedData(
        train=ImageFileDataset(img_dir, *split["train"]),
        test=ImageFileDataset(img_dir, *split["test"]),
        class_names=class_names, fingerprint=fp, location=str(d),
    )
