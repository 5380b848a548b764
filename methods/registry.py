"""The method registry: names -> `PromptStrategy` subclasses, and their hyperparameters.

Three ways in (README.md "Adding a method"):
1. a module in the `methods` package decorated with `@register("name")`: every module of the
   package is imported on first use, so a new method is one new file and nothing else;
2. `load_plugin("path/to/file.py")` or `load_plugin("package.module")` (`--plugin` on the CLI);
3. an installed package exposing the entry-point group `promptcl.methods`
   (`name = package.module:Class` or `name = package.module`).
A name belongs to the first class registered under it: a plugin can never replace a built-in or
another plugin's method, whatever its class is called.

Hyperparameters resolve in one order for every method: the `Hparams` dataclass defaults, then the
method's `DEFAULTS[protocol]` (or `DEFAULTS["*"]`, the generic defaults a method may declare for
protocols it has no entry for), then `stream_hparams()` (what follows from the stream: tasks,
classes per task), then the protocol YAML's `methods: {name: {...}}`, then command-line
overrides. Unknown keys are errors that list the valid ones. A field declared with
`added_hparam` (a hyperparameter added after runs were published) is left out of the resolved
hyperparameters while it has its default value, so that the run keys of the published runs,
hashes of those hyperparameters, stay what they were; the method gets the default either way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
import types
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .base import PromptStrategy, hparams_key_dict

ENTRY_POINT_GROUP = "promptcl.methods"
# `names()` lists references before methods: their role sorts first
_ROLE_ORDER = {"lower bound": 0, "upper bound": 1, "method": 2}

_REGISTRY: dict[str, type[PromptStrategy]] = {}
#: "new" (not yet, or the last try failed), "running", "done"
_discovery = "new"


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class HparamError(ValueError):
    """A hyperparameter is unknown or has a value its method cannot use."""


class PluginError(ValueError):
    """A plugin cannot be used: it fails to import, registers nothing, or takes a used name."""


def register(name: str):
    """Class decorator: `@register("l2p") class L2P(PromptStrategy): ...`."""
    def wrap(cls: type[PromptStrategy]) -> type[PromptStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, PromptStrategy)):
            raise TypeError(f"@register({name!r}) needs a PromptStrategy subclass")
        other = _REGISTRY.get(name)
        if other is not None and other is not cls:
            raise PluginError(f"method name {name!r} is already registered by "
                              f"{other.__module__}.{other.__qualname__}; "
                              f"{cls.__module__}.{cls.__qualname__} must use another name")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def discover() -> None:
    """Import every module of this package, then every installed `promptcl.methods` entry point.

    All or nothing: an entry point that fails to import (or registers nothing, or takes a used
    name) is one `PluginError` naming its distribution and the error, the entry points' methods
    are taken out again (no partial registry), and the next call tries again, so every command
    that asks the registry gets the same error until the distribution is fixed or uninstalled."""
    global _discovery
    if _discovery != "new":  # done, or a plugin asking the registry while discovery imports it
        return
    _discovery = "running"
    try:
        package = importlib.import_module(__package__)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{__package__}.{info.name}")
        before = dict(_REGISTRY)
        try:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                _register_entry_point(ep)
        except PluginError:
            _REGISTRY.clear()
            _REGISTRY.update(before)
            raise
    except BaseException:
        _discovery = "new"
        raise
    _discovery = "done"


def _distribution(ep) -> str:
    dist = getattr(ep, "dist", None)
    name = dist.metadata["Name"] if dist is not None else None
    return f"distribution {name!r}" if name else "an unknown distribution"


def _register_entry_point(ep) -> None:
    """Register what entry point `ep` names: a PromptStrategy subclass (under the entry point's
    name) or a module (its own `@register` classes)."""
    where = f"entry point {ep.name!r} ({ep.value}) of the installed {_distribution(ep)}"
    try:
        obj = ep.load()
    except Exception as e:  # the plugin's own code failed: its owner (or pip uninstall) can fix it
        raise PluginError(f"{where} failed to import: {type(e).__name__}: {e}; fix or uninstall "
                          "that distribution") from e
    try:
        if isinstance(obj, type) and issubclass(obj, PromptStrategy):
            if _REGISTRY.get(ep.name) is not obj:
                register(ep.name)(obj)
        elif isinstance(obj, types.ModuleType):
            # its @register decorators ran when it was first imported; after a failed discovery
            # was rolled back, the module is not imported again, so register its classes here
            for cls in vars(obj).values():
                own = vars(cls).get("name") if isinstance(cls, type) else None
                if (own and issubclass(cls, PromptStrategy) and cls.__module__ == obj.__name__
                        and _REGISTRY.get(own) is not cls):
                    register(own)(cls)
            if not any(c.__module__ == obj.__name__ for c in _REGISTRY.values()):
                raise PluginError("it registered no method (decorate a PromptStrategy subclass "
                                  "with @register('name'))")
        else:
            raise PluginError(f"it names a {type(obj).__name__}, not a PromptStrategy subclass "
                              "or a module")
    except PluginError as e:
        raise PluginError(f"{where}: {e}") from None


def load_plugin(spec: str) -> list[str]:
    """Import a plugin from a .py file path or a dotted module name; return the names it added.

    A file is imported once per path (as `promptcl_plugin_<stem>_<hash of the path>`), so loading
    it twice is harmless and two files with the same name never shadow each other."""
    discover()
    path = Path(spec)
    before = set(_REGISTRY)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise PluginError(f"plugin file {spec} not found")
        resolved = path.resolve()
        tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        mod_name = f"promptcl_plugin_{_identifier(path.stem)}_{tag}"
        if mod_name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(mod_name, resolved)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            try:
                module_spec.loader.exec_module(module)
            except PluginError:
                del sys.modules[mod_name]
                raise
            except Exception as e:  # the plugin's own code failed: the user can fix it
                del sys.modules[mod_name]
                _forget(before)
                raise PluginError(f"plugin {spec} failed to import: {type(e).__name__}: {e}") from e
    else:
        try:
            mod_name = importlib.import_module(spec).__name__
        except PluginError:
            raise
        except Exception as e:
            _forget(before)
            raise PluginError(f"plugin module {spec!r} failed to import: {type(e).__name__}: {e}") from e
    added = sorted(n for n, c in _REGISTRY.items() if c.__module__ == mod_name)
    if not added:
        raise PluginError(f"plugin {spec} registered no method (decorate a PromptStrategy "
                          f"subclass with @register('name'))")
    return added


def _identifier(stem: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in stem)


def _forget(before: set[str]) -> None:
    """Drop what a failed plugin import registered before it failed."""
    for n in set(_REGISTRY) - before:
        del _REGISTRY[n]


def names() -> list[str]:
    """Registered method names: the references (lower, then upper bound), then the methods,
    alphabetically."""
    discover()
    return sorted(_REGISTRY, key=lambda n: (_ROLE_ORDER.get(_REGISTRY[n].role, 2), n))


def get(name: str) -> type[PromptStrategy]:
    discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered: {', '.join(names())} "
            f"(add your own with --plugin FILE.py)") from None


def ablation(name: str) -> list[tuple[str, dict[str, Any]]]:
    """Method `name`'s cumulative ablation ladder, [(label, hparam overrides), ...]."""
    ladder = list(get(name).ABLATION)
    if not ladder:
        raise ValueError(f"method {name!r} defines no ABLATION ladder")
    return ladder


