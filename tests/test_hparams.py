"""Hyperparameters are checked where they are declared (`methods.base.hparam`), for every
registered method alike: numbers finite, counts and epochs in range, ranges between fields (top_k
<= pool size), choices; a bad `--set` or protocol-YAML value is one `error:` line naming where it
came from and the key, before anything runs or is stored."""
import dataclasses
import math

import pytest

import run_suite
from methods import Hparams, added_hparam, hparam, registry
from methods.base import LIMITS, Limits, hparams_key_dict

registry.names()
METHODS = registry.names()


def numeric_fields(name: str) -> list[dataclasses.Field]:
    """The int and float fields of method `name`'s Hparams (bools are flags, not numbers)."""
    hp = registry.get(name).Hparams()
    return [f for f in dataclasses.fields(hp)
            if isinstance(getattr(hp, f.name), (int, float)) and not isinstance(getattr(hp, f.name), bool)]


def declared(name: str, key: str) -> Limits | None:
    """The limits declared for `key` in method `name`'s Hparams or a base class of it."""
    out = None
    for cls in reversed(registry.get(name).Hparams.__mro__):
        f = getattr(cls, "__dataclass_fields__", {}).get(key)
        if f is not None and LIMITS in f.metadata:
            out = f.metadata[LIMITS]
    return out


def refused(name: str, key: str, value) -> str:
    with pytest.raises(registry.HparamError) as e:
        registry.resolve_hparams(name, "fmnist-5t", {key: value})
    msg = str(e.value)
    assert msg.startswith(f"{name}: {key} "), msg  # names the method and the key
    return msg


@pytest.mark.parametrize("name", METHODS)
def test_every_numeric_hparam_declares_its_range(name):
    """A method's numbers say what they may be: a lower bound at least for counts, epochs, rates,
    weights and temperatures, so a negative or zero value that means nothing is refused; a signed
    threshold (OVOR's energy margins) at least its order against its partner."""
    for f in numeric_fields(name):
        limits = declared(name, f.name)
        assert limits is not None and any(b is not None for b in (limits.ge, limits.gt, limits.le, limits.lt)), \
            f"{name}.{f.name}: declare its range with hparam(default, ge=... / gt=...)"
        if not f.name.startswith("thres_"):
            assert limits.ge is not None or limits.gt is not None, \
                f"{name}.{f.name}: declare its lower bound with hparam(default, ge=... / gt=...)"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused(name, value):
    floats = [f for f in numeric_fields(name) if isinstance(getattr(registry.get(name).Hparams(), f.name), float)]
    assert floats  # every method has rates
    for f in floats:
        msg = refused(name, f.name, value)
        assert "finite" in msg or "must be" in msg


@pytest.mark.parametrize("name", METHODS)
def test_negative_epochs_are_refused(name):
    epochs = [f.name for f in dataclasses.fields(registry.get(name).Hparams)
              if f.name == "epochs" or f.name.endswith("_epochs")]
    assert "epochs" in epochs
    for key in epochs:
        assert "must be >=" in refused(name, key, -1)
    assert "must be >= 1" in refused(name, "epochs", 0)  # a task trains at least one epoch
    for key in epochs:  # the stages may be switched off with 0 (the smoke run sets 1)
        if key != "epochs":
            assert registry.resolve_hparams(name, "fmnist-5t", {key: 0})[key] == 0


@pytest.mark.parametrize("name", METHODS)
def test_every_shipped_configuration_is_within_its_ranges(name):
    from helpers import PROTOCOLS

    for protocol in PROTOCOLS:
        if registry.has_defaults(name, protocol):
            registry.resolve_hparams(name, protocol)


