"""`reference-behaviours.md`: what the papers' code measured, from reference records alone.

Why a page of its own: the suite's tables are per sample, and no number on them depends on how
test images are batched. Several public codes behind published numbers evaluate otherwise (a
batch vote of the prompt choice, a prefix reshape that mixes images' key/value halves), and their
test loaders batch one task's images at a time, so whatever crosses the batch carries the task
identity. The reference records (`leaderboard.reference_records`) hold the same trained models
evaluated again that way, at several test batch sizes; this page sets them beside the per-sample
numbers, with paired tests over seeds (`stats.paired_tests`, each comparison a pair of one run's
numbers) and a figure of FAA against the test batch size. It never feeds a main table.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from protocols.reference_record import PER_SAMPLE, mode_set_name

from .figures import batch_size_curves
from .markdown import MARKER, PM, pipe_table
from .output import GeneratedFiles, slug
from .records import config_id, newest_created, variant_text
from .stats import LOCAL_MARK, paired_tests
from .tables import page_name

__all__ = ["PAGE", "render_reference", "figure_name"]

#: the page's file name in the leaderboard folder
PAGE = "reference-behaviours.md"


def figure_name(protocol: str, backbone: str, method: str) -> str:
    return f"figures/reference__{slug(protocol)}__{slug(backbone)}__{slug(method)}.png"


def _mstd(values: list[float]) -> str:
    if not values:
        return ""
    s = pd.Series(values, dtype=float)
    return f"{s.mean():.2f} {PM} n/a" if len(s) < 2 else f"{s.mean():.2f} {PM} {s.std(ddof=1):.2f}"


def _num(x: float, nd: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _trained(run: Mapping[str, Any]) -> str:
    """A configuration's name in the `trained` column: the main table's row or an ablation rung,
    marked (local) for a run not published (the local pages), as the tables mark it."""
    hp = variant_text(run.get("variant"))
    base = "main table" if run["table"] == "main" else run["label"]
    return base + (f" ({hp})" if hp else "") + (LOCAL_MARK if run.get("_local") else "")


class _Config:
    """One trained configuration (a table row of the run records) and its reference records."""

    def __init__(self, run: Mapping[str, Any]):
        self.name = _trained(run)
        self.table = run["table"]
        self.position = run.get("position", 0)
        self.eval_batch = run.get("eval_batch_size")
        self.refs: dict[int, Mapping[str, Any]] = {}  # seed -> reference record

    def faa(self, modes: tuple[str, ...], batch: int) -> dict[int, float]:
        """{seed: FAA} of the evaluation (modes, batch), in the seeds that have it."""
        out = {}
        for seed, ref in self.refs.items():
            for ev in ref["evaluations"]:
                if tuple(ev["modes"]) == modes and ev["batch_size"] == batch:
                    out[seed] = ev["metrics"]["faa"]
        return out

    def own(self) -> dict[int, float]:
        """{seed: FAA} of the run's own evaluation (per sample, its record's matrix)."""
        return {seed: _faa(ref["acc_matrix"]) for seed, ref in self.refs.items()}


def _faa(matrix: list[list[float | None]]) -> float:
    last = len(matrix) - 1
    return sum(row[last] for row in matrix) / len(matrix)


def _tests(config: _Config, key: str, protocol: str, backbone: str) -> pd.DataFrame:
    """Each evaluation of `config` (but the per-sample ones) against the run's own per-sample
    FAA, paired by seed, Holm over this configuration's comparisons."""
    pseudo = []
    for seed, ref in config.refs.items():
        pseudo.append(_pseudo(key, protocol, backbone, PER_SAMPLE, seed, _faa(ref["acc_matrix"])))
        for ev in ref["evaluations"]:
            if ev["modes"]:
                pseudo.append(_pseudo(key, protocol, backbone, f"{mode_set_name(ev['modes'])} @ {ev['batch_size']}",
                                      seed, ev["metrics"]["faa"]))
    return paired_tests(pseudo, reference_label=PER_SAMPLE)


