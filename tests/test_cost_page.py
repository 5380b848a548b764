"""leaderboard.cost_page: published counts from the data file, measured ones only from records."""
import random
import re

import pytest

from leaderboard.cost_page import render_cost
from leaderboard.papers import load_papers
from leaderboard.markdown import MARKER

from helpers import section_tables


def sections(md: str) -> dict[str, list[dict]]:
    return section_tables(md, headings=("## ", "### "))


COST = {"trainable_params": 230400, "head_params": 76900, "passes_train": 1, "passes_test": 1,
        "gflops_train": 35.24, "gflops_test": 35.24}
H200 = "cuda:0 (NVIDIA H200)"


def run(method="smope", seed=0, protocol="fmnist-5t", backbone="tiny", cost=None, created=None, **extra):
    r = {"key": f"{protocol}-{backbone}-{method}-{seed}-{created}", "protocol": protocol, "backbone": backbone,
         "method": method, "label": method, "table": "main", "seed": seed, "status": "ok", "variant": {},
         "metrics": {"faa": 80.0}, "cost": dict(COST if cost is None else cost),
         "created": created or f"2025-01-0{seed + 1}T00:00:00+00:00"}
    r.update(extra)
    return r


def profile(method="smope", device=H200, created="2025-02-01T00:00:00+00:00", **extra):
    p = {"kind": "profile", "created": created, "device": device, "versions": {}, "protocol": "cifar100-10t",
         "backbone": "sup21k", "method": method, "precision": "bf16", "batch_size": 128, "eval_batch_size": 256,
         "threads": 16, "train_img_s": 812.34, "eval_img_s": 2400.06, "peak_mem_mb": 20345.0,
         "matmul_tflops": 701.5, "train_tflops": 80.1, "eval_tflops": 81.0, "frac_peak_train": 0.1142,
         "frac_peak_eval": 0.1155, "cost": dict(COST)}
    p.update(extra)
    return p


def smoke(method="smope", created="2025-03-01T00:00:00+00:00", complete=True, wall_s=123.4, **extra):
    s = {"kind": "smoke", "created": created, "device": H200, "protocol": "cifar100-10t", "backbone": "sup21k",
         "method": method, "tasks": 10, "wall_s": wall_s, "complete": complete, "versions": {}}
    s.update(extra)
    return s


@pytest.fixture(scope="module")
def papers():
    return load_papers()


def test_published_counts_are_the_data_files(papers):
    md = render_cost([], [], [], papers)
    assert md.startswith(MARKER + "\n")
    rows = sections(md)["Published cost (ViT-B/16, 224 px, per image)"]
    assert [(r["suite method"], r["paper's name"]) for r in rows] == \
        [(c.get("method") or "none", c["paper_name"]) for c in papers["costs"]]
    for r, c in zip(rows, papers["costs"]):
        counts = [int(x.replace(",", "")) for x in re.findall(r"(?:^|; )([\d,]+) \(", r["added parameters"])]
        assert counts == [a["count"] for a in c["params_added"]]
        total = None if r["total incl. head (poster)"] == "—" else float(r["total incl. head (poster)"].rstrip("M"))
        assert total == c.get("params_total_m")
        tr, te = r["GFLOPs train / test"].split(" / ") if "/" in r["GFLOPs train / test"] else ("—", "—")
        assert (None if tr == "—" else float(tr)) == c.get("gflops_train")
        assert (None if te == "—" else float(te)) == c.get("gflops_test")
        ptr, pte = r["passes train / test"].split(" / ")
        assert (None if ptr == "—" else int(ptr), None if pte == "—" else int(pte)) == \
            (c.get("passes_train"), c.get("passes_test"))


def test_no_profile_or_smoke_record_is_said_plainly(papers):
    md = render_cost([], [], [], papers)
    secs = sections(md)
    assert secs["Measured at real shape (profile records)"] == []
    assert not any(h.startswith("cifar100") or h.startswith("Data loading") for h in secs)
    assert secs["Real-shape dry runs (smoke records)"] == []
    assert "No profile records are stored yet" in md and "No smoke records are stored yet" in md
    assert "No run record with a cost is stored yet." in md and "No records are stored yet." in md


def test_run_records_one_table_per_protocol_and_backbone_newest_usable_run(papers):
    recs = [run("smope", 0), run("smope", 1, cost={**COST, "trainable_params": 999}),  # newest: seed 1
            run("l2p", 0, cost={**COST, "trainable_params": 1920, "passes_train": 2, "passes_test": 2,
                                "gflops_train": 0.0745, "gflops_test": 0.07452}),
            run("smope", 2, cost={**COST, "trainable_params": 5}, status="failed", created="2026-01-01T00:00:00+00:00"),
            run("smope", 3, cost={**COST, "trainable_params": 7}, variant={"top_k": 3},
                created="2026-01-01T00:00:00+00:00"),
            run("smope", 0, protocol="cifar100-10t", backbone="sup21k")]
    md = render_cost(recs, [], [], papers)
    secs = sections(md)
    tiny = {r["method"]: r for r in secs["fmnist-5t · tiny"]}
    assert [r["method"] for r in secs["cifar100-10t · sup21k"]] == ["smope"]
    assert list(tiny) == ["l2p", "smope"]  # suite order, failed / variant runs left out
    assert tiny["smope"]["added parameters"] == "999" and tiny["smope"]["runs"].startswith("2 (counts differ")
    assert tiny["l2p"]["passes train / test"] == "2 / 2"
    assert tiny["l2p"]["GFLOPs train / test"] == "0.0745 / 0.0745"  # the tiny ViT's cost is not rounded away
    assert tiny["smope"]["GFLOPs train / test"] == "35.24 / 35.24"
    assert tiny["l2p"]["published added parameters (ViT-B/16)"].startswith("46,080 (")
    assert tiny["smope"]["published GFLOPs train / test (ViT-B/16)"] == "33.72 / 33.72"
    assert "2026-01-01" not in md  # a failed or variant run neither shows nor dates the page


