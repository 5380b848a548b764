"""leaderboard.figures: what each figure is computed from, that it is drawn, and drawn only once."""
import math

import numpy as np
import pytest
from PIL import Image

from leaderboard import figures
from leaderboard.figures import (METHOD_COLOURS, Drawn, accuracy_curves, accuracy_matrices, critical_difference,
                                 faa_dots, row_colours, seen_class_accuracy, seen_class_curve, tradeoff,
                                 tradeoff_figure)
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

    fig = tradeoff_figure(rows, "t")
    gflops_ax, params_ax = fig.axes
    for ax in (gflops_ax, params_ax):  # every method is a labelled point in both panels
        assert sorted(t.get_text() for t in ax.texts if t.get_text() in COSTS) == sorted(COSTS)
        assert ax.get_xscale() == "log"
    ticks = dict(zip((t.get_text() for t in params_ax.get_xticklabels()), params_ax.get_xticks()))
    assert "0" in ticks and ticks["0"] < 1920 / 10  # the zero spot sits below the smallest real count
    zero_pos = {t.get_text(): t.xy[0] for t in params_ax.texts if t.get_text() in ("head_only", "joint")}
    assert sorted(zero_pos) == ["head_only", "joint"]
    for x in zero_pos.values():  # exactly at the "0" spot, left of the axis break
        assert x == ticks["0"] and x < ticks["0"] * 10 ** 0.5
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


def plotted_points(ax) -> dict[str, tuple[float, float]]:
    """{label: (x, y)} of the markers a panel draws (each errorbar's marker line), by its colour,
    read back from the matplotlib artists."""
    return {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color():
            (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
            for line in ax.lines if line.get_marker() == "o"}


def test_tradeoff_points_sit_at_the_records_gflops_exactly():
    """Four methods at 0.0671-0.0672 GFLOPs (as on fmnist-5t): each marker is drawn at its own cost,
    never moved sideways; where points crowd, the labels move."""
    from leaderboard.stats import aggregate

    costs = {"hide_prompt": 0.067108864, "vq_prompt": 0.067125248, "coda_prompt": 0.06720512,
             "dualprompt": 0.067182592, "l2p": 0.074514432, "smope": 0.034508544}
    per_run = {m: 1500.0 * c for m, c in costs.items()}
    recs = recs_for({m: [0.1 * i, 0.2 * i, 0.0] for i, m in enumerate(costs)})
    for r in recs:
        r["cost"] = {**r["cost"], "gflops_test": costs[r["method"]], "gflops_train": costs[r["method"]]}
        r["run_gflops"] = {"train": 100.0, "stages": 0.0, "eval": 50.0, "total": per_run[r["method"]]}
    rows = aggregate(recs)
    colours = row_colours(rows)
    fig = tradeoff_figure(rows, "t", colours)
    gflops_ax, _, run_ax = fig.axes
    by_colour = plotted_points(gflops_ax)
    drawn = {lab: by_colour[colours[lab]] for lab in costs}
    assert {lab: x for lab, (x, _) in drawn.items()} == costs  # exactly, not approximately
    runs = plotted_points(run_ax)
    assert {lab: runs[colours[lab]][0] for lab in costs} == per_run
    # the labels of the crowded four are apart from each other (moved, not their points)
    texts = {t.get_text(): t for t in gflops_ax.texts if t.get_text() in costs}
    assert all(t.xy[0] == costs[lab] for lab, t in texts.items())  # each label points at its own cost
    renderer = fig.canvas.get_renderer()
    boxes = [texts[lab].get_window_extent(renderer) for lab in ("hide_prompt", "vq_prompt", "coda_prompt", "dualprompt")]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_a_method_keeps_its_colour_when_a_row_is_added(tmp_path):
    """The colours of a table's rows do not depend on which other rows it has: the suite's methods
    keep theirs, a plugin gets one of its own, and the figures draw them so."""
    from leaderboard.stats import aggregate

    recs = recs_for()
    before = row_colours(aggregate(recs))
    plugin = recs_for({"my_plugin": [0.2, 0.1, 0.4, 0.0, 0.3]})
    after = row_colours(aggregate(recs + plugin))
    assert {lab: after[lab] for lab in before} == before
    assert after["smope"] == METHOD_COLOURS["smope"] and after["l2p"] == METHOD_COLOURS["l2p"]
    assert after["my_plugin"] not in METHOD_COLOURS.values()
    # read back from the figures: the same marker colour for smope with and without the plugin row
    for rows in (aggregate(recs), aggregate(recs + plugin)):
        fig = tradeoff_figure(rows.assign(gflops_test=0.05, trainable_params=1000.0), "t", row_colours(rows))
        colours = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
        assert colours["smope"] == METHOD_COLOURS["smope"]
    # a local row of a method keeps the method's colour; ablation rungs take theirs by rung
    assert row_colours([{"label": "smope (local)", "position": 0}])["smope (local)"] == METHOD_COLOURS["smope"]
    ladder = [{"label": f"rung {i}", "position": i} for i in range(3)]
    grown = row_colours(ladder + [{"label": "rung 3", "position": 3}])
    assert {k: grown[k] for k in row_colours(ladder)} == row_colours(ladder)


def test_accuracy_matrices_one_panel_per_row(tmp_path):
    mats = {"smope": np.array([[90.0, 80.0], [np.nan, 85.0]]), "l2p": np.array([[70.0, 60.0], [np.nan, 65.0]])}
    d = accuracy_matrices(mats, tmp_path / "m.png", title="t")
    assert d.changed and d.path.read_bytes()[:8] == PNG
    assert not accuracy_matrices(mats, tmp_path / "m.png", title="t").changed
    with pytest.raises(ValueError, match="T x T"):
        accuracy_matrices({"x": np.zeros((2, 3))}, tmp_path / "bad.png")


def test_tradeoff_names_methods_without_cost_and_refuses_negative(tmp_path):
    rows = trade_rows()
    rows[2] = {**rows[2], "gflops_test": float("nan")}
    fig = tradeoff_figure(rows, "t")
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
