"""Every bad input a user can give `run_suite.py` is one clear line (issue 11): exit code 2, exactly
one `error:` line on stderr naming the input, no traceback, and nothing on disk changed (the store,
the published records, the pages, the data: every byte under the test's folder except run logs).

One table, one row per bad input, grouped by kind: flag values, data files, checkpoints, plugins,
run stores, output paths, protocol files. Each row sets up its input under `tmp_path` and returns
the extra command-line arguments and the text the error line must contain. Rows that need a run
fail at the first run, before anything is stored.

Running as root, permission bits do not stop a write (root ignores them), so the rows about a
read-only folder or a read-only store make the path unusable in another way there (see
`read_only_dir` and `read_only_store`) instead of being skipped.
"""
from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import run_suite
from benchmarks import fashion_mnist
from benchmarks.synthetic import write_cifar100, write_cub200, write_fashion_mnist, write_imagenet_r_coda
from leaderboard import store as store_module
from leaderboard.records import publish
from leaderboard.store import RunStore
from methods import registry
from protocols.metrics import summarize
from test_leaderboard_store import make_record
from helpers import write_tiny_5t

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
SUP21K_FILE = "vit_base_patch16_224_augreg_in21k.bin"  # methods/backbones.py: sup21k's first file name


@dataclass
class Env:
    tmp: Path
    data: Path
    proto: Path
    store: Path
    records: Path
    lb: Path
    monkeypatch: pytest.MonkeyPatch

    def base(self, command: str = "sweep") -> list[str]:
        """The options of `command` (a sweep: all of them) that keep every output under tmp."""
        values = {"protocols": str(self.proto), "data_root": str(self.data), "store": str(self.store),
                  "records_dir": str(self.records), "leaderboard_dir": str(self.lb),
                  "local_leaderboard_dir": str(self.tmp / "local"), "workers": "1",
                  "threads": "1", "quiet": None, "methods": "head_only", "seeds": "1"}
        takes = run_suite.COMMANDS[command].options
        return [arg for name, value in values.items() if name in takes
                for arg in ([f"--{name.replace('_', '-')}"] + ([value] if value is not None else []))]

    def argv(self, bad: list[str]) -> list[str]:
        """A case's command line: its command (none: a sweep) with the base options it takes."""
        if bad and bad[0] in run_suite.COMMANDS:
            return [bad[0], *self.base(bad[0]), *bad[1:]]
        return self.base() + bad

    def file(self, name: str, text: str = "not what you think\n") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path


@dataclass
class Bad:
    argv: list[str]
    names: str  # what the error line must contain: the input itself
    also: list[str] = field(default_factory=list)  # more text the line must contain
    check: Callable[[], None] | None = None  # e.g. "the payload did not run"


CASES: dict[str, Callable[[Env], Bad]] = {}


def case(name: str):
    def add(fn: Callable[[Env], Bad]) -> Callable[[Env], Bad]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return add


def read_only_dir(env: Env, name: str) -> Path:
    """A folder nothing can be written into: mode 0o555, or, as root (whom permission bits do not
    stop), a folder path under a regular file."""
    if ROOT:
        return env.file(f"{name}-a-file") / name
    d = env.tmp / name
    d.mkdir()
    d.chmod(0o555)
    return d


def read_only_store(env: Env) -> Path:
    """A copy of the store that cannot be written: mode 0o444 (SQLite then opens it read-only), or,
    as root, opened read-only the same way by asking SQLite for it (`mode=ro`): root would
    write a 0o444 file."""
    path = env.tmp / "readonly.sqlite"
    path.write_bytes(env.store.read_bytes())
    if ROOT:
        connect = sqlite3.connect

        def read_only(database, *args, **kw):
            if Path(database).resolve() == path.resolve():
                return connect(f"file:{path}?mode=ro", *args, uri=True, **kw)
            return connect(database, *args, **kw)
        env.monkeypatch.setattr(store_module.sqlite3, "connect", read_only)
    else:
        path.chmod(0o444)
    return path


# ------------------------------------------------------------------------------ flag values

