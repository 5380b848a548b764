"""One run: `RunSpec` (protocol, backbone, method, seed, overrides) -> `RunRecord` (a dict).

A run is a pure function of its spec plus code and data versions, so it can run in this process,
a worker process, a Ray worker or a Slurm job and come back as a record; only the driver writes
the store. The run key is the sha256 of the resolved spec (protocol data fields, backbone, method,
resolved hyperparameters, seed, label, table): a sweep skips keys already stored.

Flow: build the stream for the seed -> load the frozen backbone -> create the method -> for each
task, train, then evaluate every task seen so far (Avalanche's per-experience accuracy) -> the
paper metrics from the full accuracy matrix (`protocols.metrics.summarize`) -> the record.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from benchmarks import build_stream
from methods import backbones, registry

from .metrics import summarize, task_decomposition
from .schema import Protocol, load_protocol

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunSpec:
    protocol: str
    backbone: str
    method: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    label: str = ""  # defaults to the method name; ablation variants carry their own label
    table: str = "main"  # "main" or "ablation:<name>"
    position: int = field(default=0, compare=False)  # rung of an ablation ladder (display only)
    precision: str = "fp32"  # "bf16": autocast (changes numerics, so it is part of the key)

    @property
    def display_label(self) -> str:
        return self.label or self.method


@dataclass(frozen=True)
class RunOptions:
    """How to run (never changes a result, so not part of the run key)."""
    data_root: str | None = "data"
    weights_dir: str | None = "pretrained"
    device: str = "auto"
    eval_batch_size: int = 256
    quiet: bool = False
    download: bool = False
    allow_download: bool = False
    random_init: bool = False  # backbone without weights: tests and cost only (sha256 says so)
    threads: int | None = None  # torch CPU threads for this run (None: torch's default)
    loader_workers: int | None = None  # DataLoader worker processes (None: by device, methods.loading)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve(spec: RunSpec, protocol: Protocol | None = None) -> dict[str, Any]:
    """The resolved spec: everything that defines the result, hyperparameters made explicit."""
    protocol = protocol or load_protocol(spec.protocol)
    hparams = registry.resolve_hparams(
        spec.method, protocol.name, protocol.methods.get(spec.method, {}), spec.overrides)
    resolved = {"protocol": protocol.data_spec(), "backbone": spec.backbone, "method": spec.method,
                "hparams": hparams, "seed": int(spec.seed), "label": spec.display_label,
                "table": spec.table}
    if spec.precision != "fp32":  # only when set, so fp32 keys stay what they always were
        resolved["precision"] = spec.precision
    return resolved


def run_key(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def spec_key(spec: RunSpec) -> str:
    return run_key(resolve(spec))


def code_version() -> str:
    """The git commit of the suite (+ '-dirty' with local changes), else the package version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return _pkg_version("promptcl")


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "timm": _pkg_version("timm"), "avalanche": _pkg_version("avalanche-lib"),
            "promptcl": code_version()}


def _evaluator(quiet: bool):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                            loggers=[] if quiet else [InteractiveLogger()])


class _Predictions:
    """Avalanche plugin that keeps the last evaluation's logits: per-class accuracy, and the split
    of the final accuracy into within-task prediction and task-identity inference."""

    def __init__(self):
        from avalanche.core import SupervisedPlugin

        outer = self

        class Plugin(SupervisedPlugin):
            def before_eval(self, strategy, **kw):
                outer.logits, outer.true = [], []

            def after_eval_iteration(self, strategy, **kw):
                outer.logits.append(strategy.mb_output.detach().float().cpu())
                outer.true.append(strategy.mb_y.cpu())

        self.plugin = Plugin()
        self.logits: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []

    def per_class(self) -> tuple[dict[str, float], float]:
        pred, true = torch.cat(self.logits).argmax(1), torch.cat(self.true)
        out = {str(int(c)): 100.0 * float((pred[true == c] == c).float().mean())
               for c in torch.unique(true)}
        return out, 100.0 * float((pred == true).float().mean())

    def decomposition(self, classes_per_task: list[list[int]]) -> dict[str, float]:
        """{"wtp", "tii"} in percent over the last evaluation (see metrics.task_decomposition)."""
        within, task_right = task_decomposition(torch.cat(self.logits).numpy(),
                                                torch.cat(self.true).numpy(), classes_per_task)
        return {"wtp": 100.0 * float(within.mean()), "tii": 100.0 * float(task_right.mean())}


