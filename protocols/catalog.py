"""What the suite offers: methods, protocols and backbones, for `run_suite.py --list`."""
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
    """Import method plugins (`--plugin FILE.py|module`); the names they registered."""
    return [name for spec in specs for name in registry.load_plugin(spec)]


def cost_rows(protocols: list[str], backbone_choice: str, methods: list[str],
              overrides: dict[str, dict], *, weights_dir: str | None, random_init: bool,
              allow_download: bool, device: str) -> list[dict]:
    """One cost row per protocol x backbone x method (see `protocols.cost.cost_row`)."""
    from .cost import cost_row

    from .runner import method_hparams, resolve_device
    from .sweep import _backbones_for

    methods = registry.names() if methods == ["all"] else methods
    rows = []
    for pname in protocols:
        proto = load_protocol(pname)
        for bb in _backbones_for(proto, backbone_choice if backbone_choice in ("default", "all")
                                 else backbone_choice.split(",")):
            vit = backbones.load(bb, weights_dir, random_init, allow_download).vit
            for m in methods:
                hp = method_hparams(m, proto, overrides.get(m, {}))
                row = cost_row(m, vit, proto.num_classes, hp, device=str(resolve_device(device)))
                rows.append({"protocol": proto.name, "backbone": bb, **row})
    return rows
