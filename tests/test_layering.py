"""The import graph of the suite, read from the source with `ast` (nothing is imported): every
import points down. No cycle between modules (module level or inside a function), no private
(underscore) name taken from another module, and the packages keep to their layers: the
leaderboard is built from records alone (no torch, no method, no benchmark; of `protocols/` only
the torch-free record module and the metrics), `protocols/` never imports the leaderboard, and
`benchmarks/` and `methods/` import neither each other nor anything above them."""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "methods", "protocols", "leaderboard")
#: what the leaderboard may import of `protocols/` (torch-free leaves)
LEADERBOARD_MAY_IMPORT = {"protocols", "protocols.record", "protocols.metrics", "protocols.reference_record"}
#: third-party packages that load torch (the leaderboard must not)
TORCH_WORLD = {"torch", "torchvision", "timm", "avalanche"}


def our_modules() -> dict[str, Path]:
    """Every module of the packages, and run_suite: dotted name -> file."""
    out = {"run_suite": ROOT / "run_suite.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = our_modules()


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module (ours or not)
    name: str | None  # the name taken from it (`from target import name`), else None
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{MODULES[self.importer].relative_to(ROOT)}:{self.line}"


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _absolute(importer: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _with_parents(module: str, importer: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c; the packages that hold the
    importer itself are left out (Python runs them before the importer, whatever it imports)."""
    parts = module.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [m for m in chain if m == module or not importer.startswith(m + ".")]


def imports_of(importer: str) -> list[Import]:
    tree = ast.parse(MODULES[importer].read_text(encoding="utf-8"))
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    for target in _with_parents(alias.name, importer):
                        out.append(Import(importer, target, None, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                source = _absolute(importer, child.module, child.level)
                for target in _with_parents(source, importer):
                    out.append(Import(importer, target, None, child.lineno, inside))
                for alias in child.names:
                    sub = f"{source}.{alias.name}"
                    if sub in MODULES:  # `from package import module`
                        out.append(Import(importer, sub, None, child.lineno, inside))
                    else:
                        out.append(Import(importer, source, alias.name, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return out


IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def _ours(module: str) -> bool:
    return module in MODULES


def _top(module: str) -> str:
    return module.split(".")[0]


def cycles() -> list[list[str]]:
    """The import cycles among our modules (Tarjan's strongly connected components)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if _ours(imp.target) and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe_cycle(component: list[str]) -> str:
    edges = sorted({f"{imp.importer} -> {imp.target} ({imp.where()}"
                    + (", inside a function)" if imp.in_function else ")")
                    for imp in IMPORTS if imp.importer in component and imp.target in component
                    and imp.target != imp.importer})
    return "cycle among " + ", ".join(component) + ":\n  " + "\n  ".join(edges)


def test_the_graph_sees_the_imports():
    """The analysis itself: it finds the suite's own imports, at module level and in functions."""
    runner = {imp.target for imp in IMPORTS if imp.importer == "protocols.runner"}
    assert {"protocols.record", "protocols.schema", "methods.registry", "torch"} <= runner
    assert any(imp.in_function for imp in IMPORTS if imp.importer == "run_suite")
    assert _absolute("protocols.sweep", "runner", 1) == "protocols.runner"
    assert _absolute("leaderboard", "render", 1) == "leaderboard.render"


def test_no_import_cycle():
    found = cycles()
    assert not found, "\n".join(_describe_cycle(c) for c in found)


def test_a_cycle_would_be_found(monkeypatch):
    """The detector fails on a planted cycle (through an import inside a function)."""
    planted = Import("protocols.record", "protocols.runner", None, 1, True)
    monkeypatch.setattr(sys.modules[__name__], "IMPORTS", IMPORTS + [planted])
    assert any({"protocols.record", "protocols.runner"} <= set(c) for c in cycles())


def private_names_taken() -> list[tuple[str, str]]:
    """(importer, where and what) for each `from x import _y` or `x._y` (x one of our modules,
    not the importer itself)."""
    found = [(imp.importer, f"{imp.where()}: {imp.importer} takes {imp.target}.{imp.name}") for imp in IMPORTS
             if _ours(imp.target) and imp.name and imp.name.startswith("_") and imp.target != imp.importer]
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = {}  # local name -> our module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _ours(alias.name) and alias.asname:
                        bound[alias.asname] = alias.name
                    elif _ours(alias.name):
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                source = _absolute(module, node.module, node.level)
                for alias in node.names:
                    if f"{source}.{alias.name}" in MODULES:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and bound[node.value.id] != module
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append((module, f"{path.relative_to(ROOT)}:{node.lineno}: {module} uses "
                                      f"{bound[node.value.id]}.{node.attr}"))
    return found


@pytest.mark.parametrize("package", [
    "run_suite", "protocols", "leaderboard", "benchmarks", "methods",
])
def test_no_private_name_crosses_a_module(package):
    """`from x import _y` and `x._y` (x one of our modules) only inside x itself."""
    found = [text for importer, text in private_names_taken() if _top(importer) == package]
    assert not found, "\n".join(found)


def _violations(rule) -> list[str]:
    return [f"{imp.where()}: {imp.importer} imports {imp.target}" for imp in IMPORTS if rule(imp)]


def test_the_layers():
    bad = _violations(lambda i: _top(i.importer) == "benchmarks" and _top(i.target) in
                      {"methods", "protocols", "leaderboard", "run_suite"})
    bad += _violations(lambda i: _top(i.importer) == "methods" and _top(i.target) in
                       {"benchmarks", "protocols", "leaderboard", "run_suite"})
    bad += _violations(lambda i: _top(i.importer) == "protocols" and _top(i.target) in
                       {"leaderboard", "run_suite"})
    bad += _violations(lambda i: i.importer == "run_suite" and _top(i.target) in {"methods", "benchmarks"})
    assert not bad, "\n".join(bad)


def test_the_leaderboard_is_built_from_records_alone():
    """No method, benchmark or torch; of protocols/ only the record module and the metrics."""
    bad = _violations(lambda i: _top(i.importer) == "leaderboard" and (
        _top(i.target) in {"methods", "benchmarks", "run_suite"} | TORCH_WORLD
        or (_top(i.target) == "protocols" and i.target not in LEADERBOARD_MAY_IMPORT)))
    assert not bad, "\n".join(bad)


#: what the record module may import besides the standard library: the metrics it recomputes a
#: record's numbers with, and what those need (numpy, no torch)
RECORD_MAY_IMPORT = {"protocols.metrics", "numpy"}


def test_the_record_module_is_a_torch_free_leaf():
    """protocols/record.py imports only the standard library and the metrics it verifies a record
    with, and protocols/metrics.py only the standard library and numpy (the leaderboard and every
    producer of records read them); protocols/__init__.py imports nothing, so importing the record
    module loads no more than those two."""
    stdlib = sys.stdlib_module_names
    bad = _violations(lambda i: i.importer == "protocols.record" and _top(i.target) not in stdlib
                      and i.target not in RECORD_MAY_IMPORT)
    bad += _violations(lambda i: i.importer == "protocols.metrics" and _top(i.target) not in stdlib | {"numpy"})
    # the reference record (a run's re-evaluations, kept beside it) is a leaf over the record module
    bad += _violations(lambda i: i.importer == "protocols.reference_record" and _top(i.target) not in stdlib
                       and i.target != "protocols.record")
    bad += _violations(lambda i: i.importer in {"protocols", "leaderboard"})
    assert not bad, "\n".join(bad)


def test_producers_and_pages_read_the_one_record_module():
    """Whoever builds, stores, publishes, counts or shows a run record takes its shape from
    protocols/record.py."""
    users = {"protocols.runner", "protocols.sweep", "leaderboard.store", "leaderboard.records",
             "leaderboard.stats", "leaderboard.export", "leaderboard.papers", "leaderboard.cost_page"}
    importers = {imp.importer for imp in IMPORTS if imp.target == "protocols.record"}
    assert users <= importers, sorted(users - importers)


def test_importing_the_leaderboard_loads_no_torch():
    """The same, at run time: every leaderboard module imported, and torch never loaded."""
    code = ("import sys, importlib\n"
            f"for m in {sorted(m for m in MODULES if _top(m) == 'leaderboard')!r}:\n"
            "    importlib.import_module(m)\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(TORCH_WORLD | {'methods', 'benchmarks'})!r})\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("planted, rule", [
    (Import("leaderboard.stats", "protocols.runner", None, 1, False), test_the_leaderboard_is_built_from_records_alone),
    (Import("leaderboard.render", "torch", None, 1, True), test_the_leaderboard_is_built_from_records_alone),
    (Import("protocols.record", "pandas", None, 1, False), test_the_record_module_is_a_torch_free_leaf),
    (Import("protocols.metrics", "torch", None, 1, False), test_the_record_module_is_a_torch_free_leaf),
    (Import("protocols.sweep", "leaderboard.store", None, 1, True), test_the_layers),
    (Import("protocols.sweep", "protocols.executors", "_check", 1, False),
     lambda: test_no_private_name_crosses_a_module("protocols")),
])
def test_a_broken_rule_fails(monkeypatch, planted, rule):
    monkeypatch.setattr(sys.modules[__name__], "IMPORTS", IMPORTS + [planted])
    with pytest.raises(AssertionError):
        rule()