for flag, value in [("--seeds", "0"), ("--seeds", "-1"), ("--seeds", "two"), ("--threads", "0"),
                    ("--threads", "-1"), ("--workers", "0"), ("--workers", "-2"),
                    ("--loader-workers", "-1"), ("--eval-batch-size", "0"), ("--eval-batch-size", "x"),
                    ("--precision", "fp16"), ("--executor", "dask"), ("--gpus-per-run", "-1"),
                    ("--slurm-timeout-min", "0")]:
    case(f"{flag[2:]}={value}")(lambda env, flag=flag, value=value: Bad([flag, value], flag))


@case("cost --format=xml")
def _(env):
    return Bad(["cost", "--random-init", "--format", "xml"], "--format")


@case("unknown option")
def _(env):
    return Bad(["--epochs", "3"], "--epochs")


@case("methods=unknown")
def _(env):
    return Bad(["--methods", "head_only,nope"], "'nope'")


@case("methods=empty")
def _(env):
    return Bad(["--methods", ","], "no method")


@case("set without =")
def _(env):
    return Bad(["--set", "head_only.epochs"], "head_only.epochs")


@case("set unknown hparam")
def _(env):
    return Bad(["--set", "head_only.epoch=2"], "'epoch'")


@case("set value of the wrong type")
def _(env):
    return Bad(["--set", "head_only.epochs=many"], "head_only.epochs")


@case("set value out of range")
def _(env):
    return Bad(["--set", "head_only.epochs=-1"], "epochs")


@case("set smope.ca_lr=nan")
def _(env):
    return Bad(["--protocols", "fmnist-5t", "--methods", "smope", "--set", "smope.ca_lr=nan"], "ca_lr",
               also=["--set", "finite"], check=lambda: _no_run_started(env))


@case("set smope.eps=nan")
def _(env):
    return Bad(["--protocols", "fmnist-5t", "--methods", "smope", "--set", "smope.eps=nan"], "eps",
               also=["--set", "finite"], check=lambda: _no_run_started(env))


@case("set smope.ca_epochs=-1")
def _(env):
    return Bad(["--protocols", "fmnist-5t", "--methods", "smope", "--set", "smope.ca_epochs=-1"], "ca_epochs",
               also=["--set", ">= 0"], check=lambda: _no_run_started(env))


@case("set of an unknown method")
def _(env):
    return Bad(["--set", "nope.lr=1"], "'nope'")


@case("protocols=unknown name")
def _(env):
    return Bad(["--protocols", "fmnist-50t"], "fmnist-50t")


@case("backbones=unknown")
def _(env):
    return Bad(["--backbones", "vit-huge"], "vit-huge")


@case("ablation=unknown")
def _(env):
    return Bad(["--ablation", "nope"], "'nope'")


@case("cost with an unknown backbone")
def _(env):
    return Bad(["cost", "--random-init", "--backbones", "vit-huge"], "vit-huge")


@case("device=foo")
def _(env):
    return Bad(["--device", "foo"], "foo")


@case("device=cuda, no GPU")
def _(env):
    env.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return Bad(["--device", "cuda"], "--device cuda", also=["--device cpu"])


@case("device=cuda:3, one GPU")
def _(env):
    env.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return Bad(["--device", "cuda:3"], "cuda:3")


@case("device=mps, not here")
def _(env):
    env.monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return Bad(["--device", "mps"], "mps")


@case("device=meta")
def _(env):
    return Bad(["--device", "meta"], "meta")


@case("cost --device=foo")
def _(env):
    return Bad(["cost", "--random-init", "--device", "foo"], "foo")


@case("gpus-per-run with device cpu")
def _(env):
    env.monkeypatch.setitem(sys.modules, "submitit", None)
    return Bad(["--executor", "slurm", "--device", "cpu", "--gpus-per-run", "1"], "--gpus-per-run")


@case("executor=ray, no Ray")
def _(env):
    env.monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    return Bad(["--executor", "ray"], "--executor ray", also=["pip install"])


@case("executor=slurm, no submitit")
def _(env):
    env.monkeypatch.setitem(sys.modules, "submitit", None)
    return Bad(["--executor", "slurm", "--device", "cpu"], "--executor slurm", also=["pip install"])


@case("slurm-folder under a file")
def _(env):
    folder = env.file("slurm-a-file") / "slurm"
    return Bad(["--executor", "slurm", "--device", "cpu", "--slurm-folder", str(folder)], str(folder))


# ------------------------------------------------------------------------------ commands

