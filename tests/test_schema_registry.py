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
    monkeypatch.setattr(registry, "_discovery", "new")
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "ep_method" in registry.names()
    assert registry.get("ep_method").__name__ == "FromEntryPoint"
    sys.modules.pop("ep_pkg", None)


def fake_distribution(root, name: str, entry_points: dict[str, str], modules: dict[str, str]):
    """An installed distribution as pip leaves one: `<name>-0.1.dist-info/` (METADATA and
    entry_points.txt) beside its modules, all under `root` (put on sys.path by the caller)."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, body in modules.items():
        (root / f"{module}.py").write_text(body)


BROKEN_DIST = dict(
    name="promptcl-broken-plugin",
    # the first entry point is fine and registers; the second fails: neither may stay
    entry_points={"fine_method": "fine_plugin_mod:Fine", "broken_method": "broken_plugin_mod:Broken"},
    modules={"fine_plugin_mod": "from methods import PromptStrategy\n\n\nclass Fine(PromptStrategy):\n"
                                "    DEFAULTS = {'*': {}}\n",
             "broken_plugin_mod": "import promptcl_no_such_dependency\n"})


def test_a_failing_entry_point_is_one_error_naming_its_distribution(tmp_path, monkeypatch):
    """A distribution whose entry point cannot be imported: PluginError naming the distribution
    and the import error, at every call (not a silently partial registry), and the methods of its
    other entry points are not left behind."""
    import sys

    registry.names()
    builtins = dict(registry._REGISTRY)
    fake_distribution(tmp_path, **BROKEN_DIST)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovery", "new")
    monkeypatch.setattr(registry, "_REGISTRY", dict(builtins))
    try:
        for call in (registry.names, lambda: registry.get("head_only"), lambda: registry.load_plugin("x.py")):
            with pytest.raises(registry.PluginError) as e:
                call()
            msg = str(e.value)
            assert "'promptcl-broken-plugin'" in msg and "'broken_method'" in msg, msg
            assert "ModuleNotFoundError: No module named 'promptcl_no_such_dependency'" in msg, msg
            assert registry._REGISTRY == builtins  # no partial registry: fine_method went again
            assert registry._discovery == "new"  # and the next command tries again
    finally:
        for module in ("fine_plugin_mod", "broken_plugin_mod"):
            sys.modules.pop(module, None)


def test_a_fixed_distribution_registers_every_entry_point_after_a_failure(tmp_path, monkeypatch):
    """After a failed discovery (rolled back), the next one registers every entry point again,
    a module already imported by the failed try included."""
    import sys

    registry.names()
    builtins = dict(registry._REGISTRY)
    fake_distribution(tmp_path, **{**BROKEN_DIST, "modules": {
        **BROKEN_DIST["modules"],
        "mod_plugin": "from methods import PromptStrategy, register\n\n\n@register('from_module')\n"
                      "class FromModule(PromptStrategy):\n    pass\n"},
        "entry_points": {"by_module": "mod_plugin", **BROKEN_DIST["entry_points"]}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovery", "new")
    monkeypatch.setattr(registry, "_REGISTRY", dict(builtins))
    try:
        with pytest.raises(registry.PluginError, match="broken_method"):
            registry.names()
        assert "mod_plugin" in sys.modules and registry._REGISTRY == builtins
        (tmp_path / "broken_plugin_mod.py").write_text(BROKEN_DIST["modules"]["fine_plugin_mod"]
                                                       .replace("Fine", "Broken"))
        names = registry.names()
        assert {"fine_method", "broken_method", "from_module"} <= set(names)
        assert registry.get("from_module").__module__ == "mod_plugin"
    finally:
        for module in ("fine_plugin_mod", "broken_plugin_mod", "mod_plugin"):
            sys.modules.pop(module, None)


@pytest.mark.parametrize("argv", [["list"], ["report", "--leaderboard-dir", "{tmp}/pages"],
                                  ["--methods", "head_only", "--seeds", "1", "--threads", "1"]],
                         ids=["list", "report", "sweep"])
def test_the_cli_reports_a_failing_entry_point_in_one_line(tmp_path, argv):
    """The same through `python run_suite.py`: one `error:` line naming the distribution and the
    import error, exit 2, nothing run or stored."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    site = tmp_path / "site"
    fake_distribution(site, **BROKEN_DIST)
    store = tmp_path / "runs.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo)])}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] != "list":
        argv += ["--store", str(store)]
    proc = subprocess.run([sys.executable, "run_suite.py", *argv],
                          cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "'promptcl-broken-plugin'" in lines[0] and "promptcl_no_such_dependency" in lines[0]
    assert not store.exists() and not (tmp_path / "pages").exists()


def test_a_new_method_file_is_registered_without_editing_any_list(tmp_path):
    """Built-ins are discovered from the package: dropping one file into (a copy of) `methods/`
    registers it; no hand-kept list exists to edit."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import methods

    copy = tmp_path / "methods"
    shutil.copytree(Path(methods.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "brand_new.py").write_text(
        "from .base import PromptStrategy\nfrom .registry import register\n\n\n"
        "@register('brand_new')\nclass BrandNew(PromptStrategy):\n    description = 'dropped in'\n")
    code = "import methods; print(methods.__file__); print(' '.join(methods.names()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == str(copy / "__init__.py")
    assert "brand_new" in out[1].split() and "smope" in out[1].split()
    assert not hasattr(registry, "BUILTIN")


def test_a_plugin_can_never_take_a_used_name(tmp_path, monkeypatch):
    """Whatever its class is called, a plugin cannot replace a built-in or another plugin."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    body = ("from methods import PromptStrategy, register\n\n\n@register({name!r})\n"
            "class {cls}(PromptStrategy):\n    pass\n")
    builtin = registry.get("smope")
    for i, cls in enumerate(("SMoPE", "Other")):  # same class name as the built-in, or not
        f = tmp_path / f"p{i}.py"
        f.write_text(body.format(name="smope", cls=cls))
        with pytest.raises(registry.PluginError, match="already registered"):
            registry.load_plugin(str(f))
    assert registry.get("smope") is builtin
    first, second = tmp_path / "a" / "mine.py", tmp_path / "b" / "mine.py"  # same file name
    for f in (first, second):
        f.parent.mkdir()
        f.write_text(body.format(name="mine", cls="Mine"))
    assert registry.load_plugin(str(first)) == ["mine"]
    assert registry.load_plugin(str(first)) == ["mine"]  # the same file again: harmless
    mine = registry.get("mine")
    with pytest.raises(registry.PluginError, match="already registered"):
        registry.load_plugin(str(second))
    assert registry.get("mine") is mine
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(registry.PluginError, match="failed to import: RuntimeError: boom"):
        registry.load_plugin(str(broken))


