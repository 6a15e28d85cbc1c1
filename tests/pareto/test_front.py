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