@case("report given a sweep's option")
def _(env):
    return Bad(["report", "--seeds", "2"], "--seeds", also=["report does not take", "sweep"])


@case("export given a run's option")
def _(env):
    return Bad(["export", str(env.tmp / "runs.csv"), "--device", "cpu"], "--device", also=["export"])


@case("cost given a sweep's option")
def _(env):
    return Bad(["cost", "--random-init", "--workers", "2"], "--workers", also=["cost does not take"])


@case("an unknown command")
def _(env):
    return Bad(["sweeep"], "sweeep")


@case("an old mode flag")
def _(env):
    return Bad(["--publish"], "--publish", also=["run_suite.py publish"])


@case("two old modes at once")
def _(env):
    return Bad(["--cost", "--profile"], "--cost", also=["run_suite.py cost"])


@case("two commands at once")
def _(env):
    return Bad(["report", "publish"], "publish")


# ------------------------------------------------------------------------------ data files

def _fmnist(env: Env, name: str) -> Path:
    return env.data / "fashion-mnist" / name


@case("fmnist .gz truncated")
def _(env):
    f = _fmnist(env, "train-images-idx3-ubyte.gz")
    f.write_bytes(f.read_bytes()[:-40])
    return Bad([], str(f))


@case("fmnist .gz not a gzip")
def _(env):
    f = _fmnist(env, "t10k-labels-idx1-ubyte.gz")
    f.write_bytes(b"<html>404 not found</html>")
    return Bad([], str(f))


@case("fmnist .gz with a corrupt stream")
def _(env):
    f = _fmnist(env, "train-labels-idx1-ubyte.gz")
    raw = bytearray(f.read_bytes())
    raw[12:20] = b"\x00" * 8
    f.write_bytes(bytes(raw))
    return Bad([], str(f))


@case("fmnist labels file holds images")
def _(env):
    f = _fmnist(env, "train-labels-idx1-ubyte.gz")
    f.write_bytes(_fmnist(env, "train-images-idx3-ubyte.gz").read_bytes())
    return Bad([], str(f))


@case("data-root without the data")
def _(env):
    empty = env.tmp / "nodata"
    empty.mkdir()
    return Bad(["--data-root", str(empty)], str(empty), also=["run_suite.py fetch"])


@case("data-root is a file")
def _(env):
    f = env.file("data.txt")
    return Bad(["--data-root", str(f)], str(f))


@case("data-root whose fashion-mnist entry is a link loop")
def _(env):
    root = env.tmp / "loopdata"
    root.mkdir()
    (root / "fashion-mnist").symlink_to(root / "fashion-mnist")  # never the system copy instead
    return Bad(["--data-root", str(root)], f"{root / 'fashion-mnist'}: a symbolic link loop")


@case("dry-run with a data-root that is a file")
def _(env):
    f = env.file("data.txt")
    return Bad(["dry-run", "--data-root", str(f)], str(f))


