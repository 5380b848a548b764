"""A trained run evaluated again as the public codes evaluate it: the reference modes at several
test batch sizes, inside the run, beside its own evaluation (`RunOptions.reference_batch_sizes`).

Why inside the run: no checkpoint is stored, so the model the records describe exists only while
its run does. After each task's own evaluation (per sample, through Avalanche and the run's
predictions plugin), `ReferenceEvaluation.after_task` scores the tasks seen so far again with a
plain loop (`PromptStrategy.accuracy`), which no plugin, logger or metric sees, under
`torch.random.fork_rng`: each pass over a loader draws a seed from the global RNG
(`methods.loading`), and without the fork the extra passes would change every later training
draw. So the run's own accuracy matrix, metrics and record stay bit-identical to a run without
re-evaluations (tests/test_reference_eval.py), and the reference record repeats that matrix as
the proof that the model re-evaluated is the record's.

What is evaluated (`plan_evaluations`): per sample, each single mode and the modes the protocol's
reference configuration turns on together (`REFERENCE_TESTS`), at each asked test batch size plus
that configuration's own; and that combination once more at batch 1, where every mode is the
per-sample evaluation (a runtime check the reference page reports). Every test image is scored
once per evaluation, one task's test set at a time as the reference codes' test loops go, in the
data set's own order within the task (`protocols.reference_record.DATASET_ORDER`, read from
`benchmarks.SAMPLE_INDEX`): the order decides which images share a batch, hence what a batch vote
or the mixing does (the stream's class-grouped order would hand a vote whole batches of one class).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import SAMPLE_INDEX
from methods import registry

from .errors import SweepError
from .metrics import summarize
from .reference_record import DATASET_ORDER, validate_reference

__all__ = ["DEFAULT_BATCH_SIZES", "Evaluation", "ReferenceEvaluation", "affected_methods", "mode_sets",
           "plan_evaluations", "check_methods", "check_batch_sizes", "in_dataset_order"]

#: the test batch sizes every mode set is evaluated at, besides the reference configuration's own
#: (and batch 1 for its modes): l2p-pytorch's 16, and 64 for the trend
DEFAULT_BATCH_SIZES: tuple[int, ...] = (16, 64)


@dataclass(frozen=True)
class Evaluation:
    """One re-evaluation: the reference modes on (sorted; () = per sample) and the test batch size."""
    modes: tuple[str, ...]
    batch_size: int


def affected_methods() -> list[str]:
    """The registered methods whose public code has a batch-dependent test behaviour."""
    return [m for m in registry.names() if registry.get(m).REFERENCE_MODES]


def mode_sets(method: str, protocol: str) -> list[tuple[str, ...]]:
    """Each single reference mode of `method`, then the modes the reference configuration of
    `protocol` turns on together (all of them where no configuration is known), each sorted."""
    cls = registry.get(method)
    test = cls.REFERENCE_TESTS.get(protocol)
    sets = [(m,) for m in sorted(cls.REFERENCE_MODES)]
    combined = tuple(sorted(test.modes if test else cls.REFERENCE_MODES))
    return sets + ([combined] if combined and combined not in sets else [])


def plan_evaluations(method: str, protocol: str,
                     batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> list[Evaluation]:
    """The re-evaluations of one run (module docstring), per sample first."""
    check_methods([method])
    check_batch_sizes(batch_sizes)
    cls = registry.get(method)
    test = cls.REFERENCE_TESTS.get(protocol)
    sizes = sorted(set(batch_sizes) | ({test.batch_size} if test else set()))
    sets = mode_sets(method, protocol)
    plan = [Evaluation((), b) for b in sizes] + [Evaluation(s, b) for s in sets for b in sizes]
    if 1 not in sizes:
        plan.append(Evaluation(sets[-1], 1))
    return plan


def check_methods(methods: Sequence[str]) -> None:
    """SweepError naming the methods that have no reference mode to be evaluated under."""
    bad = sorted({m for m in methods if not registry.get(m).REFERENCE_MODES})
    if bad:
        raise SweepError(f"{', '.join(bad)}: no reference modes (the public code evaluates per sample); methods "
                         f"with reference modes: {', '.join(affected_methods())}")


def check_batch_sizes(batch_sizes: Sequence[int]) -> None:
    """SweepError unless `batch_sizes` are positive integers."""
    bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise SweepError(f"test batch sizes must be positive integers, got {', '.join(map(repr, bad))}")


def in_dataset_order(dataset) -> tuple[Any, list[int]]:
    """`dataset` (one task's test set, an Avalanche dataset) reordered into its data set's own
    order, and the data-set index of each of its images in that order."""
    if not hasattr(dataset, SAMPLE_INDEX):
        raise ValueError(f"the test set carries no `{SAMPLE_INDEX}` (each image's index in its data set), so "
                         "its images cannot be batched in the data set's order; build the stream with "
                         "benchmarks.build_stream")
    index = [int(v) for v in getattr(dataset, SAMPLE_INDEX)]
    order = sorted(range(len(index)), key=index.__getitem__)
    return dataset.subset(order), [index[k] for k in order]


def _fork_rng(device: torch.device):
    """Fork the global CPU RNG (and the run's CUDA device's) around the re-evaluations."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index if device.index is not None
                                              else torch.cuda.current_device()])
    return torch.random.fork_rng(devices=[])


