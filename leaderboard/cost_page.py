"""The cost page, ``leaderboard/cost.md``: what each method adds and costs, published beside measured,
per image and per run.

Why generated: the cost table used to be typed into the README; here every measured number comes
from a stored record (run records for the counts of the runs behind the leaderboard, profile
records for throughput, fraction of the device's matmul peak and memory at real shape, smoke
records for the real-shape dry runs) and every published one from ``papers.yaml``. Where no record
exists the page says so instead of showing a number. Dated by the newest record used, so
rendering twice gives the same bytes.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from protocols.record import COST_FIELDS

from .markdown import MARKER, PM, pipe_table
from .papers import SUITE_METHODS, load_papers
from .records import newest_created, usable
from .stats import LOCAL_MARK

__all__ = ["render_cost"]

def _int(v: Any) -> str:
    return "—" if v is None else f"{int(round(float(v))):,}"


def _num(v: Any, nd: int = 2) -> str:
    return "—" if v is None else f"{float(v):.{nd}f}"


def _gflops(v: Any) -> str:
    """Two decimals as the papers print them; 3 significant digits below 1 (the tiny ViT's 0.0334)."""
    return "—" if v is None else (f"{float(v):.2f}" if abs(float(v)) >= 1 else f"{float(v):.3g}")


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100.0 * float(v):.1f}%"


def _pair(a: Any, b: Any, fmt=_int) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def _method_key(m: Any) -> tuple:
    m = str(m)
    return (SUITE_METHODS.index(m), m) if m in SUITE_METHODS else (len(SUITE_METHODS), m)


def _order_key(r: Mapping) -> tuple:
    """Newest last; ties broken by the record's content, so input order never matters."""
    return str(r.get("created") or ""), json.dumps(r, sort_keys=True, default=str)


def _newest(records: list[Mapping]) -> Mapping:
    return max(records, key=_order_key)


def _latest(records: Iterable[Mapping], key: Callable[[Mapping], tuple]) -> dict[tuple, Mapping]:
    """The newest record per ``key(record)``."""
    out: dict[tuple, Mapping] = {}
    for r in sorted(records, key=_order_key):
        out[key(r)] = r
    return out


def _published_by_method(papers: Mapping) -> dict[str, Mapping]:
    return {c["method"]: c for c in papers["costs"] if c.get("method")}


def _published_added(c: Mapping | None) -> str:
    if not c or not c.get("params_added"):
        return "—"
    return "; ".join(f"{a['count']:,} ({a['what']})" for a in c["params_added"])


def _published_gflops(c: Mapping | None) -> str:
    if not c or (c.get("gflops_train") is None and c.get("gflops_test") is None):
        return "—"
    return _pair(c.get("gflops_train"), c.get("gflops_test"), _gflops)


def _published_section(papers: Mapping) -> list[str]:
    lines = ["## Published cost (ViT-B/16, 224 px, per image)", "",
             "From `leaderboard/papers.yaml`. Added parameters exclude the head; basis `paper` where the "
             "paper states the count, `inferred` where it is computed from the configuration "
             "(docs/sources.md#cost). The "
             "total is the SMoPE poster's, head included. GFLOPs are per image and forward, as published "
             "(a plain ViT-B/16 forward is counted as 33.72).", ""]
    rows, notes = [], []
    for c in papers["costs"]:
        added = "; ".join(f"{a['count']:,} ({a['what']}; {a['basis']})" for a in c["params_added"]) or "—"
        total = "—" if c.get("params_total_m") is None else f"{c['params_total_m']:.2f}M"
        ref = ""
        for text in (c.get("uncertain") and f"Uncertain: {c['uncertain']}.", c.get("note")):
            if text:
                notes.append(" ".join(str(text).split()))
                ref += f"[{len(notes)}]"
        rows.append([c.get("method") or "none", c["paper_name"], added, total,
                     _pair(c.get("passes_train"), c.get("passes_test")), _published_gflops(c),
                     f"{c['source']} ({c['provenance']})", ref])
    lines += pipe_table(["suite method", "paper's name", "added parameters", "total incl. head (poster)",
                   "passes train / test", "GFLOPs train / test", "source", "notes"], rows)
    if notes:
        lines += ["", "Notes:", "", *[f"{i}. {t}" for i, t in enumerate(notes, 1)]]
    return lines + [""]


