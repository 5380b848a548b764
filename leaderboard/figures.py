"""Leaderboard figures: FAA dot plots, accuracy curves, accuracy matrices, accuracy-cost trade-off,
CD diagram.

Why the object API with an explicit Agg canvas instead of pyplot: rendering must work headless
(CI, Slurm nodes) and must not change the global matplotlib backend of whoever imports us.

Why a hash in every PNG: the leaderboard is committed, so re-rendering unchanged results must
leave the files byte for byte alone. Each figure function hashes its inputs (the data it draws
and ``FIGURE_VERSION``), stores the hash in the PNG's ``Source`` text chunk, and neither draws nor
writes when the file on disk already carries that hash. Bump ``FIGURE_VERSION`` whenever a
drawing changes, so that the next render redraws every figure once.

Why fixed colours: a reader follows a method from figure to figure and page to page, so a method
keeps one colour everywhere, whatever else a table holds (`row_colours`): the suite's methods
have theirs (`METHOD_COLOURS`), the rungs of an ablation ladder take theirs by rung, and any other
row (a plugin, a variant) one picked by a hash of its label, so adding a row never recolours another.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FixedLocator, NullFormatter

from protocols.record import HIGHER_IS_BETTER

from .output import atomic_file
from .stats import LOCAL_MARK

if TYPE_CHECKING:
    from .stats import FriedmanResult

__all__ = ["Drawn", "FIGURE_VERSION", "stored_digest", "SeenCurve", "seen_class_accuracy", "seen_class_curve", "faa_dots",
           "accuracy_curves", "accuracy_matrices", "tradeoff", "tradeoff_figure", "critical_difference",
           "METHOD_COLOURS", "row_colours", "colour_of", "batch_size_curves"]

#: Part of every figure's input hash: bump it whenever any drawing changes.
FIGURE_VERSION = "2"
_DPI = 120
_SOFTWARE = f"promptcl leaderboard figures {FIGURE_VERSION}"


class Drawn(NamedTuple):
    """Where a figure lives and whether this call wrote it (False: the file already showed these inputs)."""

    path: Path
    changed: bool


# ---------------------------------------------------------------------------------------------
# writing once


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"cannot hash {type(obj).__name__} in figure inputs")


def _digest(kind: str, payload: Any) -> str:
    text = json.dumps({"figure": kind, "version": FIGURE_VERSION, "data": payload}, sort_keys=True,
                      separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored_digest(path: str | Path) -> str | None:
    """The input hash a figure file carries, or None (no file, not a PNG of ours)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {}).get("Source")
    except (OSError, ValueError, SyntaxError):
        return None


def _draw_once(kind: str, payload: Any, path: str | Path, draw: Callable[[], Figure]) -> Drawn:
    """Draw and write ``path`` unless it already carries the hash of (kind, payload, FIGURE_VERSION).

    The bytes are deterministic: fixed dpi, no date in the metadata, Agg rendering.
    """
    path = Path(path)
    digest = _digest(kind, payload)
    if path.is_file() and stored_digest(path) == digest:
        return Drawn(path, False)
    fig = draw()
    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as fh:  # saved to a temporary file, renamed once complete
        fig.savefig(fh, format="png", dpi=_DPI, bbox_inches="tight",
                    metadata={"Software": _SOFTWARE, "Source": digest})
    return Drawn(path, True)


#: The suite's methods and bounds, each with the colour it keeps on every figure of every page
#: (matplotlib's tab20: a method and its lighter twin for the comparators of one family).
METHOD_COLOURS: dict[str, str] = {
    "head_only": "#7f7f7f", "joint": "#393939",
    "l2p": "#1f77b4", "l2p_pp": "#aec7e8", "deep_l2p_pp": "#17becf",
    "dualprompt": "#ff7f0e", "coda_prompt": "#2ca02c", "ovor": "#98df8a",
    "hide_prompt": "#9467bd", "norga": "#c5b0d5", "vq_prompt": "#8c564b", "smope": "#d62728",
}
#: An ablation ladder's rungs, by rung (position 0 first): a sequence that stays apart from itself.
LADDER_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                  "#ccb974", "#64b5cd")
#: Any other row (a plugin, a variant): the colour at a hash of its label (matplotlib's tab20b).
OTHER_COLOURS = ("#393b79", "#5254a3", "#6b6ecf", "#9c9ede", "#637939", "#8ca252", "#b5cf6b", "#cedb9c",
                 "#8c6d31", "#bd9e39", "#e7ba52", "#e7cb94", "#843c39", "#ad494a", "#d6616b", "#e7969c",
                 "#7b4173", "#a55194", "#ce6dbd", "#de9ed6")