def _pseudo(table: str, protocol: str, backbone: str, label: str, seed: int, faa: float) -> dict[str, Any]:
    """One number as `stats.paired_tests` reads a run: the comparisons of one configuration form
    its own table (`table`), each (behaviour, batch) a label."""
    return {"key": f"{table}|{label}|{seed}", "protocol": protocol, "backbone": backbone, "table": table,
            "label": label, "method": label, "seed": seed, "role": "method", "metrics": {"faa": faa}}


def _method_section(protocol: str, backbone: str, method: str, configs: list[_Config], files: GeneratedFiles | None,
                    figures: bool) -> list[str]:
    refs = [r for c in configs for r in c.refs.values()]
    modes_text = refs[0]["reference_modes"]
    test = refs[0]["reference_test"]
    ref_modes, ref_batch = (tuple(test["modes"]), test["batch_size"]) if test else ((), None)
    lines = [f"### {method}", ""]
    for mode, text in sorted(modes_text.items()):
        lines.append(f"- `{mode}`: {text}")
    lines.append("")
    if test:
        lines += [f"Reference configuration for {protocol}: {test['source']}. It evaluates with "
                  f"{' and '.join(f'`{m}`' for m in ref_modes)} at test batch {ref_batch} (**bold** below).", ""]
    sets = sorted({tuple(ev["modes"]) for r in refs for ev in r["evaluations"] if ev["modes"]},
                  key=lambda s: (len(s), s))
    batches = sorted({ev["batch_size"] for r in refs for ev in r["evaluations"]})
    own = sorted({c.eval_batch for c in configs if c.eval_batch})
    header = ["trained", "seeds", "test behaviour", *[f"batch {b}" for b in batches],
              *[f"batch {b} (the run's own)" for b in own]]
    rows = []
    for c in configs:
        seeds = ", ".join(str(s) for s in sorted(c.refs))
        cells = [_mstd(list(c.faa((), b).values())) for b in batches]
        cells += [_mstd(list(c.own().values())) if b == c.eval_batch else "" for b in own]
        rows.append([c.name, seeds, PER_SAMPLE, *cells])
        for s in sets:
            cells = []
            for b in batches:
                cell = _mstd(list(c.faa(s, b).values()))
                cells.append(f"**{cell}**" if cell and s == ref_modes and b == ref_batch else cell)
            rows.append(["", "", mode_set_name(s), *cells, *["" for _ in own]])
    lines += [f"FAA (%), mean {PM} sample std over seeds:", ""] + pipe_table(header, rows) + [""]

    test_rows, summary = [], []
    for c in configs:
        t = _tests(c, f"{method}|{c.name}", protocol, backbone)
        for _, r in t.iterrows():
            test_rows.append([c.name, r["label"], str(r["n"]), _num(r["mean_reference"]), _num(r["mean_label"]),
                              _num(r["mean_diff"], signed=True), f"[{_num(r['ci_low'], signed=True)}, "
                              f"{_num(r['ci_high'], signed=True)}]", _p(r["p"]), _p(r["p_holm"])])
        measured = c.faa(ref_modes, ref_batch) if test else {}
        if measured:
            own = c.own()
            diff = [measured[s] - own[s] for s in measured]
            row = t[t["label"] == f"{mode_set_name(ref_modes)} @ {ref_batch}"]
            tested = (f", p (Holm) {_p(row['p_holm'].iloc[0])}" if len(row) else
                      ", no paired test with one seed")
            summary.append(f"What it means ({c.name}): {method}'s numbers from its reference configuration were "
                           f"measured with {mode_set_name(ref_modes)} at test batch {ref_batch}. Evaluated that way, "
                           f"these trained models score FAA {_num(sum(measured.values()) / len(measured))} instead "
                           f"of {_num(sum(own[s] for s in measured) / len(measured))} per sample (Δ "
                           f"{_num(sum(diff) / len(diff), signed=True)}, n = {len(diff)}{tested}).")
    if not test_rows:
        lines += ["No paired test: it needs two seeds or more of a configuration.", ""]
    else:
        lines += ["Each test behaviour against the same runs' per-sample FAA, paired by seed (two-sided paired "
                  "t-test, Holm-corrected over the comparisons of one trained configuration; Δ = behaviour minus "
                  "per sample):", ""]
        lines += pipe_table(["trained", "test behaviour @ batch", "n", "FAA per sample", "FAA", "Δ FAA", "95% CI",
                             "p", "p (Holm)"], test_rows) + [""]

    ablations = sorted({c.table for c in configs if c.table != "main"})
    for table in ablations:
        lines += [f"Trained as the code against trained per sample, and every other metric of these runs: "
                  f"[{table.split(':', 1)[1]}]({page_name(protocol, backbone, table)}) (the ablation's table, "
                  "its paired tests between rungs).", ""]

    if figures and files is not None and batches:
        curves = []
        for c in configs:
            per_sample = {b: list(c.faa((), b).values()) for b in batches}
            if c.eval_batch:
                per_sample.setdefault(c.eval_batch, list(c.own().values()))
            curves.append({"trained": c.name, "behaviour": PER_SAMPLE, "points": per_sample})
            for s in sets:
                curves.append({"trained": c.name, "behaviour": mode_set_name(s),
                               "points": {b: list(c.faa(s, b).values()) for b in batches}})
        curves = [c for c in curves if any(c["points"].values())]
        if curves:
            rel = files.figure(batch_size_curves(curves, files.root / figure_name(protocol, backbone, method),
                                                 f"{protocol} · {backbone} · {method}", ref_batch))
            lines += [f"![FAA against the test batch size, {method}]({rel})", ""]

    for text in summary + _as_the_code(configs, ref_modes, ref_batch, method, protocol, backbone):
        lines += [text, ""]
    return lines