def test_profile_and_smoke_records(papers):
    profs = [profile(created="2025-02-01T00:00:00+00:00", train_img_s=1.0),
             profile(created="2025-02-02T00:00:00+00:00"),  # newest of the same key wins
             profile(device="cpu (2 cores, Xeon)", precision="fp32", peak_mem_mb=None, threads=1, cpu_share=0.57),
             {"kind": "loader", "created": "2025-02-03T00:00:00+00:00", "device": "cpu", "protocol": "cifar100-10t",
              "workers": 4, "img_s": 1234.5}]
    smk = [smoke(created="2025-03-01T00:00:00+00:00", wall_s=100.0),
           smoke(created="2025-03-05T00:00:00+00:00", wall_s=90.0),
           smoke(created="2025-04-01T00:00:00+00:00", wall_s=1.0, complete=False),  # did not pass
           smoke(created="2025-03-09T00:00:00+00:00", wall_s=20.0, tasks=2)]  # a later reduced run
    md = render_cost([], profs, smk, papers)
    table = sections(md)["cifar100-10t · sup21k"]
    gpu = [r for r in table if r["device"] == H200]
    cpu = [r for r in table if r["device"].startswith("cpu")]
    assert len(gpu) == 1 and len(cpu) == 1
    assert gpu[0]["train images/s"] == "812.3" and gpu[0]["eval images/s"] == "2400.1"
    assert gpu[0]["fraction of peak train / eval"] == "11.4% / 11.6%"
    assert gpu[0]["matmul peak (TFLOP/s)"] == "701.5" and gpu[0]["peak memory (MB)"] == "20,345"
    assert gpu[0]["published GFLOPs train / test (ViT-B/16)"] == "33.72 / 33.72"
    assert cpu[0]["peak memory (MB)"] == "not measured"
    assert cpu[0]["CPU share"] == "0.57" and gpu[0]["CPU share"] == "—"  # a shared CPU is visible
    assert "| cpu | cifar100-10t | 4 | 1234.5 | 2025-02-03T00:00:00+00:00 |" in md
    dry = sections(md)["Real-shape dry runs (smoke records)"]
    assert dry == [{"protocol": "cifar100-10t", "backbone": "sup21k", "method": "smope", "device": H200,
                    "tasks": "10", "wall time (s)": "90.0", "last passed": "2025-03-05T00:00:00+00:00"},
                   {"protocol": "cifar100-10t", "backbone": "sup21k", "method": "smope", "device": H200,
                    "tasks": "2", "wall time (s)": "20.0", "last passed": "2025-03-09T00:00:00+00:00"}]
    assert "Newest record used: 2025-03-09T00:00:00+00:00." in md  # the failed smoke run does not count


def test_cost_page_is_deterministic(papers):
    recs = [run(m, s) for m in ("smope", "l2p", "vq_prompt") for s in range(3)]
    profs = [profile(m) for m in ("smope", "l2p")] + [profile("smope", created="2025-02-01T00:00:00+00:00",
                                                              train_img_s=5.0)]
    smk = [smoke(m) for m in ("smope", "l2p")]
    a = render_cost(recs, profs, smk, papers)
    for seed in range(3):
        r, p, s = recs[:], profs[:], smk[:]
        for x in (r, p, s):
            random.Random(seed).shuffle(x)
        assert render_cost(r, p, s, papers) == a


def test_per_run_gflops_by_part_and_wall_time_with_its_device(papers):
    """The counted GFLOPs of a run (median over its runs) beside its measured wall time, which names
    the device and threads it was measured on; local runs are a row of their own, marked."""
    parts = {"train": 400.0, "stages": 20.0, "eval": 100.0, "total": 520.0}
    recs = [run("smope", s, run_gflops=parts, timings={"train_s": 10.0 + s}, device="cpu", threads=1)
            for s in range(3)]
    recs.append(run("smope", 3, run_gflops={k: 2 * v for k, v in parts.items()}, timings={"train_s": 5.0},
                    device=H200, threads=1, _local=True))
    recs.append(run("l2p", 0, timings={"train_s": 7.0}, device="cpu", threads=2))  # made before run_gflops
    secs = sections(render_cost(recs, [], [], papers))
    rows = {r["method"]: r for r in secs["fmnist-5t · tiny, per run"]}
    assert rows["smope"]["run total (forward)"] == "520 GFLOPs" and rows["smope"]["per-task stages"] == "20 GFLOPs"
    assert rows["smope"]["train wall time (s)"] == "11.0 ± 1.0" and rows["smope"]["device, threads"] == "cpu, 1 thread(s)"
    assert rows["smope (local)"]["run total (forward)"] == "1,040 GFLOPs"
    assert rows["smope (local)"]["device, threads"] == f"{H200}, 1 thread(s)"
    assert rows["l2p"]["run total (forward)"] == "—" and rows["l2p"]["device, threads"] == "cpu, 2 thread(s)"
