"""docs/writing-a-method.md: its two worked examples and its test file run exactly as written, and
everything it names is importable from `methods`."""
import ast
import re
from pathlib import Path

import pytest
import torch

import methods
import run_suite
from benchmarks.synthetic import write_fashion_mnist
from helpers import assert_batch_size_invariant, stream
from leaderboard.store import RunStore
from methods import registry
from methods.backbones import load
from protocols.cost import check_passes

torch.set_num_threads(1)
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-a-method.md"
TEXT = GUIDE.read_text()


def block(marker: str) -> str:
    return re.search(rf"<!-- {re.escape(marker)} -->\s*```python\n(.*?)```", TEXT, re.S).group(1)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """The two examples as files, loaded as plugins (once per process: a name is registered once)."""
    folder = tmp_path_factory.mktemp("guide")
    for name in ("keyed_pool", "prompt_align"):
        (folder / f"{name}.py").write_text(block(f"guide-example: {name}"))
        assert registry.load_plugin(str(folder / f"{name}.py")) == [name]
    return folder


def test_everything_the_guide_imports_from_methods_exists():
    names = {alias.name for code in re.findall(r"```python\n(.*?)```", TEXT, re.S)
             for node in ast.walk(ast.parse(code))
             if isinstance(node, ast.ImportFrom) and node.module == "methods" for alias in node.names}
    assert {"TaskStages", "ClassStatistics", "align_classifier", "register"} <= names
    assert not names - set(methods.__all__), names - set(methods.__all__)


@pytest.mark.parametrize("name", ["keyed_pool", "prompt_align"])
def test_each_example_runs_through_run_suite(name, plugins, tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=8, test_per_class=4)
    proto = tmp_path / "tiny-3t.yaml"
    proto.write_text("name: tiny-3t\ndataset: fashion_mnist\nnum_tasks: 3\nbackbones: [tiny]\n"
                     f"methods:\n  {name}: {{epochs: 1}}\n")
    store = tmp_path / "runs.sqlite"
    assert run_suite.main(["--protocols", str(proto), "--data-root", str(tmp_path / "data"), "--store", str(store),
                           "--plugin", str(plugins / f"{name}.py"), "--methods", name, "--seeds", "1",
                           "--quiet", "--workers", "1", "--threads", "1", "--no-render"]) == 0
    (record,) = RunStore(store).records(method=name)
    assert record["status"] == "ok" and len(record["acc_matrix"]) == 3
    assert record["cost"]["trainable_params"] > 0
    if name == "keyed_pool":
        assert record["spec"]["hparams"]["pool_size"] == 3  # from stream_hparams


@pytest.mark.parametrize("name", ["keyed_pool", "prompt_align"])
def test_each_example_declares_its_passes_and_is_batch_size_invariant(name, plugins):
    vit = load("tiny", random_init=True).vit
    hp = registry.resolve_hparams(name, "fmnist-5t", {"epochs": 1, "align_epochs": 1} if name == "prompt_align"
                                  else {"epochs": 1}, num_tasks=2, classes_per_task=[2, 2])
    cls = registry.get(name)
    assert check_passes(name, vit, 4, hp) == (cls.passes_train, cls.passes_test)
    torch.manual_seed(0)
    strategy = registry.create(name, vit=vit, num_classes=4, hparams=hp, eval_mb_size=8, num_tasks=2,
                               classes_per_task=[2, 2])
    bm = stream()
    for exp in bm.train_stream:
        strategy.train(exp)
    if name == "prompt_align":
        assert strategy.stats.classes() == [0, 1, 2, 3]
        assert cls.task_stages(strategy.hp, 1).no_grad_passes == 1
    x = torch.stack([bm.test_stream[j].dataset[k][0] for j in range(2) for k in range(4)])
    assert_batch_size_invariant(strategy, x, bm.test_stream)


def test_keyed_pool_refuses_a_pool_smaller_than_the_stream(plugins):
    vit = load("tiny", random_init=True).vit
    with pytest.raises(ValueError, match="5 tasks need pool_size >= 5"):
        registry.create("keyed_pool", vit=vit, num_classes=10, hparams={"pool_size": 2}, num_tasks=5,
                        classes_per_task=[2] * 5)


def test_the_guide_s_test_file_passes(plugins, monkeypatch):
    monkeypatch.chdir(plugins)
    namespace: dict = {}
    exec(compile(block("guide-test"), "test_keyed_pool.py", "exec"), namespace)
    namespace["test_declared_passes_and_batch_size_invariance"]()