class _Payload:
    """Unpickling this calls `fn(*args)`: what a crafted file would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class ForeignThing:
    """A custom class: a pickle of it names this module, which a safe loader must not import."""

    def __init__(self):
        self.weights = [1.0, 2.0]


def _cifar(env: Env) -> tuple[Path, Path]:
    d = write_cifar100(env.tmp / "cifar", train_per_class=1, test_per_class=1)
    proto = env.file("cifar-10t.yaml", "name: cifar-10t\ndataset: cifar100\nnum_tasks: 10\n"
                                       "backbones: [tiny]\nmethods:\n  head_only: {epochs: 1}\n")
    return d, proto


@case("cifar pickle crafted to run code")
def _(env):
    d, proto = _cifar(env)
    victim = env.tmp / "pwned"
    blob = {b"data": None, b"fine_labels": [0], b"x": _Payload(os.system, f"touch {victim}")}
    (d / "train").write_bytes(pickle.dumps(blob, protocol=2))

    def payload_did_not_run():
        assert not victim.exists()
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "cifar")], str(d / "train"),
               also=["refused"], check=payload_did_not_run)


@case("cifar pickle of another program")
def _(env):
    d, proto = _cifar(env)
    (d / "test").write_bytes(pickle.dumps(ForeignThing(), protocol=4))
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "cifar")], str(d / "test"))


@case("cifar pickle truncated")
def _(env):
    d, proto = _cifar(env)
    raw = (d / "meta").read_bytes()
    (d / "meta").write_bytes(raw[: len(raw) // 2])
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "cifar")], str(d / "meta"))


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\xff\xd8" + os.urandom(200))


@case("cub jpeg corrupt")
def _(env):
    root = write_cub200(env.tmp / "cub", num_classes=200, per_class=2)
    for jpg in (root / "images").rglob("*_0000_*.jpg"):  # each class's training image
        _corrupt(jpg)
    proto = env.file("cub-10t.yaml", "name: cub-10t\ndataset: cub200\nnum_tasks: 10\nbackbones: [tiny]\n"
                                     "methods:\n  head_only: {epochs: 1}\n")
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "cub")], str(root / "images"),
               also=["cannot decode this image"])


@case("cub list not text")
def _(env):
    root = write_cub200(env.tmp / "cub", num_classes=2, per_class=2)
    (root / "images.txt").write_bytes(b"1 \xff\xfe\x00bad\n")
    proto = env.file("cub-2t.yaml", "name: cub-2t\ndataset: cub200\nnum_tasks: 2\nbackbones: [tiny]\n")
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "cub")], str(root / "images.txt"))


@case("imagenet-r jpeg corrupt")
def _(env):
    root, split = write_imagenet_r_coda(env.tmp / "inr", train_per_class=1, test_per_class=1, real_size=False)
    for rel in (split / "train.txt").read_text().split():
        _corrupt(root / rel)
    proto = env.file("inr-10t.yaml", f"name: inr-10t\ndataset: imagenet_r\nnum_tasks: 10\nbackbones: [tiny]\n"
                                     f"split_file: {split}\nmethods:\n  head_only: {{epochs: 1}}\n")
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "inr")], str(root),
               also=["cannot decode this image"])


@case("imagenet-r tree with a looping link")
def _(env):
    root, split = write_imagenet_r_coda(env.tmp / "inr", train_per_class=1, test_per_class=1, real_size=False)
    wnid = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    loop = root / wnid / "loop.jpg"
    loop.symlink_to(loop)
    proto = env.file("inr-10t.yaml", f"name: inr-10t\ndataset: imagenet_r\nnum_tasks: 10\nbackbones: [tiny]\n"
                                     f"split_file: {split}\nmethods:\n  head_only: {{epochs: 1}}\n")
    # an input error found before any run (the pre-run check reads the tree as the reader will)
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "inr")], f"{loop}: a symbolic link loop",
               check=lambda: _no_run_started(env))


@case("cub image that is a looping link")
def _(env):
    root = write_cub200(env.tmp / "cub", num_classes=2, per_class=2)
    photo = sorted((root / "images").rglob("*.jpg"))[0]
    photo.unlink()
    photo.symlink_to(photo)
    proto = env.file("cub-2t.yaml", "name: cub-2t\ndataset: cub200\nnum_tasks: 2\nbackbones: [tiny]\n"
                                    "methods:\n  head_only: {epochs: 1}\n")
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "cub")], f"{photo}: a symbolic link loop",
               check=lambda: _no_run_started(env))


def _no_run_started(env: Env) -> None:
    """No run began: a run writes its log beside the store as it starts."""
    assert not (env.tmp / "logs").exists()


@case("imagenet-r split file not text")
def _(env):
    root, split = write_imagenet_r_coda(env.tmp / "inr", train_per_class=1, test_per_class=1,
                                        classes=["n01443537", "n01484850"], real_size=False)
    (split / "train.txt").write_bytes(b"n01443537/x.jpg\n\xff\xfe\n")
    proto = env.file("inr-2t.yaml", f"name: inr-2t\ndataset: imagenet_r\nnum_tasks: 2\nbackbones: [tiny]\n"
                                    f"split_file: {split}\n")
    return Bad(["--protocols", str(proto), "--data-root", str(env.tmp / "inr")], str(split / "train.txt"))


# ------------------------------------------------------------------------------ checkpoints

def _weights(env: Env, write: Callable[[Path], None]) -> tuple[list[str], Path]:
    d = env.tmp / "weights"
    d.mkdir()
    write(d / SUP21K_FILE)
    return ["--backbones", "sup21k", "--weights-dir", str(d)], d / SUP21K_FILE


@case("checkpoint holding a custom class")
def _(env):
    argv, f = _weights(env, lambda p: torch.save({"pos_embed": torch.zeros(1), "meta": ForeignThing()}, p))
    return Bad(argv, str(f), also=["weights_only"])


@case("checkpoint crafted to run code")
def _(env):
    victim = env.tmp / "pwned"
    argv, f = _weights(env, lambda p: torch.save({"x": _Payload(os.system, f"touch {victim}")}, p))

    def payload_did_not_run():
        assert not victim.exists()
    return Bad(argv, str(f), also=["refused"], check=payload_did_not_run)


@case("checkpoint truncated")
def _(env):
    def write(p):
        torch.save({"pos_embed": torch.zeros(4096)}, p)
        p.write_bytes(p.read_bytes()[:3000])
    argv, f = _weights(env, write)
    return Bad(argv, str(f))


@case("checkpoint is a web page")
def _(env):
    argv, f = _weights(env, lambda p: p.write_text("<html>Sign in to download</html>\n"))
    return Bad(argv, str(f))


@case("checkpoint of another architecture")
def _(env):
    argv, f = _weights(env, lambda p: torch.save({"pos_embed": torch.zeros(1, 5, 8)}, p))
    return Bad(argv, str(f), also=["does not match"])


@case("weights-dir without weights")
def _(env):
    empty = env.tmp / "noweights"
    empty.mkdir()
    return Bad(["--backbones", "sup21k", "--weights-dir", str(empty)], str(empty))


# ------------------------------------------------------------------------------ plugins

@case("plugin raises on import")
def _(env):
    p = env.file("raises.py", "raise RuntimeError('this plugin needs a GPU cluster')\n")
    return Bad(["--plugin", str(p)], str(p), also=["this plugin needs a GPU cluster"])


@case("plugin with a syntax error")
def _(env):
    p = env.file("syntax.py", "from methods import register\ndef broken(:\n")
    return Bad(["--plugin", str(p)], str(p), also=["SyntaxError"])


@case("plugin importing a missing package")
def _(env):
    p = env.file("needs.py", "import promptcl_not_installed_anywhere\n")
    return Bad(["--plugin", str(p)], str(p), also=["promptcl_not_installed_anywhere"])


@case("plugin registering nothing")
def _(env):
    p = env.file("nothing.py", "from methods.head_only import HeadOnly\nX = 1\n")
    return Bad(["--plugin", str(p)], str(p), also=["registered no method"])


@case("plugin taking a built-in name, same class name")
def _(env):
    p = env.file("same.py", "from methods import register\nfrom methods.base import PromptStrategy\n"
                                "@register('head_only')\nclass HeadOnly(PromptStrategy):\n    pass\n")
    return Bad(["--plugin", str(p)], "'head_only'", also=["already registered"])


@case("plugin taking a built-in name, other class")
def _(env):
    p = env.file("other.py", "from methods import register\nfrom methods.head_only import HeadOnly\n"
                                 "@register('smope')\nclass Faster(HeadOnly):\n    pass\n")
    return Bad(["--plugin", str(p)], "'smope'", also=["already registered"])


@case("two plugins, one name")
def _(env):
    name = "twin"
    code = ("from methods import register\nfrom methods.head_only import HeadOnly\n"
            f"@register('{name}')\nclass Twin(HeadOnly):\n    pass\n")
    a, b = env.file("twin_a.py", code), env.file("twin_b.py", code)
    return Bad(["--plugin", str(a), "--plugin", str(b)], f"'{name}'", also=["already registered"])


@case("plugin file missing")
def _(env):
    p = env.tmp / "my_method.py"
    return Bad(["--plugin", str(p)], str(p))


@case("plugin module missing")
def _(env):
    return Bad(["--plugin", "promptcl_no_such_plugin"], "promptcl_no_such_plugin")


@case("plugin is a folder")
def _(env):
    d = env.tmp / "my_plugins"
    d.mkdir()
    return Bad(["--plugin", str(d)], str(d))


@case("plugin registering something not a method")
def _(env):
    p = env.file("notamethod.py", "from methods import register\n@register('mine')\nclass Mine:\n    pass\n")
    return Bad(["--plugin", str(p)], str(p), also=["PromptStrategy"])


@case("plugin breaks --list")
def _(env):
    p = env.file("raises.py", "raise ValueError('half-written')\n")
    return Bad(["list", "--plugin", str(p)], str(p))


# ------------------------------------------------------------------------------ run stores

@case("store is a folder")
def _(env):
    d = env.tmp / "results"
    d.mkdir()
    return Bad(["--store", str(d)], str(d))


@case("store is a text file")
def _(env):
    f = env.file("notes.sqlite", "my notes\n" * 200)
    return Bad(["--store", str(f)], str(f))


@case("store is another program's database")
def _(env):
    f = env.tmp / "app.db"
    with sqlite3.connect(f) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ada')")
    return Bad(["--store", str(f)], str(f), also=["not a promptcl run store"])


@case("store with another table called runs")
def _(env):
    f = env.tmp / "other.db"
    with sqlite3.connect(f) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER, host TEXT)")
    return Bad(["--store", str(f)], str(f), also=["not a promptcl run store"])


@case("store is damaged")
def _(env):
    f = env.tmp / "damaged.sqlite"
    raw = bytearray(env.store.read_bytes())
    raw[4096:] = b"\x07" * (len(raw) - 4096)  # the first page intact, the tables' pages garbage
    f.write_bytes(bytes(raw))
    return Bad(["--store", str(f)], str(f))


@case("store is read-only")
def _(env):
    f = read_only_store(env)
    return Bad(["--store", str(f)], str(f), also=["not writable"])


@case("store under a file")
def _(env):
    f = env.file("results-a-file") / "suite.sqlite"
    return Bad(["--store", str(f)], str(f))


@case("report from a store that is a text file")
def _(env):
    f = env.file("runs.txt.sqlite", "hello\n" * 100)
    return Bad(["report", "--store", str(f)], str(f))


# ------------------------------------------------------------------------------ output paths

@case("export under a file")
def _(env):
    out = env.file("exports") / "runs.csv"
    return Bad(["export", str(out)], str(out))


@case("export into a read-only folder")
def _(env):
    out = read_only_dir(env, "exports") / "runs.csv"
    return Bad(["export", str(out)], str(out))


@case("export onto the store")
def _(env):
    return Bad(["export", str(env.store)], str(env.store), also=["run store"])


@case("export onto the store through a .csv link")
def _(env):
    link = env.tmp / "runs.csv"
    link.symlink_to(env.store)
    return Bad(["export", str(link)], str(link), also=["run store"])


@case("export onto the store through a hard link")
def _(env):
    link = env.tmp / "hard.csv"
    os.link(env.store, link)
    return Bad(["export", str(link)], str(link), also=["run store"])


@case("export onto an existing non-CSV file")
def _(env):
    f = env.file("thesis.tex", "\\documentclass{article}\n")
    return Bad(["export", str(f)], str(f))


@case("export onto a published records file")
def _(env):
    (f,) = env.records.glob("*.jsonl")
    return Bad(["export", str(f)], str(f))


@case("export onto an SQLite file named .csv")
def _(env):
    f = env.tmp / "results.csv"
    with sqlite3.connect(f) as conn:
        conn.execute("CREATE TABLE results (x)")
    return Bad(["export", str(f)], str(f), also=["not a CSV an export wrote"])


@case("export onto a CSV another program wrote")
def _(env):
    f = env.file("scores.csv", "name,score\nalice,3\n")
    return Bad(["export", str(f)], str(f), also=["not a CSV an export wrote"])


@case("publish into a read-only records file")
def _(env):
    (f,) = env.records.glob("*.jsonl")
    f.chmod(0o444)  # refused as read-only even by root, whom the mode would not stop
    return Bad(["publish"], str(f), also=["is read-only"])


@case("export to a folder")
def _(env):
    return Bad(["export", str(env.tmp)], str(env.tmp))


@case("export to a name without .csv")
def _(env):
    out = env.tmp / "runs.json"
    return Bad(["export", str(out)], str(out))


@case("leaderboard-dir under a file, report --published")
def _(env):
    d = env.file("pages") / "lb"
    return Bad(["report", "--published", "--leaderboard-dir", str(d)], str(d))


@case("local-leaderboard-dir under a file, sweep")
def _(env):
    d = env.file("pages") / "lb"
    return Bad(["--local-leaderboard-dir", str(d)], str(d))  # before the run: nothing is stored


@case("leaderboard-dir is a file")
def _(env):
    f = env.file("lb.md")
    return Bad(["report", "--published", "--leaderboard-dir", str(f)], str(f))


@case("leaderboard-dir read-only, report --published")
def _(env):
    d = read_only_dir(env, "lb-ro")
    return Bad(["report", "--published", "--leaderboard-dir", str(d)], str(d))


@case("local-leaderboard-dir read-only, report")
def _(env):
    d = read_only_dir(env, "local-ro")
    return Bad(["report", "--local-leaderboard-dir", str(d)], str(d))


@case("local pages into the committed pages' folder, sweep")
def _(env):
    return Bad(["--local-leaderboard-dir", str(env.lb)], str(env.lb), also=["committed pages"])


@case("leaderboard-dir read-only, publish")
def _(env):
    d = read_only_dir(env, "lb-ro")
    return Bad(["publish", "--leaderboard-dir", str(d)], str(d))  # before publishing anything


@case("records-dir is a file")
def _(env):
    f = env.file("records.jsonl")
    return Bad(["report", "--records-dir", str(f)], str(f))


@case("records-dir under a file, publish")
def _(env):
    d = env.file("recs") / "records"
    return Bad(["publish", "--records-dir", str(d)], str(d))


@case("records-dir read-only, publish")
def _(env):
    d = read_only_dir(env, "records-ro")
    return Bad(["publish", "--records-dir", str(d)], str(d))


@case("records-dir is a file, sweep")
def _(env):
    f = env.file("records.jsonl")
    return Bad(["--records-dir", str(f)], str(f))  # before the run: nothing is stored


@case("records-dir with a damaged record, sweep")
def _(env):
    (f,) = env.records.glob("*.jsonl")
    f.write_text(f.read_text() + "not json\n")
    return Bad([], str(f))  # before the run: nothing is stored


@case("records-dir with a damaged record")
def _(env):
    (f,) = env.records.glob("*.jsonl")
    f.write_text(f.read_text() + '{"key": "half a line\n')
    return Bad(["report"], str(f))


@case("publish a missing store")
def _(env):
    f = env.tmp / "cluster.sqlite"
    return Bad(["publish", str(f)], str(f))


@case("publish a text file")
def _(env):
    f = env.file("cluster.sqlite", "not sqlite\n" * 100)
    return Bad(["publish", str(f)], str(f))


@case("publish a folder")
def _(env):
    return Bad(["publish", str(env.tmp)], str(env.tmp))


@case("publish another program's database")
def _(env):
    f = env.tmp / "app.db"
    with sqlite3.connect(f) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    return Bad(["publish", str(f)], str(f))


@case("publish a run that conflicts")
def _(env):
    f = env.tmp / "cluster.sqlite"
    rec = make_record(seed=1)  # published by the fixture, here with other numbers (consistent in themselves)
    rec["acc_matrix"][0][0] = 10.0
    rec["metrics"].update(summarize(rec["acc_matrix"]))
    RunStore(f).put(rec)
    return Bad(["publish", str(f)], rec["key"][:12], also=[str(f)])


# ------------------------------------------------------------------------------ protocol files

for name, text, what in [
    ("num_tasks 0", "num_tasks: 0", "num_tasks"),
    ("num_tasks 11", "num_tasks: 11", "num_tasks"),
    ("num_tasks text", "num_tasks: five", "num_tasks"),
    ("unknown dataset", "dataset: mnist", "dataset"),
    ("unknown key", "epochs: 3", "epochs"),
    ("bad class_order", "class_order: random", "class_order"),
    ("bad subsample", "subsample: {train_per_class: -3}", "train_per_class"),
    ("unknown hparam", "methods: {head_only: {epoch: 3}}", "epoch"),
    ("hparam of the wrong type", "methods: {head_only: {lr: fast}}", "lr"),
    ("methods not a mapping", "methods: [head_only]", "methods"),
]:
    def _bad_yaml(env, text=text, what=what):
        good = ("name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                "methods:\n  head_only: {epochs: 1}\n")
        key = text.split(":")[0]
        lines = [ln for ln in good.splitlines() if not ln.startswith(key + ":")
                 and not (key == "methods" and ln.startswith("  "))]
        p = env.file("bad.yaml", "\n".join(lines + [text]) + "\n")
        return Bad(["--protocols", str(p)], what, also=[str(p)])
    case(f"protocol yaml: {name}")(_bad_yaml)


@case("protocol yaml: settings for an unknown method")
def _(env):
    p = env.file("bad.yaml", "name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                             "methods:\n  head_only: {epochs: 1}\n  smpoe: {epochs: 1}\n")
    return Bad(["--protocols", str(p)], "'smpoe'", also=[str(p)])


@case("protocol yaml: not YAML")
def _(env):
    p = env.file("bad.yaml", "name: [tiny\n  dataset: {\n")
    return Bad(["--protocols", str(p)], str(p))


@case("protocol yaml: not a mapping")
def _(env):
    p = env.file("bad.yaml", "- fashion_mnist\n- 5\n")
    return Bad(["--protocols", str(p)], str(p))


@case("protocol yaml: not text")
def _(env):
    p = env.tmp / "bad.yaml"
    p.write_bytes(b"name: x\n\xff\xfe\x00\x01dataset")
    return Bad(["--protocols", str(p)], str(p))


@case("protocol yaml: missing")
def _(env):
    p = env.tmp / "tiny-5t-typo.yaml"
    return Bad(["--protocols", str(p)], str(p))


@case("protocol yaml: ablation of an unknown method")
def _(env):
    p = env.file("bad.yaml", "name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                             "ablations:\n  mine: {method: nope, variants: ladder}\n")
    return Bad(["--protocols", str(p), "--methods", "none", "--ablation", "mine"], "'nope'")


@case("protocol yaml: ladder of a method without one")
def _(env):
    p = env.file("bad.yaml", "name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\n"
                             "ablations:\n  mine: {method: head_only, variants: ladder}\n")
    return Bad(["--protocols", str(p), "--methods", "none", "--ablation", "mine"], "head_only")


# ------------------------------------------------------------------------------ the test

@pytest.fixture()
def env(tmp_path, monkeypatch):
    """Tiny Fashion-MNIST in the real format, a 5-task protocol over it, a store holding one run,
    one published record and a page: the things a bad input must leave as they are."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [])  # never fall back to a system copy
    registry.names()  # the built-ins, discovered; the plugins of a case are forgotten after it
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    data = tmp_path / "data"
    write_fashion_mnist(data / "fashion-mnist", train_per_class=12, test_per_class=4)
    proto = tmp_path / "tiny-5t.yaml"
    write_tiny_5t(proto)
    store = tmp_path / "runs.sqlite"
    RunStore(store).put(make_record(seed=0))
    publish([make_record(seed=1)], tmp_path / "records")
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "README.md").write_text("# the pages\n")
    return Env(tmp_path, data, proto, store, tmp_path / "records", tmp_path / "lb", monkeypatch)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file under root (bytes) and folder (None), but the run logs and Python's caches."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] == "logs" or "__pycache__" in rel:
            continue
        out[rel] = p.read_bytes() if p.is_file() else None
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_and_changes_nothing(name, env, capsys):
    bad = CASES[name](env)
    before = snapshot(env.tmp)
    try:
        code = run_suite.main(env.argv(bad.argv))
    except SystemExit as e:  # argparse exits instead of returning
        code = e.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, f"exit {code}; stderr: {err}; stdout: {out[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in [bad.names, *bad.also]:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert snapshot(env.tmp) == before
    if bad.check:
        bad.check()


def test_a_fresh_store_is_not_created_by_a_refused_sweep(env, capsys):
    """Options are checked before the store is opened: a refused sweep leaves no empty store."""
    fresh = env.tmp / "new" / "suite.sqlite"
    for argv in (["--threads", "0"], ["--device", "foo"], ["--seeds", "0"], ["--methods", "nope"]):
        assert run_suite.main(env.base() + ["--store", str(fresh)] + argv) == 2
    assert not fresh.exists() and not fresh.parent.exists()


def test_the_real_process_prints_one_line(env):
    """The same through `python run_suite.py`, where warnings printed at import would show."""
    proc = subprocess.run([sys.executable, "run_suite.py", *env.base(), "--store", str(env.tmp)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: --store {env.tmp} is a folder; give a file, e.g. {env.tmp / 'suite.sqlite'}\n"
