"""Expected wall time of a sweep before it starts: the `dry-run` command.

Per run, from the training and evaluation images/s of a profile record (`protocols.profile`) of
the same protocol, method, precision and backbone architecture (sup21k's profile serves sup1k),
or, where there is none, from a short profile measured on the spot (the basis column says which),
over the images each part of the run feeds through the ViT (`protocols.work.run_work`, the same
count a record's per-run GFLOPs come from):

    train  = training images x epochs / train img/s
    stages = per task, its training images x (the method's extra epochs / train img/s
             + its no-grad ViT passes / (eval img/s x eval passes per image))
    eval   = after every task, the test images of the tasks seen so far / eval img/s

Left out besides what `protocols.work` leaves out: loading the backbone, and the data pipeline
(its loader records say whether it keeps up; the table notes it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

from methods import backbones, registry

from .devices import device_name, resolve_device
from .profile import profile_method
from .runner import RunSpec, resolve
from .schema import Protocol, load_protocol
from .work import run_work


@dataclass(frozen=True)
class RunEstimate:
    spec: RunSpec
    train_s: float
    stages_s: float
    eval_s: float
    basis: str  # "profile <date> ..." or "measured now ..."
    runs: int = 1  # the runs of this configuration it stands for (a dry run: its seeds to do)

    @property
    def seconds(self) -> float:
        """One run's seconds."""
        return self.train_s + self.stages_s + self.eval_s


def run_seconds(protocol: Protocol, method: str, hparams: dict, train_img_s: float,
                eval_img_s: float) -> tuple[float, float, float]:
    """(train, stages, eval) seconds of one run at these rates (see the module docstring)."""
    work = run_work(protocol, method, hparams)
    pass_img_s = eval_img_s * registry.get(method).passes_test  # one no-grad ViT pass per image
    return (work.train_images / train_img_s,
            work.stage_epoch_images / train_img_s + work.stage_pass_images / pass_img_s,
            work.eval_images / eval_img_s)


def _arch(backbone: str) -> str:
    """Backbones with one architecture cost the same: sup21k's profile serves sup1k."""
    try:
        return json.dumps(backbones.get_spec(backbone).arch, sort_keys=True)
    except backbones.BackboneError:
        return backbone


def _describe(record: dict, measured: bool) -> str:
    batch = f"batch {record['batch_size']}"
    if record["batch_size"] != record["hparams_batch_size"]:
        batch += f" of {record['hparams_batch_size']}"
    when = "measured now" if measured else f"profile {record['created'][:10]}"
    return f"{when}, {record['backbone']}, {batch}, {record['threads']} thr"


def estimate(specs: Sequence[RunSpec], profiles: Sequence[dict], *, device: str = "auto",
             measure: bool = True, batch_size: int | None = None, eval_batch_size: int = 256,
             steps: int = 1, budget_s: float = 10.0,
             progress: Callable[[str], None] | None = None,
             runs: Sequence[int] | None = None) -> list[RunEstimate]:
    """One `RunEstimate` per spec, in order. A spec with no matching profile record is measured
    on the spot (`profile_method` with `steps` timed steps at `batch_size`, None = the method's
    own) when `measure`, else it raises ValueError naming the missing profile. `runs[i]`, when
    given, is how many runs `specs[i]` stands for (one configuration's seeds: a run's time does not
    depend on its seed), so a sweep of any size is estimated from its configurations."""
    runs = [1] * len(specs) if runs is None else list(runs)
    if len(runs) != len(specs):
        raise ValueError(f"runs gives {len(runs)} counts for {len(specs)} specs")
    latest: dict[tuple, dict] = {}
    for r in profiles:
        if r.get("kind") != "profile":
            continue
        key = (r["protocol"], r["method"], r["precision"], _arch(r["backbone"]))
        if key not in latest or r["created"] > latest[key]["created"]:
            latest[key] = r
    dev = resolve_device(device)
    measured: dict[tuple, dict] = {}
    vits: dict[str, object] = {}
    out = []
    for spec, n in zip(specs, runs):
        proto = load_protocol(spec.protocol)
        hparams = resolve(spec, proto)["hparams"]
        key = (proto.name, spec.method, spec.precision, _arch(spec.backbone))
        record, basis = latest.get(key), ""
        if record is not None:
            basis = _describe(record, measured=False)
            if spec.overrides:
                basis += ", default config"
        else:
            mkey = key + (json.dumps(spec.overrides, sort_keys=True, default=str),)
            if mkey not in measured:
                if not measure:
                    raise ValueError(
                        f"no profile of {spec.method} on {proto.name} / {spec.backbone} "
                        f"({spec.precision}) for {device_name(dev)}; run `run_suite.py profile` first "
                        f"or let `dry-run` measure it")
                if spec.backbone not in vits:
                    vits[spec.backbone] = backbones.load(spec.backbone, random_init=True).vit
                if progress:
                    progress(f"measuring {spec.method} on {proto.name} / {spec.backbone} ...")
                measured[mkey] = profile_method(
                    proto, spec.backbone, spec.method, vit=vits[spec.backbone], device=dev,
                    precision=spec.precision, batch_size=batch_size,
                    eval_batch_size=eval_batch_size, steps=steps, budget_s=budget_s,
                    overrides=spec.overrides)
            record = measured[mkey]
            basis = _describe(record, measured=True)
        train, stages, evaluation = run_seconds(proto, spec.method, hparams,
                                                record["train_img_s"], record["eval_img_s"])
        out.append(RunEstimate(spec, train, stages, evaluation, basis, n))
    return out


