"""leaderboard.papers: every published number on papers.md is the data file's, and the suite's
side is computed from the right records only."""
import configparser
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from leaderboard.papers import PapersError, load_papers, render_papers
from leaderboard.markdown import MARKER

from helpers import section_tables as sections

ROOT = Path(__file__).resolve().parents[1]
NUM = re.compile(r"^(\d+\.\d+)(?: ± (\d+\.\d+|n/a))?(?: \(\?\))?$")
LADDER = ["one prompt", "+ score aggregation", "+ sparse expert selection", "+ adaptive noise",
          "+ task-adaptive prediction", "+ initial dense training", "+ router loss", "+ prototype loss (SMoPE)"]


def num(cell: str) -> tuple[float, float | None]:
    m = NUM.match(cell)
    assert m, f"not a number cell: {cell!r}"
    return float(m.group(1)), (None if m.group(2) in (None, "n/a") else float(m.group(2)))


def record(method="smope", seed=0, protocol="cifar100-10t", backbone="sup1k", faa=80.0, ffm=5.0, caa=85.0,
           table="main", label=None, created=None, **extra):
    r = {"key": f"{protocol}-{backbone}-{method}-{label}-{table}-{seed}-{created}", "protocol": protocol,
         "backbone": backbone, "method": method, "label": label or method, "table": table, "seed": seed,
         "status": "ok", "variant": {}, "metrics": {"faa": faa, "ffm": ffm, "caa": caa},
         "data_hash": "0123456789abcdef0123", "created": created or f"2025-03-0{seed % 9 + 1}T10:00:00+00:00",
         "spec": {"protocol": {"name": protocol, "split_file": None}}}
    r.update(extra)
    return r


@pytest.fixture(scope="module")
def papers():
    return load_papers()


def row_for(md: str, heading: str, paper_name: str, source_prefix: str) -> dict:
    rows = [r for r in sections(md)[heading]
            if r["paper's name"] == paper_name and r["source"].startswith(source_prefix)]
    assert len(rows) == 1, (heading, paper_name, rows)
    return rows[0]


def test_papers_yaml_is_package_data_and_loads(papers):
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["leaderboard"].split(",")]
    assert "*.yaml" in patterns
    assert (ROOT / "leaderboard" / "papers.yaml").is_file()
    assert len(papers["results"]) > 80 and papers["costs"] and papers["evaluation_differences"]


def test_ablation_rungs_are_the_suites_labels(papers):
    from methods.smope import SMoPE  # the suite's own ladder: the labels must match exactly
    rungs = [e for e in papers["results"] if e["table"] == "ablation:smope"]
    assert [e["label"] for e in rungs] == LADDER == [label for label, _ in SMoPE.ABLATION]
    assert all((e["protocol"], e["backbone"]) == ("cub200-10t", "sup21k") for e in rungs)
    assert (rungs[0]["faa"]["mean"], rungs[-1]["caa"]["mean"]) == (75.23, 91.11)


def test_every_published_number_on_the_page_is_the_data_files(papers):
    md = render_papers([], papers)
    assert md.startswith(MARKER + "\n")
    secs = sections(md)
    seen = 0
    for e in papers["results"]:
        if e["protocol"] and e["backbone"]:
            heading = (f"{e['protocol']} · {e['backbone']}" if e["table"] == "main"
                       else f"SMoPE ablation ladder · {e['protocol']} · {e['backbone']}")
        else:
            heading = "Published numbers on benchmarks or backbones the suite does not pin"
        rows = [r for r in secs[heading] if r["paper's name"] == " ".join(e["paper_name"].split())
                and r["source"].startswith(" ".join(e["source"].split()))
                and r.get("benchmark", e["benchmark"]) == e["benchmark"]
                and r.get("rung", e.get("label")) == e.get("label")]
        assert len(rows) == 1, (heading, e["paper_name"], e["source"])
        row = rows[0]
        titles = {"faa": "FAA", "ffm": "FFM", "caa": "CAA", "f_coda": "F (CODA metric)"}
        for m, title in titles.items():
            if e.get(m) is not None:
                mean, std = num(row[title])
                assert mean == e[m]["mean"] and std == e[m].get("std"), (e["paper_name"], m, row[title])
                flagged = bool(e.get("uncertain") or e[m].get("uncertain"))
                assert row[title].endswith("(?)") == flagged
            elif m in e["missing"]:
                assert row[title] == e["missing"][m]
        seen += 1
    assert seen == len(papers["results"])
    # and nothing else on the page claims to be published: every number cell belongs to an entry
    published_rows = sum(1 for rows in secs.values() for r in rows if r.get("source"))
    assert published_rows == len(papers["results"])


