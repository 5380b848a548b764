"""A non-editable install (`pip install .`) finds the results from the working directory and never
writes beside its own code: the wheel of the suite, installed alone into a fresh virtual
environment, runs a one-run sweep, publishes and renders from a copy of the checkout, and its
site-packages is byte for byte what pip installed."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from benchmarks.synthetic import write_fashion_mnist
from helpers import write_tiny_5t

ROOT = Path(__file__).resolve().parent.parent
#: what a copy of a checkout leaves out: version control, environments, local results and data
NOT_IN_A_CHECKOUT = (".git", ".venv", "results", "data", "pretrained", "build", "dist", "*.egg-info",
                     "__pycache__", ".pytest_cache", "*.sqlite")


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # no PYTHONPATH to a checkout
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def fresh_venv(path: Path) -> tuple[Path, Path]:
    """A virtual environment without pip whose site-packages sees this interpreter's packages (the
    suite's dependencies) through a .pth line: a line of a .pth file adds a folder to sys.path
    without running that folder's own .pth files, so an editable install of a checkout there (a
    .pth file of its own) stays invisible. Returns its python and its site-packages."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    purelib = Path(run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=path).stdout.strip())
    (purelib / "promptcl-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, purelib


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file but Python's byte-code caches: size and modification time."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_a_wheel_install_writes_only_into_the_working_directory(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(*NOT_IN_A_CHECKOUT))
    source = tmp_path / "source"  # the wheel is built from its own copy: a build leaves files behind
    shutil.copytree(checkout, source)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp_path / "wheels"), str(source)], cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("promptcl-*.whl")
    python, purelib = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(wheel)], cwd=tmp_path)
    where = json.loads(run([str(python), "-I", "-c", "import json, protocols, leaderboard, run_suite; print(json.dumps("
                                                     "[protocols.__file__, leaderboard.__file__, run_suite.__file__]))"],
                           cwd=checkout).stdout)
    assert all(Path(f).is_relative_to(purelib) for f in where), where  # the installed code, not a checkout's
    installed = snapshot(purelib)

    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=6, test_per_class=2)
    proto = tmp_path / "tiny-5t.yaml"
    write_tiny_5t(proto)
    suite = [str(python), "-I", "-m", "run_suite"]  # -I: the working directory is not on sys.path
    store = ["--store", str(tmp_path / "scratch.sqlite")]
    run([*suite, "--protocols", str(proto), "--methods", "head_only", "--seeds", "1", "--data-root",
         str(tmp_path / "data"), *store, "--threads", "1", "--workers", "1", "--quiet", "--no-render"], cwd=checkout)
    run([*suite, "publish", *store, "--no-render"], cwd=checkout)
    run([*suite, "report", "--published"], cwd=checkout)

    assert snapshot(purelib) == installed  # nothing written beside the installed code
    published = checkout / "leaderboard" / "records" / "tiny-5t__tiny.jsonl"
    (record,) = [json.loads(line) for line in published.read_text().splitlines()]
    assert record["method"] == "head_only"
    # an installed copy is no checkout: no commit, but the hash of the code that ran all the same
    assert record["code"]["commit"] is None and "methods.head_only" in record["code"]["files"]
    assert "head_only" in (checkout / "leaderboard" / "tiny-5t__tiny.md").read_text()
