"""Leaderboard figures: FAA bars per protocol x backbone and a critical-difference diagram.

Why the object API with an explicit Agg canvas instead of pyplot: rendering must work headless
(CI, Slurm nodes) and must not change the global matplotlib backend of whoever imports us.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from .stats import FriedmanResult

__all__ = ["faa_bar", "cd_diagram"]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": "promptcl leaderboard"})
    return path


def faa_bar(rows: pd.DataFrame, path: str | Path, title: str = "", metric: str = "faa") -> Path:
    """Bar chart of the seed-mean metric with +- sample std error bars, best first.

    ``rows`` is the slice of ``stats.aggregate`` for one protocol x backbone x table.
    """
    rows = rows.sort_values([f"{metric}_mean", "label"], ascending=[False, True])
    labels = rows["label"].astype(str).tolist()
    means = rows[f"{metric}_mean"].to_numpy(dtype=float)
    stds = np.nan_to_num(rows[f"{metric}_std"].to_numpy(dtype=float))
    fig = Figure(figsize=(max(4.0, 0.7 * len(labels) + 1.5), 3.2))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x, means, yerr=stds, capsize=3, color="#4C72B0")
    for xi, m, s in zip(x, means, stds):
        ax.annotate(f"{m:.1f}", (xi, m + s), textcoords="offset points", xytext=(0, 3), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"{metric.upper()} (%), mean ± std over seeds")
    if len(means):
        lo = float(np.nanmin(means - stds))
        hi = float(np.nanmax(means + stds))
        pad = max(1.0, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - 3 * pad), min(100.0, hi + pad) if hi <= 100 else hi + pad)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _cliques(ranks: list[float], cd: float) -> list[tuple[int, int]]:
    """Maximal runs i..j (in rank order) whose rank spread is below CD: not significantly different."""
    out: list[tuple[int, int]] = []
    n = len(ranks)
    for i in range(n):
        j = i
        while j + 1 < n and ranks[j + 1] - ranks[i] < cd:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in out):
            out.append((i, j))
    return out


def cd_diagram(result: "FriedmanResult", path: str | Path):
    """Demsar-style critical-difference diagram: average ranks on an axis, CD bar, and lines
    joining methods whose average ranks differ by less than CD (Nemenyi, not significant)."""
    order = sorted(result.avg_ranks, key=lambda k: (result.avg_ranks[k], k))
    ranks = [result.avg_ranks[k] for k in order]
    k = max(len(order), 2)
    cliques = _cliques(ranks, result.cd) if result.cd is not None else []
    n_left = (len(order) + 1) // 2
    top = -0.3 - 0.08 * len(cliques)  # method lines start below the clique bars
    fig = Figure(figsize=(6.0, 1.0 + 0.25 * n_left + 0.1 * len(cliques)))
    ax = fig.add_subplot()
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(top - 0.3 * n_left, 1.3)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.12, color="black", lw=1)
        ax.text(r, 0.2, str(r), ha="center", va="bottom", fontsize=8)
    for i, (lab, r) in enumerate(zip(order, ranks)):
        left = i < n_left
        depth = top - 0.3 * (i if left else len(order) - 1 - i)
        x_end = 0.6 if left else k + 0.4
        ax.plot([r, r, x_end], [0, depth, depth], color="black", lw=0.8)
        ax.text(x_end + (-0.05 if left else 0.05), depth, f"{lab} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=8)
    if result.cd is not None:
        ax.plot([1, 1 + result.cd], [0.9, 0.9], color="black", lw=1.5)
        ax.text(1 + result.cd / 2, 0.95, f"CD = {result.cd:.2f}", ha="center", va="bottom", fontsize=8)
        for c, (i, j) in enumerate(cliques):
            y = -0.15 - 0.08 * c
            ax.plot([ranks[i] - 0.03, ranks[j] + 0.03], [y, y], color="tab:red", lw=3, alpha=0.8)
    title = f"{result.metric.upper()} average rank over {result.n_blocks} protocol x backbone blocks"
    if result.p is not None:
        title += f"; Friedman p = {result.p:.3g}"
    ax.set_title(title, fontsize=9)
    return _save(fig, path), True


def faa_dots(rows, path, title=""):  # TEMPORARY shim until the figures branch lands
    return faa_bar(rows, path, title), True
