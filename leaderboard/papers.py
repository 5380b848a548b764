"""The papers' published numbers beside the suite's: ``papers.yaml`` -> ``leaderboard/papers.md``.

Why a data file: the published numbers of six papers (and their quotes, re-runs and the SMoPE
poster) are typed once, each with its source and provenance (docs/sources.md), and every
page that shows them is rendered from that file, so a number is corrected in one place. The
suite's side is computed from run records alone, with the same filter as a leaderboard row:
status "ok", the default configuration (no ``variant``), table "main" (the SMoPE ablation ladder:
table "ablation:smope"). Pages are dated by their newest record, so rendering twice gives the
same bytes.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from protocols.record import REAL_PROTOCOLS

from .markdown import MARKER, PM, pipe_table
from .records import newest_created, usable

__all__ = ["load_papers", "render_papers", "PapersError", "PAPERS_FILE", "SUITE_METHODS", "REAL_BACKBONES"]

PAPERS_FILE = "papers.yaml"
#: The suite's names for the methods the papers report, in the order the tables list them.
SUITE_METHODS = ("l2p", "l2p_pp", "deep_l2p_pp", "dualprompt", "coda_prompt", "ovor", "hide_prompt",
                 "norga", "vq_prompt", "smope")
#: The suite's backbones that papers report on (docs/sources.md#backbones; the protocols:
#: `protocols.record.REAL_PROTOCOLS`, docs/sources.md#data).
REAL_BACKBONES = ("sup21k", "sup1k", "ibot1k", "dino1k")
ABLATION_TABLE = "ablation:smope"
#: Published metrics, in column order; f_coda is CODA-Prompt's own forgetting (not FFM).
METRICS = ("faa", "ffm", "caa", "f_coda")
METRIC_TITLE = {"faa": "FAA", "ffm": "FFM", "caa": "CAA", "f_coda": "F (CODA metric)"}
#: Metrics the suite's records carry and can be set beside the published ones.
SUITE_METRICS = ("faa", "ffm", "caa")
EVIDENCE = ("paper", "quoted", "poster", "secondary", "reproduction", "third-party")

_RESULT_KEYS = {"method", "paper_name", "benchmark", "protocol", "tasks", "backbone", "paper_backbone",
                "backbone_note", "table", "label", *METRICS, "missing", "source", "provenance", "evidence",
                "uncertain", "runs", "note"}
_RESULT_REQUIRED = {"method", "paper_name", "benchmark", "protocol", "tasks", "backbone", "source",
                    "provenance", "evidence"}
_METRIC_KEYS = {"mean", "std", "source", "uncertain"}
_COST_KEYS = {"method", "paper_name", "params_added", "params_total_m", "passes_train", "passes_test",
              "gflops_train", "gflops_test", "source", "provenance", "uncertain", "note"}
_COST_NUMBERS = ("params_total_m", "gflops_train", "gflops_test")
_DIFF_KEYS = {"id", "title", "methods", "fact", "code", "suite"}
_CODE_KEYS = {"repo", "commit", "file", "lines", "what"}
_LINES = re.compile(r"^\d+(-\d+)?(, ?\d+(-\d+)?)*$")


class PapersError(ValueError):
    """A malformed entry of the papers data file (the message names the file and the entry)."""


# ----------------------------------------------------------------------------- loading

def _default_path() -> Path:
    return Path(str(resources.files("leaderboard").joinpath(PAPERS_FILE)))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text_ok(v: Any) -> bool:
    """A non-empty one-line string without '|' (it becomes a markdown table cell)."""
    return isinstance(v, str) and v.strip() != "" and "|" not in v and "\n" not in v.strip()


class _Checker:
    def __init__(self, file: str, where: str):
        self.file, self.where = file, where

    def fail(self, problem: str) -> None:
        raise PapersError(f"{self.file}: {self.where}: {problem}; correct that entry")

    def text(self, entry: Mapping, key: str, optional: bool = False) -> None:
        v = entry.get(key)
        if v is None and optional:
            return
        if not _text_ok(v):
            self.fail(f"{key} must be a non-empty one-line string without '|', got {v!r}")

    def choice(self, entry: Mapping, key: str, allowed: Iterable, nullable: bool = True) -> None:
        v = entry.get(key)
        allowed = tuple(allowed)
        if v is None and nullable:
            return
        if v not in allowed:
            self.fail(f"{key} must be one of {', '.join(allowed)}{' or null' if nullable else ''}, got {v!r}")

    def positive_int(self, entry: Mapping, key: str) -> None:
        v = entry.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            self.fail(f"{key} must be a positive integer or null, got {v!r}")


def _check_metric(c: _Checker, name: str, m: Any) -> None:
    if not isinstance(m, Mapping):
        c.fail(f"{name} must be a mapping {{mean, std, source, uncertain}}, got {m!r}")
    extra = set(m) - _METRIC_KEYS
    if extra:
        c.fail(f"{name} has unknown keys {sorted(extra)} (allowed: {sorted(_METRIC_KEYS)})")
    if not _is_number(m.get("mean")) or not 0 <= m["mean"] <= 100:
        c.fail(f"{name}.mean must be a number between 0 and 100, got {m.get('mean')!r}")
    if m.get("std") is not None and (not _is_number(m["std"]) or m["std"] < 0):
        c.fail(f"{name}.std must be a non-negative number or absent, got {m.get('std')!r}")
    for k in ("source", "uncertain"):
        if k in m and not _text_ok(m[k]):
            c.fail(f"{name}.{k} must be a non-empty one-line string without '|', got {m[k]!r}")


def _check_result(c: _Checker, e: Any, notes: Mapping) -> dict:
    if not isinstance(e, Mapping):
        c.fail(f"must be a mapping, got {type(e).__name__}")
    extra = set(e) - _RESULT_KEYS
    if extra:
        c.fail(f"unknown keys {sorted(extra)} (allowed: {sorted(_RESULT_KEYS)})")
    absent = _RESULT_REQUIRED - set(e)
    if absent:
        c.fail(f"missing keys {sorted(absent)} (write null where a value does not apply)")
    for k in ("paper_name", "benchmark", "source", "provenance"):
        c.text(e, k)
    for k in ("paper_backbone", "uncertain", "note"):
        c.text(e, k, optional=True)
    c.choice(e, "method", SUITE_METHODS)
    c.choice(e, "protocol", REAL_PROTOCOLS)
    c.choice(e, "backbone", REAL_BACKBONES)
    c.choice(e, "evidence", EVIDENCE, nullable=False)
    c.choice(e, "table", ("main", ABLATION_TABLE))
    c.choice(e, "backbone_note", notes)
    c.positive_int(e, "tasks")
    c.positive_int(e, "runs")
    out = dict(e)
    out["table"] = e.get("table") or "main"
    if out["table"] == ABLATION_TABLE:
        c.text(e, "label")
        if e.get("protocol") is None or e.get("backbone") is None:
            c.fail("an ablation rung needs its protocol and backbone")
    elif e.get("label") is not None:
        c.fail("label is only for ablation rungs (table: ablation:smope)")
    present = [m for m in METRICS if e.get(m) is not None]
    if not present:
        c.fail(f"no published number: give at least one of {', '.join(METRICS)}")
    for m in present:
        _check_metric(c, m, e[m])
    missing = e.get("missing") or {}
    if not isinstance(missing, Mapping):
        c.fail(f"missing must be a mapping metric -> reason, got {missing!r}")
    for m, why in missing.items():
        if m not in METRICS:
            c.fail(f"missing.{m}: unknown metric (allowed: {', '.join(METRICS)})")
        if m in present:
            c.fail(f"{m} is both given and listed as missing")
        if not _text_ok(why):
            c.fail(f"missing.{m} must say why in one line, got {why!r}")
    out["missing"] = dict(missing)
    return out


def _check_cost(c: _Checker, e: Any) -> dict:
    if not isinstance(e, Mapping):
        c.fail(f"must be a mapping, got {type(e).__name__}")
    extra = set(e) - _COST_KEYS
    if extra:
        c.fail(f"unknown keys {sorted(extra)} (allowed: {sorted(_COST_KEYS)})")
    c.choice(e, "method", SUITE_METHODS)
    for k in ("paper_name", "source", "provenance"):
        c.text(e, k)
    for k in ("uncertain", "note"):
        c.text(e, k, optional=True)
    for k in ("passes_train", "passes_test"):
        c.positive_int(e, k)
    for k in _COST_NUMBERS:
        if e.get(k) is not None and (not _is_number(e[k]) or e[k] <= 0):
            c.fail(f"{k} must be a positive number or absent, got {e[k]!r}")
    added = e.get("params_added") or []
    if not isinstance(added, list):
        c.fail(f"params_added must be a list of {{count, what, basis}}, got {added!r}")
    for j, a in enumerate(added):
        if not isinstance(a, Mapping) or set(a) != {"count", "what", "basis"}:
            c.fail(f"params_added[{j}] must be {{count, what, basis}}, got {a!r}")
        if not isinstance(a["count"], int) or isinstance(a["count"], bool) or a["count"] <= 0:
            c.fail(f"params_added[{j}].count must be a positive integer, got {a['count']!r}")
        if not _text_ok(a["what"]):
            c.fail(f"params_added[{j}].what must be a one-line string without '|', got {a['what']!r}")
        if a["basis"] not in ("paper", "inferred"):
            c.fail(f"params_added[{j}].basis must be paper or inferred, got {a['basis']!r}")
    if not added and all(e.get(k) is None for k in (*_COST_NUMBERS, "passes_train", "passes_test")):
        c.fail("no published cost: give params_added, params_total_m, passes or GFLOPs")
    out = dict(e)
    out["params_added"] = [dict(a) for a in added]
    return out


def _check_difference(c: _Checker, e: Any) -> dict:
    if not isinstance(e, Mapping):
        c.fail(f"must be a mapping, got {type(e).__name__}")
    if set(e) != _DIFF_KEYS:
        c.fail(f"keys must be exactly {sorted(_DIFF_KEYS)}, got {sorted(e)}")
    for k in ("id", "title", "fact", "suite"):
        c.text(e, k)
    if not isinstance(e["methods"], list) or not set(e["methods"]) <= set(SUITE_METHODS):
        c.fail(f"methods must be a list of {', '.join(SUITE_METHODS)}, got {e['methods']!r}")
    if not isinstance(e["code"], list) or not e["code"]:
        c.fail("code must list the public code that shows the fact (repo, commit, file, lines, what)")
    for j, ref in enumerate(e["code"]):
        if not isinstance(ref, Mapping) or set(ref) != _CODE_KEYS:
            c.fail(f"code[{j}] must have exactly the keys {sorted(_CODE_KEYS)}, got {ref!r}")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(ref["repo"])):
            c.fail(f"code[{j}].repo must be owner/name, got {ref['repo']!r}")
        if not re.fullmatch(r"[0-9a-f]{40}", str(ref["commit"])):
            c.fail(f"code[{j}].commit must be a 40-hex commit, got {ref['commit']!r}")
        if not _LINES.fullmatch(str(ref["lines"])):
            c.fail(f"code[{j}].lines must be line numbers such as '70-81' or '32-33, 48-57', got {ref['lines']!r}")
        for k in ("file", "what"):
            if not _text_ok(ref[k]):
                c.fail(f"code[{j}].{k} must be a one-line string without '|', got {ref[k]!r}")
    return copy.deepcopy(dict(e))


def _describe(e: Any) -> str:
    if isinstance(e, Mapping):
        bits = [str(e[k]) for k in ("paper_name", "label", "benchmark", "backbone") if e.get(k)]
        if bits:
            return " / ".join(bits)
    return "?"


def load_papers(path: str | Path | None = None) -> dict:
    """Read and validate the papers data file (default: the packaged ``leaderboard/papers.yaml``).

    Returns ``{"backbone_notes", "results", "costs", "evaluation_differences", "notes"}`` with
    defaults filled in (``table`` "main", ``missing`` {}). A malformed entry raises
    :class:`PapersError` naming the file, the entry and what is wrong.
    """
    p = Path(path) if path is not None else _default_path()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PapersError(f"{p}: cannot read the papers data file ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PapersError(f"{p}: not valid YAML ({exc})") from exc
    f = str(p)
    if not isinstance(data, Mapping):
        raise PapersError(f"{f}: the top level must be a mapping with backbone_notes, results, costs, "
                          f"evaluation_differences, notes")
    extra = set(data) - {"backbone_notes", "results", "costs", "evaluation_differences", "notes"}
    if extra:
        raise PapersError(f"{f}: unknown top-level keys {sorted(extra)}")
    notes = data.get("backbone_notes") or {}
    if not isinstance(notes, Mapping) or not all(_text_ok(v) for v in notes.values()):
        raise PapersError(f"{f}: backbone_notes must map a name to a one-line text without '|'")
    other = data.get("notes") or {}
    if not isinstance(other, Mapping) or not all(_text_ok(v) for v in other.values()):
        raise PapersError(f"{f}: notes must map a name to a one-line text without '|'")

    results, seen = [], {}
    for i, e in enumerate(data.get("results") or []):
        c = _Checker(f, f"results[{i}] ({_describe(e)})")
        r = _check_result(c, e, notes)
        key = (r["table"], r["protocol"], r["backbone"], r["benchmark"], r.get("label") or r["paper_name"],
               r["source"])
        if key in seen:
            c.fail(f"repeats results[{seen[key]}] (same table, protocol, backbone, benchmark, name and "
                   f"source); merge the two")
        seen[key] = i
        results.append(r)
    costs, seen_cost = [], {}
    for i, e in enumerate(data.get("costs") or []):
        c = _Checker(f, f"costs[{i}] ({_describe(e)})")
        r = _check_cost(c, e)
        key = (r.get("method"), r["paper_name"])
        if key in seen_cost:
            c.fail(f"repeats costs[{seen_cost[key]}]; merge the two")
        seen_cost[key] = i
        costs.append(r)
    diffs, ids = [], set()
    for i, e in enumerate(data.get("evaluation_differences") or []):
        c = _Checker(f, f"evaluation_differences[{i}] ({e.get('id', '?') if isinstance(e, Mapping) else '?'})")
        d = _check_difference(c, e)
        if d["id"] in ids:
            c.fail(f"id {d['id']!r} is used twice")
        ids.add(d["id"])
        diffs.append(d)
    return {"backbone_notes": dict(notes), "results": results, "costs": costs,
            "evaluation_differences": diffs, "notes": dict(other)}


# ----------------------------------------------------------------------------- records

def _one_per_seed(runs: list[Mapping]) -> list[Mapping]:
    """The newest run per seed, so a re-run seed is never counted twice."""
    best: dict[Any, Mapping] = {}
    for r in sorted(runs, key=lambda r: (str(r.get("created") or ""), str(r.get("key") or ""))):
        best[r.get("seed")] = r
    return [best[s] for s in sorted(best, key=lambda s: (s is None, s))]


class _Suite:
    """Mean and sample std (ddof 1) over seeds of one row's runs."""

    def __init__(self, runs: list[Mapping]):
        self.runs = _one_per_seed(runs)
        self.seeds = [r.get("seed") for r in self.runs]
        self.stats: dict[str, tuple[float, float | None, int]] = {}
        for m in SUITE_METRICS:
            v = np.array([float(r["metrics"][m]) for r in self.runs
                          if (r.get("metrics") or {}).get(m) is not None], dtype=float)
            if len(v):
                self.stats[m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v))

    def cell(self, m: str) -> str:
        if m not in self.stats:
            return "not recorded"
        mean, std, _ = self.stats[m]
        return f"{mean:.2f} {PM} {'n/a' if std is None else f'{std:.2f}'}"

    def delta(self, m: str, published: Mapping | None) -> str:
        if m not in self.stats or published is None:
            return ""
        return f"{self.stats[m][0] - float(published['mean']):+.2f}"

    def seeds_cell(self) -> str:
        return f"{len(self.seeds)} ({', '.join(str(s) for s in self.seeds)})"


