"""What the suite offers: methods, protocols and backbones, for `run_suite.py list`."""
from __future__ import annotations

from methods import backbones, registry

from .schema import available, load_protocol


def listing() -> str:
    lines = ["methods:"]
    for name in registry.names():
        cls = registry.get(name)
        about = cls.description or (cls.__doc__ or "").strip().splitlines()[0]
        role = "" if cls.role == "method" else f" [{cls.role}]"
        lines.append(f"  {name:<12} {about}{role}")
    lines.append("protocols:")
    for name in available():
        p = load_protocol(name)
        abl = f"; ablations: {', '.join(p.ablations)}" if p.ablations else ""
        lines.append(f"  {name:<15} {p.description}  [backbones: {', '.join(p.backbones)}{abl}]")
    lines.append("backbones:")
    for name in backbones.names():
        lines.append(f"  {name:<8} {backbones.get_spec(name).description}")
    return "\n".join(lines)


def load_plugins(specs: list[str]) -> list[str]:
    """Discover the built-in and installed methods (a broken installed plugin is one PluginError
    for every command, the ones that never name a method included), then import method plugins
    (`--plugin FILE.py|module`); the names they registered."""
    registry.discover()
    return [name for spec in specs for name in registry.load_plugin(spec)]

