"""Class orders, task sizes, subsampling, transforms and the Avalanche streams built from
tiny data in the real formats. Nothing is downloaded."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks
from benchmarks import (DATASETS, DataError, DataNotFoundError, StreamInfo, build_stream, build_transforms, class_order,
                        classes_per_exp, fashion_mnist, imagenet_r, load_fashion_mnist, subsample_indices,
                        unused_indices)
from benchmarks.synthetic import write_cifar100, write_cub200, write_fashion_mnist, write_imagenet_r

torch.set_num_threads(1)

TINY = dict(image_size=28, in_chans=1)  # the default tiny backbone's input


@pytest.fixture
def fmnist_root(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [])
    write_fashion_mnist(tmp_path / "fashion-mnist", train_per_class=12, test_per_class=5)
    return tmp_path


# ---------------------------------------------------------------- orders and task sizes


def test_public_api():
    assert set(DATASETS) == {"fashion_mnist", "cifar100", "imagenet_r", "cub200"}
    assert all(isinstance(v, str) and v for v in DATASETS.values())
    assert issubclass(DataNotFoundError, FileNotFoundError)
    for name in ("build_stream", "StreamInfo", "DataNotFoundError", "DATASETS", "subsample_indices"):
        assert name in benchmarks.__all__


@pytest.mark.parametrize("c", [10, 100, 200])
def test_shuffled_order_is_random_Random_shuffle(c):
    for s in range(4):
        ref = list(range(c))
        random.Random(s).shuffle(ref)
        assert class_order(c, s, "shuffled") == ref == class_order(c, s)
        assert sorted(ref) == list(range(c))
    assert class_order(c, 0) != class_order(c, 1)
    assert class_order(c, 3, "natural") == list(range(c))
    with pytest.raises(ValueError, match="natural"):
        class_order(c, 0, "sorted")


@pytest.mark.parametrize("c, t", [(100, 5), (100, 10), (100, 20), (200, 5), (200, 10), (200, 20), (10, 5), (10, 3)])
def test_classes_per_exp_never_drops(c, t):
    n = classes_per_exp(c, t)
    assert len(n) == t and sum(n) == c and max(n) - min(n) <= 1 and n == sorted(n, reverse=True)


def test_classes_per_exp_remainder_first_and_bounds():
    assert classes_per_exp(10, 3) == [4, 3, 3]
    assert classes_per_exp(200, 10) == [20] * 10
    for bad in (0, 11):
        with pytest.raises(ValueError):
            classes_per_exp(10, bad)


# ---------------------------------------------------------------- subsampling


def test_subsample_fixed_deterministic_and_disjoint_from_unused():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 5, size=400).tolist()
    a = subsample_indices(y, 10)
    assert a == subsample_indices(list(y), 10) and a == sorted(a)
    assert np.bincount(np.asarray(y)[a]).tolist() == [10] * 5
    u = unused_indices(y, 10)
    assert not set(a) & set(u) and sorted(a + u) == list(range(400))
    assert set(subsample_indices(y, 4)) <= set(a)  # prefix of the same per-class permutation
    # per class: first n of default_rng(12345).permutation over that class's indices
    idx3 = np.flatnonzero(np.asarray(y) == 3)
    want = idx3[np.random.default_rng(12345).permutation(len(idx3))[:10]]
    assert sorted(want.tolist()) == [i for i in a if y[i] == 3]
    # a class smaller than per_class is taken whole
    assert subsample_indices([0, 0, 1], 2) == [0, 1, 2] and unused_indices([0, 0, 1], 2) == []
    with pytest.raises(ValueError):
        subsample_indices(y, 0)


def test_subsample_does_not_depend_on_run_seed(fmnist_root):
    kw = dict(data_root=fmnist_root, num_tasks=5, subsample={"train_per_class": 4, "test_per_class": 2}, **TINY)
    s0, s1 = build_stream("fashion_mnist", seed=0, **kw), build_stream("fashion_mnist", seed=1, **kw)
    assert s0.class_order != s1.class_order and s0.data_hash == s1.data_hash
    assert (s0.num_train, s0.num_test) == (40, 20)

    def samples(info):
        return sorted((int(y), x.numpy().tobytes()) for e in info.benchmark.train_stream for x, y in e.dataset)

    assert samples(s0) == samples(s1)
    full = build_stream("fashion_mnist", seed=0, data_root=fmnist_root, num_tasks=5, **TINY)
    other = build_stream("fashion_mnist", seed=0, **{**kw, "subsample": {"train_per_class": 5, "test_per_class": 2}})
    assert len({s0.data_hash, full.data_hash, other.data_hash}) == 3
    assert (full.num_train, full.num_test) == (120, 50)
    assert full.data_hash == load_fashion_mnist(fmnist_root).fingerprint  # whole data: the files' hash


# ---------------------------------------------------------------- streams


def _check_stream(info: StreamInfo, num_tasks: int):
    bm = info.benchmark
    assert len(bm.train_stream) == len(bm.test_stream) == num_tasks
    assert sorted(c for chunk in info.classes_per_task for c in chunk) == list(range(info.num_classes))
    assert [c for chunk in info.classes_per_task for c in chunk] == info.class_order
    for k, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        want = set(info.classes_per_task[k])
        assert set(tr.classes_in_this_experience) == set(te.classes_in_this_experience) == want
        assert set(tr.dataset.targets) == set(te.dataset.targets) == want  # original ids, not remapped
    assert sum(len(e.dataset) for e in bm.train_stream) == info.num_train
    assert sum(len(e.dataset) for e in bm.test_stream) == info.num_test


def test_fmnist_stream_10_classes_3_tasks_drops_nothing(fmnist_root):
    info = build_stream("fashion_mnist", data_root=fmnist_root, seed=0, num_tasks=3, **TINY)
    assert [len(c) for c in info.classes_per_task] == [4, 3, 3]
    assert info.class_order == class_order(10, 0) and info.num_classes == 10
    assert info.class_names[0] == "T-shirt/top" and len(info.data_hash) == 64
    _check_stream(info, 3)
    nat = build_stream("fashion_mnist", data_root=fmnist_root, seed=5, num_tasks=5, class_order="natural", **TINY)
    assert nat.classes_per_task == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    _check_stream(nat, 5)


@pytest.mark.parametrize("t", [5, 10, 20])
def test_cifar100_streams(tmp_path_factory, t):
    root = tmp_path_factory.getbasetemp() / "cifar_streams"
    if not root.exists():
        write_cifar100(root, train_per_class=2, test_per_class=1)
    info = build_stream("cifar100", data_root=root, seed=t, num_tasks=t, image_size=32, in_chans=3)
    assert [len(c) for c in info.classes_per_task] == [100 // t] * t
    _check_stream(info, t)


def test_imagenet_r_and_cub_streams_with_vit_transforms(tmp_path):
    wnids = [f"n0{i:07d}" for i in range(10)]
    write_imagenet_r(tmp_path, wnids, per_class=5)
    write_cub200(tmp_path, num_classes=6, per_class=4)
    vit = dict(image_size=24, in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               augment="rrc_flip", eval_resize="resize_crop")
    r = build_stream("imagenet_r", data_root=tmp_path, seed=0, num_tasks=3, split="stratified", **vit)
    _check_stream(r, 3)
    assert r.split == "stratified"
    assert r.data_hash == r.split_hash == imagenet_r.split_hash(imagenet_r.read_split(r.split_path), wnids)
    c = build_stream("cub200", data_root=tmp_path, seed=0, num_tasks=3, **vit)
    _check_stream(c, 3)
    x, _ = c.benchmark.train_stream[0].dataset[0]
    assert x.shape == (3, 24, 24) and x.min() >= -1 and x.max() <= 1
    te = r.benchmark.test_stream[1].dataset
    assert torch.equal(te[0][0], te[0][0])  # test side starts in the eval group: no augmentation


def test_fmnist_tiny_path_has_no_pil_round_trip(fmnist_root, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("PIL used on the 28 px path")

    monkeypatch.setattr(Image, "fromarray", boom)
    info = build_stream("fashion_mnist", data_root=fmnist_root, seed=0, num_tasks=5,
                        subsample={"train_per_class": 3, "test_per_class": 2}, **TINY)
    for stream in (info.benchmark.train_stream, info.benchmark.test_stream):
        x, y = stream[0].dataset[0]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and 0 <= x.min() <= x.max() <= 1
    loader = torch.utils.data.DataLoader(info.benchmark.train_stream[0].dataset, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.int64


def test_build_stream_errors(fmnist_root, tmp_path):
    with pytest.raises(ValueError, match="cifar100"):
        build_stream("mnist", num_tasks=5, **TINY)
    with pytest.raises(ValueError, match="split_file"):
        build_stream("fashion_mnist", data_root=fmnist_root, num_tasks=5, split_file="x.txt", **TINY)
    with pytest.raises(ValueError, match="only used by imagenet_r"):
        build_stream("cifar100", data_root=fmnist_root, num_tasks=5, split="coda", **TINY)
    with pytest.raises(ValueError, match="coda, stratified"):
        build_stream("imagenet_r", data_root=fmnist_root, num_tasks=5, split="random", **TINY)
    with pytest.raises(ValueError, match="not both"):
        build_stream("imagenet_r", data_root=fmnist_root, num_tasks=5, split="coda", split_file="x", **TINY)
    with pytest.raises(ValueError, match="subsample"):
        build_stream("fashion_mnist", data_root=fmnist_root, num_tasks=5, subsample={"train": 3}, **TINY)
    with pytest.raises(ValueError, match="rrc_flip"):
        build_stream("fashion_mnist", data_root=tmp_path / "empty", num_tasks=5, augment="flip", **TINY)
    with pytest.raises(ValueError, match="num_tasks"):
        build_stream("fashion_mnist", data_root=fmnist_root, num_tasks=11, **TINY)
    for name in ("fashion_mnist", "cifar100", "imagenet_r", "cub200"):
        with pytest.raises(DataNotFoundError) as e:
            build_stream(name, data_root=tmp_path / "empty", num_tasks=2, **TINY)
        assert e.value.paths_tried and all(str(tmp_path / "empty") in p for p in e.value.paths_tried)


def test_stream_says_which_copy_and_never_replaces_a_named_data_root(tmp_path, monkeypatch):
    """`system_copy=False` (a data root the user named): the system copy is never read instead;
    `data_source` tells which copy a stream was built from, for the run record."""
    system = write_fashion_mnist(tmp_path / "system", train_per_class=4, test_per_class=2)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [str(system)])
    named = tmp_path / "named"
    named.mkdir()
    info = build_stream("fashion_mnist", data_root=named, num_tasks=5, **TINY)
    assert (info.data_source, info.location) == ("system", str(system))
    with pytest.raises(DataNotFoundError, match="was not used: the data root was given explicitly"):
        build_stream("fashion_mnist", data_root=named, num_tasks=5, system_copy=False, **TINY)
    write_fashion_mnist(named / "fashion-mnist", train_per_class=4, test_per_class=2)
    info = build_stream("fashion_mnist", data_root=named, num_tasks=5, system_copy=False, **TINY)
    assert (info.data_source, info.location) == ("data_root", str(named / "fashion-mnist"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "loops" / "fashion-mnist").parent.mkdir()
    (tmp_path / "loops" / "fashion-mnist").symlink_to(tmp_path / "loops" / "fashion-mnist")
    for root, says in ((a_file, "is not a folder"), (tmp_path / "loops", "a symbolic link loop")):
        with pytest.raises(DataError, match=says):
            build_stream("fashion_mnist", data_root=root, num_tasks=5, **TINY)


# ---------------------------------------------------------------- transforms


def _ops(t) -> list[str]:
    return [type(o).__name__ for o in t.transforms]


def test_transform_pipelines():
    tr, ev = build_transforms(28, 1, (0.0,), (1.0,), "none", "resize", native_size=28)
    assert _ops(tr) == _ops(ev) == ["ToFloatTensor", "MatchChannels"]
    tr, ev = build_transforms(224, 3, (0.5,) * 3, (0.5,) * 3, "rrc_flip", "resize_crop", native_size=32)
    assert _ops(tr) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToFloatTensor", "MatchChannels", "Normalize"]
    assert _ops(ev) == ["Resize", "CenterCrop", "ToFloatTensor", "MatchChannels", "Normalize"]
    assert ev.transforms[0].size == 256 and ev.transforms[1].size == (224, 224)
    _, ev = build_transforms(224, 3, (0,) * 3, (1,) * 3, "none", "resize", native_size=32)
    assert _ops(ev) == ["Resize", "ToFloatTensor", "MatchChannels"]
    with pytest.raises(ValueError):
        build_transforms(28, 1, (0,), (1,), "mixup", "resize")
    with pytest.raises(ValueError):
        build_transforms(28, 3, (0, 0), (1, 1), "none", "resize")


def test_transform_values_and_channels():
    u8 = torch.arange(784, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(1, 28, 28)
    _, ev = build_transforms(28, 1, (0.0,), (1.0,), native_size=28)
    assert torch.allclose(ev(u8), u8.float() / 255)
    _, ev3 = build_transforms(28, 3, (0.5,) * 3, (0.25,) * 3, native_size=28)
    x3 = ev3(u8)
    assert x3.shape == (3, 28, 28) and torch.allclose(x3[0], (u8[0].float() / 255 - 0.5) / 0.25)
    assert torch.equal(x3[0], x3[2])
    rgb = Image.new("RGB", (40, 30), (255, 0, 0))
    _, ev1 = build_transforms(16, 1, (0.0,), (1.0,), "none", "resize")
    x1 = ev1(rgb)
    assert x1.shape == (1, 16, 16) and torch.allclose(x1, torch.full_like(x1, 0.2989), atol=0.01)
    gray = Image.new("L", (50, 20), 128)
    tr, ev = build_transforms(24, 3, (0,) * 3, (1,) * 3, "rrc_flip", "resize_crop")
    assert tr(gray).shape == ev(gray).shape == (3, 24, 24)