def _as_the_code(configs: list[_Config], ref_modes: tuple[str, ...], ref_batch: int | None, method: str,
                 protocol: str, backbone: str) -> list[str]:
    """For each later rung of an ablation against its first (e.g. trained as the code against
    trained per sample): the later rung evaluated as the reference configuration evaluates against
    the first evaluated per sample, paired by seed. That is the public code's number against the
    suite's, training and evaluation both changed."""
    if ref_batch is None:
        return []
    out = []
    for table in sorted({c.table for c in configs if c.table != "main"}):
        rungs = [c for c in configs if c.table == table]
        first = rungs[0]
        for rung in rungs[1:]:
            code, suite = rung.faa(ref_modes, ref_batch), first.own()
            seeds = sorted(set(code) & set(suite))
            if not seeds:
                continue
            key = f"{method}|{table}|{rung.name}"
            faithful, as_code = f"{first.name}, per sample", f"{rung.name}, as the code"
            pseudo = [_pseudo(key, protocol, backbone, faithful, s, suite[s]) for s in seeds]
            pseudo += [_pseudo(key, protocol, backbone, as_code, s, code[s]) for s in seeds]
            t = paired_tests(pseudo, reference_label=faithful)
            mean_code, mean_suite = (sum(v[s] for s in seeds) / len(seeds) for v in (code, suite))
            tested = f", p {_p(t['p'].iloc[0])}" if len(t) else ", no paired test with one seed"
            out.append(f"Trained and evaluated as the public code does ({rung.name}; {mode_set_name(ref_modes)} at "
                       f"test batch {ref_batch}): FAA {_num(mean_code)}, against {_num(mean_suite)} trained and "
                       f"evaluated per sample ({first.name}): Δ {_num(mean_code - mean_suite, signed=True)} "
                       f"(n = {len(seeds)}{tested}): on this protocol and backbone, the gap between what the public "
                       "code would report and the suite's number.")
    return out


def _checks(references: list[Mapping[str, Any]]) -> list[str]:
    """The runtime checks every reference record allows: at batch 1 each mode set is the
    per-sample evaluation, and per sample nothing depends on the batch size."""
    one, one_ok, flat, flat_ok = 0, 0, 0, 0
    off: list[str] = []
    for r in references:
        for ev in r["evaluations"]:
            same = ev["acc_matrix"] == r["acc_matrix"]
            if ev["modes"] and ev["batch_size"] == 1:
                one, one_ok = one + 1, one_ok + same
            elif not ev["modes"]:
                flat, flat_ok = flat + 1, flat_ok + same
            if not same and (not ev["modes"] or ev["batch_size"] == 1):
                off.append(f"{r['protocol']} · {r['backbone']} · {r['label']} seed {r['seed']} "
                           f"({mode_set_name(ev['modes'])} at batch {ev['batch_size']})")
    lines = [f"- At test batch 1, where no image shares a batch, the reference modes gave exactly the per-sample "
             f"accuracy matrix in {one_ok} of {one} evaluations.",
             f"- Per sample, every test batch size gave exactly the run's own accuracy matrix in {flat_ok} of {flat} "
             "evaluations."]
    if off:
        lines.append("- Not exactly equal (float summation order; see the matrices in the reference records): "
                     + "; ".join(off[:20]) + (f"; and {len(off) - 20} more" if len(off) > 20 else "") + ".")
    return lines


