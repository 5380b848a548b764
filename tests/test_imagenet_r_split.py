"""ImageNet-R as the published numbers were made: the shipped CODA-Prompt split is the protocols'
default split and label order, the suite's stratified split stays an option, and a run records the
split's hash. Trees are written in the real layout with the CODA split's file names."""

from __future__ import annotations

import configparser
import fnmatch
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import CODA_SPLIT_SHA256, DataNotFoundError, build_stream, imagenet_r, load_imagenet_r
from benchmarks.synthetic import write_imagenet_r_coda
from protocols.schema import ProtocolError, load_protocol, validate

torch.set_num_threads(1)

CODA = imagenet_r.CODA_SPLIT_DIR
REPO = Path(__file__).resolve().parent.parent


def _lines(name: str) -> list[str]:
    return (CODA / name).read_text().splitlines()


def test_the_shipped_split_is_the_coda_lists_and_its_hash_is_pinned():
    train, test, classes = _lines("train.txt"), _lines("test.txt"), _lines("classes.txt")
    assert (len(train), len(test), len(classes)) == (24000, 6000, 200)
    assert not set(train) & set(test) and len(set(train)) == 24000 and len(set(test)) == 6000
    assert {p.split("/")[0] for p in train} == {p.split("/")[0] for p in test} == set(classes)
    assert classes != sorted(classes)  # the code's label order, not the sorted wnids
    entries, order = imagenet_r.read_split_folder(CODA)
    assert order == classes and imagenet_r.split_hash(entries, order) == CODA_SPLIT_SHA256
    # the label order is part of the hash: the same lists under sorted labels are another split
    assert imagenet_r.split_hash(entries, sorted(classes)) != CODA_SPLIT_SHA256


def test_the_split_ships_as_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["benchmarks"].split(",")]
    pkg = REPO / "benchmarks"
    shipped = [str(p.relative_to(pkg)) for p in CODA.iterdir()]
    assert sorted(shipped) == ["splits/imagenet-r-coda/" + n for n in
                               ("README.md", "classes.txt", "test.txt", "train.txt")]
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in shipped)


@pytest.fixture(scope="module")
def coda_tree(tmp_path_factory):
    """All 200 classes, 2 train + 1 test file each, named as in the CODA lists (small images)."""
    root = tmp_path_factory.mktemp("coda")
    data, split = write_imagenet_r_coda(root, train_per_class=2, test_per_class=1, real_size=False)
    return root, data, split


def test_labels_follow_classes_txt_so_seed_s_gives_the_codes_tasks(coda_tree):
    root, data, split = coda_tree
    d = load_imagenet_r(root, split_file=split)
    classes = _lines("classes.txt")
    assert d.class_names == classes and len(d.train) == 400 and len(d.test) == 200
    for ds in (d.train, d.test):  # label i is line i of classes.txt
        assert all(classes[y] == p.split("/")[0] for p, y in zip(ds.relpaths, ds.targets))
    tiny = dict(image_size=28, in_chans=1)
    for seed in (0, 3):
        info = build_stream("imagenet_r", data_root=root, seed=seed, num_tasks=10, split_file=split, **tiny)
        labels = list(range(200))
        random.Random(seed).shuffle(labels)  # what the CODA / VQ / SMoPE code does with its labels
        want = [[classes[c] for c in labels[20 * t:20 * t + 20]] for t in range(10)]
        got = [[info.class_names[c] for c in task] for task in info.classes_per_task]
        assert got == want
        wnids_in_exp0 = {info.class_names[int(y)] for _, y in info.benchmark.train_stream[0].dataset}
        assert wnids_in_exp0 == set(want[0])
        assert info.split == "file" and info.data_hash == info.split_hash
        assert info.split_hash == imagenet_r.split_hash(*imagenet_r.read_split_folder(split))


def test_default_split_on_a_partial_tree_names_the_missing_files(coda_tree):
    root, data, _ = coda_tree
    with pytest.raises(DataNotFoundError) as e:
        load_imagenet_r(root)  # split="coda", the default
    msg = str(e.value)
    assert "29400 of the 30000 files of the default ImageNet-R split" in msg
    assert "split_file" in msg and "imagenet-r.tar" in msg
    assert len(e.value.paths_tried) == 11 and e.value.paths_tried[0].startswith(str(data))
    assert not (data / imagenet_r.SPLIT_NAME).exists()  # nothing written beside the data