@pytest.mark.parametrize("name,key,value,says", [
    ("l2p", "top_k", 11, "top_k must be <= pool_size (10), got 11"),
    ("smope", "top_k", 11, "top_k must be <= num_experts (10), got 11"),
    ("smope", "ca_min_lr", 0.01, "ca_min_lr must be <= ca_lr (0.001), got 0.01"),
    ("vq_prompt", "align_min_lr", 1.0, "align_min_lr must be <= align_lr"),
    ("hide_prompt", "prompt_momentum", 1.5, "prompt_momentum must be <= 1, got 1.5"),
    ("head_only", "momentum", 1.5, "momentum must be <= 1"),
    ("smope", "ca_batch_ratio", 0, "ca_batch_ratio must be >= 1, got 0"),
    ("hide_prompt", "prompt_layers", [0, -1], "prompt_layers (each item) must be >= 0, got -1"),
    ("vq_prompt", "tau", 0.0, "tau must be > 0, got 0.0"),
    ("smope", "attn_impl", "flash", "attn_impl must be one of fused, reference, got 'flash'"),
    ("head_only", "optimizer", "lion", "optimizer must be one of adam, adamw, sgd, got 'lion'"),
])
def test_ranges_the_papers_imply(name, key, value, says):
    assert says in refused(name, key, value)


def test_limits_are_inherited_and_compose_with_added_hparam():
    @dataclasses.dataclass
    class Mine(Hparams):
        epochs: int = 7  # redeclared with a new default: still >= 1 (declared in Hparams)
        width: int = hparam(4, ge=1, le="depth")
        depth: int = hparam(8, ge=1)
        rule: float = added_hparam(0.5, ge=0, le=1)

    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        Mine(epochs=0)
    with pytest.raises(ValueError, match=r"width must be <= depth \(8\), got 9"):
        Mine(width=9)
    with pytest.raises(ValueError, match="rule must be a finite number, got nan"):
        Mine(rule=math.nan)
    with pytest.raises(ValueError, match="rule must be <= 1, got 2"):
        Mine(rule=2)
    assert "rule" not in hparams_key_dict(Mine()) and hparams_key_dict(Mine(rule=0.25))["rule"] == 0.25


# ------------------------------------------------------------------------------ end to end

def cli(tmp_path, capsys, *argv: str, command: str = "sweep") -> str:
    """`run_suite.py COMMAND ARGV` on a store and records folder of its own; the one stderr line."""
    base = [command, "--store", str(tmp_path / "runs.sqlite"), "--data-root", str(tmp_path / "data"),
            "--threads", "1", "--workers", "1", "--quiet"]  # run logs would go beside the store
    if command == "sweep":
        base += ["--records-dir", str(tmp_path / "records"), "--leaderboard-dir", str(tmp_path / "lb")]
    try:
        code = run_suite.main(base + list(argv))
    except SystemExit as e:  # argparse exits instead of returning
        code = e.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, f"exit {code}; stderr: {err}; stdout: {out[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("setting,says", [
    ("smope.ca_lr=nan", "--set: smope: ca_lr must be a finite number, got nan"),
    ("smope.eps=nan", "--set: smope: eps must be a finite number, got nan"),
    ("smope.ca_epochs=-1", "--set: smope: ca_epochs must be >= 0, got -1"),
    ("hide_prompt.tap_lr=inf", "--set: hide_prompt: tap_lr must be a finite number, got inf"),
    ("vq_prompt.align_epochs=-3", "--set: vq_prompt: align_epochs must be >= 0, got -3"),
])
@pytest.mark.parametrize("dry_run", [False, True], ids=["sweep", "dry-run"])
def test_a_bad_set_is_one_line_before_anything_runs(tmp_path, capsys, setting, says, dry_run):
    method = setting.split(".")[0]
    line = cli(tmp_path, capsys, "--methods", method, "--seeds", "1", "--set", setting,
               command="dry-run" if dry_run else "sweep")
    assert line == "error: " + says
    assert not any(tmp_path.iterdir())  # no store, no records, no logs, no page


def test_a_bad_protocol_yaml_value_names_the_file(tmp_path, capsys):
    proto = tmp_path / "protocol.yaml"
    proto.write_text("name: mine\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                     "methods:\n  smope: {ca_lr: .nan, epochs: 2}\n")
    line = cli(tmp_path, capsys, "--protocols", str(proto), "--methods", "smope", "--seeds", "1")
    assert line == f"error: {proto}: methods.smope: smope: ca_lr must be a finite number, got nan"
    assert [p.name for p in tmp_path.iterdir()] == ["protocol.yaml"]