def total_seconds(estimates: Sequence[RunEstimate]) -> float:
    return sum(e.seconds * e.runs for e in estimates)


def human(seconds: float) -> str:
    """12 s, 7 min, 3.5 h, 4.2 d, 1.3 y."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 365.25 * 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / (365.25 * 86400):.1f} y"


def format_estimates(estimates: Sequence[RunEstimate], device: str = "",
                     loader_records: Sequence[dict] = ()) -> str:
    """The table a user reads before a sweep: one row per protocol x backbone x method (label)
    with its seeds folded in, then the total; a note per protocol whose data pipeline (loader
    records) is slower than the fastest training step."""
    from tabulate import tabulate

    groups: dict[tuple, list[RunEstimate]] = {}
    for e in estimates:
        s = e.spec
        key = (s.protocol, s.backbone, s.display_label, s.table, s.precision)
        groups.setdefault(key, []).append(e)
    rows = []
    for (protocol, backbone, label, _, precision), es in groups.items():
        one = es[0]
        n = sum(e.runs for e in es)
        rows.append([protocol, backbone, label + ("" if precision == "fp32" else f" ({precision})"),
                     f"{n:,}", human(one.train_s), human(one.stages_s), human(one.eval_s),
                     human(total_seconds(es) / n), human(total_seconds(es)), one.basis])
    table = tabulate(rows, headers=["protocol", "backbone", "method", "runs", "train", "stages",
                                    "eval", "per run", "all runs", "basis"], tablefmt="github")
    total = total_seconds(estimates)
    hours = f" ({total / 3600:,.0f} h)" if total >= 2 * 86400 else ""
    lines = [table, "", f"total: {sum(e.runs for e in estimates):,} runs, {human(total)}{hours} one after another"
                        + (f" on {device}" if device else "")]
    for protocol in dict.fromkeys(e.spec.protocol for e in estimates):
        loader = [r for r in loader_records if r.get("protocol") == protocol]
        if not loader:
            continue
        best = max(loader, key=lambda r: r["img_s"])
        # the fastest training step this sweep runs on the protocol, at the estimate's rates
        fastest = max(_train_rate(e) for e in estimates if e.spec.protocol == protocol)
        verdict = "keeps up with" if best["img_s"] >= fastest else "is SLOWER than"
        lines.append(f"{protocol}: the data pipeline ({best['img_s']:.4g} img/s with "
                     f"{best['workers']} workers) {verdict} the fastest training step "
                     f"({fastest:.4g} img/s)")
    return "\n".join(lines)


def _train_rate(e: RunEstimate) -> float:
    """Training images/s implied by an estimate (images x epochs / train seconds)."""
    proto = load_protocol(e.spec.protocol)
    work = run_work(proto, e.spec.method, resolve(e.spec, proto)["hparams"])
    return work.train_images / e.train_s if e.train_s else float("inf")
