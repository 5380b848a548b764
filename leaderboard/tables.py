"""The result pages: one per protocol x backbone (and per ablation), with their figures, and the
leaderboard's index of them.

Each table row is one configuration over seeds (`stats.aggregate`), with the paired tests of its
table (`stats.paired_tests`) and, across protocols, the Friedman ranks (`stats.friedman`). A page
leads with its best method and its bounds apart, then the table (FAA, CAA, FFM, BWT, the split of
the final accuracy, the costs per image and per run), the figures, the paired tests, each row's
mean accuracy matrix and the metrics' definitions. The pages are written through the render's
`GeneratedFiles` (only when changed); the orchestrator, `leaderboard.render`, adds the pages
beside the tables and the index's links to them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from protocols.record import METRICS

from .figures import accuracy_curves, accuracy_matrices, critical_difference, faa_dots, row_colours, tradeoff
from .markdown import MARKER, PM
from .output import GeneratedFiles, slug
from .stats import (LOCAL_MARK, FriedmanResult, aggregate, friedman, mean_matrix, paired_tests, runs_frame,
                    wilcoxon_min_p)

__all__ = ["render_tables", "page_name", "NO_RUNS"]

#: The index when there is no run at all.
NO_RUNS = f"{MARKER}\n# Leaderboard\n\nNo runs yet: there are no published records and the run store is empty.\n"


def page_name(protocol: str, backbone: str, table: str = "main") -> str:
    """File name of a page: ``<protocol>__<backbone>.md``, ablations ``...__ablation-<name>.md``."""
    base = f"{slug(protocol)}__{slug(backbone)}"
    if table == "main":
        return base + ".md"
    return f"{base}__ablation-{slug(table.split(':', 1)[1])}.md"


def _fig_base(protocol: str, backbone: str, table: str = "main") -> str:
    return page_name(protocol, backbone, table)[:-3]


def _f(x: Any, nd: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _mstd(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f} {PM} n/a" if n < 2 else f"{mean:.2f} {PM} {std:.2f}"


def _g3(x: float) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.3g}"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _int(x: float) -> str:
    return "" if x is None or math.isnan(x) else f"{int(round(x)):,}"


def _f0(v: float) -> str:
    if v is None or math.isnan(v):
        return ""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _date(created: str) -> str:
    return str(created)[:10] or "unknown"


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def _is_ladder(rows: pd.DataFrame) -> bool:
    return "position" in rows and rows["position"].nunique() > 1


def _flops_unit(values: pd.Series) -> tuple[str, float]:
    """The unit a table's per-run GFLOPs are shown in (GFLOPs, TFLOPs, PFLOPs: the largest that keeps
    the biggest value at least 1), and its size in GFLOPs."""
    top = values.dropna().max() if values.notna().any() else 0.0
    for unit, size in (("PFLOPs", 1e6), ("TFLOPs", 1e3)):
        if top >= 10 * size:
            return unit, size
    return "GFLOPs", 1.0


def _sig3(v: float) -> str:
    """Three significant digits, thousands separated: 643, 1,230, 0.0671."""
    if v is None or math.isnan(v):
        return ""
    if abs(v) >= 100:
        return f"{round(v, 2 - int(math.floor(math.log10(abs(v))))):,.0f}"
    return f"{v:.3g}"


def _results_table(rows: pd.DataFrame) -> str:
    if _is_ladder(rows):  # an ablation ladder, in its order
        rows = rows.sort_values(["position", "label"])
    else:
        rows = rows.sort_values(["faa_mean", "label"], ascending=[False, True])
    # WTP / TII only where some run has them (records stored before they existed lack them)
    split = [m for m in ("wtp", "tii") if rows[f"{m}_mean"].notna().any()]
    headers = ["method", "FAA", "CAA", "FFM", "BWT", *[m.upper() for m in split], "seeds (n)"]
    unit, size = _flops_unit(rows["run_gflops"])
    cost = [("trainable_params", "trainable params", _int), ("gflops_test", "GFLOPs per test image", _g3),
            ("passes_test", "passes (test)", _f0),
            ("run_gflops", f"{unit} per run (forward)", lambda v: _sig3(v / size))]
    cost = [c for c in cost if rows[c[0]].notna().any()]
    headers += [c[1] for c in cost]
    body = []
    for _, r in rows.iterrows():
        n = int(r["n"])
        line = [r["label"], *[_mstd(r[f"{m}_mean"], r[f"{m}_std"], n) for m in ("faa", "caa", "ffm", "bwt")],
                *[_mstd(r[f"{m}_mean"], r[f"{m}_std"], n) for m in split], str(n)]
        line += [fmt(r[col]) for col, _, fmt in cost]
        body.append(line)
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _best(rows: pd.DataFrame) -> pd.Series:
    """The best row by FAA among the contestants (role "method"; every row if none is)."""
    pool = rows[rows["role"] == "method"]
    pool = pool if len(pool) else rows
    return pool.sort_values(["faa_mean", "label"], ascending=[False, True]).iloc[0]


def _bounds(rows: pd.DataFrame) -> list[str]:
    bounds = rows[rows["role"].isin(["lower bound", "upper bound"])].sort_values(["role", "label"])
    return [f"{r['label']} ({r['role']}) {_mstd(r['faa_mean'], r['faa_std'], int(r['n']))}"
            for _, r in bounds.iterrows()]


def _versus(best: pd.Series, tests: pd.DataFrame) -> str:
    """How the best row compares with the paired tests' reference: '' when it is the reference."""
    if tests.empty:
        return ""
    ref = tests["reference"].iloc[0]
    if best["label"] == ref:
        return "; it is the reference of the paired tests"
    t = tests[tests["label"] == best["label"]]
    if t.empty or math.isnan(t["p_holm"].iloc[0]):
        return f"; no paired test against {ref} (too few seeds in common, or no spread)"
    r = t.iloc[0]
    verdict = "significantly different" if r["significant"] else "not significantly different"
    return (f"; against {ref}, the reference of the paired tests: {r['mean_diff']:+.2f} FAA points, "
            f"p (Holm) {_p(r['p_holm'])}, {verdict}")


