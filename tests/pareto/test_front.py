"""Pareto-front tools on hand-computed examples and against brute-force cell counting."""

import itertools
import math

import numpy as np
import pytest

from alignax.errors import DataError
from alignax.pareto import hypervolume, non_dominated, weight_grid


def test_non_dominated_2d_by_hand():
    points = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0, 3], [3, 0.5]])
    # [1,1] < [2,2]; [0,3] < [1,3]; [3,0.5] < [3,1]; the duplicate [2,2] is kept twice.
    np.testing.assert_array_equal(non_dominated(points), [True, True, True, False, True, False, False])
    # minimising: [1,1] dominates everything except [0,3] (better first) and [3,0.5] (better second)
    np.testing.assert_array_equal(non_dominated(points, maximize=False),
                                  [False, False, False, True, False, True, True])


def test_non_dominated_3d_by_hand():
    points = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0.4, 0.4, 0.4], [0.3, 0.3, 0.3]])
    np.testing.assert_array_equal(non_dominated(points), [True, True, True, True, True, False])


def test_hypervolume_2d_by_hand():
    points = np.array([[1, 3], [2, 2], [3, 1], [1, 1]])
    assert hypervolume(points, [0, 0]) == pytest.approx(6.0)  # columns of heights 3, 2, 1
    assert hypervolume(points, [1, 1]) == pytest.approx(1.0)  # only [2,2] beats (1,1) everywhere
    # minimisation with ref (4, 4): [1,1] dominates the rest, so one box (4 − 1)·(4 − 1) = 9
    assert hypervolume(points, [4, 4], maximize=False) == pytest.approx(9.0)


def test_hypervolume_3d_by_hand():
    axis_boxes = np.array([[3, 1, 1], [1, 3, 1], [1, 1, 3]])
    # the unit cube, plus the three 2×1×1 arms: 1 + 3·2 = 7
    assert hypervolume(axis_boxes, [0, 0, 0]) == pytest.approx(7.0)
    # adding the 2×2×2 cube: 8 + three 1×1×1 arm tips = 11
    assert hypervolume(np.vstack([axis_boxes, [[2, 2, 2]]]), [0, 0, 0]) == pytest.approx(11.0)
    # a dominated point and a point outside the reference change nothing
    assert hypervolume(np.vstack([axis_boxes, [[2, 2, 2], [1, 1, 1], [5, 5, -1]]]), [0, 0, 0]) == pytest.approx(11.0)


def _cells(points, reference):
    """Brute force for integer points: count the unit cells inside some box [reference, p]."""
    ranges = [range(int(r), int(points[:, j].max())) for j, r in enumerate(reference)]
    return sum(any(np.all(np.array(c) + 1 <= p) for p in points) for c in itertools.product(*ranges))


@pytest.mark.parametrize("num_objectives, seed", [(2, 0), (3, 1), (3, 2), (4, 3)])
def test_hypervolume_matches_cell_counting(num_objectives, seed):
    points = np.random.default_rng(seed).integers(0, 6, size=(9, num_objectives))
    reference = np.zeros(num_objectives)
    assert hypervolume(points, reference) == pytest.approx(_cells(points, reference))


def test_front_inputs_are_checked():
    with pytest.raises(DataError, match="reference"):
        hypervolume(np.ones((3, 2)), [0, 0, 0])
    with pytest.raises(DataError, match=r"\(N, M\)"):
        non_dominated(np.ones(3))
    with pytest.raises(DataError, match="NaN"):
        non_dominated(np.array([[1.0, np.nan]]))


def test_weight_grid_two_rewards_by_hand():
    np.testing.assert_allclose(weight_grid(2, 5), [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]])


@pytest.mark.parametrize("num_rewards, num_points", [(1, 4), (2, 2), (3, 5), (4, 4), (3, 1)])
def test_weight_grid_is_the_simplex_lattice(num_rewards, num_points):
    grid = weight_grid(num_rewards, num_points)
    assert grid.shape[1] == num_rewards
    np.testing.assert_allclose(grid.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(grid >= 0)
    if num_points > 1 and num_rewards > 1:
        h = num_points - 1
        assert len(grid) == math.comb(h + num_rewards - 1, num_rewards - 1)
        np.testing.assert_allclose(grid * h, np.round(grid * h), atol=1e-12)  # on the 1/H lattice
        assert len(np.unique(grid, axis=0)) == len(grid)
    else:
        np.testing.assert_allclose(grid, np.full((1, num_rewards), 1.0 / num_rewards))


def _cells_on_grid(points, reference, step):
    """Brute force on a lattice of spacing `step`: the volume of the cells inside some box [reference, p]."""
    cells = np.round((points - reference) / step).astype(int)
    corners = np.indices(cells.max(axis=0)).reshape(points.shape[1], -1).T  # every cell's lower corner
    inside = np.any(np.all(corners[:, None, :] < cells[None, :, :], axis=-1), axis=1)
    return int(inside.sum()) * step ** points.shape[1]


@pytest.mark.parametrize("num_objectives, seed", [(4, 10), (4, 11), (5, 12)])
def test_hypervolume_four_and_more_rewards_matches_grid_counting(num_objectives, seed):
    """k >= 4 (the study report's exact path): half-unit points with a non-zero reference, some of them
    dominated, duplicated or outside the reference."""
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 9, size=(12, num_objectives)) / 2.0 - 1.0
    points = np.vstack([points, points[:2]])  # duplicates
    reference = np.full(num_objectives, -1.0)
    inside = points[np.all(points > reference, axis=1)]
    assert len(inside) < len(points)  # the reference does cut points off
    expected = _cells_on_grid(inside, reference, 0.5)
    assert expected > 0
    assert hypervolume(points, reference) == pytest.approx(expected, rel=1e-12)


def test_hypervolume_monte_carlo_and_auto():
    from alignax.pareto.front import hypervolume_auto, hypervolume_monte_carlo
    points = np.random.default_rng(5).integers(0, 6, size=(9, 4)).astype(float)
    exact = hypervolume(points, np.zeros(4))
    value, error = hypervolume_monte_carlo(points, np.zeros(4), samples=100_000, seed=1)
    assert 0 < error < 0.02 * exact
    assert abs(value - exact) < 4 * error  # the stated error is the real one
    assert hypervolume_monte_carlo(points, np.zeros(4), samples=100_000, seed=1) == (value, error)  # fixed seed
    assert hypervolume_auto(points, np.zeros(4)) == (exact, 0.0, "exact")  # a small front: exact
    mc = hypervolume_auto(points, np.zeros(4), max_work=1.0)
    assert mc[2] == "monte_carlo" and abs(mc[0] - exact) < 4 * mc[1]
    assert hypervolume_monte_carlo(points, np.full(4, 10.0)) == (0.0, 0.0)  # nothing beats the reference