class ReferenceEvaluation:
    """The re-evaluations of one run: `after_task` after each task's own evaluation, `record` at
    the end (the reference record of the run's record)."""

    def __init__(self, strategy, protocol: str, num_tasks: int,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES):
        self.strategy = strategy
        self.cls = type(strategy)
        self.protocol = protocol
        self.plan = plan_evaluations(self.cls.name, protocol, batch_sizes)
        self.acc = {ev: [[None] * num_tasks for _ in range(num_tasks)] for ev in self.plan}
        self.order: dict[int, list[int]] = {}  # task -> data-set indices, in the order batched
        self.seconds = 0.0

    def after_task(self, task: int, test_stream) -> None:
        """Score tasks 0..`task` (`test_stream`, one experience each) under every planned evaluation."""
        start = time.perf_counter()
        with _fork_rng(torch.device(self.strategy.device)):
            for j, exp in enumerate(test_stream):
                data, indices = in_dataset_order(exp.dataset)
                self.order.setdefault(j, indices)
                for ev in self.plan:
                    with self.strategy.reference_mode(*ev.modes):
                        self.acc[ev][j][task] = self.strategy.accuracy(data, ev.batch_size)
        self.seconds += time.perf_counter() - start

    def record(self, run_record: dict[str, Any]) -> dict[str, Any]:
        """The reference record of `run_record` (the run these evaluations were made in)."""
        test = self.cls.REFERENCE_TESTS.get(self.protocol)
        order = json.dumps([self.order[j] for j in sorted(self.order)], separators=(",", ":"))
        total = run_record["timings"]["total_s"]
        out = {
            **{k: run_record[k] for k in ("key", "protocol", "backbone", "method", "label", "table", "seed",
                                          "acc_matrix", "device", "threads", "versions", "created")},
            "reference_modes": dict(self.cls.REFERENCE_MODES),
            "reference_test": (None if test is None else
                               {"modes": sorted(test.modes), "batch_size": test.batch_size, "source": test.source}),
            "test_order": {"rule": DATASET_ORDER, "sha256": hashlib.sha256(order.encode()).hexdigest()},
            "evaluations": [{"modes": list(ev.modes), "batch_size": ev.batch_size, "order": DATASET_ORDER,
                             "acc_matrix": self.acc[ev], "metrics": summarize(self.acc[ev])}
                            for ev in self.plan],
            "timings": {"run_s": total, "reference_s": round(self.seconds, 3)},
            **({"code": run_record["code"]} if "code" in run_record else {}),
        }
        validate_reference(out)  # exactly REFERENCE_FIELDS, each well formed
        return out
