"""The trainer's one call: normalise the raw rewards, scalarise them, and log each reward.

The Pareto evaluation needs every reward's raw and normalised value at every step, so
`multi_reward_loss` logs both, per reward, next to the scalarisation's own metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from alignax.errors import ConfigError
from alignax.pareto import normalize as normalize_lib
from alignax.pareto import scalarize as scalarize_lib


def resolve_config(pareto: Any, reward_names: Sequence[str], field: str = "config.pareto") -> dict[str, Any]:
    """`config.pareto` checked and turned into the keyword arguments of `multi_reward_loss`.

    Raises ConfigError naming the field for a bad weight vector, normalisation, scalarisation
    or ideal point. Call it before compiling anything.
    """
    if pareto.scalarization not in scalarize_lib.SCALARIZATIONS:
        raise ConfigError(f"{field}.scalarization={pareto.scalarization!r}: expected one of "
                          f"{sorted(scalarize_lib.SCALARIZATIONS)}")
    return dict(weights=scalarize_lib.validate_weights(pareto.weights, reward_names, f"{field}.weights"),
                normalization=normalize_lib.validate_specs(pareto.normalization, reward_names,
                                                           f"{field}.normalization"),
                scalarization=pareto.scalarization,
                ideal=scalarize_lib.validate_ideal(pareto.ideal, reward_names, f"{field}.ideal"))


def multi_reward_loss(raw: Mapping[str, jax.Array], state: normalize_lib.State, *,
                      normalization: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float],
                      scalarization: str, ideal: Mapping[str, float] | None = None,
                      ) -> tuple[jax.Array, dict[str, jax.Array], normalize_lib.State]:
    """(per-sample loss (B,) to minimise, metrics, new state); pure and jit-able.

    The keyword arguments are what `resolve_config(config.pareto, reward_names)` returns. With `ideal=None`,
    `chebyshev` uses the running ideal point, which is updated with this batch first.
    """
    normalized, state = normalize_lib.normalize(raw, state, normalization)
    if ideal is None:
        state = scalarize_lib.update_ideal(state, normalized)
        ideal = scalarize_lib.ideal_point(state)
    loss, info = scalarize_lib.scalarize(normalized, weights, scalarization, ideal)
    for name in raw:
        info[f"reward/{name}/raw"] = jnp.mean(raw[name])
        info[f"reward/{name}/normalized"] = jnp.mean(normalized[name])
        if normalization.get(name, {}).get("method") == "running":
            info[f"reward/{name}/running_mean"] = state[name]["mean"]
            info[f"reward/{name}/running_std"] = jnp.sqrt(state[name]["var"])
    return loss, info, state
