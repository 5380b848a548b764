"""leaderboard.stats on synthetic records: aggregation, paired tests with Holm, Friedman / Nemenyi."""
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from leaderboard.stats import aggregate, friedman, paired_tests, wilcoxon_min_p
from test_leaderboard_store import make_record

# FAA of make_record is 80 + shift; CAA 252.5/3 + shift; FFM is 15 whatever the shift.
SHIFTS = {
    "smope": [1.0, 1.4, 0.6, 1.2, 0.9],
    "vq": [0.5, 1.1, 0.7, 0.4, 0.8],
    "l2p": [-2.0, -1.5, -2.6, -1.0, -3.1],
    "coda": [0.2, 1.5, -0.4, 0.9, 0.1],
}


def recs_for(shifts=SHIFTS, protocol="fmnist-5t", backbone="tiny", table="main", offset=0.0):
    return [make_record(method=m, seed=s, protocol=protocol, backbone=backbone, table=table,
                        label=m if table == "main" else f"{m}-abl", shift=v + offset)
            for m, vals in shifts.items() for s, v in enumerate(vals)]


def test_aggregate_mean_std():
    recs = recs_for()
    recs.append(make_record(method="head_only", seed=0, shift=-30.0))
    agg = aggregate(recs).set_index("label")
    for m, vals in SHIFTS.items():
        faa = 80.0 + np.array(vals)
        assert agg.loc[m, "n"] == 5 and agg.loc[m, "seeds"] == [0, 1, 2, 3, 4]
        assert agg.loc[m, "faa_mean"] == pytest.approx(faa.mean())
        assert agg.loc[m, "faa_std"] == pytest.approx(faa.std(ddof=1))
        assert agg.loc[m, "caa_mean"] == pytest.approx(252.5 / 3 + np.mean(vals))
        assert agg.loc[m, "ffm_mean"] == pytest.approx(15.0) and agg.loc[m, "ffm_std"] == pytest.approx(0.0)
        assert agg.loc[m, "trainable_params"] == 230400
        assert agg.loc[m, "train_s"] == pytest.approx(12.0)  # mean of 10 + seed over seeds 0..4
    assert agg.loc["head_only", "n"] == 1
    assert agg.loc["head_only", "faa_std"] == 0.0 and agg.loc["head_only", "faa_mean"] == pytest.approx(50.0)
    assert set(agg["protocol"]) == {"fmnist-5t"} and set(agg["table"]) == {"main"}


def test_aggregate_groups_by_table_and_protocol():
    recs = recs_for() + recs_for(table="ablation:noise") + recs_for(protocol="cifar100-10t", offset=3.0)
    agg = aggregate(recs)
    assert len(agg) == 12
    g = agg.set_index(["protocol", "table", "label"])
    assert g.loc[("cifar100-10t", "main", "smope"), "faa_mean"] == pytest.approx(83.0 + np.mean(SHIFTS["smope"]))
    assert g.loc[("fmnist-5t", "ablation:noise", "smope-abl"), "n"] == 5


def test_aggregate_duplicate_seed_kept_once():
    a = make_record(seed=0, shift=0.0, key="old")
    b = make_record(seed=0, shift=2.0, key="new")
    b["created"] = "2026-01-01T00:00:00+00:00"
    with pytest.warns(UserWarning, match="old"):
        agg = aggregate([a, b])
    assert agg.iloc[0]["n"] == 1 and agg.iloc[0]["faa_mean"] == pytest.approx(82.0)