def render_reference(references: Iterable[Mapping[str, Any]], runs: Iterable[Mapping[str, Any]],
                     files: GeneratedFiles | None = None, figures: bool = True) -> str:
    """The page's markdown from reference records (each already checked against its run,
    `reference_records.check_reference`) and the run records they extend (`runs`); figures go
    through `files` (none without it)."""
    by_key = {r["key"]: r for r in runs}
    refs = sorted(references, key=lambda r: (r["protocol"], r["backbone"], r["method"], r["table"], r["label"],
                                             r["seed"]))
    groups: dict[tuple[str, str, str], dict[str, _Config]] = {}
    for ref in refs:
        run = by_key[ref["key"]]
        configs = groups.setdefault((ref["protocol"], ref["backbone"], ref["method"]), {})
        config = configs.setdefault(config_id(run), _Config(run))
        config.refs[ref["seed"]] = ref
    newest = newest_created(refs)
    lines = [MARKER, "# Reference behaviours: what the papers' code measured", "",
             "The suite evaluates every method per sample: no number in its tables depends on how test images "
             "are batched. The public code behind several published numbers does not: L2P's and DualPrompt's "
             "CIFAR-100 configurations choose one prompt set per test batch by majority vote, and the PyTorch "
             "DualPrompt, HiDe-Prompt and NoRGa code reshape each image's prefix across the batch, so that images "
             "receive other images' key/value halves (the mechanisms and their file and line are listed per "
             "method below, and in [papers.md](papers.md)). Their test loops score one task's test set at a time, "
             "so a test batch holds one task's images, and whatever crosses the batch carries the task identity, "
             "which class-incremental evaluation must not be given.",
             "",
             "Here the same trained models are scored both ways. Each run was trained again from its spec and, after "
             "each task's own evaluation, scored again under each reference mode (and the modes its reference "
             "configuration turns on together) at several test batch sizes: every test image once, one task's test "
             "set at a time, batched in the data set's own order within the task (the order of its test file or list, "
             "as the reference codes' sequential test loaders batch it; the order decides which images share a "
             "batch). The re-evaluations run under a forked RNG and outside the "
             "run's own evaluation, so its per-sample accuracy matrix is bit-identical to the published run's: each "
             "reference record repeats that matrix and is accepted only if it is equal, entry for entry. The "
             "reference records are in `leaderboard/records/reference/`; `python run_suite.py reference` makes "
             "them.",
             "",
             "A number measured under one of these behaviours includes what the batch shares, not only what the "
             "method learned. Its size depends on the data, the backbone, the batch size and the order images are "
             "batched in, so a published number cannot be corrected by the differences below; it can only be "
             "measured again per sample, as the suite's tables do.",
             "",
             (f"Reference records: {len(refs)}, newest recorded {newest}." if refs else
              "No reference records yet: `python run_suite.py reference` makes them."), ""]
    if not refs:
        return "\n".join(lines).rstrip("\n") + "\n"
    lines += ["Checks over every reference record:", "", *_checks(refs), ""]
    for (protocol, backbone) in sorted({(p, b) for p, b, _ in groups}):
        lines += [f"## {protocol} · {backbone}", ""]
        for (p, b, method), configs in sorted(groups.items()):
            if (p, b) != (protocol, backbone):
                continue
            ordered = sorted(configs.values(), key=lambda c: (c.table != "main", c.table, c.position, c.name))
            lines += _method_section(protocol, backbone, method, ordered, files, figures)
    return "\n".join(lines).rstrip("\n") + "\n"
