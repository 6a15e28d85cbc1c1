"""Host-side tools for comparing runs on the Pareto front (numpy; evaluation, not training).

A run's evaluation gives one point per run: its mean score on each reward. The front is the
set of runs no other run beats on every reward at once. Its hypervolume, the volume it
dominates above a reference point, is one number that grows when the front moves out. That
number compares weight sweeps and objectives.

All functions take `maximize=True` by default, since alignax rewards are higher-is-better.
"""

from __future__ import annotations

import itertools

import numpy as np

from alignax.errors import ConfigError, DataError


def _as_points(points: np.ndarray, name: str = "points") -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise DataError(f"{name}: expected shape (N, M) = (runs, rewards), found shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise DataError(f"{name}: expected finite values, found NaN or inf in rows "
                        f"{np.nonzero(~np.all(np.isfinite(points), axis=1))[0].tolist()}")
    return points


def non_dominated(points: np.ndarray, maximize: bool = True) -> np.ndarray:
    """Bool mask (N,) of the points no other point dominates.

    q dominates p when q is at least as good on every reward and strictly better on one.
    Identical points do not dominate each other, so duplicates on the front are all kept.
    O(N²·M) time and memory: meant for tens to thousands of runs.
    """
    p = _as_points(points)
    if not maximize:
        p = -p
    at_least = np.all(p[:, None, :] >= p[None, :, :], axis=-1)  # [q, p]: q ≥ p everywhere
    strictly = np.any(p[:, None, :] > p[None, :, :], axis=-1)  # [q, p]: q > p somewhere
    return ~np.any(at_least & strictly, axis=0)


def _hv_min(p: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of points that all lie strictly below `ref` (minimisation), by slicing.

    Sort by the last objective; between consecutive values of it, the dominated region is a
    slab whose cross-section is the (M−1)-D hypervolume of the points already passed.
    """
    if len(p) == 0:
        return 0.0
    if p.shape[1] == 1:
        return float(ref[0] - p[:, 0].min())
    if p.shape[1] == 2:
        p = p[np.lexsort((p[:, 1], p[:, 0]))]  # x ascending, then y ascending
        volume, best_y = 0.0, ref[1]
        for x, y in p:
            if y < best_y:
                volume += (ref[0] - x) * (best_y - y)
                best_y = y
        return volume
    p = p[np.argsort(p[:, -1], kind="stable")]
    volume = 0.0
    for k in range(len(p)):
        upper = p[k + 1, -1] if k + 1 < len(p) else ref[-1]
        if upper > p[k, -1]:
            volume += (upper - p[k, -1]) * _hv_min(p[: k + 1, :-1], ref[:-1])
    return volume


def hypervolume(points: np.ndarray, reference: np.ndarray, maximize: bool = True) -> float:
    """Exact volume of the region the points dominate, bounded by `reference`.

    With `maximize=True` (the default) that is the union of the boxes [reference, p].
    Points not strictly better than the reference on every reward add nothing.
    - 2-D: sweep, O(N log N).
    - M ≥ 3: recursive slicing on the last objective (HSO), O(N^(M−1) log N). It is exact,
      and meant for the small N of run comparisons: N ≤ ~100 for M = 3, fewer beyond.
    Dominated points are dropped first, so they cost nothing.
    """
    p = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape[0] != p.shape[1] or not np.all(np.isfinite(ref)):
        raise DataError(f"reference: expected {p.shape[1]} finite values (one per reward), found {reference!r}")
    if maximize:
        p, ref = -p, -ref
    p = p[np.all(p < ref, axis=1)]
    if len(p) == 0:
        return 0.0
    p = np.unique(p[non_dominated(p, maximize=False)], axis=0)
    return _hv_min(p, ref)


def hypervolume_monte_carlo(points: np.ndarray, reference: np.ndarray, *, samples: int = 200_000, seed: int = 0,
                            maximize: bool = True) -> tuple[float, float]:
    """(estimate, standard error) of the hypervolume by uniform sampling of the box between the
    reference and the points' best values: the fallback when exact slicing (O(N^(M−1))) is too slow
    for many points in many dimensions. The error is the binomial standard error of the hit
    fraction times the box volume, so a report can state it; the seed is fixed."""
    p = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape[0] != p.shape[1] or not np.all(np.isfinite(ref)):
        raise DataError(f"reference: expected {p.shape[1]} finite values (one per reward), found {reference!r}")
    if not maximize:
        p, ref = -p, -ref
    p = p[np.all(p > ref, axis=1)]
    if len(p) == 0:
        return 0.0, 0.0
    p = p[non_dominated(p)]
    top = p.max(axis=0)
    box = float(np.prod(top - ref))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 50_000):  # chunks bound the [chunk, N, M] comparison's memory
        x = rng.uniform(ref, top, size=(min(50_000, samples - start), len(ref)))
        hits += int(np.any(np.all(x[:, None, :] <= p[None, :, :], axis=-1), axis=1).sum())
    fraction = hits / samples
    return box * fraction, box * float(np.sqrt(fraction * (1.0 - fraction) / samples))


def hypervolume_auto(points: np.ndarray, reference: np.ndarray, *, max_work: float = 2e6,
                     maximize: bool = True) -> tuple[float, float, str]:
    """(value, error, method): exact slicing when its cost N^(M−1) is at most `max_work` (always for
    M ≤ 3 and for the tens of points of a study up to M ≈ 5), else Monte Carlo with its standard error."""
    p = _as_points(points)
    front = p[non_dominated(p, maximize=maximize)] if len(p) else p
    if p.shape[1] <= 3 or float(len(front)) ** (p.shape[1] - 1) <= max_work:
        return hypervolume(p, reference, maximize=maximize), 0.0, "exact"
    value, error = hypervolume_monte_carlo(p, reference, maximize=maximize)
    return value, error, "monte_carlo"


def weight_grid(num_rewards: int, num_points: int) -> np.ndarray:
    """Simplex-lattice weight vectors for a sweep, shape (K, num_rewards), each row summing to 1.

    `num_points` is the number of values each weight takes: {0, 1/H, …, 1} with H =
    num_points − 1 (Das–Dennis lattice). That gives K = C(H + M − 1, M − 1) vectors, so for
    two rewards exactly `num_points` vectors, from (1, 0) to (0, 1). Rows are ordered with
    the first weight descending. `num_points=1` gives the single uniform vector (1/M, …).
    """
    if not (isinstance(num_rewards, int) and num_rewards >= 1):
        raise ConfigError(f"num_rewards={num_rewards!r}: expected an integer ≥ 1")
    if not (isinstance(num_points, int) and num_points >= 1):
        raise ConfigError(f"num_points={num_points!r}: expected an integer ≥ 1")
    if num_points == 1 or num_rewards == 1:
        return np.full((1, num_rewards), 1.0 / num_rewards)
    h = num_points - 1
    # Stars and bars: choose M−1 bar positions among H + M − 1 slots; the gaps are the counts.
    rows = []
    for bars in itertools.combinations(range(h + num_rewards - 1), num_rewards - 1):
        edges = (-1, *bars, h + num_rewards - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(num_rewards)])
    grid = np.asarray(rows, dtype=np.float64)[::-1] / h
    return np.ascontiguousarray(grid)
