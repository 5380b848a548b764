"""Protocol YAML validation and hyperparameter resolution."""
import pytest

from methods import registry
from protocols.schema import ProtocolError, available, load_protocol, validate

SHIPPED = ["cifar100-10t", "cub200-10t", "fmnist-5t", "imagenet-r-10t", "imagenet-r-20t", "imagenet-r-5t"]


def test_every_shipped_protocol_loads():
    assert available() == SHIPPED
    for name in SHIPPED:
        p = load_protocol(name)
        assert p.name == name and p.backbones
    assert load_protocol("imagenet-r-20t").num_tasks == 20
    assert load_protocol("fmnist-5t").subsample == {"train_per_class": 200, "test_per_class": 100}


BASE = {"name": "x", "dataset": "fashion_mnist", "num_tasks": 5}


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "num_task": 3}, "unknown key"),
    ({**BASE, "num_tasks": "5"}, "num_tasks must be int"),
    ({**BASE, "num_tasks": True}, "num_tasks must be int"),
    ({**BASE, "class_order": "random"}, "class_order must be one of shuffled, natural"),
    ({**BASE, "subsample": {"train": 3}}, "subsample keys"),
    ({**BASE, "split_file": "a.txt"}, "only used by the imagenet_r"),
    ({"name": "x", "dataset": "fashion_mnist"}, "missing required key 'num_tasks'"),
    ({**BASE, "methods": {"l2p": 3}}, "methods.l2p must be a mapping"),
    ({**BASE, "ablations": {"a": {"variants": "ladder"}}}, "ablations.a must be"),
])
def test_invalid_protocols_are_rejected_with_the_key(raw, message):
    with pytest.raises(ProtocolError, match=message):
        validate(raw, "test.yaml")


def test_missing_protocol_names_the_shipped_ones(tmp_path):
    with pytest.raises(ProtocolError, match="fmnist-5t"):
        load_protocol("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(bad)


def test_hparams_resolve_in_order_and_coerce():
    base = registry.resolve_hparams("head_only", None)
    proto = registry.resolve_hparams("head_only", "fmnist-5t")
    assert proto["epochs"] == 3 and base["epochs"] == 5
    over = registry.resolve_hparams("head_only", "fmnist-5t", {"epochs": 4}, {"lr": "0.5", "clip_grad": "1"})
    assert over["epochs"] == 4 and over["lr"] == 0.5 and over["clip_grad"] == 1.0
    with pytest.raises(ValueError, match="unknown hyperparameter 'epoch'.*valid: batch_size"):
        registry.resolve_hparams("head_only", None, {"epoch": 3})
    with pytest.raises(ValueError, match="integer"):
        registry.resolve_hparams("head_only", None, {"epochs": 2.5})


def test_unknown_method_lists_registered():
    with pytest.raises(registry.UnknownMethodError, match="head_only, joint"):
        registry.get("nope")
    assert registry.names()[:2] == ["head_only", "joint"]


def test_installed_entry_point_registers_a_method(tmp_path, monkeypatch):
    """The third way in: a package exposing `promptcl.methods` entry points is found at discovery."""
    import importlib.metadata
    import sys

    pkg = tmp_path / "ep_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from methods import PromptStrategy\n\nclass FromEntryPoint(PromptStrategy):\n"
        "    description = 'a method from an installed package'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("ep_method", "ep_pkg:FromEntryPoint", registry.ENTRY_POINT_GROUP)

    def fake_entry_points(group=None, **kw):
        return [ep] if group == registry.ENTRY_POINT_GROUP else []
    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "ep_method" in registry.names()
    assert registry.get("ep_method").__name__ == "FromEntryPoint"
    sys.modules.pop("ep_pkg", None)
