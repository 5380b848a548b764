"""Safe reading of every file a user points the suite at, and one clear error per bad file: crafted
CIFAR pickles cannot run code, checkpoints load only as weights, and truncated or corrupt data
files raise `DataError` / `BackboneError` naming the file (issue 11)."""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import DataError, load_cifar100, load_cub200, load_fashion_mnist, load_imagenet_r
from benchmarks import fashion_mnist
from benchmarks.synthetic import write_cifar100, write_cub200, write_fashion_mnist, write_imagenet_r
from methods import backbones
from methods.backbones import BackboneError
from methods.loading import make_loader

torch.set_num_threads(1)


# ---------------------------------------------------------------- CIFAR-100 pickles


class _Payload:
    """Unpickling this calls ``fn(*args)``: what a crafted data file would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _craft(path: Path, payload, protocol: int) -> None:
    blob = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"evil": payload}
    path.write_bytes(pickle.dumps(blob, protocol=protocol))


def test_the_fixture_is_written_as_the_real_files_are(tmp_path):
    d = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    raw = (d / "train").read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert ops[0] == ("PROTO", 2)
    assert {a for n, a in ops if n == "GLOBAL"} == {"numpy.core.multiarray _reconstruct", "numpy ndarray",
                                                    "numpy dtype"}
    assert not {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES"} & {n for n, _ in ops}  # Python 2 str only
    data = load_cifar100(tmp_path)
    assert data.train.images.shape == (100, 32, 32, 3) and data.class_names[7] == "class_007"


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "eval"])
def test_a_crafted_cifar_pickle_runs_no_code(tmp_path, kind, protocol):
    write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    victim = tmp_path / "pwned"
    payload = {"os.system": _Payload(os.system, f"touch {victim}"),
               "builtins.open": _Payload(open, str(victim), "w"),
               "eval": _Payload(eval, f"open({str(victim)!r}, 'w')")}[kind]
    target = tmp_path / "cifar-100-python" / "train"
    _craft(target, payload, protocol)
    with pytest.raises(DataError) as e:
        load_cifar100(tmp_path)
    assert not victim.exists()
    msg = str(e.value)
    assert str(target) in msg and "refused global" in msg and "original file" in msg
    assert "\n" not in msg.split(".")[0]


def test_truncated_and_foreign_cifar_files(tmp_path):
    d = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    good = (d / "test").read_bytes()
    (d / "test").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=f"{d / 'test'}: not a readable CIFAR-100 pickle"):
        load_cifar100(tmp_path)
    (d / "test").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match="holds a list, not a dict"):
        load_cifar100(tmp_path)
    (d / "test").write_bytes(pickle.dumps({b"data": [[0] * 3072], b"fine_labels": [0]}, protocol=4))
    with pytest.raises(DataError, match="uint8 numpy array"):
        load_cifar100(tmp_path)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [])
    return write_fashion_mnist(tmp_path / "fashion-mnist", train_per_class=2, test_per_class=1)


def _fmnist_error(tmp_path) -> str:
    fashion_mnist._load_arrays.cache_clear()
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path)
    return str(e.value)


def test_truncated_gzip(tmp_path, fmnist):
    f = fmnist / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-40])
    msg = _fmnist_error(tmp_path)
    assert msg.startswith(f"{f}: cannot decompress") and "--download" in msg


def test_not_a_gzip(tmp_path, fmnist):
    f = fmnist / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(b"<html>404 not found</html>")
    assert _fmnist_error(tmp_path).startswith(f"{f}: cannot decompress")


def test_wrong_idx_magic(tmp_path, fmnist):
    f = fmnist / "train-labels-idx1-ubyte.gz"
    f.write_bytes((fmnist / "train-images-idx3-ubyte.gz").read_bytes())  # images where labels belong
    assert _fmnist_error(tmp_path).startswith(f"{f}: IDX magic number 2051, expected 2049")


def test_size_mismatch_and_cut_header(tmp_path, fmnist):
    f = fmnist / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(raw[:-5]))
    assert _fmnist_error(tmp_path).startswith(f"{f}: header says (10, 28, 28) (7840 bytes) but 7835")
    f.write_bytes(gzip.compress(raw[:9]))
    assert _fmnist_error(tmp_path).startswith(f"{f}: IDX header cut short")


# ---------------------------------------------------------------- images and lists


def _corrupt_jpeg(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3] if how == "truncated" else b"\xff\xd8" + os.urandom(200))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupt_imagenet_r_jpeg_names_the_file(tmp_path, how):
    root = write_imagenet_r(tmp_path, per_class=4)
    d = load_imagenet_r(tmp_path, split="stratified")
    victim = root / d.train.relpaths[0]
    _corrupt_jpeg(victim, how)
    with pytest.raises(DataError, match=f"^{victim}: cannot decode this image.*re-extract"):
        d.train[0]


def test_a_corrupt_cub_jpeg_fails_the_same_way_in_a_loader_worker(tmp_path):
    """Raised in a DataLoader worker, the error still comes back as one line naming the file."""
    root = write_cub200(tmp_path, num_classes=2, per_class=2)
    d = load_cub200(tmp_path)
    victim = root / "images" / d.test.relpaths[1]
    _corrupt_jpeg(victim, "garbage")
    loader = make_loader(d.test, batch_size=2, workers=1, collate_fn=lambda b: b)
    with pytest.raises(DataError) as e:
        list(loader)
    assert str(e.value).startswith(f"{victim}: cannot decode this image") and "Traceback" not in str(e.value)


def test_unreadable_cub_lists(tmp_path):
    root = write_cub200(tmp_path, num_classes=2, per_class=2)
    (root / "images.txt").write_bytes(b"1 \xff\xfe\x00bad\n")
    with pytest.raises(DataError, match=f"{root / 'images.txt'}: not a UTF-8 text file"):
        load_cub200(tmp_path)
    write_cub200(tmp_path, num_classes=2, per_class=2)
    (root / "image_class_labels.txt").write_text("1 one\n2 1\n3 2\n4 2\n")
    with pytest.raises(DataError, match="image 1 has class 'one'"):
        load_cub200(tmp_path)


def test_unreadable_imagenet_r_split_list(tmp_path):
    write_imagenet_r(tmp_path, per_class=3)
    bad = tmp_path / "split.txt"
    bad.write_bytes(b"train\tn01443537/art_0.jpg\n\xff\xfe\n")
    with pytest.raises(DataError, match=f"{bad}: not a UTF-8 text list"):
        load_imagenet_r(tmp_path, split_file=bad)


# ---------------------------------------------------------------- checkpoints


def _dino_error(tmp_path) -> str:
    with pytest.raises(BackboneError) as e:
        backbones.load("dino1k", str(tmp_path))
    return str(e.value)


def test_a_checkpoint_weights_only_refuses_runs_no_code(tmp_path):
    victim = tmp_path / "pwned"
    f = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save({"pos_embed": torch.zeros(1), "x": _Payload(os.system, f"touch {victim}")}, f)
    msg = _dino_error(tmp_path)
    assert not victim.exists()
    assert msg.startswith(f"checkpoint {f}: refused") and "weights_only=True" in msg and "safetensors" in msg


@pytest.mark.parametrize("content", ["truncated", "text", "empty", "list"])
def test_unreadable_checkpoints(tmp_path, content):
    f = tmp_path / "dino_vitbase16_pretrain.pth"
    if content == "truncated":
        torch.save(backbones.build_architecture("tiny").state_dict(), f)
        f.write_bytes(f.read_bytes()[:5000])
    elif content == "text":
        f.write_text("<html>Sign in to download</html>\n")
    elif content == "empty":
        f.write_bytes(b"")
    else:
        torch.save([torch.zeros(2)], f)
    msg = _dino_error(tmp_path)
    assert msg.startswith(f"checkpoint {f}: ") and "facebookresearch/dino" in msg
    assert ("not a state dict" in msg) if content == "list" else ("cannot be read" in msg)


def test_corrupt_safetensors(tmp_path):
    f = tmp_path / "vit_base_patch16_224.augreg_in21k.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(BackboneError, match=f"checkpoint {f}: cannot be read"):
        backbones.load("sup21k", str(tmp_path))
