"""One run: `RunSpec` (protocol, backbone, method, seed, overrides) -> `RunRecord` (a dict).

A run is a pure function of its spec plus code and data versions, so it can run in this process,
a worker process, a Ray worker or a Slurm job and come back as a record; only the driver writes
the store. The run key is the sha256 of the resolved spec (protocol data fields, backbone, method,
resolved hyperparameters, seed, label, table): a sweep skips keys already stored.

Flow: build the stream for the seed -> load the frozen backbone -> create the method with the
stream's facts -> `strategy.fit()` (train each task, then evaluate every task seen so far) -> the
accuracy matrix from the evaluation's own predictions -> the paper metrics
(`protocols.metrics.summarize`) -> the record. The driver, not the run, stamps the user's command
line on it (a Ray or Slurm worker would otherwise record its own).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import build_stream
from methods import backbones, registry

from .code_identity import code_identity, git_state
from .cost import cost_row
from .devices import device_name, resolve_device
from .metrics import summarize, task_decomposition
from .record import COST_FIELDS, complete_record, utc_now
from .reference_eval import ReferenceEvaluation
from .reference_record import REFERENCE_KEY
from .schema import Protocol, available, load_protocol
from .work import run_gflops, run_work


@dataclass(frozen=True)
class RunSpec:
    protocol: str
    backbone: str
    method: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)  # the user's --set
    label: str = ""  # defaults to the method name; ablation variants carry their own label
    table: str = "main"  # "main" or "ablation:<name>"
    position: int = field(default=0, compare=False)  # rung of an ablation ladder (display only)
    precision: str = "fp32"  # "bf16": autocast (changes numerics, so it is part of the key)
    rung: dict[str, Any] = field(default_factory=dict, hash=False)  # an ablation rung's overrides

    @property
    def display_label(self) -> str:
        return self.label or self.method


@dataclass(frozen=True)
class RunOptions:
    """How to run (never changes a result, so not part of the run key)."""
    data_root: str | None = "data"
    system_copy: bool = True  # False: a --data-root the user gave is never replaced by the system copy
    weights_dir: str | None = "pretrained"
    device: str = "auto"
    eval_batch_size: int = 256
    quiet: bool = False
    download: bool = False
    allow_download: bool = False
    random_init: bool = False  # backbone without weights: tests, cost and dry runs (sha256 says so)
    threads: int | None = None  # torch CPU threads for this run (None: torch's default)
    log_dir: str | None = None  # each run's evaluation log goes to a file here (see log_path)
    progress: bool = False  # a progress bar over the run's tasks (one process, a terminal)
    loader_workers: int | None = None  # DataLoader worker processes (None: by device, methods.loading)
    # test batch sizes at which to evaluate the trained model again under its method's reference
    # modes after each task (protocols.reference_eval); () = none. The record then comes back with
    # its reference record under REFERENCE_KEY, and is otherwise the same record
    reference_batch_sizes: tuple[int, ...] = ()


def method_hparams(method: str, protocol: Protocol, *overrides: dict[str, Any]) -> dict[str, Any]:
    """`method`'s resolved hyperparameters on `protocol`: its defaults for the protocol, what
    follows from the stream (tasks, classes per task), the protocol YAML's settings, then
    `overrides` in order."""
    return registry.resolve_hparams(
        method, protocol.name, protocol.methods.get(method, {}), *overrides,
        num_tasks=protocol.num_tasks, classes_per_task=protocol.classes_per_task)


def resolve(spec: RunSpec, protocol: Protocol | None = None) -> dict[str, Any]:
    """The resolved spec: everything that defines the result, hyperparameters made explicit."""
    protocol = protocol or load_protocol(spec.protocol)
    hparams = method_hparams(spec.method, protocol, spec.rung, spec.overrides)
    resolved = {"protocol": protocol.data_spec(), "backbone": spec.backbone, "method": spec.method,
                "hparams": hparams, "seed": int(spec.seed), "label": spec.display_label,
                "table": spec.table}
    if spec.precision != "fp32":  # only when set, so fp32 keys stay what they always were
        resolved["precision"] = spec.precision
    return resolved


def variant(spec: RunSpec, protocol: Protocol | None = None) -> dict[str, Any]:
    """What makes this run's configuration differ from the default one of its (protocol name,
    backbone, method, label, table) row: the protocol's data fields where a user's YAML reuses a
    shipped protocol's name, the hyperparameters the user or that YAML changed, and the precision.
    {} for the default configuration. It labels the run's row and never lets a changed
    configuration pass for the default one."""
    protocol = protocol or load_protocol(spec.protocol)
    reference = protocol
    out: dict[str, Any] = {}
    if not protocol.shipped and protocol.name in available():
        reference = load_protocol(protocol.name)
        ours, theirs = _flat(protocol.data_spec()), _flat(reference.data_spec())
        out.update({f"protocol.{k}": v for k, v in sorted(ours.items()) if theirs.get(k) != v})
        out.update({f"protocol.{k}": None for k in sorted(set(theirs) - set(ours))})
    hp = method_hparams(spec.method, protocol, spec.rung, spec.overrides)
    default = method_hparams(spec.method, reference, spec.rung)
    out.update({k: v for k, v in hp.items() if default.get(k) != v})
    if spec.precision != "fp32":
        out["precision"] = spec.precision
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_key(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def spec_key(spec: RunSpec) -> str:
    return run_key(resolve(spec))


class _SeedSlot:
    """Stands for the seed while a resolved spec is serialised once (`seed_keys`)."""
    TEXT = "promptcl-seed-slot-7f3a9c"

    def __str__(self) -> str:
        return self.TEXT


def seed_keys(resolved: dict[str, Any]) -> Callable[[int], str]:
    """`seed -> run_key({**resolved, "seed": seed})` for one configuration, resolved once: its
    canonical JSON is cut where the seed goes, the part before it is hashed once, and each seed's
    key only hashes the seed and the rest. The keys are exactly `run_key`'s (the same bytes are
    hashed), at a small fraction of the cost: planning 100,000 seeds does not resolve the
    hyperparameters 100,000 times."""
    slot = json.dumps(str(_SeedSlot()))
    text = json.dumps({**resolved, "seed": _SeedSlot()}, sort_keys=True, default=str)
    if text.count(slot) != 1:  # the slot's text is in the spec itself (never, in practice)
        return lambda seed: run_key({**resolved, "seed": int(seed)})
    head, _, tail = text.partition(slot)
    prefix = hashlib.sha256(head.encode())

    def key(seed: int) -> str:
        h = prefix.copy()
        h.update(f"{int(seed)}{tail}".encode())
        return h.hexdigest()
    return key


def config_keys(spec: RunSpec, protocol: Protocol | None = None) -> Callable[[int], str]:
    """The run key of `spec`'s configuration at any seed (`seed_keys` of its resolved spec)."""
    return seed_keys(resolve(spec, protocol))


