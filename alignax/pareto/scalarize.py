"""Scalarisations: one weight vector turns several (normalised) rewards into one loss.

**Sign convention.** Every scalarisation returns a per-sample *loss to minimise*, shape (B,):
- `weighted_sum`: loss = −Σ_i w_i·r_i. The objective Σ_i w_i·r_i is maximised, so
  ∂loss/∂r_i = −w_i.
- `chebyshev`:    loss = max_i w_i·(z*_i − r_i), the weighted distance to the ideal point z*
  along the worst reward. Unlike the weighted sum, it can reach points on non-convex parts of
  the Pareto front. ∂loss/∂r_i = −w_i for the reward attaining the max and 0 for the others.
- `mgda`:         gradient-balanced (`gradient_balance.py`): the update is MGDA's min-norm combination of
  the per-reward gradients, steered by w, so no weighted reward's gradient opposes it. Its value here is
  the weighted sum; `reward_backprop` computes the balanced gradient (one backward per reward).

Weights are used as given, not renormalised. z* is in the units of the normalised rewards.
It is either configured (`config.pareto.ideal = {name: value}`) or running: the running
maximum of observed batch-mean rewards, stored in the normalisation state pytree (see
`update_ideal`). An empty `config.pareto.ideal` selects the running ideal.

**Weight vectors** (`config.pareto.weights`) are given either as a mapping {name: w} or as a
sequence aligned with the order of `config.rewards`. That order is what
`list(config.rewards.keys())` returns. For an ml_collections `ConfigDict`, `keys()` is
*sorted by name*: it does not keep insertion order (checked with ml_collections 1.1.0), so a
sequence there means alphabetical order. Prefer the mapping form; the errors print the order
used.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from alignax.errors import ConfigError

Scalarization = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _weighted_sum(rewards: jax.Array, weights: jax.Array, names: Sequence[str],
                  ideal: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    objective = jnp.einsum("m,mb->b", weights, rewards)
    return -objective, {"pareto/objective": jnp.mean(objective)}


def _chebyshev(rewards: jax.Array, weights: jax.Array, names: Sequence[str],
               ideal: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    if ideal is None:
        raise ConfigError("chebyshev scalarisation needs an ideal point: set config.pareto.ideal or use the "
                          "running ideal (multi_reward_loss with an empty config.pareto.ideal)")
    gaps = weights[:, None] * (ideal[:, None] - rewards)
    loss = jnp.max(gaps, axis=0)
    active = jax.nn.one_hot(jnp.argmax(gaps, axis=0), len(names))
    info = {f"pareto/{name}/active_fraction": jnp.mean(active[:, i]) for i, name in enumerate(names)}
    info |= {f"pareto/{name}/ideal": ideal[i] for i, name in enumerate(names)}
    return loss, info


# `mgda` balances the per-reward *gradients* (alignax/pareto/gradient_balance.py; reward_backprop takes that
# path). In value space, where this function is all there is, it is the weighted sum: the logged
# `pareto/objective`, and the loss of any objective that does not differentiate rewards one by one.
SCALARIZATIONS: dict[str, Scalarization] = {"weighted_sum": _weighted_sum, "chebyshev": _chebyshev,
                                            "mgda": _weighted_sum}


def scalarize(normalized: Mapping[str, jax.Array], weights: Mapping[str, float], method: str,
              ideal: Mapping[str, Any] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-sample loss (B,) to minimise, and scalar metrics; pure and jit-able.

    `weights` maps every reward name to its weight, as `validate_weights` returns it. Rewards
    in `normalized` without a weight are ignored. `ideal` maps names to z*, as floats or
    arrays; only `chebyshev` uses it.
    """
    if method not in SCALARIZATIONS:
        raise ConfigError(f"config.pareto.scalarization={method!r}: expected one of {sorted(SCALARIZATIONS)}")
    names = list(weights)
    missing = [n for n in names if n not in normalized]
    if missing:
        raise ConfigError(f"config.pareto.weights: rewards {missing} have weights but were not computed; "
                          f"computed {sorted(normalized)}")
    rewards = jnp.stack([normalized[n] for n in names])
    w = jnp.asarray([weights[n] for n in names], rewards.dtype)
    z = None
    if ideal is not None:
        absent = [n for n in names if n not in ideal]
        if absent:
            raise ConfigError(f"config.pareto.ideal: missing rewards {absent}; expected every name in {names}")
        z = jax.lax.stop_gradient(jnp.stack([jnp.asarray(ideal[n], rewards.dtype) for n in names]))
    return SCALARIZATIONS[method](rewards, w, names, z)


