"""How much a run feeds through the ViT: images per part of the run, counted once for both the
`dry-run` estimate (images / measured images per second) and the per-run training cost of a record
(images x counted GFLOPs per image).

A run of a protocol with T tasks (the first `first_tasks` of them when a protocol says so):

    train        = the training images of the tasks run x the method's `epochs`
    stage epochs = per task, its training images x the method's extra epochs (SMoPE's dense warm-up)
    stage passes = per task, its training images x the method's no-grad ViT passes (statistics,
                   HiDe's task-identity stage): `PromptStrategy.task_stages`
    eval         = after every task, the test images of the tasks seen so far

Image counts are the data sets' official split sizes (`benchmarks.facts`), capped by the
protocol's per-class `subsample` (balanced classes assumed: exact for CIFAR-100 and Fashion-MNIST,
an upper bound for CUB); a task's share is its share of the classes. Left out, each small next to
the ViT passes: re-fits of a linear head or of HiDe's TII MLP on stored features, k-means on
features, and backward passes (the per-image GFLOPs of a record are forward only).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from benchmarks import classes_per_exp, dataset_facts
from methods import registry

from .schema import Protocol

__all__ = ["RunWork", "split_sizes", "run_work", "run_gflops", "record_run_gflops"]


@dataclass(frozen=True)
class RunWork:
    """Images each part of one run feeds through the ViT (see the module docstring)."""

    train_images: float  # training images x epochs: training steps
    stage_epoch_images: float  # training images of the extra epochs: training steps too
    stage_pass_images: float  # image x no-grad ViT pass, one pass each
    eval_images: float  # test images evaluated, summed over the evaluations after every task


def split_sizes(protocol: Protocol) -> tuple[int, int]:
    """(training, test) images a run of `protocol` uses: the official split, capped per class by
    the protocol's `subsample` (classes assumed balanced)."""
    facts = dataset_facts(protocol.dataset)
    sub = protocol.subsample or {}
    train, test = facts.train_size, facts.test_size
    if sub.get("train_per_class") is not None:
        train = min(train, sub["train_per_class"] * facts.num_classes)
    if sub.get("test_per_class") is not None:
        test = min(test, sub["test_per_class"] * facts.num_classes)
    return train, test


def run_work(protocol: Protocol, method: str, hparams: Mapping[str, Any]) -> RunWork:
    """What one run of `method` with resolved `hparams` feeds through the ViT on `protocol`."""
    cls = registry.get(method)
    hp = cls.Hparams(**hparams)
    num_classes = dataset_facts(protocol.dataset).num_classes
    n_train, n_test = split_sizes(protocol)
    counts = classes_per_exp(num_classes, protocol.num_tasks)[: protocol.first_tasks or protocol.num_tasks]
    train = extra = passes = evaluation = 0.0
    seen = 0
    for t, k in enumerate(counts):
        images = n_train * k / num_classes
        stages = cls.task_stages(hp, t)
        train += images * hp.epochs
        extra += images * stages.extra_epochs
        passes += images * stages.no_grad_passes
        seen += k
        evaluation += n_test * seen / num_classes
    return RunWork(train, extra, passes, evaluation)


def run_gflops(work: RunWork, cost: Mapping[str, Any]) -> dict[str, float]:
    """A run's forward GFLOPs by part (a record's `run_gflops`) from its `work` and its per-image
    `cost` (`protocols.record.COST_FIELDS`): a training step costs `gflops_train` per image, a
    no-grad pass one of the `passes_test` passes of an evaluation, an evaluation `gflops_test`."""
    per_pass = float(cost["gflops_test"]) / max(1, int(cost["passes_test"]))
    out = {"train": work.train_images * float(cost["gflops_train"]),
           "stages": work.stage_epoch_images * float(cost["gflops_train"]) + work.stage_pass_images * per_pass,
           "eval": work.eval_images * float(cost["gflops_test"])}
    out["total"] = out["train"] + out["stages"] + out["eval"]
    return out


_PROTOCOL_FIELDS = {f.name for f in fields(Protocol)}


def record_run_gflops(record: Mapping[str, Any]) -> dict[str, float] | None:
    """`run_gflops` of a stored record that predates the field, counted from its resolved spec and
    its per-image cost with the method's code of now; None when that cannot be done (a method not
    registered here, a record without a cost)."""
    spec, cost = record.get("spec") or {}, record.get("cost") or {}
    data = spec.get("protocol")
    if not isinstance(data, Mapping) or not {"gflops_train", "gflops_test", "passes_test"} <= set(cost):
        return None
    if record.get("method") not in registry.names():
        return None
    try:
        protocol = Protocol(**{k: v for k, v in data.items() if k in _PROTOCOL_FIELDS})
        return run_gflops(run_work(protocol, record["method"], spec.get("hparams") or {}), cost)
    except (TypeError, ValueError, KeyError):  # a spec this code cannot read: no count, not a guess
        return None
