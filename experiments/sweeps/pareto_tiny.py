"""A weight sweep for the Pareto front of red against blue on the tiny reward_backprop run.

`get_sweep()` returns one override dict per run: `--config.<key>=<value>` pairs on top of
experiments/configs/reward_backprop_tiny.py. The weight vectors are the simplex lattice of
`alignax.pareto.front.weight_grid`, from (1, 0) to (0, 1); the launcher names and places each run.
"""

from alignax.pareto.front import weight_grid

CONFIG = "experiments/configs/reward_backprop_tiny.py"
REWARDS = ("red", "blue")


def get_sweep(arg: str = "") -> list[dict]:
    """`arg` = number of weight values per reward (default 5: 0, 0.25, …, 1)."""
    num_points = int(arg) if arg else 5
    runs = []
    for row in weight_grid(len(REWARDS), num_points):
        overrides = {f"pareto.weights.{name}": float(w) for name, w in zip(REWARDS, row, strict=True)}
        runs.append(overrides)
    return runs
