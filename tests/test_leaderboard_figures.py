"""leaderboard.figures: what each figure is computed from, that it is drawn, and drawn only once."""
import math

import numpy as np
import pytest
from PIL import Image

from leaderboard import figures
from leaderboard.figures import (Drawn, accuracy_curves, critical_difference, faa_dots,
                                 seen_class_accuracy, seen_class_curve, tradeoff)
from leaderboard.stats import aggregate, friedman
from protocols.metrics import summarize
from test_leaderboard_stats import recs_for
from test_leaderboard_store import make_record

PNG = b"\x89PNG\r\n\x1a\n"
M1 = [[90.0, 80.0, 70.0], [None, 85.0, 75.0], [None, None, 95.0]]
M2 = [[v + 2.0 if v is not None else None for v in row] for row in M1]
M3 = [[100.0, 60.0, 40.0], [None, 70.0, 50.0], [None, None, 90.0]]

# The default table's added parameters; head_only and joint add none.
COSTS = {"head_only": (0, 0.033), "joint": (0, 0.033), "l2p": (1920, 0.086), "dualprompt": (11200, 0.067),
         "coda_prompt": (64000, 0.067), "hide_prompt": (26954, 0.067), "vq_prompt": (17280, 0.067),
         "smope": (3840, 0.035)}


def trade_rows():
    return [{"label": m, "faa_mean": 70.0 + i, "faa_std": 0.5 + 0.1 * i, "n": 5, "trainable_params": p,
             "gflops_test": g} for i, (m, (p, g)) in enumerate(COSTS.items())]


def test_seen_class_accuracy_hand_computed():
    # after task 1: task 1 alone; after task 2: (80 + 85) / 2; after task 3: (70 + 75 + 95) / 3
    assert seen_class_accuracy(M1).tolist() == pytest.approx([90.0, 82.5, 80.0])
    assert seen_class_accuracy(M3).tolist() == pytest.approx([100.0, 65.0, 60.0])
    # the last point is the run's FAA, the mean of the points its CAA (docs/sources.md#metrics)
    m = summarize(M3)
    assert seen_class_accuracy(M3)[-1] == pytest.approx(m["faa"])
    assert seen_class_accuracy(M3).mean() == pytest.approx(m["caa"])


def test_seen_class_curve_band_by_number_of_seeds():
    three = seen_class_curve([M1, M2, M3])
    assert three.n == 3 and three.band == "std"
    assert three.mean.tolist() == pytest.approx([94.0, 77.0 + 1 / 3, 74.0])
    # task 1: 90, 92, 100 -> deviations -4, -2, 6 -> sample variance 56 / 2
    sd1 = math.sqrt(28.0)
    assert three.high[0] - three.mean[0] == pytest.approx(sd1)
    assert three.mean[0] - three.low[0] == pytest.approx(sd1)
    assert three.high.tolist() == pytest.approx((three.mean + np.vstack(
        [seen_class_accuracy(m) for m in (M1, M2, M3)]).std(axis=0, ddof=1)).tolist())

    two = seen_class_curve([M1, M3])
    assert two.band == "range"
    assert two.low.tolist() == pytest.approx([90.0, 65.0, 60.0])
    assert two.high.tolist() == pytest.approx([100.0, 82.5, 80.0])

    one = seen_class_curve([M2])
    assert one.band == "none" and one.low is None and one.high is None
    assert one.mean.tolist() == pytest.approx([92.0, 84.5, 82.0])


def test_seen_class_curve_refuses_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        seen_class_accuracy([[1.0, 2.0], [None]])
    with pytest.raises(ValueError, match="j <= 1"):
        seen_class_accuracy([[1.0, 2.0], [None, None]])
    with pytest.raises(ValueError, match="different numbers of tasks"):
        seen_class_curve([M1, [[50.0, 40.0], [None, 60.0]]])
    with pytest.raises(ValueError, match="'smope'"):
        accuracy_curves({"smope": [M1, [[50.0]]]}, "unused.png")