def _index(records: Iterable[Mapping[str, Any]]) -> tuple[dict, dict, list]:
    """Usable records on the papers' protocols: main rows by (protocol, backbone, method),
    ablation-ladder rows by (protocol, backbone, label), and all of them (they date the page)."""
    main: dict[tuple, list] = {}
    ladder: dict[tuple, list] = {}
    used = []
    for r in records:
        if not usable(r) or r.get("protocol") not in REAL_PROTOCOLS:
            continue
        table = r.get("table") or "main"
        if table == "main":
            main.setdefault((r["protocol"], r.get("backbone"), r.get("method")), []).append(r)
        elif table == ABLATION_TABLE:
            ladder.setdefault((r["protocol"], r.get("backbone"), r.get("label")), []).append(r)
        else:
            continue
        used.append(r)
    return main, ladder, used


# ----------------------------------------------------------------------------- rendering

def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def _published_cell(e: Mapping, m: str) -> str:
    v = e.get(m)
    if v is None:
        return e["missing"].get(m, "")
    s = f"{v['mean']:.2f}" + (f" {PM} {v['std']:.2f}" if v.get("std") is not None else "")
    return s + (" (?)" if v.get("uncertain") or e.get("uncertain") else "")


def _source_cell(e: Mapping) -> str:
    s = f"{_one_line(e['source'])} ({e['evidence']}"
    if e.get("runs"):
        s += f", {e['runs']} runs"
    return s + ")"