def colour_of(label: str, position: int | None = None) -> str:
    """The colour of a row: its method's (`METHOD_COLOURS`, the local mark set aside), its rung's
    on an ablation ladder (`position`), else the one at a hash of its label."""
    base = label.removesuffix(LOCAL_MARK)
    if base in METHOD_COLOURS:
        return METHOD_COLOURS[base]
    if position is not None:
        return LADDER_COLOURS[int(position) % len(LADDER_COLOURS)]
    return OTHER_COLOURS[int(hashlib.sha256(base.encode("utf-8")).hexdigest(), 16) % len(OTHER_COLOURS)]


def row_colours(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """{label: colour} of the rows of one table (`stats.aggregate`'s rows: label, and position on an
    ablation ladder, whose rungs are coloured by rung)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    ladder = "position" in df and df["position"].nunique() > 1
    return {str(r["label"]): colour_of(str(r["label"]), int(r["position"]) if ladder else None)
            for _, r in df.iterrows()}


def _colours(labels: Iterable[str], colours: Mapping[str, str] | None) -> dict[str, str]:
    """`colours` for `labels`, `colour_of` for any label it lacks."""
    given = dict(colours or {})
    return {lab: given.get(lab) or colour_of(lab) for lab in labels}


def _frame(rows: pd.DataFrame | Iterable[Mapping[str, Any]], required: Sequence[str], what: str) -> pd.DataFrame:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: rows lack column(s) {missing}; give each row {list(required)} "
                         "(stats.aggregate gives the FAA columns)")
    return df


def _fmt_n(n: Any) -> str:
    return "" if n is None or (isinstance(n, float) and math.isnan(n)) else f"n={int(n)}"


# ---------------------------------------------------------------------------------------------
# FAA per method


def faa_dots(rows: pd.DataFrame | Iterable[Mapping[str, Any]], path: str | Path, title: str = "",
             metric: str = "faa", colours: Mapping[str, str] | None = None) -> Drawn:
    """Dot plot of the seed-mean ``metric`` with +- sample std error bars, best at the top.

    ``rows`` is the slice of ``stats.aggregate`` for one protocol x backbone x table (columns
    label, <metric>_mean, <metric>_std and optionally n). Dots instead of bars: the methods differ
    by a few points near 80%, which bars starting at zero would hide and bars not starting at zero
    would exaggerate. One seed gets no error bar (its spread is unknown, not zero).
    """
    df = _frame(rows, ["label", f"{metric}_mean", f"{metric}_std"], "faa_dots")
    if df.empty:
        raise ValueError("faa_dots needs at least one method row")
    df = df.assign(label=df["label"].astype(str))
    hib = HIGHER_IS_BETTER.get(metric, True)
    df = df.sort_values([f"{metric}_mean", "label"], ascending=[not hib, True])
    items = [{"label": r["label"], "mean": float(r[f"{metric}_mean"]), "std": float(r[f"{metric}_std"]),
              "n": (int(r["n"]) if "n" in df.columns and pd.notna(r["n"]) else None)}
             for _, r in df.iterrows()]
    colors = _colours((it["label"] for it in items), colours)
    payload = {"title": title, "metric": metric, "rows": items, "colours": colors}
    return _draw_once("faa_dots", payload, path, lambda: _draw_dots(items, title, metric, colors))


def _draw_dots(items: list[dict], title: str, metric: str, colors: Mapping[str, str]) -> Figure:
    fig = Figure(figsize=(6.4, 0.9 + 0.32 * max(len(items), 1)))
    ax = fig.add_subplot()
    ys = np.arange(len(items))[::-1]  # first item (best) at the top
    for y, it in zip(ys, items):
        single = it["n"] == 1 or math.isnan(it["std"])
        err = None if single else it["std"]
        ax.errorbar(it["mean"], y, xerr=err, fmt="o", color=colors[it["label"]], ecolor="0.35", elinewidth=1.2,
                    capsize=3, markersize=6)
        text = f"{it['mean']:.2f}" + ("" if single else f" ± {it['std']:.2f}")
        n = _fmt_n(it["n"])
        ax.annotate(f"{text}  {n}".rstrip(), (1.02, y), xycoords=("axes fraction", "data"), va="center",
                    ha="left", fontsize=8, annotation_clip=False)
    ax.set_yticks(ys, [it["label"] for it in items], fontsize=9)
    ax.set_ylim(-0.6, len(items) - 0.4)
    ax.margins(x=0.08)
    ax.set_xlabel(f"{metric.upper()} (%): mean ± sample std over seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
    ax.annotate(f"{better} is better", (1.0, 1.0), xycoords="axes fraction", xytext=(0, 3),
                textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.4")
    return fig


# ---------------------------------------------------------------------------------------------
# accuracy on seen classes after each task


@dataclass(frozen=True)
class SeenCurve:
    """Seen-class accuracy after each task over seeds: mean, band edges and what the band is.

    ``band`` is "std" (mean +- sample std, n >= 3), "range" (min-max, n = 2) or "none" (one seed;
    ``low`` and ``high`` are then None).
    """

    mean: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    n: int
    band: str


def seen_class_accuracy(acc_matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Accuracy on the classes seen so far after each task i: mean_{j<=i} acc[j][i] (tasks weighted
    equally, the inner term of CAA, docs/sources.md#metrics; its last value is the FAA)."""
    rows = [list(r) for r in acc_matrix]
    t = len(rows)
    if t == 0 or any(len(r) != t for r in rows):
        raise ValueError(f"acc_matrix must be square T x T (acc[j][i] = task j after task i); got row lengths "
                         f"{[len(r) for r in rows]}")
    out = np.empty(t)
    for i in range(t):
        col = [rows[j][i] for j in range(i + 1)]
        if any(v is None for v in col):
            raise ValueError(f"acc_matrix has no accuracy for a seen task after task {i + 1} (acc[j][{i}] is None "
                             f"for some j <= {i}); only j > i may be None")
        out[i] = float(np.mean(np.asarray(col, dtype=float)))
    return out


def seen_class_curve(matrices: Sequence[Sequence[Sequence[float | None]]]) -> SeenCurve:
    """Mean and band over seeds of ``seen_class_accuracy`` (all matrices must have the same T)."""
    if not matrices:
        raise ValueError("seen_class_curve needs at least one acc_matrix")
    curves = [seen_class_accuracy(m) for m in matrices]
    lengths = sorted({len(c) for c in curves})
    if len(lengths) > 1:
        raise ValueError(f"acc matrices of one method have different numbers of tasks {lengths}; "
                         "runs of one row must share the protocol")
    a = np.vstack(curves)
    n = a.shape[0]
    mean = a.mean(axis=0)
    if n >= 3:
        sd = a.std(axis=0, ddof=1)
        return SeenCurve(mean, mean - sd, mean + sd, n, "std")
    if n == 2:
        return SeenCurve(mean, a.min(axis=0), a.max(axis=0), n, "range")
    return SeenCurve(mean, None, None, n, "none")


def accuracy_curves(curves: Mapping[str, Sequence[Sequence[Sequence[float | None]]]], path: str | Path,
                    title: str = "", colours: Mapping[str, str] | None = None) -> Drawn:
    """Accuracy on the seen classes after each task, one line (mean over seeds) and band per method.

    ``curves`` maps a row label to its runs' acc matrices (one per seed). The band is +- sample std
    with 3+ seeds, min-max with 2, absent with 1; the legend gives n and follows the final order.
    """
    if not curves:
        raise ValueError("accuracy_curves needs at least one method with acc matrices")
    stats: dict[str, SeenCurve] = {}
    payload_rows = {}
    for label, mats in curves.items():
        try:
            stats[str(label)] = seen_class_curve(mats)
        except ValueError as e:
            raise ValueError(f"accuracy_curves, {label!r}: {e}") from None
        # seed order must not change the hash: sort the matrices by their text
        payload_rows[str(label)] = sorted(json.dumps(m, default=_plain) for m in mats)
    colors = _colours(stats, colours)
    payload = {"title": title, "curves": payload_rows, "colours": colors}
    return _draw_once("accuracy_curves", payload, path, lambda: _draw_curves(stats, title, colors))


def _draw_curves(stats: dict[str, SeenCurve], title: str, colors: Mapping[str, str]) -> Figure:
    order = sorted(stats, key=lambda k: (-stats[k].mean[-1], k))  # legend in the order the lines end
    t_max = max(len(s.mean) for s in stats.values())
    fig = Figure(figsize=(7.2, 4.2))
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>p"
    spread_text = {"std": "± sample std", "range": "min-max", "none": "none (one seed)"}
    same = len({(s.n, s.band) for s in stats.values()}) == 1  # then the legend title says it once
    for idx, lab in enumerate(order):
        s = stats[lab]
        x = np.arange(1, len(s.mean) + 1)
        ax.plot(x, s.mean, marker=markers[idx % len(markers)], markersize=4, lw=1.5, color=colors[lab],
                label=lab if same else f"{lab} (n={s.n}, {spread_text[s.band]})")
        if s.low is not None:
            ax.fill_between(x, s.low, s.high, color=colors[lab], alpha=0.13, lw=0)
    first = stats[order[0]]
    legend_title = (f"mean over {first.n} seed{'s' if first.n > 1 else ''}\nband: {spread_text[first.band]}" if same
                    else "mean over seeds, band")
    ax.set_xticks(np.arange(1, t_max + 1))
    ax.set_xlim(0.8, t_max + 0.2)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title=legend_title, title_fontsize=8, alignment="left")
    return fig