def test_methods_without_runs_say_not_run_yet_and_others_say_no_suite_method(papers):
    md = render_papers([record("smope", s) for s in range(3)], papers)
    row = row_for(md, "cifar100-10t · sup1k", "VQ-Prompt", "VQ-Prompt paper, Table 2")
    assert row["suite FAA"] == "not run yet" and row["Δ FAA"] == ""
    row = row_for(md, "cifar100-10t · sup1k", "NoRGa", "SMoPE poster")
    assert row["suite FAA"] == "not run yet" and row["suite method"] == "norga"
    row = row_for(md, "imagenet-r-10t · sup1k", "VQ-Prompt-S (VQ-Prompt without representation statistics)",
                  "VQ-Prompt paper, Table 5")
    assert row["suite FAA"] == "no suite method"
    row = row_for(md, "cifar100-10t · sup1k", "SMoPE", "SMoPE poster")
    assert row["suite FAA"] != "not run yet"


def test_suite_mean_std_and_difference(papers):
    faa, ffm, caa = [88.1, 89.6, 90.4], [5.0, 4.0, 3.5], [92.0, 93.1, 94.0]
    recs = [record("smope", s, faa=faa[s], ffm=ffm[s], caa=caa[s]) for s in range(3)]
    md = render_papers(recs, papers)
    row = row_for(md, "cifar100-10t · sup1k", "SMoPE", "SMoPE poster")
    mean, std = num(row["suite FAA"])
    assert mean == pytest.approx(np.mean(faa), abs=0.005) and std == pytest.approx(np.std(faa, ddof=1), abs=0.005)
    assert row["seeds (n)"] == "3 (0, 1, 2)"
    assert float(row["Δ FAA"]) == pytest.approx(np.mean(faa) - 89.23, abs=0.005)
    assert float(row["Δ CAA"]) == pytest.approx(np.mean(caa) - 93.67, abs=0.005)
    assert num(row["suite FFM"])[0] == pytest.approx(np.mean(ffm), abs=0.005)
    assert row["Δ FFM"] == ""  # the paper gives no FFM: nothing to subtract
    # the third-party reproduction row gets the same suite numbers and its own difference
    row = row_for(md, "cifar100-10t · sup1k", "SMoPE (third-party reproduction)", "a derivative")
    assert float(row["Δ FFM"]) == pytest.approx(np.mean(ffm) - 4.30, abs=0.005)


def test_one_seed_shows_na_and_a_rerun_seed_counts_once(papers):
    recs = [record("vq_prompt", 0, faa=80.0, created="2025-01-01T00:00:00+00:00"),
            record("vq_prompt", 0, faa=82.0, created="2025-02-01T00:00:00+00:00")]
    md = render_papers(recs, papers)
    row = row_for(md, "cifar100-10t · sup1k", "VQ-Prompt", "VQ-Prompt paper, Table 2")
    assert row["suite FAA"] == "82.00 ± n/a" and row["seeds (n)"] == "1 (0)"


def test_variant_failed_and_other_tables_stay_out_of_the_comparison(papers):
    good = [record("smope", s, faa=85.0 + s) for s in range(2)]
    late = "2031-01-01T00:00:00+00:00"
    noise = [record("smope", 2, faa=10.0, variant={"top_k": 3}, created=late),
             record("smope", 3, faa=10.0, status="failed", created=late),
             record("smope", 4, faa=10.0, table="ablation:smope", label="+ router loss"),
             record("smope", 5, faa=10.0, protocol="fmnist-5t", backbone="tiny"),
             record("smope", 6, faa=10.0, backbone="sup21k", created="2030-01-01T00:00:00+00:00")]
    md = render_papers(good + noise, papers)
    row = row_for(md, "cifar100-10t · sup1k", "SMoPE", "SMoPE poster")
    assert num(row["suite FAA"])[0] == 85.5 and row["seeds (n)"] == "2 (0, 1)"
    # the sup21k run is its own pair; it appears there (no published SMoPE row: "none published")
    sup21k = sections(md)["cifar100-10t · sup21k"]
    assert [r["suite FAA"] for r in sup21k if r["suite method"] == "smope"] == ["10.00 ± n/a"]
    assert [r["paper's name"] for r in sup21k if r["suite method"] == "smope"] == ["none published"]
    # the ablation record is on cifar100, not the ladder's cub200: the ladder stays empty
    ladder = sections(md)["SMoPE ablation ladder · cub200-10t · sup21k"]
    assert {r["suite FAA"] for r in ladder} == {"not run yet"}
    # the failed and the variant runs never date the page either
    assert "newest recorded 2030-01-01T00:00:00+00:00" in md and "2031" not in md


def test_ablation_ladder_compares_with_ablation_records(papers):
    recs = [record("smope", s, protocol="cub200-10t", backbone="sup21k", table="ablation:smope",
                   label="+ router loss", faa=86.0 + s, caa=90.0) for s in range(3)]
    recs.append(record("smope", 0, protocol="cub200-10t", backbone="sup21k", faa=50.0))  # main table
    md = render_papers(recs, papers)
    ladder = {r["rung"]: r for r in sections(md)["SMoPE ablation ladder · cub200-10t · sup21k"]}
    assert list(ladder) == LADDER
    assert num(ladder["+ router loss"]["suite FAA"]) == (87.0, 1.0)
    assert float(ladder["+ router loss"]["Δ FAA"]) == pytest.approx(87.0 - 87.05)
    assert ladder["+ prototype loss (SMoPE)"]["suite FAA"] == "not run yet"
    main = row_for(md, "cub200-10t · sup21k", "SMoPE", "SMoPE poster")
    assert main["suite FAA"] == "50.00 ± n/a"