class _Notes:
    """Numbered notes under one table; identical texts share a number."""

    def __init__(self):
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        text = _one_line(text)
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def lines(self) -> list[str]:
        return [f"{i}. {t}" for i, t in enumerate(self.texts, 1)]


def _entry_notes(e: Mapping, papers: Mapping, notes: _Notes, backbone: bool = True) -> str:
    refs = []
    if e.get("uncertain"):
        refs.append(notes.ref(f"Uncertain: {e['uncertain']}."))
    for m in METRICS:
        v = e.get(m) or {}
        if v.get("uncertain"):
            refs.append(notes.ref(f"{METRIC_TITLE[m]} uncertain: {v['uncertain']}."))
        if v.get("source"):
            refs.append(notes.ref(f"{METRIC_TITLE[m]} from: {v['source']}."))
    if backbone and e.get("paper_backbone"):
        refs.append(notes.ref(f"Paper's backbone: {e['paper_backbone']}."))
    if e.get("backbone_note"):
        refs.append(notes.ref(papers["backbone_notes"][e["backbone_note"]]))
    if e.get("note"):
        refs.append(notes.ref(e["note"]))
    return " ".join(dict.fromkeys(refs))


def _order(e: Mapping) -> int:
    return SUITE_METHODS.index(e["method"]) if e.get("method") in SUITE_METHODS else len(SUITE_METHODS)


