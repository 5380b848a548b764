"""Class orders, per-class subsampling and the Avalanche class-incremental streams.

Streams come from ``class_incremental_benchmark`` with an explicit ``num_classes_per_exp``:
with ``num_experiences`` Avalanche 0.6.0 silently drops the remainder classes
(``avalanche/benchmarks/scenarios/supervised.py:104-114``, docs/sources.md#avalanche-060).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .cifar100 import load_cifar100
from .common import FROM_DATA_ROOT, ArrayImageDataset, LoadedData, sha256_bytes
from .cub200 import load_cub200
from .fashion_mnist import load_fashion_mnist
from .imagenet_r import SPLITS, load_imagenet_r
from .transforms import AUGMENTS, EVAL_RESIZES, build_transforms, needs_geometry

DATASETS: dict[str, str] = {
    "fashion_mnist": "Fashion-MNIST: 10 clothing classes, 28x28 grayscale, official 60,000/10,000 split (IDX gz files)",
    "cifar100": "CIFAR-100: 100 classes, 32x32 RGB, official 50,000/10,000 split (cifar-100-python pickles)",
    "imagenet_r": "ImageNet-R: 200 ImageNet classes as renditions (art, cartoons, ...), the CODA-Prompt code's 80/20 split (default), the suite's stratified one or a split file",
    "cub200": "CUB-200-2011: 200 bird species, official train_test_split.txt (5,994/5,794)",
}
CLASS_ORDERS = ("shuffled", "natural")
#: The data attribute of every stream sample holding its index in the reader's data set (before any
#: subsampling): the data set's own order, which the reference codes batch test images in (within a
#: task: CIFAR-100's and Fashion-MNIST's test-file order, CUB-200's ``images.txt`` order, the
#: ImageNet-R split's test list order). An experience's samples are grouped by class instead;
#: ``exp.dataset.sample_index`` recovers the data set's order without changing the stream.
SAMPLE_INDEX = "sample_index"
#: Seed of the per-class subsample permutation; fixed so the subset never depends on the run seed.
SUBSAMPLE_SEED = 12345


def class_order(num_classes: int, seed: int, mode: str = "shuffled") -> list[int]:
    """``shuffled``: ``list(range(C))`` shuffled by ``random.Random(seed)`` (CODA / VQ / SMoPE lineage);
    ``natural``: ``list(range(C))``."""
    if mode == "natural":
        return list(range(num_classes))
    if mode == "shuffled":
        order = list(range(num_classes))
        random.Random(seed).shuffle(order)
        return order
    raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {mode!r}")


_order = class_order  # build_stream's ``class_order`` parameter shadows the function


def classes_per_exp(num_classes: int, num_tasks: int) -> list[int]:
    """Class counts per task summing to ``num_classes``: the remainder goes one each to the first
    tasks (10 classes / 3 tasks -> [4, 3, 3]), so no class is ever dropped."""
    if not 1 <= num_tasks <= num_classes:
        raise ValueError(f"num_tasks must be in 1..{num_classes} for {num_classes} classes, got {num_tasks}")
    base, extra = divmod(num_classes, num_tasks)
    return [base + (1 if t < extra else 0) for t in range(num_tasks)]


def _per_class_pick(targets: Sequence[int], per_class: int) -> np.ndarray:
    """Boolean mask of the fixed subset: per class, the first ``per_class`` of a
    ``default_rng(SUBSAMPLE_SEED)`` permutation of that class's indices (a fresh generator per class,
    so a class's subset does not depend on the others). Classes smaller than ``per_class`` are
    taken whole."""
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    y = np.asarray(targets, dtype=np.int64)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        perm = np.random.default_rng(SUBSAMPLE_SEED).permutation(len(idx))
        mask[idx[perm[:int(per_class)]]] = True
    return mask


def subsample_indices(targets: Sequence[int], per_class: int) -> list[int]:
    """Sorted indices of the fixed per-class subset the streams use (independent of the run seed)."""
    return np.flatnonzero(_per_class_pick(targets, per_class)).tolist()


def unused_indices(targets: Sequence[int], per_class: int) -> list[int]:
    """Sorted indices NOT in ``subsample_indices(targets, per_class)``: data a pretraining recipe
    may use without ever touching what the benchmark trains or tests on."""
    return np.flatnonzero(~_per_class_pick(targets, per_class)).tolist()


@dataclass
class StreamInfo:
    """A built benchmark plus what a run record needs to reproduce it."""

    benchmark: Any                      # avalanche CLScenario: .train_stream / .test_stream
    class_order: list[int]
    classes_per_task: list[list[int]]
    num_classes: int
    data_hash: str                      # files + split + subsample
    dataset: str = ""
    class_names: list[str] = field(default_factory=list)
    num_train: int = 0
    num_test: int = 0
    location: str = ""                  # folder the data was read from
    data_source: str = FROM_DATA_ROOT   # which copy: under the data root, or the system copy
    split_path: str | None = None       # ImageNet-R: split list used
    split: str | None = None            # ImageNet-R: "coda" | "stratified" | "file"
    split_hash: str | None = None       # ImageNet-R: hash of the split used (lists + label order)
    notes: list[str] = field(default_factory=list)


def _load(dataset: str, data_root, split, split_file, download, system_copy) -> LoadedData:
    if dataset == "fashion_mnist":
        return load_fashion_mnist(data_root, download=download, system_copy=system_copy)
    if dataset == "cifar100":
        return load_cifar100(data_root)
    if dataset == "imagenet_r":
        return load_imagenet_r(data_root, split=split or "coda", split_file=split_file)
    if dataset == "cub200":
        return load_cub200(data_root)
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def _parse_subsample(subsample: Mapping[str, Any] | None) -> dict[str, int | None] | None:
    if subsample is None:
        return None
    unknown = set(subsample) - {"train_per_class", "test_per_class"}
    if unknown:
        raise ValueError(f"subsample keys are train_per_class and test_per_class, got {sorted(unknown)}")
    sub = {k: (None if subsample.get(k) is None else int(subsample[k]))
           for k in ("train_per_class", "test_per_class")}
    return None if all(v is None for v in sub.values()) else sub


def build_stream(dataset: str, *, data_root: str | os.PathLike | None = None, seed: int = 0,
                 num_tasks: int, class_order: str = "shuffled", image_size: int, in_chans: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: str = "none", eval_resize: str = "resize",
                 subsample: Mapping[str, Any] | None = None, split: str | None = None,
                 split_file: str | os.PathLike | None = None, download: bool = False,
                 system_copy: bool = True) -> StreamInfo:
    """Class-incremental train / test streams of ``dataset`` for one seed.

    ``mean`` / ``std`` default to 0 / 1 (no normalisation). ``subsample`` keys left out or None
    keep that split whole. Labels stay the reader's class ids (not remapped to the order); for
    ImageNet-R they follow the split's label order. ``split`` (``coda``, the default, or
    ``stratified``) and ``split_file`` choose ImageNet-R's split (``benchmarks.imagenet_r``).
    ``system_copy=False`` forbids the system-wide copy of the data (Fashion-MNIST's
    ``/usr/share/datasets/fashion-mnist``): give it for a data root the user named, which must
    never be replaced silently. ``StreamInfo.data_source`` says which copy was read.
    """
    # argument errors before any disk work
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if class_order not in CLASS_ORDERS:
        raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {class_order!r}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if eval_resize not in EVAL_RESIZES:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}, got {eval_resize!r}")
    if dataset != "imagenet_r" and (split is not None or split_file is not None):
        raise ValueError(f"split and split_file are only used by imagenet_r, not {dataset!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"ImageNet-R split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split is not None and split_file is not None:
        raise ValueError("give an ImageNet-R split or a split_file, not both")
    sub = _parse_subsample(subsample)
    data = _load(dataset, data_root, split, split_file, download, system_copy)
    train, test = data.train, data.test
    index = {"train": list(range(len(train))), "test": list(range(len(test)))}  # SAMPLE_INDEX

    if isinstance(train, ArrayImageDataset):
        # no resize / crop / flip -> uint8 tensors straight to the float conversion, no PIL
        mode = "pil" if needs_geometry(image_size, augment, eval_resize, train.native_size) else "tensor"
        train, test = train.with_mode(mode), test.with_mode(mode)
    if sub is not None:
        if sub["train_per_class"] is not None:
            index["train"] = subsample_indices(train.targets, sub["train_per_class"])
            train = train.subset(index["train"])
        if sub["test_per_class"] is not None:
            index["test"] = subsample_indices(test.targets, sub["test_per_class"])
            test = test.subset(index["test"])

    num_classes = data.num_classes
    for name, ds in (("train", train), ("test", test)):
        if sorted(set(ds.targets)) != list(range(num_classes)):
            raise ValueError(f"{dataset} {name} split does not hold every class 0..{num_classes - 1}")
    order = _order(num_classes, seed, class_order)
    counts = classes_per_exp(num_classes, num_tasks)
    chunks, start = [], 0
    for n in counts:
        chunks.append(order[start:start + n])
        start += n

    t_tr, t_ev = build_transforms(image_size, in_chans, mean if mean is not None else (0.0,),
                                  std if std is not None else (1.0,), augment, eval_resize,
                                  native_size=train.native_size)
    benchmark = _avalanche_benchmark(train, test, t_tr, t_ev, order, counts, index)

    # whole data: the reader's own hash (for ImageNet-R the split list's sha256); subsampled: that
    # hash combined with the subsample spec, which with the fixed seed determines the subset
    data_hash = data.fingerprint if sub is None else sha256_bytes(json.dumps({
        "dataset": dataset, "files_and_split": data.fingerprint,
        "subsample": sub, "subsample_seed": SUBSAMPLE_SEED,
    }, sort_keys=True).encode())
    imagenet = dataset == "imagenet_r"
    return StreamInfo(
        benchmark=benchmark, class_order=order, classes_per_task=chunks, num_classes=num_classes,
        data_hash=data_hash, dataset=dataset, class_names=data.class_names,
        num_train=len(train), num_test=len(test), location=data.location, data_source=data.source,
        split_path=data.split_path,
        split=("file" if split_file is not None else split or "coda") if imagenet else None,
        split_hash=data.fingerprint if imagenet else None, notes=list(data.notes),
    )


def _avalanche_benchmark(train, test, t_tr, t_ev, order: list[int], counts: list[int],
                         index: Mapping[str, list[int]]):
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import DataAttribute, TransformGroups, make_avalanche_dataset

    def wrap(ds, original: list[int]):
        # SAMPLE_INDEX is never returned by __getitem__: batches and their order are unchanged
        return make_avalanche_dataset(
            ds, data_attributes=[DataAttribute(ds.targets, "targets"), DataAttribute(original, SAMPLE_INDEX)],
            transform_groups=TransformGroups({"train": t_tr, "eval": t_ev}))

    # the test side starts in the eval group so iterating test_stream by hand never augments
    return class_incremental_benchmark({"train": wrap(train, index["train"]),
                                        "test": wrap(test, index["test"]).eval()},
                                       class_order=order, num_classes_per_exp=counts)