def _exp_acc(res: dict[str, float], j: int) -> float:
    key = f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"
    if key not in res:
        raise RuntimeError(f"evaluation returned no {key}; got {sorted(res)[:5]}...")
    return 100.0 * float(res[key])


def run(spec: RunSpec, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Execute one run and return its record (nothing is stored here)."""
    from avalanche.training.determinism.rng_manager import RNGManager

    start = time.time()
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
        download=options.download)
    bm = info.benchmark

    RNGManager.set_random_seeds(spec.seed)
    preds = _Predictions()
    strategy = registry.create(
        spec.method, vit=backbone.vit, num_classes=info.num_classes, hparams=resolved["hparams"],
        device=device, eval_mb_size=options.eval_batch_size, evaluator=_evaluator(options.quiet),
        plugins=[preds.plugin], precision=spec.precision, loader_workers=options.loader_workers)
    model = strategy.model
    cost = {
        "trainable_params": int(sum(p.numel() for _, p in model.added_parameters())),
        "head_params": int(sum(p.numel() for p in model.head.parameters())),
        "passes_train": type(strategy).passes_train,
        "passes_test": type(strategy).passes_test,
    }

    T = protocol.num_tasks
    acc: list[list[float | None]] = [[None] * T for _ in range(T)]
    train_s = eval_s = 0.0
    if type(strategy).trains_jointly:
        # one model trained on every task at once, evaluated after "task i" with the same
        # seen-classes mask as the others, so each column is an upper bound for that step
        t0 = time.time()
        strategy.train(list(bm.train_stream), eval_streams=[])
        train_s = time.time() - t0
        for i in range(T):
            t0 = time.time()
            strategy.seen_classes = sorted(c for chunk in info.classes_per_task[:i + 1] for c in chunk)
            res = strategy.eval(bm.test_stream[:i + 1])
            eval_s += time.time() - t0
            for j in range(i + 1):
                acc[j][i] = _exp_acc(res, j)
    else:
        for i, exp in enumerate(bm.train_stream):
            t0 = time.time()
            strategy.train(exp, eval_streams=[])
            train_s += time.time() - t0
            t0 = time.time()
            res = strategy.eval(bm.test_stream[:i + 1])
            eval_s += time.time() - t0
            for j in range(i + 1):
                acc[j][i] = _exp_acc(res, j)

    per_class, final_acc = preds.per_class()
    metrics = summarize(acc)
    metrics["final_acc"] = final_acc
    metrics.update(preds.decomposition(info.classes_per_task))
    dev = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return {
        "key": run_key(resolved), "protocol": protocol.name, "backbone": spec.backbone,
        "method": spec.method, "label": spec.display_label, "table": spec.table,
        "position": spec.position, "precision": spec.precision,
        "seed": int(spec.seed), "spec": resolved, "metrics": metrics, "acc_matrix": acc,
        "per_class_acc": per_class, "class_order": info.class_order,
        "classes_per_task": info.classes_per_task, "cost": cost,
        "timings": {"train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
                    "total_s": round(time.time() - start, 3)},
        "versions": versions(), "backbone_sha256": backbone.sha256, "backbone_source": backbone.source,
        "device": dev, "data_hash": info.data_hash, "eval_batch_size": options.eval_batch_size,
        "argv": sys.argv[1:], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
