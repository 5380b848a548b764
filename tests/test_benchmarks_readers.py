"""Readers on tiny data written in the real on-disk formats (IDX gz, CIFAR pickles, ImageNet-R
folders, the CUB_200_2011 tree). Nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import DataError, DataNotFoundError, load_cifar100, load_cub200, load_fashion_mnist, load_imagenet_r
from benchmarks import fashion_mnist, imagenet_r
from benchmarks.common import sha256_lines
from benchmarks.synthetic import write_cifar100, write_cub200, write_fashion_mnist, write_idx, write_imagenet_r

torch.set_num_threads(1)


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """Hide the Debian copy so lookups see only tmp_path."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [str(tmp_path / "no-system-dir")])


# ---------------------------------------------------------------- Fashion-MNIST


def test_idx_writer_matches_the_published_header(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "y.gz", np.arange(5, dtype=np.uint8))
    x = gzip.open(tmp_path / "x.gz").read()
    y = gzip.open(tmp_path / "y.gz").read()
    assert x[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", x[4:16]) == (5, 28, 28)
    assert y[:4] == b"\x00\x00\x08\x01" and struct.unpack(">I", y[4:8]) == (5,)
    assert len(x) == 16 + 5 * 784 and y[8:] == bytes(range(5))


def test_fmnist_reads_idx_gz(tmp_path, no_system_fmnist):
    write_fashion_mnist(tmp_path / "fashion-mnist", train_per_class=6, test_per_class=2)
    d = load_fashion_mnist(tmp_path)
    assert d.location == str(tmp_path / "fashion-mnist")
    assert d.train.images.shape == (60, 28, 28) and d.test.images.shape == (20, 28, 28)
    assert d.train.targets[:12] == list(range(10)) + [0, 1]
    assert sorted(set(d.test.targets)) == list(range(10)) and d.num_classes == 10
    img, y = d.train[3]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28) and y == 3
    x, y = d.train.with_mode("tensor")[3]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28) and y == 3
    assert torch.equal(x[0], torch.from_numpy(np.array(img)))
    raw = gzip.open(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").read()
    assert np.array_equal(d.train.images[0], np.frombuffer(raw[16:16 + 784], np.uint8).reshape(28, 28))


@pytest.mark.parametrize("sub, gz", [("", True), ("FashionMNIST/raw", False)])
def test_fmnist_search_order_and_plain_files(tmp_path, no_system_fmnist, sub, gz):
    write_fashion_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    d = load_fashion_mnist(tmp_path)
    assert d.location == str(tmp_path / sub if sub else tmp_path) and len(d.train) == 60


def test_fmnist_hash_follows_content_not_packaging(tmp_path, no_system_fmnist):
    write_fashion_mnist(tmp_path / "a" / "fashion-mnist", gz=True)
    write_fashion_mnist(tmp_path / "b" / "FashionMNIST" / "raw", gz=False)
    write_fashion_mnist(tmp_path / "c", seed=1)
    fa, fb, fc = (load_fashion_mnist(tmp_path / k).fingerprint for k in "abc")
    assert fa == fb != fc


def test_fmnist_bad_magic(tmp_path, no_system_fmnist):
    d = write_fashion_mnist(tmp_path / "fashion-mnist")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros((60, 1), np.uint8))  # 2-d: magic 2050
    with pytest.raises(ValueError, match="magic number 2050, expected 2049"):
        load_fashion_mnist(tmp_path)


def test_fmnist_missing_names_every_path_and_the_three_ways(tmp_path, no_system_fmnist, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "_download", lambda root: pytest.fail("downloaded without download=True"))
    with pytest.raises(DataNotFoundError) as e:
        load_fashion_mnist(tmp_path / "root")
    msg = str(e.value)
    for p in ("root/fashion-mnist", "root/FashionMNIST/raw", "no-system-dir"):
        assert p in msg
    assert len(e.value.paths_tried) == 4
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg and "--download" in msg
    assert pickle.loads(pickle.dumps(e.value)).paths_tried == e.value.paths_tried


