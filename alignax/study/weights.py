"""An arm's weight grid: `'simplex:N'`, `'dirichlet:N:SEED'` or an explicit list of vectors.

Every grid is resolved to a tuple of weight vectors, rounded to `DECIMALS` places: the point names
carry the weights, so a vector must print the same way on every re-run of the study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignax.errors import ConfigError

DECIMALS = 4


def resolve_grid(grid: Any, num_rewards: int, where: str) -> tuple[tuple[float, ...], ...]:
    """The weight vectors `grid` names, each of length `num_rewards`; ConfigError naming `where`."""
    if isinstance(grid, str):
        kind, _, rest = grid.partition(":")
        parts = rest.split(":") if rest else []
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = None
        if kind == "simplex" and numbers is not None and len(numbers) == 1 and numbers[0] >= 1:
            from alignax.pareto.front import weight_grid
            vectors = weight_grid(num_rewards, numbers[0])
        elif kind == "dirichlet" and numbers is not None and len(numbers) == 2 and numbers[0] >= 1:
            # Flat Dirichlet samples: uniform on the simplex; the seed makes them the same on every re-run.
            vectors = np.random.default_rng(numbers[1]).dirichlet(np.ones(num_rewards), size=numbers[0])
        else:
            raise ConfigError(f"{where}={grid!r}: expected 'simplex:N' (N ≥ 1 values per weight), "
                              f"'dirichlet:N:SEED' (N ≥ 1 samples) or a list of weight vectors")
    elif isinstance(grid, Sequence) and not isinstance(grid, str | bytes):
        if not grid:
            raise ConfigError(f"{where}: the grid is empty; give at least one weight vector")
        vectors = []
        for index, vector in enumerate(grid):
            if not isinstance(vector, Sequence) or isinstance(vector, str) or len(vector) != num_rewards:
                raise ConfigError(f"{where}[{index}]={vector!r}: expected {num_rewards} weights, one per reward of "
                                  f"weights.rewards")
            bad = [w for w in vector if isinstance(w, bool) or not isinstance(w, int | float)
                   or not math.isfinite(w) or w < 0]
            if bad or not any(w > 0 for w in vector):
                raise ConfigError(f"{where}[{index}]={list(vector)!r}: weights must be finite, non-negative and "
                                  f"not all zero")
            vectors.append([float(w) for w in vector])
    else:
        raise ConfigError(f"{where}: expected 'simplex:N', 'dirichlet:N:SEED' or a list of weight vectors, "
                          f"found {type(grid).__name__} {grid!r}")
    out = tuple(tuple(round(float(w), DECIMALS) + 0.0 for w in row) for row in np.asarray(vectors, np.float64))
    if not out:
        raise ConfigError(f"{where}={grid!r}: the grid is empty")
    return out


def format_weight(w: float) -> str:
    """0.75 → '0.75', 1.0 → '1', 0.3333 → '0.3333': short and stable for point names."""
    return f"{round(w, DECIMALS):.{DECIMALS}f}".rstrip("0").rstrip(".") or "0"