def _comparison(entries: list[Mapping], runs_of, extra_methods: list[str], first_col: str,
                papers: Mapping, linked: Mapping[str, str] | None = None) -> list[str]:
    """One published-vs-suite table: ``runs_of(entry_or_method)`` gives the suite's runs;
    ``linked`` ({method: page}) adds to a method's rows a note linking its reference behaviours."""
    metrics = [m for m in METRICS if any(e.get(m) is not None or m in e["missing"] for e in entries)]
    beside = [m for m in SUITE_METRICS if m in metrics and m != "faa"]
    header = [first_col, "paper's name", *[METRIC_TITLE[m] for m in metrics], "source", "suite FAA",
              "seeds (n)", "Δ FAA"]
    for m in beside:
        header += [f"suite {METRIC_TITLE[m]}", f"Δ {METRIC_TITLE[m]}"]
    header.append("notes")
    notes = _Notes()
    rows = []

    def suite_cells(runs: list | None, e: Mapping | None) -> list[str]:
        if runs is None:
            return ["no suite method", "", ""] + ["", ""] * len(beside)
        if not runs:
            return ["not run yet", "0", ""] + ["", ""] * len(beside)
        s = _Suite(runs)
        cells = [s.cell("faa"), s.seeds_cell(), s.delta("faa", e and e.get("faa"))]
        for m in beside:
            cells += [s.cell(m), s.delta(m, e and e.get(m))]
        return cells

    def reference_note(method: str | None) -> str:
        if not linked or method not in linked:
            return ""
        return notes.ref(f"The public code behind {method}'s numbers evaluates with a batch-dependent behaviour; "
                         f"the suite's {method} runs evaluated that way: [reference behaviours]({linked[method]}).")

    for e in entries:
        runs = runs_of(e)
        rows.append([e.get("label") or e.get("method") or "none", _one_line(e["paper_name"]),
                     *[_published_cell(e, m) for m in metrics], _source_cell(e),
                     *suite_cells(runs, e),
                     " ".join(filter(None, [_entry_notes(e, papers, notes), reference_note(e.get("method"))]))])
    for method in extra_methods:
        rows.append([method, "none published", *["" for _ in metrics], "", *suite_cells(runs_of(method), None),
                     reference_note(method)])
    lines: list[str] = []
    lines += pipe_table(header, rows)
    if notes.texts:
        lines += ["", "Notes:", "", *notes.lines()]
    return lines