def test_fmnist_download_only_when_asked(tmp_path, no_system_fmnist, monkeypatch):
    calls = []

    def fake_download(root):  # what torchvision leaves behind: <root>/FashionMNIST/raw/*
        calls.append(root)
        write_fashion_mnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(fashion_mnist, "_download", fake_download)
    d = load_fashion_mnist(tmp_path, download=True)
    assert calls == [tmp_path] and d.location == str(tmp_path / "FashionMNIST" / "raw")
    load_fashion_mnist(tmp_path, download=True)
    assert len(calls) == 1  # found on disk the second time


@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"),
                    reason="dataset-fashion-mnist not installed")
def test_fmnist_real_debian_copy():
    d = load_fashion_mnist("/nonexistent-root")
    assert d.train.images.shape == (60000, 28, 28) and d.test.images.shape == (10000, 28, 28)
    assert np.bincount(d.train.targets).tolist() == [6000] * 10
    assert np.bincount(d.test.targets).tolist() == [1000] * 10


# ---------------------------------------------------------------- CIFAR-100


def test_cifar100_reads_the_python_pickles(tmp_path):
    write_cifar100(tmp_path, train_per_class=3, test_per_class=1)
    d = load_cifar100(tmp_path)
    assert d.train.images.shape == (300, 32, 32, 3) and len(d.test) == 100
    assert d.num_classes == 100 and d.class_names[7] == "class_007"
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    row = raw[b"data"][5]
    for c in range(3):  # plane c of the row is channel c, row-major
        assert np.array_equal(d.train.images[5, :, :, c], row[1024 * c:1024 * (c + 1)].reshape(32, 32))
    assert d.train.targets == list(raw[b"fine_labels"])
    img, y = d.train[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32) and y == 5
    x, _ = d.train.with_mode("tensor")[5]
    assert x.shape == (3, 32, 32) and torch.equal(x.permute(1, 2, 0), torch.from_numpy(d.train.images[5]))


def test_cifar100_data_root_may_be_the_folder_itself(tmp_path):
    write_cifar100(tmp_path, num_classes=100, train_per_class=1, test_per_class=1)
    assert load_cifar100(tmp_path / "cifar-100-python").location == str(tmp_path / "cifar-100-python")


