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
    repository's own records (tests/test_published.py reads them) would otherwise join every table;
    and their local pages go to a folder of their own unless they pass --local-leaderboard-dir."""
    from leaderboard import layout
    monkeypatch.setattr(layout, "RECORDS_DIR", tmp_path_factory.mktemp("published-records"))
    # ... and write their local pages there too, never into the checkout's results/
    monkeypatch.setattr(layout, "LOCAL_PAGES_DIR", tmp_path_factory.mktemp("local-pages"))


#: Files whose module fixtures take most of the run; collected first, so that with one process
#: per CPU (`make test`: pytest-xdist, a file per process) they start at once instead of ending
#: the run alone: test_smoke.py's reduced real-shape dry run (every method on ViT-B/16 fed 32 px).
LONGEST_FIRST = ("test_smoke.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order
