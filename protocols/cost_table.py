"""The `cost` command's table: parameters, passes and GFLOPs per image for each protocol x
backbone x method, counted by `protocols.cost.cost_row` on the method built for that protocol."""
from __future__ import annotations

from methods import backbones, registry

from .cost import cost_row
from .devices import resolve_device
from .runner import method_hparams
from .schema import load_protocol
from .sweep import backbones_for


def cost_rows(protocols: list[str], backbone_choice: str, methods: list[str],
              overrides: dict[str, dict], *, weights_dir: str | None, random_init: bool,
              allow_download: bool, device: str) -> list[dict]:
    """One cost row per protocol x backbone x method; `backbone_choice` as `--backbones` takes it."""
    methods = registry.names() if methods == ["all"] else methods
    rows = []
    for pname in protocols:
        proto = load_protocol(pname)
        for bb in backbones_for(proto, backbone_choice if backbone_choice in ("default", "all")
                                else backbone_choice.split(",")):
            vit = backbones.load(bb, weights_dir, random_init, allow_download).vit
            for m in methods:
                hp = method_hparams(m, proto, overrides.get(m, {}))
                row = cost_row(m, vit, proto.num_classes, hp, device=str(resolve_device(device)))
                rows.append({"protocol": proto.name, "backbone": bb, **row})
    return rows
