"""pipeline.pareto against independent oracles: Optuna's own best_trials, geometry done by hand."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest

from pipeline.pareto import dominates, hypervolume, knee_point, normalized_hypervolume, pareto_front

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("directions", [["maximize", "minimize"], ["maximize", "minimize", "minimize"],
                                        ["minimize", "minimize", "maximize"]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_front_matches_optuna_best_trials(directions, seed):
    rng = np.random.default_rng(seed)
    # few distinct values per axis, so ties and duplicates occur
    points = rng.integers(0, 6, size=(40, len(directions))).astype(float)
    study = optuna.create_study(directions=directions)
    dists = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for p in points:
        study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dists, values=list(p)))
    expected = sorted(t.number for t in study.best_trials)
    assert pareto_front(points, directions) == expected


def test_front_is_non_dominated_and_covers_the_rest():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(60, 3))
    dirs = ["maximize", "minimize", "minimize"]
    front = pareto_front(pts, dirs)
    assert front
    for i, j in itertools.permutations(front, 2):
        assert not dominates(pts[i], pts[j], dirs)
    for k in set(range(len(pts))) - set(front):
        assert any(dominates(pts[i], pts[k], dirs) for i in front)


def test_dominates_respects_directions():
    assert dominates([0.9, 1.0], [0.8, 2.0], ["maximize", "minimize"])
    assert not dominates([0.9, 1.0], [0.9, 1.0], ["maximize", "minimize"])  # equal: no
    assert not dominates([0.9, 3.0], [0.8, 2.0], ["maximize", "minimize"])  # trade-off: no


def test_hypervolume_by_hand_2d():
    # minimise both; reference (4, 4). Point (1, 2) dominates a 3 x 2 box; (2, 1) a 2 x 3 box;
    # their overlap is [2,4] x [2,4] = 4, so the union is 6 + 6 - 4 = 8.
    dirs = ["minimize", "minimize"]
    assert hypervolume([[1, 2]], dirs, [4, 4]) == pytest.approx(6.0)
    assert hypervolume([[1, 2], [2, 1]], dirs, [4, 4]) == pytest.approx(8.0)
    # a dominated point adds nothing; a point outside the box is ignored
    assert hypervolume([[1, 2], [2, 1], [3, 3], [5, 0]], dirs, [4, 4]) == pytest.approx(8.0)
    assert hypervolume([], dirs, [4, 4]) == 0.0


def test_hypervolume_maximize_axis_and_3d_box():
    # maximise accuracy above 0.5, minimise cost below 10: one point (0.9, 4) -> 0.4 * 6
    assert hypervolume([[0.9, 4.0]], ["maximize", "minimize"], [0.5, 10.0]) == pytest.approx(2.4)
    assert hypervolume([[1, 1, 1]], ["minimize"] * 3, [3, 4, 5]) == pytest.approx(2 * 3 * 4)


def test_normalized_hypervolume_is_a_share_of_the_box():
    dirs = ["maximize", "minimize"]
    ideal, ref = [1.0, 0.0], [0.9, 100.0]
    assert normalized_hypervolume([[0.9, 100.0]], dirs, ref, ideal) == 0.0  # the reference itself: nothing
    assert normalized_hypervolume([[1.0, 0.0]], dirs, ref, ideal) == pytest.approx(1.0)  # the ideal: all
    assert normalized_hypervolume([[0.95, 50.0]], dirs, ref, ideal) == pytest.approx(0.25)
    assert normalized_hypervolume([[0.95, 50.0]], dirs, [1.0, 100.0], ideal) == 0.0  # degenerate box


def test_knee_is_the_balanced_point_and_ignores_dominated_points():
    dirs = ["maximize", "minimize"]
    # a convex front: extremes (1.0, 10) and (0.5, 1); the middle (0.9, 2) is close to the ideal (1.0, 1)
    front = [[1.0, 10.0], [0.9, 2.0], [0.5, 1.0]]
    assert knee_point(front, dirs) == 1
    with_dominated = front + [[0.8, 3.0], [0.4, 9.0]]
    assert knee_point(with_dominated, dirs) == 1
    # the same front written as losses (accuracy negated, minimised) has the same knee
    assert knee_point([[-1.0, 10.0], [-0.9, 2.0], [-0.5, 1.0]], ["minimize", "minimize"]) == 1
    assert knee_point([[0.7, 3.0]], dirs) == 0


def test_knee_in_the_box_does_not_let_one_eval_row_outweigh_a_large_speedup():
    dirs = ["maximize", "minimize"]
    # two front points: one eval row of 300 more accurate (0.9700 vs 0.9667) but 19x slower
    front = [[0.9700, 19.0], [0.9667, 1.0]]
    # min-max over the front stretches the 0.0033 accuracy span to the same weight as the 18 ms one: a tie that
    # goes to the slow point
    assert knee_point(front, dirs) == 0
    # in the box (ideal = FP32 accuracy 0.97 at zero cost, reference = the 0.03 drop limit and the worst uniform
    # baseline's 20 ms) the row is a ninth of the budget and the speedup most of the cost range
    assert knee_point(front, dirs, scale=([0.97, 0.0], [0.94, 20.0])) == 1
    # accuracy above the ideal's is no distance from it (not a penalty)
    assert knee_point([[0.99, 5.0], [0.96, 4.0]], dirs, scale=([0.97, 0.0], [0.94, 20.0])) == 0
    # a degenerate box falls back to min-max
    assert knee_point(front, dirs, scale=([0.97, 0.0], [0.97, 20.0])) == 0


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="finite"):
        pareto_front([[1.0, float("nan")]], ["maximize", "minimize"])
    with pytest.raises(ValueError, match="shape"):
        pareto_front([[1.0, 2.0, 3.0]], ["maximize", "minimize"])
    with pytest.raises(ValueError, match="maximize"):
        pareto_front([[1.0, 2.0]], ["max", "minimize"])
    with pytest.raises(ValueError, match="at least one"):
        knee_point([], ["maximize"])