def has_defaults(name: str, protocol: str) -> bool:
    """Whether method `name` has hyperparameters for `protocol`: its own entry, or generic
    defaults it declared with `DEFAULTS["*"]`."""
    defaults = get(name).DEFAULTS
    return protocol in defaults or "*" in defaults


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """CLI strings and YAML scalars -> the dataclass field's type."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, Any)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = args[0] if len(args) == 1 else Any
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise HparamError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if annotation is int:
        if isinstance(value, float) and not value.is_integer():
            raise HparamError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise HparamError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HparamError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        return str(value)
    if typing.get_origin(annotation) in (list, tuple) and isinstance(value, str):
        import yaml
        return yaml.safe_load(value)
    return value


def resolve_hparams(name: str, protocol: str | None = None, *overrides: dict[str, Any] | None,
                    num_tasks: int | None = None, classes_per_task: list[int] | None = None
                    ) -> dict[str, Any]:
    """Merged, type-checked hyperparameters for `name` under `protocol` (see module docstring).

    `num_tasks` / `classes_per_task` are the stream's facts; without them the hyperparameters
    that follow from the stream keep their dataclass defaults."""
    cls = get(name)
    hints = typing.get_type_hints(cls.Hparams)
    valid = {f.name for f in dataclasses.fields(cls.Hparams)}
    merged: dict[str, Any] = {}
    defaults = cls.DEFAULTS.get(protocol or "", cls.DEFAULTS.get("*", {}))
    stream = {} if num_tasks is None else cls.stream_hparams(
        num_tasks, list(classes_per_task) if classes_per_task is not None else [])
    for layer in (defaults, stream, *overrides):
        for key, value in (layer or {}).items():
            if key not in valid:
                raise HparamError(
                    f"unknown hyperparameter {key!r} for method {name!r}; valid: {', '.join(sorted(valid))}")
            merged[key] = _coerce(value, hints.get(key, Any), f"{name}.{key}")
    try:
        return hparams_key_dict(cls.Hparams(**merged))
    except (TypeError, ValueError) as e:  # the dataclass's own checks (choices, ranges)
        raise HparamError(f"{name}: {e}") from None


def create(name: str, **kwargs) -> PromptStrategy:
    """Instantiate method `name` (kwargs: vit, num_classes, hparams, device, eval_mb_size, ...)."""
    return get(name)(**kwargs)