def _runs_section(runs: list[Mapping], published: Mapping[str, Mapping]) -> list[str]:
    lines = ["## Counted on the runs behind the leaderboard (run records)", "",
             "The `cost` of each method's newest usable run (status ok, default configuration, table "
             "`main`), counted on the run's own backbone and protocol; FLOPs from "
             "`torch.utils.flop_counter`, 2 per multiply-add, forward, per image.", ""]
    groups: dict[tuple, dict[str, list]] = {}
    for r in runs:
        pair = (str(r.get("protocol")), str(r.get("backbone")))
        groups.setdefault(pair, {}).setdefault(str(r.get("method")), []).append(r)
    if not groups:
        return lines + ["No run record with a cost is stored yet.", ""]
    for (proto, bb), by_method in sorted(groups.items()):
        rows = []
        for method in sorted(by_method, key=_method_key):
            rs = by_method[method]
            c = _newest(rs)["cost"]
            varies = {tuple((r.get("cost") or {}).get(k) for k in COST_FIELDS) for r in rs}
            pub = published.get(method)
            rows.append([method, _int(c.get("trainable_params")), _int(c.get("head_params")),
                         _pair(c.get("passes_train"), c.get("passes_test")),
                         _pair(c.get("gflops_train"), c.get("gflops_test"), _gflops),
                         _published_added(pub), _published_gflops(pub),
                         f"{len(rs)}" + (" (counts differ between runs; newest shown)" if len(varies) > 1 else ""),
                         str(newest_created(rs) or "—")])
        lines += [f"### {proto} · {bb}", ""]
        lines += pipe_table(["method", "added parameters", "head parameters", "passes train / test",
                       "GFLOPs train / test", "published added parameters (ViT-B/16)",
                       "published GFLOPs train / test (ViT-B/16)", "runs", "newest run"], rows)
        lines.append("")
    return lines


def _flops(v: float | None) -> str:
    """GFLOPs with a unit that keeps them readable: 643 GFLOPs, 16.9 PFLOPs."""
    if v is None:
        return "—"
    for unit, size in (("PFLOPs", 1e6), ("TFLOPs", 1e3)):
        if v >= 10 * size:
            return f"{v / size:,.3g} {unit}" if v / size < 1000 else f"{v / size:,.0f} {unit}"
    return f"{v:,.3g} GFLOPs" if v < 1000 else f"{v:,.0f} GFLOPs"


def _median(values: list[float]) -> float | None:
    vs = sorted(values)
    if not vs:
        return None
    mid = len(vs) // 2
    return vs[mid] if len(vs) % 2 else (vs[mid - 1] + vs[mid]) / 2


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} {PM} {sd:.1f}"