def _other_benchmarks(entries: list[Mapping], papers: Mapping) -> list[str]:
    metrics = [m for m in METRICS if any(e.get(m) is not None or m in e["missing"] for e in entries)]
    header = ["paper's name", "suite method", "benchmark", "paper's backbone",
              *[METRIC_TITLE[m] for m in metrics], "source", "notes"]
    notes = _Notes()
    rows = []
    for e in entries:
        rows.append([_one_line(e["paper_name"]), e.get("method") or "none", _one_line(e["benchmark"]),
                     _one_line(e.get("paper_backbone") or "not stated"),
                     *[_published_cell(e, m) for m in metrics], _source_cell(e),
                     _entry_notes(e, papers, notes, backbone=False)])
    lines: list[str] = []
    lines += pipe_table(header, rows)
    if notes.texts:
        lines += ["", "Notes:", "", *notes.lines()]
    return lines


def _differences(papers: Mapping) -> list[str]:
    lines = ["## How the papers' code evaluates differently from the suite", "",
             "Facts read in the public code, at the commit named (line numbers of that version); what "
             "the suite does instead follows each.", ""]
    for d in papers["evaluation_differences"]:
        lines += [f"### {_one_line(d['title'])}", "", _one_line(d["fact"]), ""]
        for ref in d["code"]:
            lines.append(f"- {ref['repo']} `{ref['file']}:{ref['lines']}` (commit {ref['commit'][:7]}): "
                         f"{_one_line(ref['what'])}")
        lines += ["", f"The suite: {_one_line(d['suite'])}", ""]
    return lines