def test_accuracy_curves_written_once_and_redrawn_on_change(tmp_path):
    path = tmp_path / "figs" / "curves.png"
    curves = {"smope": [M1, M2, M3], "l2p": [M3, M2], "joint": [M1]}
    d = accuracy_curves(curves, path, title="fmnist-5t · tiny")
    assert d == Drawn(path, True) and path.read_bytes()[:8] == PNG
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns

    # same runs, other seed order: nothing is drawn, the file is not touched
    d = accuracy_curves({"joint": [M1], "l2p": [M2, M3], "smope": [M3, M1, M2]}, path, title="fmnist-5t · tiny")
    assert d == Drawn(path, False)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime

    # one number changes: redrawn
    changed = {**curves, "joint": [[[90.0, 80.0, 70.0], [None, 85.0, 75.0], [None, None, 95.5]]]}
    assert accuracy_curves(changed, path, title="fmnist-5t · tiny").changed
    assert path.read_bytes() != before
    # the title is an input too
    assert accuracy_curves(changed, path, title="other").changed


def test_bytes_deterministic_and_hash_in_metadata(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    accuracy_curves({"smope": [M1, M2]}, a)
    accuracy_curves({"smope": [M1, M2]}, b)
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        text = dict(im.text)
    assert set(text) == {"Software", "Source"}  # no date
    assert len(text["Source"]) == 64 and figures.stored_digest(a) == text["Source"]


def test_figure_version_bump_redraws(tmp_path, monkeypatch):
    path = tmp_path / "c.png"
    accuracy_curves({"smope": [M1]}, path)
    assert not accuracy_curves({"smope": [M1]}, path).changed
    monkeypatch.setattr(figures, "FIGURE_VERSION", figures.FIGURE_VERSION + "-next")
    assert accuracy_curves({"smope": [M1]}, path).changed


def test_foreign_file_is_replaced(tmp_path):
    path = tmp_path / "dots.png"
    path.write_bytes(b"not a png")
    agg = aggregate(recs_for())
    assert faa_dots(agg, path).changed and path.read_bytes()[:8] == PNG


def test_faa_dots_and_compat_name(tmp_path):
    recs = recs_for() + [make_record(method="head_only", seed=0, shift=-5.0)]  # one seed: no error bar
    agg = aggregate(recs)
    d = faa_dots(agg, tmp_path / "dots.png", title="fmnist-5t · tiny")
    assert d.changed and d.path.read_bytes()[:8] == PNG
    assert not faa_dots(agg, tmp_path / "dots.png", title="fmnist-5t · tiny").changed
    # render.py's name until it is rewired: same figure, returns the path
    assert faa_dots(agg, tmp_path / "dots.png", title="fmnist-5t · tiny").path == tmp_path / "dots.png"
    with pytest.raises(ValueError, match="faa_mean"):
        faa_dots([{"label": "x"}], tmp_path / "bad.png")


def test_tradeoff_places_zero_parameter_methods_at_a_marked_zero(tmp_path):
    rows = trade_rows()
    d = tradeoff(rows, tmp_path / "tradeoff.png", title="fmnist-5t · tiny")
    assert d.changed and d.path.read_bytes()[:8] == PNG
    assert not tradeoff(rows, tmp_path / "tradeoff.png", title="fmnist-5t · tiny").changed

    fig = figures._draw_tradeoff(tradeoff_items(rows), "t")
    gflops_ax, params_ax = fig.axes
    for ax in (gflops_ax, params_ax):  # every method is a labelled point in both panels
        assert sorted(t.get_text() for t in ax.texts if t.get_text() in COSTS) == sorted(COSTS)
        assert ax.get_xscale() == "log"
    ticks = dict(zip((t.get_text() for t in params_ax.get_xticklabels()), params_ax.get_xticks()))
    assert "0" in ticks and ticks["0"] < 1920 / 10  # the zero spot sits below the smallest real count
    zero_pos = {t.get_text(): t.xy[0] for t in params_ax.texts if t.get_text() in ("head_only", "joint")}
    assert sorted(zero_pos) == ["head_only", "joint"]
    for x in zero_pos.values():  # at the "0" spot (set side by side at most), left of the axis break
        assert abs(math.log10(x / ticks["0"])) < 0.1 and x < ticks["0"] * 10 ** 0.5
    assert "parameters 0: none added (head_only, joint)" in fig.texts[0].get_text()  # the note names them


def test_label_spots_never_overlap_when_crowded():
    # five labels on one spot, a marker box beside it: every label finds its own place
    points = [(100.0, 100.0)] * 5
    sizes = [(50.0, 10.0)] * 5
    obstacles = [(96.0, 96.0, 104.0, 104.0)]
    spots = figures._place_labels(points, sizes, obstacles, (400.0, 300.0))
    boxes = []
    for (px, py), (w, h), (dx, dy, ha) in zip(points, sizes, spots):
        x0 = px + dx if ha == "left" else px + dx - w
        boxes.append((x0, py + dy - h / 2, x0 + w, py + dy + h / 2))
    for i, a in enumerate(boxes):
        assert figures._overlap(a, obstacles[0]) == 0
        assert all(figures._overlap(a, b) == 0 for b in boxes[i + 1:])


def test_dodge_spreads_only_overlapping_points():
    # a and b overlap at the same x; c is at the same x but far below; d is far away
    shifts = figures._dodge([10.0, 10.0, 10.0, 200.0], [(50, 60), (55, 70), (0, 5), (50, 60)])
    assert shifts[2] == 0 and shifts[3] == 0
    assert sorted(shifts[:2]) == [-4.5, 4.5] and shifts[1] < shifts[0]  # the higher one on the left


def tradeoff_items(rows):
    return [{**r, "faa_mean": float(r["faa_mean"]), "faa_std": float(r["faa_std"]),
             "gflops_test": float(r["gflops_test"]), "trainable_params": float(r["trainable_params"])}
            for r in sorted(rows, key=lambda r: r["label"])]


def test_tradeoff_names_methods_without_cost_and_refuses_negative(tmp_path):
    rows = trade_rows()
    rows[2] = {**rows[2], "gflops_test": float("nan")}
    fig = figures._draw_tradeoff(tradeoff_items(rows), "t")
    notes = fig.texts[0].get_text().splitlines()
    assert f"not shown against test GFLOPs, no cost recorded: {rows[2]['label']}" in notes
    assert tradeoff(rows, tmp_path / "t.png").changed
    rows[3] = {**rows[3], "trainable_params": -1}
    with pytest.raises(ValueError, match=">= 0"):
        tradeoff(rows, tmp_path / "t2.png")


def test_cliques_are_maximal_runs_within_cd():
    assert figures._cliques([1.0, 1.5, 3.0, 3.2], 1.0) == [(0, 1), (2, 3)]
    assert figures._cliques([1.0, 1.9, 2.8, 3.7], 1.0) == [(0, 1), (1, 2), (2, 3)]
    assert figures._cliques([1.0, 2.0, 3.0], 1.0) == []  # a difference of exactly CD is significant
    assert figures._cliques([1.0, 1.2, 1.4], 5.0) == [(0, 2)]


def constructed_store():
    """4 methods on 3 protocols: smope best everywhere, l2p worst, vq and coda swap places."""
    recs = []
    for proto, shifts in {"fmnist-5t": {"smope": 2, "vq": 1, "coda": 0, "l2p": -5},
                          "cifar100-10t": {"smope": 3, "vq": -1, "coda": 0, "l2p": -6},
                          "imr-10t": {"smope": 1, "vq": 0.5, "coda": 0.2, "l2p": -2}}.items():
        recs += recs_for({m: [s + 0.1 * i for i in range(3)] for m, s in shifts.items()}, protocol=proto)
    return recs


def test_cd_diagram_from_a_constructed_store(tmp_path):
    fr = friedman(constructed_store())
    assert fr.n_blocks == 3 and fr.cd is not None
    assert fr.avg_ranks == pytest.approx({"smope": 1.0, "vq": 2 + 1 / 3, "coda": 2 + 2 / 3, "l2p": 4.0})
    d = critical_difference(fr, tmp_path / "cd.png")
    assert d.changed and d.path.read_bytes()[:8] == PNG
    assert not critical_difference(fr, tmp_path / "cd.png").changed
    assert critical_difference(fr, tmp_path / "cd.png").path == tmp_path / "cd.png"

    order = ["smope", "vq", "coda", "l2p"]
    texts = [t.get_text() for t in figures._draw_cd(fr, order).axes[0].texts]
    for lab in order:
        assert f"{lab} ({fr.avg_ranks[lab]:.2f})" in texts
    assert f"CD = {fr.cd:.2f}" in texts


def test_cd_diagram_never_from_one_pair_or_two_methods(tmp_path):
    one_pair = friedman(recs_for())
    assert one_pair.n_blocks == 1
    with pytest.raises(ValueError, match="needs >= 2 protocol x backbone"):
        critical_difference(one_pair, tmp_path / "cd.png")
    two_methods = friedman([r for r in constructed_store() if r["label"] in ("smope", "l2p")])
    with pytest.raises(ValueError, match="no CD diagram"):
        critical_difference(two_methods, tmp_path / "cd.png")
    assert not (tmp_path / "cd.png").exists()
