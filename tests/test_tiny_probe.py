"""The shipped tiny backbone's quality check, on the real Fashion-MNIST (installed by `make test`)."""
import json

import pytest

from benchmarks import DataNotFoundError, fashion_mnist
from methods import backbones
from protocols import pretrain_tiny


def test_pretrained_tiny_beats_raw_pixels_and_random_vit():
    try:
        fashion_mnist.load_fashion_mnist(None)
    except DataNotFoundError as e:  # only outside `make test`, which installs the data first
        pytest.skip(str(e))
    probe = pretrain_tiny.probe(None)
    assert probe["pretrained_vit"] > probe["raw_pixels"] > probe["random_vit"]
    shipped = json.loads(pretrain_tiny.META.read_text())["probe"]
    for k, v in probe.items():  # the numbers the README and the .json report are these
        assert v == pytest.approx(shipped[k], abs=0.01)


def test_pretraining_never_sees_the_stream_images():
    import numpy as np
    from benchmarks import streams

    targets = np.repeat(np.arange(10), 300)
    used = set(streams.subsample_indices(targets, 200))
    unused = set(streams.unused_indices(targets, 200))
    assert not used & unused and len(used | unused) == len(targets)
    assert pretrain_tiny.stream_subsample() == {"train_per_class": 200, "test_per_class": 100}
    assert backbones.get_spec("tiny").files == ("tiny_fmnist.pt",)
