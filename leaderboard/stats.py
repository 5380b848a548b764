"""Statistics for the leaderboard, computed from stored records alone (docs/sources.md#statistics).

Why these tests: runs with the same seed share the class order, so methods are compared paired
by seed. With 5 seeds a two-sided Wilcoxon signed-rank test cannot go below p = 0.0625, so the
paired t-test is used, with the mean difference, its 95% CI and Cohen's d_z, Holm-corrected over
the comparisons of one table. Across protocols: average ranks, Friedman test and Nemenyi critical
difference as in Demsar (2006), JMLR 7:1-30.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from protocols.record import COST_FIELDS, HIGHER_IS_BETTER, METRICS, TIMING_FIELDS

from .records import config_id, variant_text

__all__ = ["runs_frame", "aggregate", "paired_tests", "friedman", "FriedmanResult", "wilcoxon_min_p", "mean_matrix",
           "LOCAL_MARK"]

#: What a row label of local runs (not published; `_local` in the rendered record) ends with.
LOCAL_MARK = " (local)"

_METRICS = tuple(METRICS)
_COST = COST_FIELDS
_GROUP = ["protocol", "backbone", "table"]


def _better(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; valid: {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def wilcoxon_min_p(n: int) -> float:
    """Smallest two-sided exact Wilcoxon signed-rank p-value reachable with n pairs: 2 / 2**n."""
    return 2.0 / 2 ** n


def runs_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run (flattened metrics, cost, timings), one run per (configuration, seed).

    A table row is one configuration (`records.config_id`: the resolved spec without the seed),
    never a name. `protocol` and `label` are display names: a protocol whose data differs from the
    shipped protocol of that name, and a configuration that differs from the default one (the
    record's `variant`), carry what differs, e.g. `smope (top_k=3)`; so a changed configuration
    never joins, replaces or averages into the default row. Two configurations that would still
    share a label (records made with different code defaults) are told apart by their config id,
    the published one (`_published`) keeping the plain label. Local runs (`_local`: not published,
    shown beside the published records on the local pages) form rows of their own, labelled with
    `LOCAL_MARK`: a published row never mixes with runs nobody published. If one configuration and seed were
    stored twice under different keys, only the most recently created run is kept, with a warning,
    so that a seed is never counted twice.
    """
    rows = []
    for r in records:
        m = r.get("metrics") or {}
        cost = r.get("cost") or {}
        tim = r.get("timings") or {}
        variant = r.get("variant") or {}
        proto_v, hp_v = variant_text(variant, protocol=True), variant_text(variant)
        label = r.get("label") or r.get("method")
        local = bool(r.get("_local", False))
        rows.append({
            "key": r.get("key"),
            "protocol": r.get("protocol") + (f" ({proto_v})" if proto_v else ""),
            "backbone": r.get("backbone"), "table": r.get("table", "main"),
            "label": label + (f" ({hp_v})" if hp_v else "") + (LOCAL_MARK if local else ""),
            "method": r.get("method"), "seed": r.get("seed"), "created": r.get("created") or "",
            "position": r.get("position", 0), "role": r.get("role") or "method",
            "config": config_id(r), "default_config": not variant,
            "default_protocol": not proto_v, "published": bool(r.get("_published", False)), "local": local,
            **{k: (float(m[k]) if m.get(k) is not None else np.nan) for k in _METRICS},
            **{c: cost.get(c, np.nan) for c in _COST},
            **{t: tim.get(t, np.nan) for t in TIMING_FIELDS},
            "run_gflops": (r.get("run_gflops") or {}).get("total", np.nan),
            "acc_matrix": r.get("acc_matrix"),
        })
    cols = ["key", *_GROUP, "label", "method", "seed", "created", "position", "role", "config",
            "default_config", "default_protocol", "published", "local", *_METRICS, *_COST,
            *TIMING_FIELDS, "run_gflops", "acc_matrix"]
    df = pd.DataFrame(rows, columns=cols)
    if df.empty:
        return df
    for c in [*_COST, *TIMING_FIELDS, "run_gflops"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df = df.sort_values([*_GROUP, "config", "seed", "created", "key"], kind="stable")
    dup = df.duplicated([*_GROUP, "config", "seed"], keep="last")
    if dup.any():
        d = df[dup]
        warnings.warn(f"{int(dup.sum())} run(s) repeat a configuration and seed already stored; "
                      f"keeping the most recent, dropping keys {d['key'].tolist()}", stacklevel=2)
        df = df[~dup]
    # one label per configuration within a table
    for _, g in df.groupby([*_GROUP, "label"], sort=False):
        configs = g["config"].unique()
        if len(configs) > 1:
            keep = set(g.loc[g["published"], "config"].unique())
            keep = keep if len(keep) == 1 else set()
            for c in configs:
                if c not in keep:
                    idx = g.index[g["config"] == c]
                    df.loc[idx, "label"] = df.loc[idx, "label"] + f" [config {c[:8]}]"
    return df.reset_index(drop=True)


def aggregate(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and sample std (ddof=1; 0 with one seed, which pages show as n/a) over seeds per
    (protocol, backbone, table, label): one row per configuration (see `runs_frame`).

    Columns: protocol, backbone, table, label, method, n, seeds, <metric>_mean, <metric>_std for
    every metric of `protocols.record.METRICS`, the cost columns (`COST_FIELDS` and the run's total
    forward GFLOPs `run_gflops`: median over seeds) and the timings (train_s, eval_s, total_s:
    mean), which stay NaN when no record carries them; `local`: the row's runs are not published.
    """
    df = runs_frame(records)
    out_cols = [*_GROUP, "label", "method", "n", "seeds", "position", "role", "config",
                "default_config", "default_protocol", "local", "created"]
    for m in _METRICS:
        out_cols += [f"{m}_mean", f"{m}_std"]
    out_cols += [*_COST, "run_gflops", *TIMING_FIELDS]
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    rows = []
    for (p, b, t, lab), g in df.groupby([*_GROUP, "label"], sort=True):
        row: dict[str, Any] = {"protocol": p, "backbone": b, "table": t, "label": lab,
                               "method": ", ".join(sorted(set(g["method"].dropna()))),
                               "n": int(g["seed"].nunique()), "seeds": sorted(int(s) for s in g["seed"]),
                               "position": int(g["position"].fillna(0).min()),
                               "role": str(g["role"].iloc[0]), "config": str(g["config"].iloc[0]),
                               "default_config": bool(g["default_config"].all()),
                               "default_protocol": bool(g["default_protocol"].all()),
                               "local": bool(g["local"].all()), "created": str(g["created"].max())}
        for m in _METRICS:
            v = g[m].dropna().to_numpy(dtype=float)
            row[f"{m}_mean"] = float(v.mean()) if len(v) else np.nan
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else np.nan)
        for c in [*_COST, "run_gflops"]:
            v = g[c].dropna()
            row[c] = float(v.median()) if len(v) else np.nan
        for c in TIMING_FIELDS:
            v = g[c].dropna()
            row[c] = float(v.mean()) if len(v) else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=out_cols)


def mean_matrix(matrices: Iterable[Iterable[Iterable[float | None]]]) -> np.ndarray:
    """The entrywise mean over seeds of acc matrices of one row (T x T, NaN where j > i): what the
    pages show as a row's accuracy matrix."""
    stack = np.array([[[np.nan if v is None else float(v) for v in row] for row in m] for m in matrices],
                     dtype=float)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2] or len(stack) == 0:
        raise ValueError("mean_matrix needs square T x T acc matrices of one T")
    with warnings.catch_warnings():  # entries j > i are NaN in every seed: their mean stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stack, axis=0)


def _pick_reference(means: Mapping[str, float], requested: str | None, metric: str) -> str:
    if requested is not None and requested in means:
        return requested
    if "smope" in means:
        return "smope"
    finite = {k: v for k, v in means.items() if not math.isnan(v)}
    pool = finite or dict(means)
    hib = _better(metric)
    # best mean; ties broken by label so the choice is deterministic
    return sorted(pool, key=lambda k: ((-pool[k] if hib else pool[k]), k))[0]


def paired_tests(records: Iterable[Mapping[str, Any]], reference_label: str | None = None,
                 metric: str = "faa", alpha: float = 0.05) -> pd.DataFrame:
    """Each label against a reference, paired by seed, per (protocol, backbone, table).

    The reference is ``reference_label`` where that table has it, else "smope" if present, else the
    label with the best mean ``metric``. Only seeds both have are used; comparisons with fewer
    than 2 common seeds are skipped. diff = label - reference, so a negative FAA difference means
    the label is worse than the reference. p_holm is Holm-corrected over the comparisons of one
    table between methods (`in_family`): the bounds (role "lower bound" / "upper bound": head_only,
    joint) are references, not contestants, so their comparisons are shown uncorrected and stay
    out of the family. d_z = mean(diff) / sd(diff).
    """
    _better(metric)
    df = runs_frame(records)
    cols = [*_GROUP, "metric", "reference", "label", "method", "n", "seeds", "mean_reference", "mean_label",
            "mean_diff", "ci_low", "ci_high", "t", "p", "p_holm", "d_z", "significant", "role",
            "in_family"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    from statsmodels.stats.multitest import multipletests

    out = []
    for (p, b, t), g in df.groupby(_GROUP, sort=True):
        means = g.groupby("label")[metric].mean().to_dict()
        ref = _pick_reference(means, reference_label, metric)
        if str(t).startswith("ablation:") and (reference_label is None or reference_label not in means):
            rungs = g.groupby("label")["position"].min()
            if rungs.nunique() > 1:  # an ordered ladder: compare every rung with the last one
                ref = str(rungs.idxmax())
        ref_by_seed = g[g["label"] == ref].set_index("seed")[metric].dropna()
        rows = []
        for lab, h in g[g["label"] != ref].groupby("label", sort=True):
            by_seed = h.set_index("seed")[metric].dropna()
            seeds = sorted(set(by_seed.index) & set(ref_by_seed.index))
            n = len(seeds)
            if n < 2:
                continue
            x = by_seed.loc[seeds].to_numpy(dtype=float)
            y = ref_by_seed.loc[seeds].to_numpy(dtype=float)
            d = x - y
            md, sd = float(d.mean()), float(d.std(ddof=1))
            if sd > 0:
                res = sps.ttest_rel(x, y)
                tstat, pval = float(res.statistic), float(res.pvalue)
                half = float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
                dz = md / sd
            else:  # identical differences on every seed: no variance to test against
                tstat = pval = dz = math.nan
                half = 0.0
            rows.append({"protocol": p, "backbone": b, "table": t, "metric": metric, "reference": ref,
                         "label": lab, "method": ", ".join(sorted(set(h["method"].dropna()))), "n": n,
                         "seeds": [int(s) for s in seeds], "mean_reference": float(y.mean()),
                         "mean_label": float(x.mean()), "mean_diff": md, "ci_low": md - half,
                         "ci_high": md + half, "t": tstat, "p": pval, "d_z": dz,
                         "role": str(h["role"].iloc[0]), "in_family": h["role"].iloc[0] == "method"})
        finite = [i for i, r in enumerate(rows) if not math.isnan(r["p"]) and r["in_family"]]
        holm = multipletests([rows[i]["p"] for i in finite], alpha=alpha, method="holm")[1] if finite else []
        for r in rows:
            r["p_holm"] = math.nan
        for i, ph in zip(finite, holm):
            rows[i]["p_holm"] = float(ph)
        for r in rows:
            r["significant"] = bool(not math.isnan(r["p_holm"]) and r["p_holm"] < alpha)
        out.extend(rows)
    return pd.DataFrame(out, columns=cols)


@dataclass
class FriedmanResult:
    """Average ranks across blocks (protocol x backbone), Friedman test and Nemenyi CD.

    ``statistic``, ``p`` and ``cd`` are None when the design is too small (``reason`` says why).
    """

    metric: str
    table: str
    blocks: list[tuple[str, str]]
    labels: list[str]
    avg_ranks: dict[str, float]
    scores: pd.DataFrame  # blocks x labels, seed-mean metric
    statistic: float | None = None
    p: float | None = None
    cd: float | None = None
    q_alpha: float | None = None
    alpha: float = 0.05
    dropped_labels: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def k(self) -> int:
        return len(self.labels)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def friedman(records: Iterable[Mapping[str, Any]], metric: str = "faa", table: str = "main",
             alpha: float = 0.05) -> FriedmanResult | None:
    """Rank methods across protocols (Demsar 2006).

    Blocks are (protocol, backbone) pairs, each scored by the seed-mean ``metric``: the seeds of
    one protocol are repeated measurements of one data set, not independent data sets, and using
    them as blocks would overstate the evidence. Only labels present in every block are ranked
    (a complete design); others are listed in ``dropped_labels``. Rank 1 is best (ties share the
    average rank). The Friedman test needs >= 3 labels and >= 2 blocks; the Nemenyi critical
    difference is CD = q_alpha * sqrt(k (k + 1) / (6 N)) with
    q_alpha = studentized_range.ppf(1 - alpha, k, inf) / sqrt(2).
    Returns None when there are no runs for ``table``.
    """
    hib = _better(metric)
    df = runs_frame(records)
    if df.empty:
        return None
    # blocks are the protocols as shipped: a user's modified copy is not another data set
    df = df[(df["table"] == table) & df["default_protocol"]]
    if df.empty:
        return None
    scores = df.groupby(["protocol", "backbone", "label"])[metric].mean().unstack("label")
    all_labels = sorted(scores.columns)
    complete = scores.dropna(axis=1, how="any")
    labels = sorted(complete.columns)
    dropped = [lab for lab in all_labels if lab not in labels]
    blocks = [tuple(ix) for ix in complete.index]
    res = FriedmanResult(metric=metric, table=table, blocks=blocks, labels=labels, avg_ranks={},
                         scores=complete[labels], alpha=alpha, dropped_labels=dropped)
    if not labels:
        res.reason = "no label has runs in every protocol x backbone block"
        return res
    vals = complete[labels].to_numpy(dtype=float)
    ranks = sps.rankdata(-vals if hib else vals, axis=1)  # rank 1 = best
    res.avg_ranks = {lab: float(r) for lab, r in zip(labels, ranks.mean(axis=0))}
    k, n = len(labels), len(blocks)
    if k < 3 or n < 2:
        res.reason = f"Friedman test needs >= 3 methods and >= 2 protocol x backbone blocks (have {k} and {n})"
        return res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stat, p = sps.friedmanchisquare(*[vals[:, i] for i in range(k)])
    res.statistic = float(stat)
    res.p = float(p)
    res.q_alpha = float(sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))
    res.cd = res.q_alpha * math.sqrt(k * (k + 1) / (6.0 * n))
    return res
