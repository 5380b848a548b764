"""protocols.metrics.summarize against hand-computed values (docs/sources.md#metrics)."""
import math

import numpy as np
import pytest

from protocols.metrics import summarize, task_decomposition

# acc[j][i]: accuracy on task j (row) after training task i (column); None where j > i.
ACC3 = [
    [90.0, 80.0, 70.0],
    [None, 85.0, 75.0],
    [None, None, 95.0],
]
# FAA = (70 + 75 + 95) / 3                                  = 240 / 3   = 80.0
# CAA = ( 90/1 + (80+85)/2 + (70+75+95)/3 ) / 3 = (90 + 82.5 + 80) / 3 = 252.5 / 3 = 84.1666...
# FFM over j < T, max over earlier evaluations i in [j, T-1):
#   task 0: max(90, 80) - 70 = 20 ; task 1: max(85) - 75 = 10  -> (20 + 10) / 2 = 15.0
# BWT = ((70 - 90) + (75 - 85)) / 2 = -15.0


def test_summarize_3x3_by_hand():
    m = summarize(ACC3)
    assert set(m) == {"faa", "caa", "ffm", "bwt"}
    assert m["faa"] == pytest.approx(80.0)
    assert m["caa"] == pytest.approx(252.5 / 3)
    assert m["ffm"] == pytest.approx(15.0)
    assert m["bwt"] == pytest.approx(-15.0)
    assert all(isinstance(v, float) for v in m.values())


def test_ffm_uses_best_earlier_not_first():
    # Task 0 improves after task 1 (backward transfer) then drops: the best (60) is not the first (50).
    acc = [[50.0, 60.0, 40.0],
           [None, 80.0, 80.0],
           [None, None, 70.0]]
    m = summarize(acc)
    # FFM: task 0: max(50, 60) - 40 = 20; task 1: 80 - 80 = 0 -> 10.0
    assert m["ffm"] == pytest.approx(10.0)
    # BWT: (40 - 50) + (80 - 80) -> -5.0 ; FAA: (40+80+70)/3
    assert m["bwt"] == pytest.approx(-5.0)
    assert m["faa"] == pytest.approx(190 / 3)
    # CAA: (50 + (60+80)/2 + 190/3) / 3
    assert m["caa"] == pytest.approx((50 + 70 + 190 / 3) / 3)


def test_single_task():
    m = summarize([[42.0]])
    assert m == {"faa": 42.0, "caa": 42.0, "ffm": 0.0, "bwt": 0.0}


def test_entries_above_diagonal_ignored():
    ref = summarize(ACC3)
    junk = [[90.0, 80.0, 70.0],
            [1e9, 85.0, 75.0],
            ["not yet", -3, 95.0]]
    assert summarize(junk) == ref
    arr = np.array([[90.0, 80.0, 70.0], [np.nan, 85.0, 75.0], [np.nan, np.nan, 95.0]])
    assert summarize(arr) == pytest.approx(ref)
    arr[1, 0] = 12345.0
    assert summarize(arr) == pytest.approx(ref)


def test_perfect_no_forgetting():
    acc = [[100.0, 100.0], [None, 100.0]]
    assert summarize(acc) == {"faa": 100.0, "caa": 100.0, "ffm": 0.0, "bwt": 0.0}


@pytest.mark.parametrize("bad", [
    [[1.0, 2.0, 3.0], [None, 4.0]],             # ragged
    [[1.0, 2.0], [None, 3.0], [None, None]],     # 3 rows of 2
    np.zeros((2, 3)),                            # non-square array
    np.zeros(4),                                 # 1-D
    [],                                          # empty
])
def test_non_square_raises(bad):
    with pytest.raises(ValueError, match="square|2-D|empty"):
        summarize(bad)


def test_missing_evaluated_entry_raises():
    with pytest.raises(ValueError, match=r"acc\[0\]\[1\]"):
        summarize([[90.0, None], [None, 80.0]])
    with pytest.raises(ValueError, match="finite"):
        summarize(np.array([[90.0, math.nan], [0.0, 80.0]]))


def test_task_decomposition_by_hand():
    tasks = [[3, 0], [1, 2]]  # classes by task, not in id order
    logits = np.array([
        [5.0, 1.0, 9.0, 2.0],  # label 0 (task 0): own task {0, 3} -> 0 right; overall 2 -> task 1
        [1.0, 0.0, 0.0, 4.0],  # label 0: own task -> 3 wrong; overall 3 -> task 0 right
        [0.0, 2.0, 3.0, 1.0],  # label 1 (task 1): own task -> 2 wrong; overall 2 -> task 1
        [0.0, 6.0, 3.0, -np.inf],  # label 1: right on both (masked logits are fine)
    ])
    within, task_right = task_decomposition(logits, [0, 0, 1, 1], tasks)
    assert within.tolist() == [True, False, False, True]
    assert task_right.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="no task"):
        task_decomposition(logits, [0, 0, 1, 3], [[0], [1]])  # label 3 is in no task
