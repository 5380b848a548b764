"""Shared fixtures: the tests import their helpers from this folder."""
import pytest
import torch

from methods import backbones


@pytest.fixture(scope="module")
def tiny():
    """The tiny ViT with random weights (no file read), frozen; shared, as the suite shares it."""
    return backbones.load("tiny", random_init=True).vit


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return backbones.load("tiny", random_init=True).vit
