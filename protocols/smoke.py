"""The real-shape dry run (`run_suite.py smoke`): every method through every task of the real protocols.

Why: nobody here has CIFAR-100, ImageNet-R, CUB-200 or the ViT-B/16 weights, so the next best
proof that the real path works is to run it at the real shape on synthetic files in the real
formats. Each run is an ordinary run of `protocols.runner.run` (training, every per-task stage,
every evaluation, a record with its T x T accuracy matrix); only what the data and weights
cannot provide, and the epoch counts, differ.

What stays real: the protocol (data set reader and on-disk format, image resolution of the
files, transforms, class order, classes per task, head size), the backbone architecture
(`sup21k`, ViT-B/16 at 224 px) and every hyperparameter of the method for that protocol
(prompt lengths, pools, layers, top-k, batch sizes, learning rates, sample counts).
What differs, each visible in the run record:
- weights: random (`backbone_sha256` / `backbone_source` say "random-init");
- data: a handful of synthetic images per class (`benchmarks.synthetic`, real formats and
  sizes; ImageNet-R gives `split_file:` a list of just those files, so the record's
  `variant` shows `protocol.split_file`);
- every epoch count (`epochs`, `tii_epochs`, `tap_epochs`, `ca_epochs`, `align_epochs`, ...,
  any hyperparameter named `*epochs`) is set to 1 through the spec's overrides, so `variant`
  lists them; SMoPE keeps 2 epochs, the fewest with which its task-0 dense warm-up
  (int(epochs / 2) epochs) runs at all;
- the first tasks only (`tasks=k`) add `first_tasks: k` to a copy of the protocol: the
  stream, classes per task, head and hyperparameters stay those of the full protocol (pool
  sizes that follow the task count included), and only the first k tasks are trained and
  evaluated (a k x k matrix). A protocol with num_tasks=k would instead change the classes per
  task and every stream-derived hyperparameter: not the real shape.

Three sizes. The full dry run (`run_suite.py smoke`, `make smoke`): every task of every real
protocol at 224 px. Its 2-task form (`tasks=2` on cifar100-10t, also part of `make smoke`):
every method through both tasks at 224 px, minutes on a CPU. The reduced form CI runs
(tests/test_smoke.py): the same 2 tasks with the backbone fed CIFAR-100's own 32 px
(`REDUCED_BACKBONE`, `sup21k@32`: every layer, width and head of ViT-B/16, the position
embedding on a 2 x 2 patch grid instead of 14 x 14), so that every method still goes through
training and every per-task stage with the real protocol, parameter shapes and hyperparameters for
about a fortieth of the compute per image; the lower bound alone runs at the real 224 px there,
for the full-resolution input path.
Such runs can never pass for results: their label is "<method> [smoke]", their variant is
never empty, their weights are random, and they go to their own store (`STORE`), never to the
published records. Each run also gives one smoke record (`SmokeRun.smoke`, the schema of
`leaderboard/smoke/`), which the caller writes (this package never imports the leaderboard).
"""
from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from methods import backbones, registry

from .devices import device_name, resolve_device
from .errors import SweepError
from .record import REAL_PROTOCOLS, seal_record
from .reference_record import REFERENCE_KEY
from .runner import RunOptions, RunSpec, method_hparams, run, versions
from .schema import PROTOCOL_DIR, load_protocol
from .sweep import Store

BACKBONE = "sup21k"
#: The reduced (CI) form's backbone: ViT-B/16 fed 32 px inputs (see the module docstring).
REDUCED_BACKBONE = f"{BACKBONE}@32"
STORE = "results/smoke.sqlite"
DATA_ROOT = "results/smoke-data"
LABEL_SUFFIX = " [smoke]"
#: Epoch counts below 1 skip no stage, except where a method derives a stage's epochs from them.
#: SMoPE's task-0 dense warm-up trains int(epochs / 2) epochs: it needs epochs >= 2 to run.
_MIN_EPOCHS = {"smope": 2}


def smoke_overrides(method: str, protocol: str) -> dict[str, int]:
    """The hyperparameter overrides of `method`'s dry run on `protocol`: every epoch count of its
    real configuration (any hyperparameter named `epochs` or `*_epochs`) lowered to 1 (SMoPE's
    `epochs` to 2); nothing else changes."""
    proto = load_protocol(protocol)
    hp = method_hparams(method, proto)
    out = {}
    for key, value in hp.items():
        if key == "epochs" or key.endswith("_epochs"):
            fewest = _MIN_EPOCHS.get(method, 1) if key == "epochs" else 1
            if isinstance(value, int) and value > fewest:
                out[key] = fewest
    return out