def record_identity(spec: RunSpec, protocol: Protocol | None = None,
                    resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run was asked to do (`protocols.record.IDENTITY_FIELDS`): the part of its record that
    a complete and a failed run share."""
    protocol = protocol or load_protocol(spec.protocol)
    resolved = resolved if resolved is not None else resolve(spec, protocol)
    return {"key": run_key(resolved), "protocol": protocol.name, "backbone": spec.backbone,
            "method": spec.method, "label": spec.display_label, "table": spec.table,
            "position": spec.position, "precision": spec.precision, "seed": int(spec.seed),
            "spec": resolved}


def code_version() -> str:
    """The git commit of the suite (+ '-dirty' with local changes) when the code runs from a
    checkout, else the package version (an installed copy is no checkout, even inside one)."""
    commit, dirty = git_state()
    return commit + ("-dirty" if dirty else "") if commit else _pkg_version("promptcl")


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "timm": _pkg_version("timm"), "avalanche": _pkg_version("avalanche-lib"),
            "promptcl": code_version()}


def log_path(log_dir: str | Path, key: str, spec: RunSpec) -> Path:
    """Where a run's log goes: `<log_dir>/<method>-seed<s>-<key prefix>.log`."""
    return Path(log_dir) / f"{spec.method}-seed{spec.seed}-{key[:12]}.log"


def _evaluator(quiet: bool, log_file=None):
    """Avalanche's evaluation logs: to the terminal unless quiet (`--verbose`), and to the run's
    log file when there is one (so a run can be read after the fact)."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import InteractiveLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    loggers = ([] if quiet else [InteractiveLogger()]) + ([TextLogger(log_file)] if log_file else [])
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=loggers)


class _Predictions:
    """Avalanche plugin that keeps each evaluation's logits, labels and experience ids: the one
    source of every accuracy of a record (the matrix, per class, and the split of the final
    accuracy into within-task prediction and task-identity inference)."""

    def __init__(self):
        from avalanche.core import SupervisedPlugin

        outer = self

        class Plugin(SupervisedPlugin):
            def before_eval(self, strategy, **kw):
                outer.logits, outer.true, outer.exp = [], [], []

            def after_eval_iteration(self, strategy, **kw):
                outer.logits.append(strategy.mb_output.detach().float().cpu())
                outer.true.append(strategy.mb_y.cpu())
                outer.exp.append(torch.full_like(outer.true[-1], strategy.experience.current_experience))

        self.plugin = Plugin()
        self.logits: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []
        self.exp: list[torch.Tensor] = []

    def _last(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.logits:
            raise RuntimeError("the strategy evaluated no test image")
        return torch.cat(self.logits), torch.cat(self.true), torch.cat(self.exp)

    def accuracy_by_task(self) -> dict[int, float]:
        """{task j: top-1 accuracy (%) on its test images} of the last evaluation."""
        logits, true, exp = self._last()
        right = logits.argmax(1) == true
        return {int(j): 100.0 * int(right[exp == j].sum()) / int((exp == j).sum())
                for j in torch.unique(exp)}

    def per_class(self) -> tuple[dict[str, float], float]:
        logits, true, _ = self._last()
        pred = logits.argmax(1)
        out = {str(int(c)): 100.0 * float((pred[true == c] == c).float().mean())
               for c in torch.unique(true)}
        return out, 100.0 * float((pred == true).float().mean())

    def decomposition(self, classes_per_task: list[list[int]]) -> dict[str, float]:
        """{"wtp", "tii"} in percent over the last evaluation (see metrics.task_decomposition)."""
        logits, true, _ = self._last()
        within, task_right = task_decomposition(logits.numpy(), true.numpy(), classes_per_task)
        return {"wtp": 100.0 * float(within.mean()), "tii": 100.0 * float(task_right.mean())}


def run(spec: RunSpec, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Execute one run and return its record (nothing is stored here)."""
    with contextlib.ExitStack() as stack:
        return _run(spec, options, stack)


def _run(spec: RunSpec, options: RunOptions, stack: contextlib.ExitStack) -> dict[str, Any]:
    from avalanche.training.determinism.rng_manager import RNGManager

    start = time.time()
    code = code_identity(spec.method)  # read as the run starts, before it can be edited
    if options.threads:
        torch.set_num_threads(options.threads)
    protocol = load_protocol(spec.protocol)
    resolved = resolve(spec, protocol)
    device = resolve_device(options.device)
    backbone = backbones.load(spec.backbone, options.weights_dir, options.random_init,
                              options.allow_download)
    bspec = backbone.spec
    mean, std = (bspec.mean, bspec.std) if protocol.normalize == "backbone" else (None, None)
    info = build_stream(
        protocol.dataset, data_root=options.data_root, seed=spec.seed,
        num_tasks=protocol.num_tasks, class_order=protocol.class_order,
        image_size=bspec.image_size, in_chans=bspec.in_chans, mean=mean, std=std,
        augment=protocol.augment, eval_resize=protocol.eval_resize,
        subsample=protocol.subsample, split=protocol.split, split_file=protocol.split_file,
        download=options.download, system_copy=options.system_copy)
    bm = info.benchmark

    key = run_key(resolved)
    log_file = None
    if options.log_dir:
        path = log_path(options.log_dir, key, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = stack.enter_context(path.open("w", encoding="utf-8"))
        log_file.write(f"{spec.protocol} {spec.backbone} {spec.display_label} seed {spec.seed} key {key}\n"
                       f"hparams {json.dumps(resolved['hparams'], sort_keys=True)}\n")
    RNGManager.set_random_seeds(spec.seed)
    preds = _Predictions()
    strategy = registry.create(
        spec.method, vit=backbone.vit, num_classes=info.num_classes, hparams=resolved["hparams"],
        device=device, eval_mb_size=options.eval_batch_size, evaluator=_evaluator(options.quiet, log_file),
        plugins=[preds.plugin], precision=spec.precision, num_tasks=protocol.num_tasks,
        classes_per_task=protocol.classes_per_task, loader_workers=options.loader_workers)

    T = protocol.num_tasks
    train_stream, test_stream = bm.train_stream, bm.test_stream
    if protocol.first_tasks is not None:  # a dry run's reduced form: the stream's first k tasks
        T = protocol.first_tasks
        train_stream, test_stream = train_stream[:T], test_stream[:T]
    acc: list[list[float | None]] = [[None] * T for _ in range(T)]
    reference = (ReferenceEvaluation(strategy, protocol.name, T, options.reference_batch_sizes)
                 if options.reference_batch_sizes else None)
    tasks = stack.enter_context(tqdm(total=T, desc=f"{spec.display_label} seed {spec.seed}", unit="task",
                                     leave=False, disable=not options.progress))
    for i in strategy.fit(train_stream, test_stream):
        tasks.update(1)
        by_task = preds.accuracy_by_task()
        for j in range(i + 1):
            acc[j][i] = by_task[j]
        if reference is not None:
            reference.after_task(i, test_stream[:i + 1])

    per_class, final_acc = preds.per_class()
    metrics = summarize(acc)
    metrics["final_acc"] = final_acc
    metrics.update(preds.decomposition(info.classes_per_task))
    # counted after the last evaluation, on a fresh copy of the method: nothing here can touch
    # the run's numbers (the counting builds parameters, which draws from the RNG)
    cost = cost_row(spec.method, backbone.vit, info.num_classes, resolved["hparams"], device=device)
    # the processor too: numbers can differ in the last bits between CPU models (one test image of
    # 95 published fmnist-5t runs flips between an AMD EPYC and an Intel Xeon)
    dev = device_name(device)
    extra_s = reference.seconds if reference is not None else 0.0  # not the run's own time
    record = complete_record(
        record_identity(spec, protocol, resolved),
        variant=variant(spec, protocol), role=type(strategy).role, metrics=metrics, acc_matrix=acc,
        per_class_acc=per_class, class_order=info.class_order, classes_per_task=info.classes_per_task,
        cost={k: cost[k] for k in COST_FIELDS},
        timings={"train_s": round(strategy.seconds["train"], 3),
                 "eval_s": round(strategy.seconds["eval"], 3),
                 "total_s": round(time.time() - start - extra_s, 3)},
        versions=versions(), backbone_sha256=backbone.sha256, backbone_source=backbone.source,
        device=dev, data_hash=info.data_hash, data_source=info.data_source,
        eval_batch_size=options.eval_batch_size,
        **({"split": {"name": info.split, "sha256": info.split_hash}} if info.split else {}),
        threads=torch.get_num_threads(), created=utc_now(), code=code,
        run_gflops=run_gflops(run_work(protocol, spec.method, resolved["hparams"]), cost))
    if reference is not None:
        record[REFERENCE_KEY] = reference.record(record)
    return record