def _headline(rows: pd.DataFrame, tests: pd.DataFrame) -> str:
    """The best method by FAA, and the bounds apart: the upper bound is a reference, never the best."""
    best = _best(rows)
    what = "variant" if _is_ladder(rows) else "method"
    text = (f"**Best {what} by FAA: {best['label']}, {_mstd(best['faa_mean'], best['faa_std'], int(best['n']))}**"
            + _versus(best, tests) + ".")
    bounds = _bounds(rows)
    if bounds:
        text += " Bounds, references that frame the methods (not contestants): " + "; ".join(bounds) + "."
    return text


def _index_summary(rows: pd.DataFrame, n_runs: int) -> str:
    best = _best(rows)
    what = "variant" if _is_ladder(rows) else "method"
    text = (f"{len(rows)} rows, {n_runs} runs; best {what} {best['label']} "
            f"{_mstd(best['faa_mean'], best['faa_std'], int(best['n']))} FAA")
    bounds = rows[rows["role"].isin(["lower bound", "upper bound"])].sort_values(["role", "label"])
    if len(bounds):
        text += "; bounds " + ", ".join(
            f"{r['label']} {_mstd(r['faa_mean'], r['faa_std'], int(r['n']))} ({r['role'].split()[0]})"
            for _, r in bounds.iterrows())
    return text


def _matrix_table(m: np.ndarray) -> str:
    t = m.shape[0]
    body = [[f"task {j + 1}", *["" if np.isnan(m[j, i]) else f"{m[j, i]:.2f}" for i in range(t)]]
            for j in range(t)]
    return tabulate(body, headers=["test task j / after task i", *[str(i + 1) for i in range(t)]],
                    tablefmt="github", disable_numparse=True)