def write_data(dataset: str, root: str | os.PathLike, train_per_class: int, test_per_class: int,
               seed: int = 0) -> dict[str, Any]:
    """Write `dataset` in its real format and resolution under `root` (every class, the given
    images per class); returns the protocol fields the synthetic copy needs (ImageNet-R: its
    `split_file`, since the shipped split lists 30,000 files)."""
    from benchmarks import synthetic

    root = Path(root)
    if dataset == "cifar100":
        synthetic.write_cifar100(root, train_per_class=train_per_class,
                                 test_per_class=test_per_class, seed=seed)
        return {}
    if dataset == "imagenet_r":
        _, split = synthetic.write_imagenet_r_coda(root, train_per_class=train_per_class,
                                                   test_per_class=test_per_class, seed=seed,
                                                   real_size=True)
        return {"split": None, "split_file": str(split.resolve())}
    if dataset == "cub200":
        # write_cub200 alternates train / test per class, starting with train
        if not 0 <= train_per_class - test_per_class <= 1:
            raise SweepError(f"CUB-200's synthetic tree alternates train and test images, so "
                             f"train_per_class must be test_per_class or one more; got "
                             f"{train_per_class} train / {test_per_class} test")
        synthetic.write_cub200(root, num_classes=200, per_class=train_per_class + test_per_class,
                               seed=seed, real_size=True)
        return {}
    raise SweepError(f"no synthetic writer for data set {dataset!r}; the dry run covers "
                     f"{', '.join(REAL_PROTOCOLS)}")


def smoke_protocol(name: str, root: str | os.PathLike, fields: dict[str, Any],
                   tasks: int | None = None) -> Path:
    """A copy of shipped protocol `name` (same name, so the methods' defaults for it apply and the
    record's variant lists what differs) with `fields` replaced and, for the reduced form,
    `first_tasks: tasks`; written to `root/protocols/<name>.yaml`."""
    raw = yaml.safe_load((PROTOCOL_DIR / f"{name}.yaml").read_text())
    for key, value in fields.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    if tasks is not None:
        raw["first_tasks"] = int(tasks)
    path = Path(root) / "protocols" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_protocol(path)  # validated now, not in the middle of a dry run
    return path.resolve()