def update_ideal(state: Mapping[str, Mapping[str, jax.Array]],
                 normalized: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """The state with each running ideal raised to this batch's mean reward if that is higher."""
    new_state = dict(state)
    for name, values in normalized.items():
        batch_mean = jax.lax.stop_gradient(jnp.mean(values.astype(jnp.float32)))
        new_state[name] = {**state[name], "ideal": jnp.maximum(state[name]["ideal"], batch_mean)}
    return new_state


def ideal_point(state: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """The running ideal point {name: z*} held in the state."""
    return {name: stats["ideal"] for name, stats in state.items()}


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_weights(weights: Any, reward_names: Sequence[str],
                     field: str = "config.pareto.weights") -> dict[str, float]:
    """The weight vector as {name: float} in `reward_names` order, or ConfigError naming `field`.

    Refused: names not in `reward_names`, missing names, a sequence of the wrong length,
    non-numbers, negative, NaN or infinite weights, and all-zero weights. No rewards and no
    weights is valid (objectives without rewards).
    """
    names = list(reward_names)
    if hasattr(weights, "to_dict"):
        weights = weights.to_dict()
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ConfigError(f"{field}: rewards {unknown} are not in config.rewards {names}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise ConfigError(f"{field}: no weight for rewards {missing}; expected a weight for every name in {names}")
        vector = {n: weights[n] for n in names}
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != len(names):
            raise ConfigError(f"{field}: {len(weights)} weights {list(weights)} for {len(names)} rewards; a sequence "
                              f"is aligned with config.rewards in the order {names}")
        vector = dict(zip(names, weights, strict=True))
    else:
        raise ConfigError(f"{field}: expected a mapping {{name: weight}} or a sequence aligned with {names}, "
                          f"found {type(weights).__name__} {weights!r}")
    bad = {n: w for n, w in vector.items() if not (_is_number(w) and math.isfinite(w) and w >= 0)}
    if bad:
        raise ConfigError(f"{field}: weights must be finite non-negative numbers; found {bad}")
    if names and not any(w > 0 for w in vector.values()):
        raise ConfigError(f"{field}: all weights are zero {vector}; at least one must be positive")
    return {n: float(w) for n, w in vector.items()}


def validate_ideal(ideal: Any, reward_names: Sequence[str],
                   field: str = "config.pareto.ideal") -> dict[str, float] | None:
    """A configured ideal point {name: z*}, or None (empty) for the running ideal point."""
    if hasattr(ideal, "to_dict"):
        ideal = ideal.to_dict()
    if ideal is None or (isinstance(ideal, Mapping) and not ideal):
        return None
    names = list(reward_names)
    if not isinstance(ideal, Mapping):
        raise ConfigError(f"{field}: expected a mapping {{name: z*}} or empty for a running ideal, found {ideal!r}")
    unknown, missing = sorted(set(ideal) - set(names)), [n for n in names if n not in ideal]
    if unknown or missing:
        raise ConfigError(f"{field}: expected exactly the rewards {names}; unknown {unknown}, missing {missing}")
    bad = {n: z for n, z in ideal.items() if not (_is_number(z) and math.isfinite(z))}
    if bad:
        raise ConfigError(f"{field}: ideal values must be finite numbers; found {bad}")
    return {n: float(ideal[n]) for n in names}