def test_a_method_without_defaults_for_a_protocol_is_refused_before_running(tmp_path):
    from protocols.errors import SweepError
    from protocols.sweep import SweepRequest, plan

    proto = tmp_path / "mine.yaml"
    proto.write_text("name: mine\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n")
    with pytest.raises(SweepError, match="'smope' has no hyperparameters for protocol 'mine'"):
        plan(SweepRequest(protocols=[str(proto)], methods=["smope"], seeds=1))
    # head_only declares generic defaults ("*"); the protocol YAML can configure smope itself
    assert len(plan(SweepRequest(protocols=[str(proto)], methods=["head_only"], seeds=2))) == 2
    proto.write_text(proto.read_text() + "methods:\n  smope: {epochs: 1}\n")
    assert len(plan(SweepRequest(protocols=[str(proto)], methods=["smope"], seeds=1))) == 1


def test_stream_facts_give_the_per_task_hyperparameters():
    """pool_size / n_tasks follow from the protocol's number of tasks (one fact, one place)."""
    from protocols.runner import method_hparams

    for name in ("imagenet-r-5t", "imagenet-r-20t", "fmnist-5t"):
        p = load_protocol(name)
        assert method_hparams("dualprompt", p)["pool_size"] == p.num_tasks
        assert method_hparams("hide_prompt", p)["pool_size"] == p.num_tasks
        assert method_hparams("coda_prompt", p)["n_tasks"] == p.num_tasks
    with pytest.raises(ValueError, match="pool_size=3"):
        registry.create("dualprompt", vit=__import__("methods").backbones.load("tiny", random_init=True).vit,
                        num_classes=10, hparams={"pool_size": 3}, num_tasks=5)


def test_an_added_hyperparameter_keeps_published_keys_until_it_is_set(monkeypatch):
    """A hyperparameter added after records were published (`added_hparam`) is left out of the
    resolved spec while it has its default, so the published run keys stay valid; set to another
    value it is written out, so the run gets its own key (and its own labelled row)."""
    from dataclasses import dataclass

    from methods import Hparams, PromptStrategy, added_hparam, register

    registry.names()  # discover the built-ins first, then keep the test's methods out of them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass
    class OldHp(Hparams):
        width: int = 4

    @dataclass
    class NewHp(OldHp):
        rule: str = added_hparam("suite")

    @register("keyless_old_for_test")
    class Old(PromptStrategy):
        Hparams = OldHp
        DEFAULTS = {"*": {"epochs": 2}}

    @register("keyless_new_for_test")
    class New(PromptStrategy):
        Hparams = NewHp
        DEFAULTS = {"*": {"epochs": 2}}

    old = registry.resolve_hparams("keyless_old_for_test", "fmnist-5t")
    assert registry.resolve_hparams("keyless_new_for_test", "fmnist-5t") == old
    assert registry.resolve_hparams("keyless_new_for_test", "fmnist-5t", {"rule": "suite"}) == old
    changed = registry.resolve_hparams("keyless_new_for_test", "fmnist-5t", {"rule": "official"})
    assert changed == {**old, "rule": "official"}
    # the strategy still sees the default when the key is absent
    assert NewHp(**old).rule == "suite"