def _split_section(used: list[Mapping], papers: Mapping) -> list[str]:
    """The ImageNet-R split each run used, from the record's `split` (name and sha256 over its
    file lists and label order): runs that share a row saw the same images in the same labels."""
    lines = ["## ImageNet-R split of the suite's runs", ""]
    if papers["notes"].get("imagenet_r_split"):
        lines += [_one_line(papers["notes"]["imagenet_r_split"]), ""]
    groups: dict[tuple, list] = {}
    for r in used:
        if str(r.get("protocol", "")).startswith("imagenet-r"):
            split = r.get("split") or {}
            split_file = ((r.get("spec") or {}).get("protocol") or {}).get("split_file")
            name = split.get("name") or "not recorded"
            if split_file:
                name += f" (split_file {split_file})"
            key = (r["protocol"], name, str(split.get("sha256") or "")[:12] or "not recorded",
                   str(r.get("data_hash") or "")[:12] or "not recorded")
            groups.setdefault(key, []).append(r)
    if not groups:
        return lines + ["No ImageNet-R runs are recorded yet.", ""]
    rows = [[p, n, f"`{h}`", f"`{d}`", str(len(rs)), ", ".join(sorted({str(r.get('method')) for r in rs}))]
            for (p, n, h, d), rs in sorted(groups.items())]
    lines += pipe_table(["protocol", "split", "split sha256 (first 12 hex)", "data_hash (first 12 hex)", "runs",
                   "methods"], rows)
    return lines + [""]