def _matrices_section(rows: pd.DataFrame, runs: pd.DataFrame, fig: str | None) -> list[str]:
    """Each row's accuracy matrix, mean over its seeds: the figure, then the numbers (folded)."""
    out = ["## Accuracy matrices", "",
           "acc[j][i] is the accuracy (%) on task j's test images after training task i (j ≤ i), the mean "
           "over the row's seeds. The diagonal is each task just learned; the last column's mean is the FAA; "
           "a row's fall from its best entry to the last column is that task's forgetting (FFM), and the last "
           "column minus the diagonal its backward transfer (BWT).", ""]
    if fig:
        out += [f"![accuracy matrices]({fig})", ""]
    for label in _row_order(rows)["label"]:
        mats = list(runs[runs["label"] == label].sort_values("seed")["acc_matrix"])
        if not mats:
            continue
        out += ["<details>", f"<summary>{label} (n = {len(mats)})</summary>", "", _matrix_table(mean_matrix(mats)),
                "", "</details>", ""]
    return out


def _metrics_section() -> list[str]:
    body = []
    for m in METRICS.values():
        body.append([m.title, m.formula or "—", m.entries, m.definition,
                     "higher" if m.higher_is_better else "lower"])
    return ["## Metrics", "",
            "acc[j][i] = top-1 accuracy (%) on task j's test images after training task i, for j ≤ i, with T "
            "tasks (1-based in the formulas): sample-weighted within a task, tasks weighted equally. Every "
            "metric is computed from the run's own evaluation (`protocols/metrics.py`), not Avalanche's "
            "forgetting; the definitions, with the papers and public code they follow (file and line), are "
            "in `docs/sources.md`, section Metrics.", "",
            tabulate(body, headers=["metric", "formula", "entries it reads", "definition", "better"],
                     tablefmt="github", disable_numparse=True), ""]


def _row_order(rows: pd.DataFrame) -> pd.DataFrame:
    if _is_ladder(rows):
        return rows.sort_values(["position", "label"])
    return rows.sort_values(["faa_mean", "label"], ascending=[False, True])


def _tests_section(tests: pd.DataFrame, rows: pd.DataFrame, metric: str = "faa") -> list[str]:
    out = [f"## Paired tests ({metric.upper()})", ""]
    if tests.empty:
        out += ["No paired comparison: it needs at least two methods with at least two seeds in common.", ""]
        return out
    ref = tests["reference"].iloc[0]
    body = []
    tests = tests.assign(_bound=~tests["in_family"].astype(bool))
    for _, r in tests.sort_values(["_bound", "p", "label"], na_position="last").iterrows():
        body.append([r["label"] + ("" if r["in_family"] else f" ({r['role']})"), str(int(r["n"])),
                     _f(r["mean_reference"]), _f(r["mean_label"]),
                     f"{r['mean_diff']:+.2f}", f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]", _f(r["t"]),
                     _p(r["p"]), _p(r["p_holm"]) if r["in_family"] else "not in family", _f(r["d_z"]),
                     ("yes" if r["significant"] else "no") if r["in_family"] else ""])
    headers = ["method", "n", f"{ref} mean", "method mean", "diff (method - ref)", "95% CI", "t", "p",
               "p (Holm)", "d_z", "significant (Holm, 0.05)"]
    out.append(f"Reference: **{ref}**.")
    out.append("")
    out.append(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True))
    fam = tests[tests["in_family"].astype(bool)]
    bounds = tests[~tests["in_family"].astype(bool)]
    n_max = int(tests["n"].max())
    family = (f"The Holm family is the {len(fam)} comparison(s) of the methods with {ref}"
              + (f" ({', '.join(sorted(fam['label']))})" if len(fam) else "") + ".")
    if len(bounds):
        family += (f" The bounds ({', '.join(sorted(bounds['label']))}) are references, not contestants: "
                   "their comparisons are shown with their raw p and are not in the family.")
    out += ["",
            f"Paired t-test by seed (runs with the same seed share the class order; only seeds both have), "
            f"two-sided, Holm-corrected within this table. {family} The difference is method minus {ref} "
            f"in {metric.upper()} points, with its 95% confidence interval from the t distribution; d_z is "
            "Cohen's d for paired samples (mean difference / SD of the differences). Why not the Wilcoxon "
            "signed-rank test: with 5 seeds its two-sided p cannot go below 0.0625 (the floor is 2/2^n for "
            "n seeds), so it could never reject at 0.05"
            + ("." if n_max == 5 else f"; with the n = {n_max} seeds here the floor is {wilcoxon_min_p(n_max):.4g}.")]
    fewer = rows[rows["n"] < rows["n"].max()]
    if len(fewer):
        out.append("")
        out.append("Fewer seeds than the table's most: " + ", ".join(
            f"{r['label']} (n = {int(r['n'])}, seeds {_seeds(r['seeds'])})" for _, r in fewer.iterrows())
            + "; their tests use only the seeds they share with the reference, and a row with one "
              "seed shows no spread (n/a) and no test.")
    out.append("")
    return out