def test_rendering_is_deterministic_and_dated_by_the_newest_record(papers):
    recs = [record(m, s, faa=80 + s, created=f"2025-0{s + 1}-01T00:00:00+00:00")
            for m in ("smope", "vq_prompt", "coda_prompt") for s in range(3)]
    a = render_papers(recs, papers)
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert render_papers(shuffled, papers) == a == render_papers(recs, papers)
    assert "newest recorded 2025-03-01T00:00:00+00:00" in a
    stamps = set(re.findall(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", a))
    assert stamps == {"2025-03-01T00:00:00"}


def test_imagenet_r_split_of_the_runs_and_cited_differences(papers):
    coda = {"name": "coda", "sha256": "c0dac0dac0da" + "0" * 52}
    recs = [record("smope", s, protocol="imagenet-r-10t", data_hash="feedfacecafe0123456789", split=coda)
            for s in range(2)]
    recs.append(record("l2p", 0, protocol="imagenet-r-10t", data_hash="beadbeadbead0123",
                       split={"name": "stratified", "sha256": "5a5a5a5a5a5a" + "0" * 52}))
    recs.append(record("l2p", 1, protocol="imagenet-r-5t"))  # a record from before splits were recorded
    md = render_papers(recs, papers)
    split = sections(md)["ImageNet-R split of the suite's runs"]
    head = ("protocol", "split", "split sha256 (first 12 hex)", "data_hash (first 12 hex)", "runs", "methods")
    assert split == [dict(zip(head, row)) for row in (
        ("imagenet-r-10t", "coda", "`c0dac0dac0da`", "`feedfacecafe`", "2", "smope"),
        ("imagenet-r-10t", "stratified", "`5a5a5a5a5a5a`", "`beadbeadbead`", "1", "l2p"),
        ("imagenet-r-5t", "not recorded", "`not recorded`", "`0123456789ab`", "1", "l2p"))]
    assert "No ImageNet-R runs are recorded yet." in render_papers([], papers)
    for d in papers["evaluation_differences"]:
        for ref in d["code"]:
            assert f"{ref['repo']} `{ref['file']}:{ref['lines']}` (commit {ref['commit'][:7]})" in md
    assert "l2p-pytorch `prompt.py:70-81`" in md and "HiDe-Prompt `peft/prompt/hide_prompt.py:117`" in md


def _write(tmp_path, data) -> Path:
    p = tmp_path / "papers.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return p


@pytest.mark.parametrize("change, message", [
    (lambda e: e["faa"].update(mean="75.4x"), r"faa\.mean must be a number between 0 and 100, got '75\.4x'"),
    (lambda e: e.update(method="l2p_plus"), r"method must be one of l2p, .* got 'l2p_plus'"),
    (lambda e: e.update(protocol="cifar100"), r"protocol must be one of cifar100-10t"),
    (lambda e: e.pop("source"), r"missing keys \['source'\]"),
    (lambda e: e.update(faaa={"mean": 1.0}), r"unknown keys \['faaa'\]"),
    (lambda e: e["faa"].update(std=-1), r"faa\.std must be a non-negative number"),
    (lambda e: e.update(backbone_note="nope"), r"backbone_note must be one of"),
    (lambda e: e.update(missing={"faa": "NOT FOUND"}), r"faa is both given and listed as missing"),
])
def test_malformed_entry_names_the_file_and_the_entry(tmp_path, change, message):
    data = yaml.safe_load((ROOT / "leaderboard" / "papers.yaml").read_text(encoding="utf-8"))
    change(data["results"][3])
    path = _write(tmp_path, data)
    with pytest.raises(PapersError, match=message) as err:
        load_papers(path)
    text = str(err.value)
    assert str(path) in text and "results[3] (L2P" in text


def test_duplicate_entry_and_bad_citation_are_refused(tmp_path):
    data = yaml.safe_load((ROOT / "leaderboard" / "papers.yaml").read_text(encoding="utf-8"))
    data["results"].append(dict(data["results"][0]))
    with pytest.raises(PapersError, match=r"results\[\d+\] .*repeats results\[0\]"):
        load_papers(_write(tmp_path, data))
    data["results"].pop()
    data["evaluation_differences"][0]["code"][0]["lines"] = "around 70"
    with pytest.raises(PapersError, match=r"evaluation_differences\[0\] \(batchwise-prompt-vote\).*lines"):
        load_papers(_write(tmp_path, data))
    (tmp_path / "broken.yaml").write_text("results: [\n", encoding="utf-8")
    with pytest.raises(PapersError, match=r"broken\.yaml: not valid YAML"):
        load_papers(tmp_path / "broken.yaml")
