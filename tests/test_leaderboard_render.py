"""leaderboard.render: the markdown pages carry exactly the numbers of the records."""

import numpy as np
import pytest
from scipy import stats as sps

from leaderboard.markdown import MARKER
from leaderboard.render import render
from test_leaderboard_stats import SHIFTS, recs_for
from test_leaderboard_store import make_record

NEWEST = "2025-01-01"  # make_record's created dates: a page is dated by its newest record


def parse_tables(md: str) -> list[list[dict]]:
    """Every github-style table of a markdown page as a list of {header: cell} rows."""
    tables, cur, headers = [], None, None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                headers, cur = cells, []
            elif set("".join(cells)) <= set("-: "):
                continue
            else:
                cur.append(dict(zip(headers, cells)))
        elif cur is not None:
            tables.append(cur)
            cur = None
    if cur is not None:
        tables.append(cur)
    return tables


def pm(cell: str) -> tuple[float, float]:
    m, s = cell.split("±")
    return float(m), float(s)


@pytest.fixture
def records():
    recs = recs_for() + recs_for(protocol="cifar100-10t", offset=4.0)
    recs += recs_for({"smope": [1.0, 1.4, 0.6], "smope-noprior": [-1.0, -0.2, -0.9]}, table="ablation:prior")
    return recs


