"""The method registry: names -> `PromptStrategy` subclasses, and their hyperparameters.

Three ways in (DESIGN.md "Extension"):
1. a module in `methods/` decorated with `@register("name")` (listed in `BUILTIN`);
2. `load_plugin("path/to/file.py")` or `load_plugin("package.module")` (`--plugin` on the CLI);
3. an installed package exposing the entry-point group `promptcl.methods`
   (`name = package.module:Class` or `name = package.module`).

Hyperparameters resolve in one order for every method: the `Hparams` dataclass defaults, then the
method's `DEFAULTS[protocol]`, then the protocol YAML's `methods: {name: {...}}`, then command-line
overrides. Unknown keys are errors that list the valid ones.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .base import PromptStrategy

# The canonical order of the built-in methods (the references first, SMoPE last).
BUILTIN = ("head_only", "joint", "l2p", "dualprompt", "coda_prompt", "hide_prompt", "vq_prompt",
           "smope")
ENTRY_POINT_GROUP = "promptcl.methods"

_REGISTRY: dict[str, type[PromptStrategy]] = {}
_discovered = False


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str):
    """Class decorator: `@register("l2p") class L2P(PromptStrategy): ...`."""
    def wrap(cls: type[PromptStrategy]) -> type[PromptStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, PromptStrategy)):
            raise TypeError(f"@register({name!r}) needs a PromptStrategy subclass")
        other = _REGISTRY.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} already registered by {other.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def _discover() -> None:
    """Import the built-in method modules that exist and the installed entry points, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for mod in BUILTIN:
        if importlib.util.find_spec(f"{__package__}.{mod}") is not None:
            importlib.import_module(f"{__package__}.{mod}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, PromptStrategy) and ep.name not in _REGISTRY:
            register(ep.name)(obj)


def load_plugin(spec: str) -> list[str]:
    """Import a plugin from a .py file path or a dotted module name; return the names it added."""
    _discover()
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {spec} not found")
        mod_name = f"promptcl_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        mod_name = importlib.import_module(spec).__name__
    added = sorted(n for n, c in _REGISTRY.items() if c.__module__ == mod_name)
    if not added:
        raise ValueError(f"plugin {spec} registered no method (decorate a PromptStrategy "
                         f"subclass with @register('name'))")
    return added


def names() -> list[str]:
    """Registered method names: built-ins in canonical order, then plugins alphabetically."""
    _discover()
    builtin = [n for n in BUILTIN if n in _REGISTRY]
    return builtin + sorted(n for n in _REGISTRY if n not in BUILTIN)


def get(name: str) -> type[PromptStrategy]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered: {', '.join(names())} "
            f"(add your own with --plugin FILE.py)") from None


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
            raise ValueError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if annotation is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        return float(value)
    if annotation is str:
        return str(value)
    if typing.get_origin(annotation) in (list, tuple) and isinstance(value, str):
        import yaml
        return yaml.safe_load(value)
    return value


def resolve_hparams(name: str, protocol: str | None = None, *overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Merged, type-checked hyperparameters for `name` under `protocol` (see module docstring)."""
    cls = get(name)
    hints = typing.get_type_hints(cls.Hparams)
    valid = {f.name for f in dataclasses.fields(cls.Hparams)}
    merged: dict[str, Any] = {}
    for layer in (cls.DEFAULTS.get(protocol or "", {}), *overrides):
        for key, value in (layer or {}).items():
            if key not in valid:
                raise ValueError(
                    f"unknown hyperparameter {key!r} for method {name!r}; valid: {', '.join(sorted(valid))}")
            merged[key] = _coerce(value, hints.get(key, Any), f"{name}.{key}")
    return dataclasses.asdict(cls.Hparams(**merged))


def create(name: str, **kwargs) -> PromptStrategy:
    """Instantiate method `name` (kwargs: vit, num_classes, hparams, device, eval_mb_size, ...)."""
    return get(name)(**kwargs)