def _per_run_section(runs: list[Mapping]) -> list[str]:
    """What one run costs: its forward GFLOPs by part (counted) and its wall time (measured, on the
    device and threads it names)."""
    lines = ["## Per run: GFLOPs counted, wall time measured (run records)", "",
             "Forward GFLOPs of one whole run (`run_gflops`), median over the method's usable runs: the "
             "training epochs (training images x epochs x training GFLOPs per image), the per-task stages "
             "(a method's extra epochs, and its no-grad passes over each task's training images for "
             "statistics or task identity, at one test pass's GFLOPs each) and the evaluation after every task "
             "(the test images of the tasks seen so far x test GFLOPs per image); counted by "
             "`protocols/work.py`, the count `dry-run` turns into hours. Backward passes are not counted; "
             "for runs recorded before the field, it is counted now from their resolved spec and cost. The "
             "wall time of training (mean " + PM + " sample std over the runs) is a measurement of the "
             "machine and its load as much as of the method: it is given with the device and the torch "
             "threads the runs used, and the GFLOPs, not the seconds, compare methods.", ""]
    groups: dict[tuple, dict[str, list]] = {}
    for r in runs:
        pair = (str(r.get("protocol")), str(r.get("backbone")))
        label = str(r.get("method")) + (LOCAL_MARK if r.get("_local") else "")
        groups.setdefault(pair, {}).setdefault(label, []).append(r)
    if not groups:
        return lines + ["No run record is stored yet.", ""]
    for (proto, bb), by_method in sorted(groups.items()):
        rows = []
        for label in sorted(by_method, key=lambda m: (_method_key(m.removesuffix(LOCAL_MARK)), m)):
            rs = by_method[label]
            parts = {k: _median([float(r["run_gflops"][k]) for r in rs if r.get("run_gflops")])
                     for k in ("train", "stages", "eval", "total")}
            times = [float(r["timings"]["train_s"]) for r in rs if (r.get("timings") or {}).get("train_s") is not None]
            where = sorted({f"{r.get('device') or '?'}, {r.get('threads') or '?'} thread(s)" for r in rs})
            rows.append([label, _flops(parts["train"]), _flops(parts["stages"]), _flops(parts["eval"]),
                         _flops(parts["total"]), _mean_sd(times), "; ".join(where), str(len(rs))])
        lines += [f"### {proto} · {bb}, per run", ""]
        lines += pipe_table(["method", "training epochs", "per-task stages", "evaluation", "run total (forward)",
                             "train wall time (s)", "device, threads", "runs"], rows)
        lines.append("")
    return lines


def _profile_section(profiles: list[Mapping], published: Mapping[str, Mapping]) -> list[str]:
    lines = ["## Measured at real shape (profile records)", "",
             "Throughput of training and evaluation steps, the achieved fraction of the device's matmul "
             "peak (measured in the same run) and the peak memory, per device; the newest record per "
             "device, protocol, backbone, method, precision and batch sizes. CPU share: the CPU time the "
             "profiling process got over its wall time and thread count; below about 0.9 other work shared "
             "the CPU, so its images/s are low and its fraction of peak is not clean (it can pass 100% when "
             "the peak was measured at a quieter moment).", ""]
    latest = _latest(profiles, lambda p: tuple(str(p.get(f)) for f in (
        "protocol", "backbone", "method", "device", "precision", "batch_size", "eval_batch_size", "threads")))
    if not latest:
        return lines + ["No profile records are stored yet: throughput, fraction of peak and peak memory "
                        "have not been measured.", ""]
    groups: dict[tuple, list] = {}
    for k, p in latest.items():
        groups.setdefault(k[:2], []).append(p)
    for (proto, bb), ps in sorted(groups.items()):
        ps.sort(key=lambda p: (_method_key(p.get("method")), str(p.get("device")), str(p.get("precision")),
                               str(p.get("batch_size")), str(p.get("created"))))
        rows = []
        for p in ps:
            c = p.get("cost") or {}
            pub = published.get(str(p.get("method")))
            mem = p.get("peak_mem_mb")
            rows.append([str(p.get("method")), str(p.get("device")), str(p.get("precision")),
                         f"{p.get('batch_size')} / {p.get('eval_batch_size')}", str(p.get("threads")),
                         _int(c.get("trainable_params")), _pair(c.get("passes_train"), c.get("passes_test")),
                         _pair(c.get("gflops_train"), c.get("gflops_test"), _gflops), _published_gflops(pub),
                         _num(p.get("train_img_s"), 1), _num(p.get("eval_img_s"), 1),
                         _num(p.get("matmul_tflops"), 1),
                         f"{_pct(p.get('frac_peak_train'))} / {_pct(p.get('frac_peak_eval'))}",
                         _num(p.get("cpu_share")),
                         "not measured" if mem is None else _int(mem), str(p.get("created") or "—")])
        lines += [f"### {proto} · {bb}", ""]
        lines += pipe_table(["method", "device", "precision", "batch train / eval", "threads", "added parameters",
                       "passes train / test", "GFLOPs train / test", "published GFLOPs train / test (ViT-B/16)",
                       "train images/s", "eval images/s", "matmul peak (TFLOP/s)",
                       "fraction of peak train / eval", "CPU share", "peak memory (MB)", "measured"], rows)
        lines.append("")
    return lines


