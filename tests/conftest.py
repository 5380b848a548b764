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


@pytest.fixture(autouse=True)
def no_published_records(tmp_path_factory, monkeypatch):
    """Sweeps in tests see an empty published-records folder unless they pass --records-dir: the
    repository's own records (tests/test_published.py reads them) would otherwise join every table."""
    from leaderboard import records
    monkeypatch.setattr(records, "RECORDS_DIR", tmp_path_factory.mktemp("published-records"))