def test_default_split_reads_a_whole_tree(tmp_path, monkeypatch):
    """The default path end to end on a tree holding every listed file (a 3-class copy of the
    shipped folder stands in for the 30,000-file one)."""
    _, split = write_imagenet_r_coda(tmp_path, train_per_class=3, test_per_class=2,
                                     classes=["n02325366", "n02165456", "n01443537"], real_size=False)
    monkeypatch.setattr(imagenet_r, "CODA_SPLIT_DIR", split)
    d = load_imagenet_r(tmp_path)
    order = [w for w in _lines("classes.txt") if w in {"n02325366", "n02165456", "n01443537"}]
    assert d.class_names == order != sorted(order) and d.split_path == str(split)
    assert np.bincount(d.train.targets).tolist() == [3, 3, 3] and len(d.test) == 6
    info = build_stream("imagenet_r", data_root=tmp_path, seed=0, num_tasks=3, image_size=28, in_chans=1)
    assert info.split == "coda" and info.data_hash == d.fingerprint == info.split_hash


def test_split_folder_errors(tmp_path):
    _, split = write_imagenet_r_coda(tmp_path, 1, 1, classes=["n02165456", "n01443537"], real_size=False)
    (split / "classes.txt").write_text("n02165456\nn09999999\nn01443537\n")
    with pytest.raises(ValueError, match="name different classes.*n09999999"):
        load_imagenet_r(tmp_path, split_file=split)
    (split / "classes.txt").write_bytes(b"\xff\xfe not text")
    with pytest.raises(ValueError, match="classes.txt: not a UTF-8 text list"):
        load_imagenet_r(tmp_path, split_file=split)
    (split / "classes.txt").unlink()  # optional: sorted wnids then
    assert load_imagenet_r(tmp_path, split_file=split).class_names == ["n01443537", "n02165456"]
    (split / "test.txt").unlink()
    with pytest.raises(ValueError, match="test.txt is missing"):
        load_imagenet_r(tmp_path, split_file=split)


def test_protocols_default_to_coda_and_other_data_sets_carry_no_split():
    for name in ("imagenet-r-5t", "imagenet-r-10t", "imagenet-r-20t"):
        p = load_protocol(name)
        assert p.split == "coda" and p.data_spec()["split"] == "coda" and p.split_file is None
    for name in ("fmnist-5t", "cifar100-10t", "cub200-10t"):  # their run keys do not move
        p = load_protocol(name)
        assert p.split is None and "split" not in p.data_spec()
    base = {"name": "x", "dataset": "imagenet_r", "num_tasks": 5}
    assert validate(dict(base, split="stratified"), "x.yaml").data_spec()["split"] == "stratified"
    own = validate(dict(base, split_file="/my/list.txt"), "x.yaml")
    assert own.split is None and own.data_spec()["split_file"] == "/my/list.txt"
    with pytest.raises(ProtocolError, match="split must be one of coda, stratified"):
        validate(dict(base, split="random"), "x.yaml")
    with pytest.raises(ProtocolError, match="not both"):
        validate(dict(base, split="coda", split_file="/my/list.txt"), "x.yaml")
    with pytest.raises(ProtocolError, match="split is only used by the imagenet_r"):
        validate({"name": "x", "dataset": "cifar100", "num_tasks": 5, "split": "coda"}, "x.yaml")


def test_a_run_records_the_split_hash(coda_tree, tmp_path):
    """A whole run (tiny ViT, random weights) on the CODA-format split: its data hash is the
    split's hash, and its spec says which split it used."""
    from protocols.runner import RunOptions, RunSpec, run

    root, _, split = coda_tree
    yaml = tmp_path / "inr-2t.yaml"
    yaml.write_text(f"name: inr-2t\ndataset: imagenet_r\nnum_tasks: 2\naugment: rrc_flip\n"
                    f"eval_resize: resize_crop\nsplit_file: {split}\nbackbones: [tiny]\n"
                    "methods: {head_only: {epochs: 1, batch_size: 64}}\n")
    rec = run(RunSpec(str(yaml), "tiny", "head_only", 0),
              RunOptions(data_root=str(root), random_init=True, quiet=True, threads=1))
    assert rec["data_hash"] == imagenet_r.split_hash(*imagenet_r.read_split_folder(split))
    assert rec["spec"]["protocol"]["split_file"] == str(split) and rec["spec"]["protocol"]["split"] is None
    assert len(rec["acc_matrix"]) == 2 and rec["acc_matrix"][1][1] is not None