def _loader_section(loaders: list[Mapping]) -> list[str]:
    if not loaders:
        return []
    latest = _latest(loaders, lambda r: (str(r.get("device")), str(r.get("protocol")), str(r.get("workers"))))
    lines = ["### Data loading (loader records)", ""]
    rows = [[d, p, w, _num(latest[(d, p, w)].get("img_s"), 1), str(latest[(d, p, w)].get("created") or "—")]
            for d, p, w in sorted(latest)]
    lines += pipe_table(["device", "protocol", "workers", "images/s", "measured"], rows)
    return lines + [""]


def _smoke_section(smoke: list[Mapping]) -> list[str]:
    """One row per protocol, backbone, method, device and task count: a reduced run
    (`smoke --tasks K`) never hides when the full protocol last passed, nor the reverse."""
    lines = ["## Real-shape dry runs (smoke records)", "",
             "Kept apart from the results: a smoke run checks that a method runs end to end at the "
             "protocol's real shape; it produces no accuracy. Wall time of the newest complete run and "
             "the date it last passed, for the full protocol and for its reduced form (`run_suite.py smoke --tasks K`, "
             "the first K tasks) each.", ""]
    fields = ("protocol", "backbone", "method", "device", "tasks")
    latest = _latest((s for s in smoke if s.get("complete") is True), lambda s: tuple(str(s.get(f)) for f in fields))
    if not latest:
        return lines + ["No smoke records are stored yet: no real-shape dry run has passed.", ""]
    order = sorted(latest, key=lambda k: (k[0], k[1], _method_key(k[2]), k[3], -int(k[4]) if k[4].isdigit() else 0))
    rows = [[p, b, m, d, t, _num(latest[(p, b, m, d, t)].get("wall_s"), 1),
             str(latest[(p, b, m, d, t)].get("created") or "—")] for p, b, m, d, t in order]
    lines += pipe_table(["protocol", "backbone", "method", "device", "tasks", "wall time (s)", "last passed"], rows)
    return lines + [""]


def render_cost(records: Iterable[Mapping[str, Any]], profiles: Iterable[Mapping[str, Any]],
                smoke: Iterable[Mapping[str, Any]], papers: Mapping | None = None) -> str:
    """The markdown of ``leaderboard/cost.md``.

    ``records``: run records (usable main-table runs with a ``cost`` are counted); ``profiles``:
    profile records (``kind`` "profile") and loader records (``kind`` "loader"); ``smoke``: smoke
    records (only ``complete`` ones count as passed). ``papers``: ``load_papers()`` by default.
    """
    papers = papers if papers is not None else load_papers()
    published = _published_by_method(papers)
    runs = [r for r in records if usable(r) and (r.get("table") or "main") == "main" and r.get("cost")]
    profiles = list(profiles)
    prof = [p for p in profiles if p.get("kind", "profile") == "profile"]
    loaders = [p for p in profiles if p.get("kind") == "loader"]
    passed = [s for s in smoke if s.get("complete") is True]
    newest = newest_created([*runs, *prof, *loaders, *passed])
    lines = [MARKER, "# Cost", "",
             "What each method adds to the frozen ViT and what it costs per image and per run, published "
             "beside measured. Measured numbers come only from stored records: run records, profile records "
             "(`run_suite.py profile`, `leaderboard/profiles/`) and smoke records (`run_suite.py smoke`, `leaderboard/smoke/`).",
             "",
             f"Newest record used: {newest}." if newest else "No records are stored yet.", ""]
    lines += _published_section(papers)
    lines += _runs_section(runs, published)
    lines += _per_run_section(runs)
    lines += _profile_section(prof, published)
    lines += _loader_section(loaders)
    lines += _smoke_section(passed)
    return "\n".join(lines).rstrip("\n") + "\n"