def test_render_pages_numbers_and_index(tmp_path, records):
    written = render(records, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"README.md", "fmnist-5t__tiny.md", "cifar100-10t__tiny.md", "fmnist-5t__tiny__ablation-prior.md",
            "figures/fmnist-5t__tiny_faa.png", "figures/cifar100-10t__tiny_faa.png", "figures/cd_faa.png"} <= names
    assert all(p.exists() for p in written)
    assert (tmp_path / "figures" / "cd_faa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = (tmp_path / "fmnist-5t__tiny.md").read_text()
    assert md.startswith(MARKER)
    main, tests = parse_tables(md)[:2]
    # sorted by FAA, numbers = mean +- sample std of the records' FAA
    expect = {m: 80.0 + np.array(v) for m, v in SHIFTS.items()}
    order = sorted(expect, key=lambda m: -expect[m].mean())
    assert [r["method"] for r in main] == order
    for row in main:
        faa = expect[row["method"]]
        assert pm(row["FAA"]) == pytest.approx((round(faa.mean(), 2), round(faa.std(ddof=1), 2)), abs=1e-9)
        assert pm(row["CAA"])[0] == pytest.approx(round(faa.mean() - 80 + 252.5 / 3, 2))
        assert pm(row["FFM"]) == (15.0, 0.0)
        assert pm(row["BWT"]) == (-15.0, 0.0)  # (75 - 85 + 70 - 90) / 2, beside FFM
        assert row["seeds (n)"] == "5"
        assert row["trainable params"] == "230,400" and row["passes (test)"] == "1"
        assert "train time (s)" not in row  # wall time, with its device, is the cost page's
    # paired tests against smope, p-values as scipy gives them
    assert {r["method"] for r in tests} == {"vq", "l2p", "coda"}
    ref = expect["smope"]
    for r in tests:
        x = expect[r["method"]]
        assert float(r["p"]) == pytest.approx(round(sps.ttest_rel(x, ref).pvalue, 4), abs=1e-4)
        assert float(r["diff (method - ref)"]) == pytest.approx(round((x - ref).mean(), 2))
        assert r["n"] == "5"
    assert "Paired t-test by seed" in md and "Holm-corrected" in md and "0.0625" in md and "Wilcoxon" in md
    assert "![FAA per method](figures/fmnist-5t__tiny_faa.png)" in md
    assert "(fmnist-5t__tiny__ablation-prior.md)" in md  # main page links its ablation
    # the headline names the best method (by FAA) and how it compares with the reference
    best = order[0]
    assert f"**Best method by FAA: {best}, {main[0]['FAA']}**" in md
    # each row's mean accuracy matrix: a figure, and its numbers
    assert "![accuracy matrices](figures/fmnist-5t__tiny_matrices.png)" in md
    assert f"<summary>{best} (n = 5)</summary>" in md
    # the metrics, defined on the page: formula, entries, source
    assert "## Metrics" in md and "(1/(T-1)) Σ_{j<T} (acc[j][T] - acc[j][j])" in md
    assert "docs/sources.md" in md

    abl = (tmp_path / "fmnist-5t__tiny__ablation-prior.md").read_text()
    arows = parse_tables(abl)[0]
    assert [r["method"] for r in arows] == ["smope-abl", "smope-noprior-abl"]
    assert pm(arows[1]["FAA"]) == pytest.approx((round(80 + np.mean([-1.0, -0.2, -0.9]), 2),
                                                 round(np.std([-1.0, -0.2, -0.9], ddof=1), 2)))
    assert arows[1]["seeds (n)"] == "3"

    cifar = parse_tables((tmp_path / "cifar100-10t__tiny.md").read_text())[0]
    assert pm(cifar[0]["FAA"])[0] == pytest.approx(round(84.0 + np.mean(SHIFTS["smope"]), 2))

    readme = (tmp_path / "README.md").read_text()
    assert f"newest record {NEWEST}" in readme and f"{len(records)} runs over" in readme
    for name in names - {"README.md"}:
        assert f"]({name})" in readme, name  # every page and figure is indexed
    assert "Friedman test" in readme and "CD =" in readme


def test_cost_columns_only_when_present(tmp_path):
    recs = [make_record(method=m, seed=s, shift=d + s, cost=False) for m, d in (("a", 0), ("b", 1)) for s in (0, 1)]
    for r in recs:
        del r["timings"]
    render(recs, tmp_path, figures=False)
    md = (tmp_path / "fmnist-5t__tiny.md").read_text()
    main = parse_tables(md)[0]
    assert set(main[0]) == {"method", "FAA", "CAA", "FFM", "BWT", "seeds (n)"}
    assert "![" not in md and not (tmp_path / "figures").exists()
    assert "## Across protocols" not in (tmp_path / "README.md").read_text()


def test_task_split_columns_when_present(tmp_path):
    recs = [make_record(method=m, seed=s, shift=d) for m, d in (("a", 0), ("b", 1)) for s in (0, 1)]
    for r in recs:
        r["metrics"] = {**r["metrics"], "wtp": 96.0 + r["seed"], "tii": 80.0 - 2 * r["seed"]}
    recs.append(make_record(method="old", seed=0))  # stored before the split existed: blank cells
    render(recs, tmp_path, figures=False)
    md = (tmp_path / "fmnist-5t__tiny.md").read_text()
    rows = {r["method"]: r for r in parse_tables(md)[0]}
    assert rows["a"]["WTP"] == "96.50 ± 0.71" and rows["b"]["TII"] == "79.00 ± 1.41"
    assert rows["old"]["WTP"] == "" and "WTP: within-task prediction" in md


def test_no_paired_test_with_one_seed(tmp_path):
    recs = [make_record(method="a", seed=0), make_record(method="b", seed=0, shift=1.0)]
    render(recs, tmp_path, figures=False)
    md = (tmp_path / "fmnist-5t__tiny.md").read_text()
    assert "No paired comparison" in md
    # one seed has no spread: n/a, not a made-up 0.00 (issue 9)
    assert [r["FAA"] for r in parse_tables(md)[0]] == ["81.00 ± n/a", "80.00 ± n/a"]


def test_empty_store_and_stale_pages(tmp_path, records):
    (tmp_path / "notes.md").write_text("# hand-written\n")
    (tmp_path / "store.py").write_text("x = 1\n")
    render(records, tmp_path)
    assert (tmp_path / "fmnist-5t__tiny.md").exists()
    written = render([], tmp_path)
    assert written == [tmp_path / "README.md"]
    readme = (tmp_path / "README.md").read_text()
    assert "No runs yet" in readme
    assert not (tmp_path / "fmnist-5t__tiny.md").exists()  # generated pages without runs are removed
    assert not list((tmp_path / "figures").glob("*.png"))
    assert (tmp_path / "notes.md").exists() and (tmp_path / "store.py").exists()  # others' files untouched


def test_render_accepts_store_records(tmp_path, records):
    from leaderboard.store import RunStore

    store = RunStore(tmp_path / "s.sqlite")
    store.put_many(records)
    render(store.records(), tmp_path / "lb", figures=False)
    a = parse_tables((tmp_path / "lb" / "fmnist-5t__tiny.md").read_text())[0]
    render(records, tmp_path / "lb2", figures=False)
    b = parse_tables((tmp_path / "lb2" / "fmnist-5t__tiny.md").read_text())[0]
    assert a == b
    assert f"{len(records)} runs over" in (tmp_path / "lb" / "README.md").read_text()


def test_ablation_ladder_keeps_its_order_and_compares_with_the_full_model(tmp_path):
    """Rungs carry their position: the table follows the ladder, the reference is the last rung."""
    from leaderboard.render import render
    from test_leaderboard_store import make_record

    recs = []
    for pos, (label, faa) in enumerate([("base", 70.0), ("+ a", 60.0), ("+ b (full)", 65.0)]):
        for seed in range(3):
            r = make_record(seed=seed, method="smope", label=label, table="ablation:smope")
            r["key"] = f"{label}-{seed}"
            r["position"] = pos
            r["metrics"] = {**r["metrics"], "faa": faa + seed}
            recs.append(r)
    render(recs, out_dir=tmp_path, figures=False)
    (page,) = [p for p in tmp_path.glob("*ablation-smope.md")]
    text = page.read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:4] == ["base", "+ a", "+ b (full)"]  # ladder order, not FAA order
    assert "Reference: **+ b (full)**" in text


def test_headline_names_the_best_method_and_the_bounds_apart(tmp_path):
    """The upper bound is a reference, never "the best": the headline names the best contestant."""
    recs = recs_for()
    for method, shift, role in (("joint", 9.0, "upper bound"), ("head_only", -9.0, "lower bound")):
        for seed in range(5):
            r = make_record(method=method, seed=seed, shift=shift + 0.1 * seed)
            r["role"] = role
            recs.append(r)
    render(recs, tmp_path, figures=False)
    md = (tmp_path / "fmnist-5t__tiny.md").read_text()
    main = {r["method"]: r for r in parse_tables(md)[0]}
    best = max(SHIFTS, key=lambda m: np.mean(SHIFTS[m]))
    headline = next(line for line in md.splitlines() if line.startswith("**Best method"))
    assert headline.startswith(f"**Best method by FAA: {best}, {main[best]['FAA']}**")
    assert f"joint (upper bound) {main['joint']['FAA']}" in headline
    assert f"head_only (lower bound) {main['head_only']['FAA']}" in headline
    index = (tmp_path / "README.md").read_text()
    assert f"best method {best} {main[best]['FAA']} FAA" in index
    assert f"joint {main['joint']['FAA']} (upper)" in index and "best method joint" not in index