def test_cifar100_wrong_keys(tmp_path):
    d = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    with open(d / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"coarse_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar100(tmp_path)


def test_cifar100_missing(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_cifar100(tmp_path)
    assert e.value.paths_tried == [str(tmp_path / "cifar-100-python"), str(tmp_path)]
    assert "cifar-100-python.tar.gz" in str(e.value) and "cs.toronto.edu" in str(e.value)


# ---------------------------------------------------------------- ImageNet-R

WNIDS = ("n01443537", "n01484850", "n01494475")


def _split_lines(path: Path) -> list[str]:
    return [l for l in path.read_text().splitlines() if l and not l.startswith("#")]


def test_imagenet_r_writes_a_stratified_split_and_reuses_it(tmp_path, monkeypatch):
    root = write_imagenet_r(tmp_path, WNIDS, per_class=(10, 7, 12))
    d = load_imagenet_r(tmp_path, split="stratified")
    split = root / "promptcl_split.txt"
    assert d.split_path == str(split) and split.is_file() and d.class_names == list(WNIDS)
    lines = _split_lines(split)
    assert len(lines) == 29
    n_test = {w: sum(l.startswith("test\t" + w) for l in lines) for w in WNIDS}
    assert n_test == {"n01443537": 2, "n01484850": 1, "n01494475": 2}  # round(20 %) per class
    assert np.bincount(d.test.targets).tolist() == [2, 1, 2]
    assert np.bincount(d.train.targets).tolist() == [8, 6, 10]
    assert not set(d.train.relpaths) & set(d.test.relpaths)
    assert all(p.split("/")[0] == WNIDS[y] for p, y in zip(d.train.relpaths, d.train.targets))
    assert d.fingerprint == imagenet_r.split_hash(imagenet_r.read_split(split), list(WNIDS))
    assert d.fingerprint == sha256_lines(sorted(lines) + [f"label\t{i}\t{w}" for i, w in enumerate(WNIDS)])
    img, _ = d.test[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"

    monkeypatch.setattr(imagenet_r, "make_split", lambda *_: pytest.fail("split rebuilt instead of reused"))
    before = split.read_bytes()
    again = load_imagenet_r(tmp_path, split="stratified")
    assert split.read_bytes() == before and again.fingerprint == d.fingerprint
    assert again.test.relpaths == d.test.relpaths


def test_imagenet_r_split_is_fixed_not_path_dependent(tmp_path):
    write_imagenet_r(tmp_path / "a", WNIDS, per_class=9)
    write_imagenet_r(tmp_path / "b", WNIDS, per_class=9)
    a, b = load_imagenet_r(tmp_path / "a", split="stratified"), load_imagenet_r(tmp_path / "b", split="stratified")
    assert a.test.relpaths == b.test.relpaths and a.fingerprint == b.fingerprint


def test_imagenet_r_user_split_file_is_honoured(tmp_path):
    root = write_imagenet_r(tmp_path, WNIDS[:2], per_class=4)
    files = {w: sorted(os.listdir(root / w)) for w in WNIDS[:2]}
    lines = ["# someone else's split"]
    for w in WNIDS[:2]:
        lines += [f"train\timagenet-r/{w}/{f}" for f in files[w][:1]]  # prefix tolerated
        lines += [f"test\t{w}/{f}" for f in files[w][1:]]
    user = tmp_path / "their_split.txt"
    user.write_text("\n".join(lines) + "\n")
    d = load_imagenet_r(tmp_path, split_file=user)
    assert d.split_path == str(user) and not (root / "promptcl_split.txt").exists()
    assert d.train.relpaths == [f"{w}/{files[w][0]}" for w in WNIDS[:2]]
    assert len(d.test) == 6 and d.test.targets == [0, 0, 0, 1, 1, 1]


def test_imagenet_r_split_file_errors(tmp_path):
    write_imagenet_r(tmp_path, WNIDS[:2], per_class=3)
    bad = tmp_path / "bad.txt"
    bad.write_text("val\tn01443537/art_0.jpg\n")
    with pytest.raises(ValueError, match="train|test"):
        load_imagenet_r(tmp_path, split_file=bad)
    gone = tmp_path / "gone.txt"
    gone.write_text("train\tn01443537/art_0.jpg\ntest\tn01443537/nope.jpg\n")
    with pytest.raises(DataNotFoundError, match="nope.jpg"):
        load_imagenet_r(tmp_path, split_file=gone)
    no_test = tmp_path / "no_test.txt"
    no_test.write_text("train\tn01443537/art_0.jpg\n")
    with pytest.raises(ValueError, match="no test image"):
        load_imagenet_r(tmp_path, split_file=no_test)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_imagenet_r(tmp_path, split_file=tmp_path / "missing.txt")


def test_imagenet_r_read_only_folder_writes_to_cache(tmp_path, monkeypatch):
    root = write_imagenet_r(tmp_path / "data", WNIDS[:2], per_class=5)
    monkeypatch.setenv("PROMPTCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(imagenet_r, "_writable", lambda d: False)  # tests may run as root
    with pytest.warns(UserWarning, match="not writable"):
        d = load_imagenet_r(tmp_path / "data", split="stratified")
    assert d.split_path.startswith(str(tmp_path / "cache")) and not (root / "promptcl_split.txt").exists()
    again = load_imagenet_r(tmp_path / "data", split="stratified")
    assert d.notes and again.split_path == d.split_path  # reused from cache


def test_imagenet_r_missing(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_imagenet_r(tmp_path)
    assert str(tmp_path / "imagenet-r") in e.value.paths_tried and "imagenet-r.tar" in str(e.value)


# ---------------------------------------------------------------- CUB-200-2011


def test_cub200_official_split_and_labels(tmp_path):
    root = write_cub200(tmp_path, num_classes=4, per_class=5)
    d = load_cub200(tmp_path)
    assert len(d.train) == 12 and len(d.test) == 8  # flags 1,0,1,0,1 per class
    assert d.class_names == ["001.Bird_1", "002.Bird_2", "003.Bird_3", "004.Bird_4"]
    flags = dict(l.split() for l in (root / "train_test_split.txt").read_text().splitlines())
    rels = dict(l.split() for l in (root / "images.txt").read_text().splitlines())
    assert d.train.relpaths == [rels[i] for i in sorted(rels, key=int) if flags[i] == "1"]
    assert sorted(set(d.train.targets)) == [0, 1, 2, 3]  # 1-based ids -> 0-based
    assert all(int(p[:3]) - 1 == y for p, y in zip(d.test.relpaths, d.test.targets))
    imgs = [d.train[i][0] for i in range(len(d.train))] + [d.test[i][0] for i in range(len(d.test))]
    assert all(im.mode == "RGB" and im.size == (30, 24) for im in imgs)  # grayscale ones converted


def test_cub200_missing_tree_and_missing_images(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_cub200(tmp_path)
    assert e.value.paths_tried == [str(tmp_path / "CUB_200_2011"), str(tmp_path)]
    assert "CUB_200_2011.tgz" in str(e.value)
    root = write_cub200(tmp_path, num_classes=2, per_class=2)
    victim = next((root / "images" / "001.Bird_1").iterdir())
    victim.unlink()
    with pytest.raises(DataNotFoundError, match=victim.name):
        load_cub200(tmp_path)


# ---------------------------------------------------------------- writers at real resolutions


def test_real_size_writers_make_real_shaped_photos(tmp_path):
    from benchmarks import build_stream

    root = write_imagenet_r(tmp_path, WNIDS[:2], per_class=4, real_size=True)
    sizes = [Image.open(p).size for p in sorted(root.glob("n*/*.jpg"))]
    assert len(sizes) == 8 and all(180 <= s < 640 for wh in sizes for s in wh)
    assert len({round(w / h, 1) for w, h in sizes}) > 2  # varied aspect ratios
    cub = write_cub200(tmp_path, num_classes=2, per_class=7, real_size=True)
    ims = [Image.open(p) for p in sorted((cub / "images").glob("*/*.jpg"))]
    assert all(max(im.size) == 500 and min(im.size) >= 250 for im in ims)
    assert {im.mode for im in ims} == {"RGB", "L"}  # some grayscale, as in the real set
    vit = dict(image_size=224, in_chans=3, augment="rrc_flip", eval_resize="resize_crop")
    info = build_stream("cub200", data_root=tmp_path, seed=0, num_tasks=2, **vit)
    for stream in (info.benchmark.train_stream, info.benchmark.test_stream):
        assert stream[0].dataset[0][0].shape == (3, 224, 224)


# ---------------------------------------------------------------- data roots: never a silent substitute


@pytest.fixture
def system_fmnist(monkeypatch, tmp_path):
    """A 'system copy' of Fashion-MNIST the readers could fall back to (a stand-in for
    /usr/share/datasets/fashion-mnist), so a fallback would be visible."""
    system = write_fashion_mnist(tmp_path / "system-copy", train_per_class=3, test_per_class=1)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [str(system)])
    return system


LOADERS = {"fashion_mnist": load_fashion_mnist, "cifar100": load_cifar100,
           "imagenet_r": lambda root: load_imagenet_r(root, split="stratified"), "cub200": load_cub200}


@pytest.mark.parametrize("dataset", list(LOADERS))
def test_a_data_root_that_is_a_file_is_an_error_naming_it(tmp_path, system_fmnist, dataset):
    root = tmp_path / "data.tar"
    root.write_bytes(b"not a folder")
    with pytest.raises(DataError, match=f"data root {root} is not a folder"):
        LOADERS[dataset](root)


def test_a_looping_fashion_mnist_entry_is_an_error_not_the_system_copy(tmp_path, system_fmnist):
    root = tmp_path / "data"
    root.mkdir()
    (root / "fashion-mnist").symlink_to(root / "fashion-mnist")  # a link to itself
    with pytest.raises(DataError, match=f"{root / 'fashion-mnist'}: a symbolic link loop"):
        load_fashion_mnist(root)
    (root / "fashion-mnist").unlink()
    (root / "a").symlink_to(root / "b")  # a loop of two links, and an entry that goes through it
    (root / "b").symlink_to(root / "a")
    (root / "fashion-mnist").symlink_to(root / "a")
    with pytest.raises(DataError, match="a symbolic link loop"):
        load_fashion_mnist(root)
    loop = tmp_path / "loop-root"
    loop.symlink_to(loop)  # the data root itself
    with pytest.raises(DataError, match=f"{loop}: a symbolic link loop"):
        load_fashion_mnist(loop)


def test_the_system_copy_only_when_allowed_and_always_named(tmp_path, system_fmnist):
    empty = tmp_path / "empty"
    empty.mkdir()
    d = load_fashion_mnist(empty)  # the default: a data root may fall back to the system copy
    assert d.source == "system" and d.location == str(system_fmnist)
    with pytest.raises(DataNotFoundError) as e:
        load_fashion_mnist(empty, system_copy=False)  # a data root the user named
    assert str(system_fmnist) not in e.value.paths_tried
    assert f"The system copy in {system_fmnist} was not used" in str(e.value)
    write_fashion_mnist(empty / "fashion-mnist")
    for allowed in (True, False):
        d = load_fashion_mnist(empty, system_copy=allowed)
        assert d.source == "data_root" and d.location == str(empty / "fashion-mnist")


def test_a_looping_link_in_an_imagenet_r_tree_is_an_input_error(tmp_path):
    write_imagenet_r(tmp_path, per_class=3)
    tree = tmp_path / "imagenet-r"
    wnid = sorted(p.name for p in tree.iterdir() if p.is_dir())[0]
    bad = tree / wnid / "loop.jpg"
    bad.symlink_to(bad)
    for split in ("stratified", "coda"):
        with pytest.raises(DataError, match=f"{bad}: a symbolic link loop"):
            load_imagenet_r(tmp_path, split=split)
    bad.unlink()
    (tree / "n99999999").symlink_to(tree / "n99999999")  # a class folder that loops
    with pytest.raises(DataError, match=f"{tree / 'n99999999'}: a symbolic link loop"):
        load_imagenet_r(tmp_path, split="stratified")


def test_looping_links_in_cifar100_and_cub200_trees_are_input_errors(tmp_path):
    write_cifar100(tmp_path / "c", train_per_class=2, test_per_class=1)
    meta = tmp_path / "c" / "cifar-100-python" / "meta"
    meta.unlink()
    meta.symlink_to(meta)
    with pytest.raises(DataError, match=f"{meta}: a symbolic link loop"):
        load_cifar100(tmp_path / "c")
    write_cub200(tmp_path / "b", num_classes=4, per_class=2)
    images = tmp_path / "b" / "CUB_200_2011" / "images"
    photo = next(images.rglob("*.jpg"))
    photo.unlink()
    photo.symlink_to(photo)
    with pytest.raises(DataError, match=f"{photo}: a symbolic link loop"):
        load_cub200(tmp_path / "b")