def _check(protocols: Sequence[str], methods: Sequence[str], tasks: int | None,
           train_per_class: int, test_per_class: int) -> tuple[list[str], list[str]]:
    protocols = list(REAL_PROTOCOLS) if list(protocols) == ["all"] else list(protocols)
    unknown = [p for p in protocols if p not in REAL_PROTOCOLS]
    if unknown or not protocols:
        raise SweepError(f"the dry run covers the real protocols {', '.join(REAL_PROTOCOLS)} "
                         f"(or 'all'); got {', '.join(unknown) or 'none'}")
    methods = registry.names() if list(methods) == ["all"] else list(methods)
    if not methods:
        raise SweepError("no method given for the dry run")
    for m in methods:
        registry.get(m)  # unknown names fail here, with the list of valid ones
    for p in protocols:
        n = load_protocol(p).num_tasks
        if tasks is not None and (isinstance(tasks, bool) or not 1 <= tasks <= n):
            raise SweepError(f"tasks must be in 1..{n} for {p} (or None for all), got {tasks!r}")
    for what, n in (("train", train_per_class), ("test", test_per_class)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SweepError(f"{what}_per_class must be a positive integer, got {n!r}")
    return protocols, methods


def smoke_specs(protocols: Sequence[str] = ("all",), methods: Sequence[str] = ("all",), *,
                data_root: str | os.PathLike = DATA_ROOT, tasks: int | None = None, seed: int = 0,
                train_per_class: int = 2, test_per_class: int = 1,
                backbone: str = BACKBONE) -> list[RunSpec]:
    """Write the synthetic data and the protocol copies under `data_root`, and return the dry
    run's specs, protocol by protocol (in the order given), method by method, on `backbone`
    (`BACKBONE`, or `REDUCED_BACKBONE` for the reduced form)."""
    protocols, methods = _check(protocols, methods, tasks, train_per_class, test_per_class)
    backbones.get_spec(backbone)  # an unknown name or input size fails here, not in every run
    root = Path(data_root)
    written: dict[str, dict[str, Any]] = {}
    specs = []
    for name in protocols:
        dataset = load_protocol(name).dataset
        if dataset not in written:
            written[dataset] = write_data(dataset, root, train_per_class, test_per_class, seed)
        path = smoke_protocol(name, root, written[dataset], tasks)
        for m in methods:
            specs.append(RunSpec(str(path), backbone, m, seed, smoke_overrides(m, name),
                                 label=m + LABEL_SUFFIX))
    return specs


def is_complete(record: dict[str, Any], tasks: int) -> bool:
    """A finished run: status ok, a `tasks` x `tasks` accuracy matrix with every entry j <= i a
    finite number (and None above), and finite paper metrics."""
    acc = record.get("acc_matrix")
    if record.get("status") != "ok" or not isinstance(acc, list) or len(acc) != tasks:
        return False
    for j, row in enumerate(acc):
        if not isinstance(row, list) or len(row) != tasks:
            return False
        for i, v in enumerate(row):
            if (v is None) != (j > i) or (v is not None and not math.isfinite(v)):
                return False
    metrics = record.get("metrics") or {}
    return all(isinstance(metrics.get(m), (int, float)) and math.isfinite(metrics[m])
               for m in ("faa", "caa", "ffm", "bwt", "final_acc"))


@dataclass
class SmokeRun:
    """One dry run: its spec, the run record (None if it raised), the smoke record, and the
    traceback of a run that raised."""
    spec: RunSpec
    record: dict[str, Any] | None
    smoke: dict[str, Any]
    error: str | None = None
    reference: dict[str, Any] | None = None  # its reference record, with `reference_batch_sizes`

    def line(self) -> str:
        """One line for the console."""
        s = self.smoke
        what = f"{s['protocol']:<15} {s['backbone']} {s['method']:<12} {s['tasks']:>2} tasks"
        if s["complete"]:
            return f"{what}: complete in {s['wall_s']:.1f} s"
        return f"{what}: FAILED after {s['wall_s']:.1f} s: {s.get('error', 'incomplete record')}"


def run_smoke(protocols: Sequence[str] = ("all",), methods: Sequence[str] = ("all",), *,
              store: Store, data_root: str | os.PathLike = DATA_ROOT, tasks: int | None = None,
              seed: int = 0, train_per_class: int = 2, test_per_class: int = 1,
              device: str = "auto", threads: int | None = None, eval_batch_size: int = 256,
              quiet: bool = True, backbone: str = BACKBONE,
              reference_batch_sizes: Sequence[int] = ()) -> Iterator[SmokeRun]:
    """Run the dry run in this process, one run at a time, and yield each as it ends.
    With `reference_batch_sizes`, each affected method's run is also re-evaluated under its
    reference modes (`protocols.reference_eval`); its reference record comes in `SmokeRun.reference`.

    A complete run's record goes to `store` (anything with has/put; keep it apart from the
    results, e.g. `RunStore(STORE)`); the caller writes each `SmokeRun.smoke` (e.g.
    `leaderboard.records.add_measurements([run.smoke], SMOKE_DIR)`). A run that raises is
    yielded with `complete: False` and its traceback, and the dry run goes on."""
    specs = smoke_specs(protocols, methods, data_root=data_root, tasks=tasks, seed=seed,
                        train_per_class=train_per_class, test_per_class=test_per_class,
                        backbone=backbone)
    options = RunOptions(data_root=str(data_root), weights_dir=None, device=device,
                         eval_batch_size=eval_batch_size, quiet=quiet, random_init=True,
                         threads=threads)
    with_reference = replace(options, reference_batch_sizes=tuple(reference_batch_sizes))
    where = device_name(resolve_device(device))
    for spec in specs:
        proto = load_protocol(spec.protocol)
        n_tasks = proto.first_tasks or proto.num_tasks
        start = time.perf_counter()
        record, error = None, None
        try:
            affected = reference_batch_sizes and registry.get(spec.method).REFERENCE_MODES
            record = run(spec, with_reference if affected else options)
        except Exception as e:  # one broken method must not hide the others' results
            error = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        wall = time.perf_counter() - start
        reference = record.pop(REFERENCE_KEY, None) if record is not None else None
        complete = record is not None and is_complete(record, n_tasks)
        if complete:
            store.put(seal_record(record))
        smoke = {"kind": "smoke",
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "device": where, "protocol": proto.name, "backbone": spec.backbone,
                 "method": spec.method, "tasks": n_tasks, "wall_s": round(wall, 1),
                 "complete": complete, "versions": versions(),
                 "threads": torch.get_num_threads(),
                 "images_per_class": {"train": train_per_class, "test": test_per_class}}
        if record is not None:
            smoke["run_key"] = record["key"]
        if reference is not None:
            smoke["reference_evaluations"] = len(reference["evaluations"])
        if not complete:
            smoke["error"] = (error.strip().splitlines()[-1] if error
                              else "the run ended without a complete record")
        yield SmokeRun(spec, record, smoke, error, reference)