# ---------------------------------------------------------------------------------------------
# accuracy against cost


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in points from the axes' lower left corner

# Where a label may sit relative to its point (dx, dy in points, alignment), in order of preference.
_LABEL_SPOTS = ([(7, 0, "left"), (-7, 0, "right"), (6, 9, "left"), (6, -9, "left"), (-6, 9, "right"),
                 (-6, -9, "right")]
                + [(7, s * k * 10, "left") for k in (2, 3, 4) for s in (1, -1)]
                + [(-7, s * k * 10, "right") for k in (2, 3, 4) for s in (1, -1)])


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(points: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                  obstacles: Sequence[Box], bounds: tuple[float, float]) -> list[tuple[float, float, str]]:
    """For each point, the first spot of ``_LABEL_SPOTS`` where its label (width, height) overlaps no
    placed label, no obstacle (markers, error bars) and stays inside the axes; else the least bad.

    Written here rather than taken from adjustText: a fixed list of spots tried in a fixed order
    keeps the layout, and so the PNG bytes, a function of the data alone.
    """
    placed: list[Box] = []
    out: list[tuple[float, float, str]] = [(7, 0, "left")] * len(points)
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0], i))
    for i in order:
        (px, py), (w, h) = points[i], sizes[i]
        best, best_cost = None, math.inf
        for dx, dy, ha in _LABEL_SPOTS:
            x0 = px + dx if ha == "left" else px + dx - w
            box = (x0, py + dy - h / 2, x0 + w, py + dy + h / 2)
            outside = max(0.0, -box[0]) + max(0.0, box[2] - bounds[0]) + max(0.0, -box[1]) + max(0.0, box[3] - bounds[1])
            cost = sum(_overlap(box, o) for o in [*placed, *obstacles]) + 100.0 * outside
            if cost < best_cost:
                best, best_cost = (dx, dy, ha, box), cost
            if cost == 0:
                break
        dx, dy, ha, box = best
        placed.append(box)
        out[i] = (dx, dy, ha)
    return out


