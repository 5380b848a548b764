"""The code that ran for a run, as a record keeps it (its `code` field), and whether a stored run
is stale: made by other code than the code of now.

Why a content hash beside the git commit: the commit names the suite's tree, not a plugin's file,
and says nothing when the tree is dirty; and a sweep must know, for each stored run, whether the
method it ran has changed since. The run key (the hash of the resolved spec) stays what it is, so
the published keys stay valid; the code hash decides only whether a run stored under that key can
be reused.

What the hash covers: every module of the suite's packages (`methods`, `benchmarks`,
`protocols`) that a run imports, found by following the import statements (`ast`, anywhere in a
module, parent packages included) from the method's own module and from the runner. So it holds
the method, the shared ViT, base strategy and alignment it builds on, the data pipeline
(`benchmarks`: a changed transform or reader moves every method's numbers), and the runner,
metrics and cost counting that turn training into a record; it leaves out the other methods'
modules and the leaderboard (which never runs in a run). A plugin's own module (a `--plugin`
file, or an installed one) is part of it, with the modules of its own top-level package; an
installed plugin's distribution name and version are recorded beside. Files are hashed as bytes:
any edit, a comment included, makes the runs of the methods that import it stale, which a rerun
settles (and the reproduction line then says whether the numbers moved).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import packages_distributions, version
from pathlib import Path
from typing import Any

from methods import registry

__all__ = ["SUITE_PACKAGES", "code_identity", "git_state", "stale_reason"]

#: the suite's packages whose modules a run may execute (the leaderboard never runs in a run)
SUITE_PACKAGES = ("methods", "benchmarks", "protocols")
#: where every run starts besides its method's module
RUN_ROOTS = ("protocols.runner",)
#: the folder that holds the packages: a checkout of the suite, or site-packages once installed
REPO = Path(__file__).resolve().parent.parent


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the suite's checkout: dirty when tracked files have local changes;
    (None, None) when the code does not run from a checkout (an installed copy)."""
    if not (REPO / ".git").exists():
        return None, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _source(module: str) -> Path | None:
    """The source file of `module` (imported or importable), None for one without a .py file."""
    mod = sys.modules.get(module)
    origin = getattr(mod, "__file__", None) if mod is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return Path(origin) if origin and str(origin).endswith(".py") else None


def _imports(module: str, path: Path) -> Iterable[str]:
    """Every module `module` (at `path`) names in an import statement, made absolute; for
    `from a import b`, both `a` and `a.b` (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                yield base
                yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def _closure(roots: Iterable[str], packages: set[str]) -> dict[str, Path]:
    """{module: source file} of `roots` and every module of `packages` they import, transitively
    (importing a.b.c runs a/__init__.py and a/b/__init__.py too)."""
    out: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        path = _source(name)
        if path is None:
            continue
        out[name] = path
        for target in _imports(name, path):
            parts = target.split(".")
            if parts[0] in packages:
                todo += [".".join(parts[: i + 1]) for i in range(len(parts))]
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_identity(method: str) -> dict[str, Any]:
    """The `code` field of a run of `method` made now: the suite's commit and whether its tree is
    dirty, the sha256 of every file the run's code comes from (`files`, by module name; a plugin
    file as `plugin:<file name>`) and one `sha256` over them; for a method outside the suite,
    `plugin` names its file, or its module and installed distribution with its version."""
    cls = registry.get(method)
    module = cls.__module__
    top = module.split(".")[0]
    own = top not in SUITE_PACKAGES
    files = _closure([module, *RUN_ROOTS], set(SUITE_PACKAGES) | ({top} if own and "." in module else set()))
    hashes: dict[str, str] = {}
    plugin: dict[str, Any] | None = None
    for name, path in sorted(files.items()):
        if name == module and own and module.startswith("promptcl_plugin_"):  # a --plugin FILE.py
            hashes[f"plugin:{path.name}"] = _sha256(path)
            plugin = {"file": path.name}
        else:
            hashes[name] = _sha256(path)
    if own and plugin is None:
        plugin = {"module": module}
        dists = packages_distributions().get(top) or []
        if dists:
            plugin.update(distribution=dists[0], version=version(dists[0]))
    commit, dirty = git_state()
    out: dict[str, Any] = {"commit": commit, "dirty": dirty, "sha256": _combined(hashes), "files": hashes}
    if plugin is not None:
        out["plugin"] = plugin
    return out


def _combined(hashes: Mapping[str, str]) -> str:
    return hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in sorted(hashes.items()))
                          .encode()).hexdigest()


def stale_reason(stored: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str | None:
    """Why a stored run's code (`stored`: its record's `code`) is not the code of `now`
    (`code_identity`), None when it is the same: the files that changed, or that the run
    recorded no code (a run made before records carried it: its code cannot be known)."""
    if not stored or not stored.get("sha256"):
        return "made before runs recorded their code"
    if stored["sha256"] == now["sha256"]:
        return None
    old, new = stored.get("files") or {}, now["files"]
    changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"code changed: {shown}" if changed else "code changed"