def render_papers(records: Iterable[Mapping[str, Any]], papers: Mapping | None = None,
                  linked: Mapping[str, str] | None = None) -> str:
    """The markdown of ``leaderboard/papers.md``: published numbers beside the suite's runs.

    One table per protocol x backbone that has published numbers (plus the SMoPE ablation ladder
    and the benchmarks the suite does not run), the suite's mean ± sample std over seeds from
    usable records (status ok, no variant; table main, or ablation:smope for the ladder) and the
    difference suite minus paper; then the evaluation differences and the ImageNet-R split.
    ``linked`` ({method: page}): the methods whose rows link their reference behaviours' page.
    """
    papers = papers if papers is not None else load_papers()
    main, ladder, used = _index(records)
    results = papers["results"]
    placed = [e for e in results if e["protocol"] and e["backbone"]]
    other = [e for e in results if not (e["protocol"] and e["backbone"])]
    newest = newest_created(used)
    lines = [MARKER, "# Published numbers beside the suite", "",
             "Every published number here is read from `leaderboard/papers.yaml`, one entry per number "
             "with its source (paper table, poster, quote or re-run) and its provenance in "
             "[`docs/sources.md`](../docs/sources.md) (which table, which backbone checkpoint, which code "
             "configuration). The suite's "
             "numbers come from run records alone: status ok, default configuration (no `variant`), "
             f"table `main`; mean {PM} sample std (ddof 1) over seeds, `n/a` with one seed; "
             "Δ = suite minus paper. The papers' std is over their own runs (the CODA-Prompt and SMoPE "
             "code use `np.std`, the population std). \"not run yet\": no such run is recorded; "
             "\"(?)\": a value whose provenance is uncertain (see the notes). A variant the suite does not "
             "have (VQ-Prompt-S) is listed as published, with no suite numbers.",
             "",
             (f"Suite runs used: {len(used)}, newest recorded {newest}." if used
              else "Suite runs used: none yet (no usable run on these protocols is recorded)."), ""]

    for proto in REAL_PROTOCOLS:
        for bb in REAL_BACKBONES:
            entries = sorted((e for e in placed if e["table"] == "main" and e["protocol"] == proto
                              and e["backbone"] == bb), key=_order)
            if not entries:
                continue
            published = {e["method"] for e in entries}
            extra = [m for m in SUITE_METHODS if m not in published and main.get((proto, bb, m))]

            def runs_of(x, proto=proto, bb=bb):
                method = x if isinstance(x, str) else x.get("method")
                return None if method is None else main.get((proto, bb, method), [])

            lines += [f"## {proto} · {bb}", ""]
            lines += _comparison(entries, runs_of, extra, "suite method", papers, linked) + [""]

    for proto in REAL_PROTOCOLS:
        for bb in REAL_BACKBONES:
            rungs = [e for e in placed
                     if e["table"] == ABLATION_TABLE and e["protocol"] == proto and e["backbone"] == bb]
            if not rungs:
                continue

            def rung_runs(e, proto=proto, bb=bb):
                return ladder.get((proto, bb, e["label"]), [])

            lines += [f"## SMoPE ablation ladder · {proto} · {bb}", "",
                      f"Cumulative additions, as in the suite's table `{ABLATION_TABLE}` (one row per rung label).",
                      ""]
            lines += _comparison(rungs, rung_runs, [], "rung", papers) + [""]

    if other:
        lines += ["## Published numbers on benchmarks or backbones the suite does not pin", "",
                  "No suite protocol or backbone matches these (another benchmark, or the source does not "
                  "say which backbone or how many tasks); they are listed so that every published number "
                  "that docs/sources.md traces is here.", ""]
        lines += _other_benchmarks(other, papers) + [""]

    lines += _differences(papers)
    lines += _split_section(used, papers)
    return "\n".join(lines).rstrip("\n") + "\n"