def _local_note(rows: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    local = rows[rows["local"].astype(bool)]
    if local.empty:
        return []
    in_family = not tests.empty and tests["label"].str.endswith(LOCAL_MARK).any()
    return ["> **Local pages, not the committed leaderboard.** "
            f"{len(local)} row(s) hold runs of the local store that are not published, each marked "
            f"`{LOCAL_MARK.strip()}`: {', '.join(sorted(local['label']))}. They are on no committed page"
            + ("; their paired tests are in this page's Holm family, so its adjusted p-values differ from "
               "the committed page's, whose family holds published rows only" if in_family else "")
            + ". `run_suite.py publish` makes them results.", ""]


def _page(title: str, rows: pd.DataFrame, tests: pd.DataFrame, runs: pd.DataFrame, figs: list[tuple[str, str]],
          matrices_fig: str | None, extra: list[str]) -> str:
    seeds = sorted({s for ss in rows["seeds"] for s in ss})
    variants = rows[~rows["default_config"].astype(bool)]
    has_split = rows[["wtp_mean", "tii_mean"]].notna().any().any()
    lines = [MARKER, f"# {title}", "", *_local_note(rows, tests),
             f"{len(runs)} runs, {len(rows)} rows, seeds {_seeds(seeds)}; newest record "
             f"{_date(rows['created'].max())}.", "",
             _headline(rows, tests), "",
             _results_table(rows), "",
             f"Mean {PM} sample standard deviation over seeds, in percent (n/a with one seed). FAA: final "
             "average accuracy, CAA: cumulative average accuracy, BWT: backward transfer (higher is better); "
             "FFM: final forgetting (lower is better); their formulas over the accuracy matrix are under "
             "[Metrics](#metrics). "
             + ("WTP: within-task prediction, the final accuracy with each image's task given; TII: "
                "task-identity inference, the share of final predictions that fall in the image's own "
                "task (HiDe-Prompt's split of the class-incremental accuracy). " if has_split else "")
             + ("GFLOPs per test image: every forward pass of one test image, the query pass included. "
                if rows["gflops_test"].notna().any() else "")
             + ("Per run: the forward GFLOPs of one whole run, counted as images x passes x GFLOPs per image "
                "over its training epochs, its per-task stages (extra epochs, no-grad statistics passes) and "
                "the evaluation after every task (`protocols/work.py`); a count, not a timing, and without "
                "the backward passes. Wall times, with their device, are on the cost page. "
                if rows["run_gflops"].notna().any() else "")
             + ("In ladder order: each row adds one component to the row above; the paired tests "
                "compare every rung with the last, full model." if _is_ladder(rows) else "Sorted by FAA.")
             + _bounds_note(rows)
             + (" A row is one configuration: the settings in parentheses ("
                + "; ".join(sorted(variants["label"]))
                + ") are where a row differs from the default configuration; such rows never replace "
                  "or average into a default row." if len(variants) else ""),
             ""]
    for alt, rel in figs:
        lines += [f"![{alt}]({rel})", ""]
    lines += _tests_section(tests, rows)
    lines += _matrices_section(rows, runs, matrices_fig)
    lines += _metrics_section()
    lines += extra
    return "\n".join(lines).rstrip() + "\n"


def _bounds_note(rows: pd.DataFrame) -> str:
    bounds = rows[rows["role"].isin(["lower bound", "upper bound"])]
    if bounds.empty:
        return ""
    names = "; ".join(f"{r['label']} is the {r['role']}" for _, r in bounds.sort_values("role").iterrows())
    return f" {names}: references that frame the methods, not contestants."


def _friedman_section(res: FriedmanResult | None, fig: str | None) -> list[str]:
    if res is None or res.n_blocks < 2:
        return []
    out = ["## Across protocols", ""]
    if res.avg_ranks:
        body = [[lab, f"{res.avg_ranks[lab]:.2f}"] for lab in sorted(res.avg_ranks, key=lambda k: (res.avg_ranks[k], k))]
        out += [tabulate(body, headers=["method", "average rank (FAA)"], tablefmt="github",
                         disable_numparse=True), ""]
    blocks = ", ".join(f"{p} · {b}" for p, b in res.blocks)
    out.append(f"Blocks: the {res.n_blocks} protocol x backbone pairs ({blocks}), each scored by the "
               f"seed-mean {res.metric.upper()} of the main table; rank 1 is best. Seeds are not used as "
               "blocks: they are repeated runs on one data set, not independent data sets.")
    if res.dropped_labels:
        out.append(f"Left out (not run in every block): {', '.join(res.dropped_labels)}.")
    if res.statistic is not None:
        out.append(f"Friedman test: chi2 = {res.statistic:.3f}, p = {_p(res.p)} (k = {res.k} methods, "
                   f"N = {res.n_blocks} blocks). Nemenyi critical difference at alpha = {res.alpha}: "
                   f"CD = {res.cd:.3f} (q_alpha = {res.q_alpha:.3f}); average ranks further apart than CD "
                   "differ significantly (Demsar 2006).")
    elif res.reason:
        out.append(f"No Friedman test: {res.reason}.")
    out.append("")
    if fig:
        out += [f"![critical difference]({fig})", ""]
    return out


def render_tables(records: Iterable[Mapping[str, Any]], files: GeneratedFiles,
                  reference_label: str | None = None, figures: bool = True) -> str:
    """Write the result pages of complete `records` (at least one) and their figures into `files`;
    return the index page (README.md) without the links to the pages beside the tables."""
    recs = list(records)
    frame = runs_frame(recs)
    agg = aggregate(recs)
    tests = paired_tests(recs, reference_label=reference_label, metric="faa")
    fr = friedman(recs, metric="faa", table="main")
    index_main: list[str] = []
    index_abl: list[str] = []
    index_fig: list[str] = []
    for (proto, bb), g in agg.groupby(["protocol", "backbone"], sort=True):
        tables = sorted(g["table"].unique(), key=lambda t: (t != "main", t))
        ablation_links = []
        pages: dict[str, tuple] = {}
        for table in tables:
            rows = g[g["table"] == table]
            t_rows = tests[(tests["protocol"] == proto) & (tests["backbone"] == bb) & (tests["table"] == table)]
            runs = frame[(frame["protocol"] == proto) & (frame["backbone"] == bb) & (frame["table"] == table)]
            name = page_name(proto, bb, table)
            title = f"{proto} · {bb}" + ("" if table == "main" else f" · ablation {table.split(':', 1)[1]}")
            colours = row_colours(rows)
            figs: list[tuple[str, str]] = []
            matrices_rel = None
            if figures:
                base = f"figures/{_fig_base(proto, bb, table)}"
                rel = files.figure(faa_dots(rows, files.root / f"{base}_faa.png", title=title, colours=colours))
                figs.append(("FAA per method", rel))
                index_fig.append(f"- [{rel}]({rel}): FAA per method, {title}")
                curves = {lab: list(h.sort_values("seed")["acc_matrix"])
                          for lab, h in runs.groupby("label", sort=True)}
                rel = files.figure(accuracy_curves(curves, files.root / f"{base}_curves.png", title=title,
                                                   colours=colours))
                figs.append(("accuracy on seen classes after each task", rel))
                index_fig.append(f"- [{rel}]({rel}): accuracy on seen classes after each task, {title}")
                costed = rows.dropna(subset=["gflops_test", "trainable_params"])
                if table == "main" and len(costed):
                    rel = files.figure(tradeoff(costed, files.root / f"{base}_tradeoff.png", title=title,
                                                colours=colours))
                    figs.append(("FAA against test GFLOPs, trainable parameters and GFLOPs per run", rel))
                    index_fig.append(f"- [{rel}]({rel}): FAA against test GFLOPs, added parameters and "
                                     f"GFLOPs per run, {title}")
                means = {lab: mean_matrix(list(h.sort_values("seed")["acc_matrix"]))
                         for lab, h in runs.groupby("label", sort=False)}
                ordered = {lab: means[lab] for lab in _row_order(rows)["label"] if lab in means}
                matrices_rel = files.figure(accuracy_matrices(ordered, files.root / f"{base}_matrices.png",
                                                              title=title, colours=colours))
                index_fig.append(f"- [{matrices_rel}]({matrices_rel}): mean accuracy matrix per method, {title}")
            summary = _index_summary(rows, len(runs))
            if table == "main":
                index_main.append(f"- [{title}]({name}): {summary}")
            else:
                index_abl.append(f"- [{title}]({name}): {summary}")
                ablation_links.append(f"- [{title}]({name})")
            pages[table] = (title, rows, t_rows, runs, figs, matrices_rel)
        for table, (title, rows, t_rows, runs, figs, matrices_rel) in pages.items():
            extra = ["## Ablations", "", *ablation_links, ""] if table == "main" and ablation_links else []
            files.page(page_name(proto, bb, table), _page(title, rows, t_rows, runs, figs, matrices_rel, extra))

    cd_rel = None
    if figures and fr is not None and fr.n_blocks >= 2 and fr.cd is not None:
        cd_rel = files.figure(critical_difference(fr, files.root / "figures" / "cd_faa.png"))
        index_fig.append(f"- [{cd_rel}]({cd_rel}): critical-difference diagram of FAA ranks across protocols")

    n_pairs = agg[["protocol", "backbone"]].drop_duplicates().shape[0]
    n_pub = int(frame["published"].sum())
    n_local = int(frame["local"].sum())
    lines = [MARKER, "# Leaderboard", ""]
    if n_local:
        lines += [f"> **Local pages, not the committed leaderboard.** {n_local} run(s) of the local store are not "
                  f"published; their rows are marked `{LOCAL_MARK.strip()}` and are on no committed page. "
                  "`run_suite.py publish` makes them results.", ""]
    lines += [f"{len(frame)} runs over {n_pairs} protocol x backbone pair(s): {n_pub} published "
              f"(`leaderboard/records/`), {len(frame) - n_pub} from the local run store not published yet; "
              f"newest record {_date(frame['created'].max())}. Every number comes from these run records. "
              "Each table's best method is named apart from its bounds (the lower and the upper bound: "
              "references that frame the methods, not contestants).", ""]
    if index_main:
        lines += ["## Main tables", "", *index_main, ""]
    if index_abl:
        lines += ["## Ablations", "", *index_abl, ""]
    lines += _friedman_section(fr, cd_rel)
    if index_fig:
        lines += ["## Figures", "", *index_fig, ""]
    return "\n".join(lines).rstrip() + "\n"