def test_paired_tests_match_scipy_and_holm():
    res = paired_tests(recs_for(), metric="faa")
    assert set(res["reference"]) == {"smope"}  # smope is the default reference when present
    assert sorted(res["label"]) == ["coda", "l2p", "vq"]
    ref = 80.0 + np.array(SHIFTS["smope"])
    for _, r in res.iterrows():
        x = 80.0 + np.array(SHIFTS[r["label"]])
        t, p = sps.ttest_rel(x, ref)
        d = x - ref
        assert r["n"] == 5 and r["seeds"] == [0, 1, 2, 3, 4]
        assert r["t"] == pytest.approx(t) and r["p"] == pytest.approx(p)
        assert r["mean_diff"] == pytest.approx(d.mean())
        half = sps.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
        assert r["ci_low"] == pytest.approx(d.mean() - half) and r["ci_high"] == pytest.approx(d.mean() + half)
        assert r["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
    # Holm by hand: sort p ascending, multiply by (m - rank), keep monotone, cap at 1.
    ps = res.sort_values("p")
    m = len(ps)
    expect, running = [], 0.0
    for i, p in enumerate(ps["p"]):
        running = max(running, min(1.0, (m - i) * p))
        expect.append(running)
    assert ps["p_holm"].tolist() == pytest.approx(expect)
    assert list(ps["p_holm"]) == sorted(ps["p_holm"])  # Holm keeps the order of the raw p-values
    assert all(res["p_holm"] >= res["p"])
    l2p = res.set_index("label").loc["l2p"]
    assert l2p["mean_diff"] < 0 and l2p["significant"]


def test_paired_tests_reference_choice_and_common_seeds():
    shifts = {k: v for k, v in SHIFTS.items() if k != "smope"}
    # no smope: the best mean FAA (vq) becomes the reference
    assert set(paired_tests(recs_for(shifts))["reference"]) == {"vq"}
    # an explicit reference wins
    res = paired_tests(recs_for(), reference_label="l2p")
    assert set(res["reference"]) == {"l2p"} and "smope" in set(res["label"])
    # only common seeds; fewer than two -> skipped
    recs = recs_for()
    recs = [r for r in recs if not (r["method"] == "vq" and r["seed"] in (0, 1))]
    recs = [r for r in recs if not (r["method"] == "coda" and r["seed"] > 0)]
    res = paired_tests(recs).set_index("label")
    assert res.loc["vq", "n"] == 3 and res.loc["vq", "seeds"] == [2, 3, 4]
    assert "coda" not in res.index
    x = 80 + np.array(SHIFTS["vq"][2:])
    y = 80 + np.array(SHIFTS["smope"][2:])
    assert res.loc["vq", "p"] == pytest.approx(sps.ttest_rel(x, y).pvalue)


def test_paired_tests_ffm_lower_is_better_reference():
    recs = recs_for({"a": [0, 0], "b": [1, 1]})
    recs[0]["metrics"]["ffm"] = 5.0
    recs[1]["metrics"]["ffm"] = 6.0
    res = paired_tests(recs, metric="ffm")
    assert res.iloc[0]["reference"] == "a"  # a forgets less (5.5 vs 15)


def test_wilcoxon_floor():
    assert wilcoxon_min_p(5) == 0.0625
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sps.wilcoxon([1, 2, 3, 4, 5]).pvalue == pytest.approx(0.0625)


def test_friedman_ranks_and_cd():
    # three protocols; per protocol a constant offset keeps the within-protocol order of SHIFTS means
    recs = []
    for proto, off in (("fmnist-5t", 0.0), ("cifar100-10t", 5.0), ("cub200-10t", -3.0)):
        recs += recs_for(protocol=proto, offset=off)
    # make vq beat smope on cub only
    for r in recs:
        if r["protocol"] == "cub200-10t" and r["method"] == "vq":
            r["metrics"]["faa"] += 2.0
    recs.append(make_record(method="joint", protocol="fmnist-5t", shift=10.0))  # only one block: dropped
    res = friedman(recs)
    assert res.n_blocks == 3 and res.k == 4 and res.dropped_labels == ["joint"]
    # per block ranks (1 = best): fmnist/cifar: smope 1, vq 2, coda 3, l2p 4; cub: vq 1, smope 2, coda 3, l2p 4
    assert res.avg_ranks == pytest.approx({"smope": 4 / 3, "vq": 5 / 3, "coda": 3.0, "l2p": 4.0})
    scores = res.scores
    stat, p = sps.friedmanchisquare(*[scores[c].to_numpy() for c in scores.columns])
    assert res.statistic == pytest.approx(stat) and res.p == pytest.approx(p)
    q = sps.studentized_range.ppf(0.95, 4, np.inf) / math.sqrt(2)
    assert res.q_alpha == pytest.approx(q) and q == pytest.approx(2.569, abs=1e-3)  # Demsar (2006), Table 5a
    assert res.cd == pytest.approx(q * math.sqrt(4 * 5 / (6 * 3)))


def test_friedman_too_small():
    assert friedman([]) is None
    one_block = friedman(recs_for())
    assert one_block.statistic is None and "2 protocol" in one_block.reason
    two_methods = friedman(recs_for({"a": [0, 1]}) + recs_for({"b": [1, 2]})
                           + recs_for({"a": [0, 1], "b": [1, 2]}, protocol="other"))
    assert two_methods.statistic is None and two_methods.k == 2
