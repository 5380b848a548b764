"""Continual-learning metrics from the full accuracy matrix (docs/sources.md#metrics).

Why our own code and not Avalanche's metrics: Avalanche's forgetting is "first minus last", while
the prompt-CL papers report FFM as "best earlier accuracy minus final". Everything here is derived
from acc[j][i] = top-1 accuracy (%) on task j's test set after training task i, so every number in
a record can be recomputed from the stored matrix alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["summarize", "as_matrix", "task_decomposition"]


def as_matrix(acc: Any) -> np.ndarray:
    """Return acc as a float T x T array with NaN above the evaluated region (j > i).

    Entries with j > i (tasks not yet trained) are ignored whatever they hold, so callers may pass
    lists with ``None`` there, NaN-padded arrays, or full matrices. Entries with j <= i must be
    finite numbers: a hole there means the run is incomplete and its metrics would be wrong.
    """
    if isinstance(acc, np.ndarray):
        if acc.ndim != 2:
            raise ValueError(f"accuracy matrix must be 2-D (T x T), got an array of shape {acc.shape}")
        rows: Sequence[Any] = list(acc)
    elif isinstance(acc, Sequence) and not isinstance(acc, (str, bytes)):
        rows = acc
    else:
        raise ValueError(f"accuracy matrix must be a T x T list of lists or numpy array, got {type(acc).__name__}")
    t = len(rows)
    if t == 0:
        raise ValueError("accuracy matrix is empty: need at least one task (T >= 1)")
    out = np.full((t, t), np.nan, dtype=float)
    for j, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            raise ValueError(f"accuracy matrix row {j} is not a sequence: {row!r}")
        if len(row) != t:
            raise ValueError(
                f"accuracy matrix must be square (T x T, acc[j][i] = accuracy on task j after task i): "
                f"row {j} has {len(row)} entries, expected {t}")
        for i in range(j, t):  # only j <= i is defined
            v = row[i]
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"acc[{j}][{i}] must be a number (task {j} is evaluated after task {i}), got {v!r}") from None
            if not math.isfinite(f):
                raise ValueError(f"acc[{j}][{i}] must be finite (task {j} is evaluated after task {i}), got {v!r}")
            out[j, i] = f
    return out


def summarize(acc: Any) -> dict[str, float]:
    """FAA, CAA, FFM and BWT (percent) of one run from its accuracy matrix.

    With T tasks (1-based in the formulas, 0-based in code):
      FAA = mean_j acc[j][T]
      CAA = mean_i mean_{j<=i} acc[j][i]
      FFM = mean_{j<T} (max_{j<=i<T} acc[j][i] - acc[j][T])
      BWT = mean_{j<T} (acc[j][T] - acc[j][j])
    With a single task there is nothing to forget: ffm = bwt = 0.0.
    """
    a = as_matrix(acc)
    t = a.shape[0]
    last = t - 1
    faa = float(np.mean(a[:, last]))
    caa = float(np.mean([np.mean(a[: i + 1, i]) for i in range(t)]))
    if t == 1:
        return {"faa": faa, "caa": caa, "ffm": 0.0, "bwt": 0.0}
    ffm = float(np.mean([np.max(a[j, j:last]) - a[j, last] for j in range(last)]))
    bwt = float(np.mean([a[j, last] - a[j, j] for j in range(last)]))
    return {"faa": faa, "caa": caa, "ffm": ffm, "bwt": bwt}


def task_decomposition(logits: Any, labels: Any, classes_per_task: Sequence[Sequence[int]]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (within-task correct, task-identity correct), as HiDe-Prompt splits the
    class-incremental accuracy into within-task prediction (WTP) and task-identity inference (TII).

    WTP: the argmax over the classes of the image's own task is its label (the task-incremental
    accuracy, the task given). TII: the class-incremental prediction, the argmax over all of
    ``logits`` (masked as the evaluation masks them), falls in the image's own task. A method
    whose errors are mostly TII errors loses to the head's cross-task bias, not to its features.
    """
    logits = np.asarray(logits, dtype=float)
    labels = np.asarray(labels, dtype=int)
    n_classes = logits.shape[1]
    task_of = np.full(n_classes, -1)
    for t, chunk in enumerate(classes_per_task):
        task_of[list(chunk)] = t
    if (task_of[labels] < 0).any():
        raise ValueError("a label belongs to no task of classes_per_task")
    own = task_of[None, :] == task_of[labels][:, None]  # (B, C): the classes of each image's task
    within = np.where(own, logits, -np.inf).argmax(1) == labels
    task_right = task_of[logits.argmax(1)] == task_of[labels]
    return within, task_right