def _log_positions(values: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Where each value goes on a log axis: itself if > 0, else (for 0) a marked spot one decade
    below the smallest positive value (returned too), NaN stays NaN."""
    if np.any(values < 0):
        raise ValueError(f"tradeoff: costs must be >= 0, got {values[values < 0].tolist()}")
    pos = values[values > 0]
    if not np.any(values == 0):
        return values.astype(float), None
    zero_at = 10.0 ** (math.floor(math.log10(pos.min())) - 1) if len(pos) else 1.0
    return np.where(values == 0, zero_at, values).astype(float), zero_at


def _tick_text(v: float) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def _log_axis(ax: Any, xs: np.ndarray, zero_at: float | None) -> None:
    """Log x axis over ``xs`` (finite, > 0) with plain-number ticks; a zero spot gets the tick "0"
    and a break mark between it and the real values."""
    real = xs[xs != zero_at] if zero_at is not None else xs
    left = (zero_at if zero_at is not None else real.min()) / 10 ** 0.3
    right = (real.max() if len(real) else zero_at) * 10 ** 0.55  # room for the labels right of the points
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    lo = left if zero_at is None else zero_at * 10 ** 0.5  # no ticks left of the break
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(right)) + 1)
    ticks = [10.0 ** d for d in decades if lo <= 10.0 ** d <= right]
    span = math.log10(right) - math.log10(lo)
    subs = (2, 5) if span < 1.5 else ()  # a short axis needs ticks between the decades to be read
    ticks += [m * 10.0 ** d for d in decades for m in subs if lo <= m * 10.0 ** d <= right]
    minors = [m * 10.0 ** d for d in decades for m in range(2, 10) if lo <= m * 10.0 ** d <= right]
    ticks = sorted(ticks)
    labels = [_tick_text(t) for t in ticks]
    if zero_at is not None:
        ticks, labels = [zero_at, *ticks], ["0", *labels]
    if zero_at is not None and len(real):
        brk = zero_at * 10 ** 0.5  # halfway (in log) between 0's spot and the first real decade
        ax.axvline(brk, color="0.6", lw=0.8, ls=":")
        for dx in (-0.03, 0.03):  # two slanted strokes across the x axis: the axis is broken here
            ax.plot([brk * 10 ** (dx - 0.02), brk * 10 ** (dx + 0.02)], [-0.02, 0.02],
                    transform=ax.get_xaxis_transform(), color="black", lw=1, clip_on=False)
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_locator(FixedLocator(minors))
    ax.xaxis.set_minor_formatter(NullFormatter())


#: The trade-off's panels: the cost column, its axis label, and how a note names it.
_PANELS = (("gflops_test", "GFLOPs per test image, all forward passes (log scale)", "test GFLOPs"),
           ("trainable_params", "trainable parameters added to the frozen ViT, head excluded (log scale)",
            "parameters"),
           ("run_gflops", "forward GFLOPs of a whole run: training, per-task stages, evaluation (log scale)",
            "run GFLOPs"))


def _tradeoff_items(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict]:
    df = _frame(rows, ["label", "faa_mean", "faa_std", "gflops_test", "trainable_params"], "tradeoff")
    df = df.assign(label=df["label"].astype(str)).sort_values("label")
    if df.empty:
        raise ValueError("tradeoff needs at least one method row")
    has_run = "run_gflops" in df.columns and df["run_gflops"].notna().any()
    cols = [c for c, _, _ in _PANELS if c != "run_gflops" or has_run]
    items = [{"label": r["label"], "faa_mean": float(r["faa_mean"]), "faa_std": float(r["faa_std"]),
              **{c: float(r[c]) if pd.notna(r[c]) else math.nan for c in cols},
              "n": (int(r["n"]) if "n" in df.columns and pd.notna(r["n"]) else None)}
             for _, r in df.iterrows()]
    for col in cols:
        _log_positions(np.array([it[col] for it in items]))  # refuse negative costs before drawing
    return items


def tradeoff(rows: pd.DataFrame | Iterable[Mapping[str, Any]], path: str | Path, title: str = "",
             colours: Mapping[str, str] | None = None) -> Drawn:
    """FAA (mean +- std over seeds) against test GFLOPs per image, against trainable added
    parameters and, where rows have it, against a whole run's forward GFLOPs; log-scale x, one
    labelled point per method.

    ``rows``: label, faa_mean, faa_std, gflops_test, trainable_params, optionally run_gflops and n.
    Each point sits at its measured cost, exactly: methods of (nearly) equal cost overlap, and
    their labels, not their points, move apart (with a leader line). A method with 0 added
    parameters (head_only, joint) sits at a spot marked "0" left of a break in the log axis; a
    method without a recorded cost is named in a note under the panel.
    """
    items = _tradeoff_items(rows)
    colors = _colours((it["label"] for it in items), colours)
    payload = {"title": title, "rows": items, "colours": colors}
    return _draw_once("tradeoff", payload, path, lambda: _draw_tradeoff(items, title, colors))


def tradeoff_figure(rows: pd.DataFrame | Iterable[Mapping[str, Any]], title: str = "",
                    colours: Mapping[str, str] | None = None) -> Figure:
    """The figure `tradeoff` draws, not written (to read its artists back)."""
    items = _tradeoff_items(rows)
    return _draw_tradeoff(items, title, _colours((it["label"] for it in items), colours))


def _draw_tradeoff(items: list[dict], title: str, colors: Mapping[str, str] | None = None) -> Figure:
    colors = _colours((it["label"] for it in items), colors)
    panels = [p for p in _PANELS if p[0] in items[0]]
    fig = Figure(figsize=(5.25 * len(panels), 4.4))
    renderer = FigureCanvasAgg(fig).get_renderer()  # to measure the labels before placing them
    label_font = FontProperties(size=8)
    axes = fig.subplots(1, len(panels), sharey=True)
    fig.subplots_adjust(wspace=0.08, left=0.07 * 2 / len(panels), right=0.98, top=0.86, bottom=0.2)
    means = np.array([it["faa_mean"] for it in items])
    stds = np.array([0.0 if (it["n"] == 1 or math.isnan(it["faa_std"])) else it["faa_std"] for it in items])
    lo, hi = float(np.nanmin(means - stds)), float(np.nanmax(means + stds))
    pad = max(1.0, 0.08 * (hi - lo))
    ylim = (lo - pad, hi + pad)
    notes = []
    for ax, (col, xlabel, short) in zip(axes, panels):
        raw = np.array([it[col] for it in items])
        xs, zero_at = _log_positions(raw)
        shown = np.isfinite(xs)
        ax.set_ylim(*ylim)
        if shown.any():
            _log_axis(ax, xs[shown], zero_at)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3, which="major")
        idx = np.flatnonzero(shown)
        # work in points from the axes' lower left corner: markers, error bars and labels have sizes there
        to_pt = 72.0 / fig.dpi
        origin = np.array([ax.bbox.x0, ax.bbox.y0])

        def pt(x: float, y: float) -> np.ndarray:
            return (ax.transData.transform((x, y)) - origin) * to_pt

        pts = [pt(xs[i], means[i]) for i in idx]
        spans = [(pt(xs[i], means[i] - stds[i])[1], pt(xs[i], means[i] + stds[i])[1]) for i in idx]
        for i in idx:  # at the measured cost: never moved (translucent, so overlapping points show)
            ax.errorbar(xs[i], means[i], yerr=stds[i] if stds[i] > 0 else None, fmt="o",
                        color=colors[items[i]["label"]], elinewidth=1.2, capsize=3, markersize=6, alpha=0.8,
                        markeredgecolor="white", markeredgewidth=0.6, zorder=3)
        obstacles = [(x - 4, min(y - 4, y0), x + 4, max(y + 4, y1)) for (x, y), (y0, y1) in zip(pts, spans)]
        sizes = []
        for i in idx:
            w, h, _ = renderer.get_text_width_height_descent(items[i]["label"], label_font, ismath=False)
            sizes.append((w * to_pt + 2, h * to_pt + 2))
        spots = _place_labels([tuple(p) for p in pts], sizes, obstacles,
                              (ax.bbox.width * to_pt, ax.bbox.height * to_pt))
        for i, (dx, dy, ha) in zip(idx, spots):
            c = colors[items[i]["label"]]
            leader = None if dy == 0 else {"arrowstyle": "-", "color": c, "lw": 0.6, "shrinkA": 0, "shrinkB": 4}
            ax.annotate(items[i]["label"], (xs[i], means[i]), xytext=(dx, dy), textcoords="offset points",
                        fontproperties=label_font, color=c, va="center", ha=ha, annotation_clip=False,
                        arrowprops=leader)
        missing = [items[i]["label"] for i in np.flatnonzero(~shown)]
        if missing:
            notes.append(f"not shown against {short}, no cost recorded: " + ", ".join(missing))
    axes[0].set_ylabel("FAA (%): mean ± sample std over seeds")
    zero_labels = [it["label"] for it in items if it["trainable_params"] == 0]
    if zero_labels:
        notes.append("parameters 0: none added (" + ", ".join(zero_labels) + ")")
    notes.append("each point sits at its measured cost; where points crowd, labels move (with a leader line)")
    fig.text(0.07 * 2 / len(panels), 0.07, "\n".join(notes), ha="left", va="top", fontsize=7, color="0.3")
    fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# accuracy matrices


def accuracy_matrices(matrices: Mapping[str, Sequence[Sequence[float]]], path: str | Path, title: str = "",
                      colours: Mapping[str, str] | None = None) -> Drawn:
    """One heatmap per row: its mean accuracy matrix over seeds, acc[j][i] (task j, the row; after
    training task i, the column), blank where j > i, one colour scale (0-100%) for every panel,
    the numbers written in the cells up to 10 tasks. The panel's title is in the row's colour."""
    if not matrices:
        raise ValueError("accuracy_matrices needs at least one row")
    mats = {str(k): np.asarray(v, dtype=float) for k, v in matrices.items()}
    for k, m in mats.items():
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"accuracy_matrices, {k!r}: a T x T matrix is needed, got shape {m.shape}")
    colors = _colours(mats, colours)
    payload = {"title": title, "colours": colors,
               "matrices": {k: [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in m]
                            for k, m in sorted(mats.items())}}
    return _draw_once("accuracy_matrices", payload, path, lambda: _draw_matrices(mats, title, colors))


def _draw_matrices(mats: Mapping[str, np.ndarray], title: str, colors: Mapping[str, str]) -> Figure:
    labels = list(mats)
    t = max(m.shape[0] for m in mats.values())
    ncols = min(4, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    side = 1.1 + 0.42 * t if t <= 10 else 4.2
    fig = Figure(figsize=(side * ncols + 0.9, side * nrows + 0.5))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for ax, lab in zip(axes, labels):
        m = mats[lab]
        image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0.0, vmax=100.0)
        n = m.shape[0]
        ticks = np.arange(n)
        step = 1 if n <= 10 else 5
        ax.set_xticks(ticks[::step], [str(i + 1) for i in ticks[::step]], fontsize=7)
        ax.set_yticks(ticks[::step], [str(j + 1) for j in ticks[::step]], fontsize=7)
        ax.set_xlabel("after training task i", fontsize=7)
        ax.set_ylabel("test task j", fontsize=7)
        ax.set_title(lab, fontsize=8, color=colors[lab], fontweight="bold")
        if n <= 10:
            for j in range(n):
                for i in range(j, n):
                    v = m[j, i]
                    if not math.isnan(v):
                        ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=6.5,
                                color="black" if v > 60 else "white")
    for ax in axes[len(labels):]:
        ax.axis("off")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.8, pad=0.02)
        bar.set_label("accuracy (%), mean over seeds", fontsize=8)
    fig.suptitle(title + ("\n" if title else "") + "acc[j][i]: accuracy on task j's test images after "
                 "training task i", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# critical-difference diagram


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


def critical_difference(result: "FriedmanResult", path: str | Path) -> Drawn:
    """Demsar (2006) critical-difference diagram: average ranks (1 = best, on the left), the
    Nemenyi CD bar, and thick bars joining methods whose average ranks differ by less than CD.

    Refuses (ValueError) a result without a CD: one protocol x backbone block or fewer than three
    methods, where ranks carry no evidence across data sets.
    """
    if result.n_blocks < 2 or result.cd is None or not result.avg_ranks:
        why = result.reason or f"{result.n_blocks} protocol x backbone block(s), {result.k} method(s)"
        raise ValueError(f"no CD diagram for table {result.table!r}: {why}; it needs >= 2 protocol x backbone "
                         "blocks sharing >= 3 methods (render only when FriedmanResult.cd is not None)")
    order = sorted(result.avg_ranks, key=lambda k: (result.avg_ranks[k], k))
    payload = {"metric": result.metric, "table": result.table, "blocks": [list(b) for b in result.blocks],
               "ranks": [[lab, result.avg_ranks[lab]] for lab in order], "cd": result.cd, "p": result.p,
               "dropped": list(result.dropped_labels)}
    return _draw_once("cd_diagram", payload, path, lambda: _draw_cd(result, order))


def _draw_cd(result: "FriedmanResult", order: list[str]) -> Figure:
    ranks = [result.avg_ranks[k] for k in order]
    k = len(order)
    cd = float(result.cd)
    cliques = _cliques(ranks, cd)
    n_left = (k + 1) // 2
    row = 0.32
    top = -0.25 - 0.1 * len(cliques)  # method lines start below the clique bars
    fig = Figure(figsize=(7.0, 1.5 + 0.3 * n_left + 0.1 * len(cliques)))
    ax = fig.add_subplot()
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(top - row * (n_left - 0.5), 1.35)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.12, color="black", lw=1)
        ax.text(r, 0.18, str(r), ha="center", va="bottom", fontsize=9)
    for r in np.arange(1.5, k, 1.0):
        ax.vlines(r, 0, 0.06, color="black", lw=0.6)
    ax.text((1 + k) / 2, 0.5, "average rank (1 = best)", ha="center", va="bottom", fontsize=8, color="0.3")
    for i, (lab, r) in enumerate(zip(order, ranks)):
        left = i < n_left
        depth = top - row * (i if left else k - 1 - i)
        x_end = 0.6 if left else k + 0.4
        ax.plot([r, r, x_end], [0, depth, depth], color="black", lw=0.8)
        ax.text(x_end + (-0.05 if left else 0.05), depth, f"{lab} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    ax.plot([1, 1 + cd], [1.0, 1.0], color="black", lw=1.5)
    for x in (1, 1 + cd):
        ax.vlines(x, 0.95, 1.05, color="black", lw=1.5)
    ax.text(1 + cd / 2, 1.08, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for c, (i, j) in enumerate(cliques):
        y = -0.13 - 0.1 * c
        ax.plot([ranks[i] - 0.04, ranks[j] + 0.04], [y, y], color="tab:red", lw=3.5, alpha=0.85,
                solid_capstyle="butt")
    title = (f"{result.metric.upper()} average rank over {result.n_blocks} protocol x backbone blocks; "
             f"Friedman p = {result.p:.3g}; Nemenyi alpha = {result.alpha:g}")
    ax.set_title(title, fontsize=9)
    note = "red bars join methods whose average ranks differ by less than CD (not significantly different)"
    if result.dropped_labels:
        note += f"\nnot ranked (missing from some block): {', '.join(result.dropped_labels)}"
    fig.text(0.5, 0.0, note, ha="center", va="top", fontsize=7, color="0.3")
    return fig



# ---------------------------------------------------------------------------------------------
# accuracy against the test batch size (the reference behaviours page)


def batch_size_curves(curves: Sequence[Mapping[str, Any]], path: str | Path, title: str = "",
                      reference_batch: int | None = None) -> Drawn:
    """FAA against the test batch size (log x), one line per (trained configuration, test
    behaviour): the mean over seeds with a ± sample std bar (none with one seed).

    Each curve is {"trained": label, "behaviour": "per sample" | mode set, "points": {batch: [FAA
    of each seed]}}. Per sample is black (flat, if results do not depend on the batch); each
    behaviour has its own colour, each trained configuration its own line style; a dotted line
    marks the reference configuration's test batch (`reference_batch`)."""
    if not curves:
        raise ValueError("batch_size_curves needs at least one curve")
    items = []
    for c in curves:
        points = {int(b): sorted(float(v) for v in vals) for b, vals in c["points"].items() if vals}
        if not points:
            raise ValueError(f"batch_size_curves: {c['trained']!r} / {c['behaviour']!r} has no point")
        items.append({"trained": str(c["trained"]), "behaviour": str(c["behaviour"]),
                      "points": sorted(points.items())})
    payload = {"title": title, "reference_batch": reference_batch, "curves": items}
    return _draw_once("batch_size_curves", payload, path, lambda: _draw_batch_sizes(items, title, reference_batch))


#: Each test behaviour's colour on the batch-size figures, the same on every one (per sample black;
#: another mode set: `colour_of` its name).
BEHAVIOUR_COLOURS = {"per sample": "#000000", "batch_vote": LADDER_COLOURS[0], "prefix_mixing": LADDER_COLOURS[1],
                     "batch_vote + prefix_mixing": LADDER_COLOURS[2]}


def _draw_batch_sizes(items: list[dict], title: str, reference_batch: int | None) -> Figure:
    colors = {c["behaviour"]: BEHAVIOUR_COLOURS.get(c["behaviour"]) or colour_of(c["behaviour"]) for c in items}
    trained = list(dict.fromkeys(c["trained"] for c in items))
    styles = {t: s for t, s in zip(trained, ["-", "--", ":", "-."] * (len(trained) // 4 + 1))}
    fig = Figure(figsize=(7.2, 4.2))
    ax = fig.add_subplot()
    for c in items:
        xs = np.array([b for b, _ in c["points"]], dtype=float)
        vals = [np.array(v) for _, v in c["points"]]
        mean = np.array([v.mean() for v in vals])
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
        ax.errorbar(xs, mean, yerr=std if std.any() else None, color=colors[c["behaviour"]],
                    ls=styles[c["trained"]], marker="o", markersize=3.5, lw=1.4, capsize=2,
                    label=f"{c['behaviour']} · {c['trained']}" if len(trained) > 1 else c["behaviour"])
    if reference_batch:
        ax.axvline(reference_batch, color="0.5", lw=0.8, ls=":")
        ax.annotate(f"reference test batch {reference_batch}", (reference_batch, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(3, -10), textcoords="offset points",
                    fontsize=7, color="0.35")
    xs = sorted({b for c in items for b, _ in c["points"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(b) for b in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("test batch size (images of one task per forward)")
    ax.set_ylabel("FAA (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    n = max(len(v) for c in items for _, v in c["points"])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title=f"mean over {n} seed{'s' if n > 1 else ''}" + ("\nbar: ± sample std" if n > 1 else ""),
              title_fontsize=8, alignment="left")
    return fig
