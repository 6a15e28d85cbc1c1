"""Per-reward normalisation, so rewards on different scales can share one weight vector.

Rewards differ by orders of magnitude (an aesthetic score near 5, a CLIP similarity near
0.3); a weight vector only means a trade-off once they are on a common scale. Each reward
gets its own method, chosen by name from `METHODS` in `config.pareto.normalization`:

    config.pareto.normalization = {"hpsv2": {"method": "running", "momentum": 0.99},
                                   "aesthetic": {"method": "fixed", "scale": 2.0, "offset": 5.0}}

Rewards not listed use `none`.

- `none`:    r' = r
- `fixed`:   r' = (r - offset) / scale
- `running`: r' = (r - mean) / sqrt(var + eps), with mean and var running statistics over
  every sample seen so far. They are updated from the current batch first and then applied,
  so the first batch is normalised by its own statistics and never divided by a zero
  variance.

**The running update.** Merging the batch into the running statistics with weight `w` is
    mean' = mean + w·δ,   var' = (1 − w)·var + w·var_b + w·(1 − w)·δ²,   δ = mean_b − mean.
- With `w = n_b / (n + n_b)` this is Chan et al.'s parallel Welford merge: mean and
  population variance are exact over the whole stream. This is the default (`momentum=None`).
- With `momentum=m`, `w = max(1 − m, n_b / (n + n_b))`. The statistics are exact while few
  samples have been seen, then become an exponential moving average that tracks a reward
  whose distribution drifts as the policy improves. The max removes the EMA's start-up bias.

**Sharding.** The statistics are reduced over the whole batch axis of the raw rewards.
Under `jax.jit` with a batch sharded over the mesh, `jnp.mean` over that axis is already
the global mean: XLA inserts the cross-device reduction. No explicit collective is needed,
and every device holds the same replicated statistics.

**Gradients.** The gradient flows through r' into r, but not into the statistics
(`stop_gradient`): for `running`, ∂r'/∂r = 1/sqrt(var + eps).

**State.** The state is a plain pytree, so the trainer checkpoints it with everything else:
    {name: {"count": int32[], "mean": f32[], "var": f32[], "ideal": f32[]}}
`ideal` is the running ideal point of the Chebyshev scalarisation (see `scalarize.py`).
It lives here so one pytree holds all multi-reward state. The state layout does not
depend on the method, so changing a method keeps old checkpoints loadable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from alignax.errors import ConfigError

State = dict[str, dict[str, jax.Array]]
Stats = dict[str, jax.Array]


def init_state(names: Sequence[str]) -> State:
    """Empty statistics for every reward: zero count, mean 0, variance 1, ideal −inf."""
    return {name: {"count": jnp.zeros((), jnp.int32), "mean": jnp.zeros((), jnp.float32),
                   "var": jnp.ones((), jnp.float32), "ideal": jnp.full((), -jnp.inf, jnp.float32)}
            for name in names}


def merge_batch(stats: Stats, values: jax.Array, momentum: float | None) -> Stats:
    """`stats` with the batch `values` (B,) merged in (see the module docstring)."""
    values = jax.lax.stop_gradient(values.astype(jnp.float32))
    n_batch = values.shape[0]
    batch_mean = jnp.mean(values)
    batch_var = jnp.mean(jnp.square(values - batch_mean))
    count = stats["count"] + n_batch
    weight = n_batch / count.astype(jnp.float32)
    if momentum is not None:
        weight = jnp.maximum(1.0 - momentum, weight)
    delta = batch_mean - stats["mean"]
    return {**stats, "count": count, "mean": stats["mean"] + weight * delta,
            "var": (1.0 - weight) * stats["var"] + weight * batch_var + weight * (1.0 - weight) * jnp.square(delta)}


def _none(values: jax.Array, stats: Stats) -> tuple[jax.Array, Stats]:
    return values, stats


def _fixed(values: jax.Array, stats: Stats, *, scale: float, offset: float = 0.0) -> tuple[jax.Array, Stats]:
    return (values - offset) / scale, stats


def _running(values: jax.Array, stats: Stats, *, momentum: float | None = None,
             eps: float = 1e-8) -> tuple[jax.Array, Stats]:
    stats = merge_batch(stats, values, momentum)
    mean, var = jax.lax.stop_gradient(stats["mean"]), jax.lax.stop_gradient(stats["var"])
    return (values - mean) * jax.lax.rsqrt(var + eps), stats


@dataclasses.dataclass(frozen=True)
class Method:
    """A normalisation: its function, its required and optional settings, and a settings check."""

    apply: Callable[..., tuple[jax.Array, Stats]]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], str | None] = lambda settings: None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_fixed(s: dict[str, Any]) -> str | None:
    if not (_finite(s["scale"]) and s["scale"] != 0):
        return f"scale must be a finite non-zero number, found {s['scale']!r}"
    if not _finite(s.get("offset", 0.0)):
        return f"offset must be a finite number, found {s['offset']!r}"
    return None


def _check_running(s: dict[str, Any]) -> str | None:
    m = s.get("momentum")
    if m is not None and not (_finite(m) and 0.0 <= m < 1.0):
        return f"momentum must be None (exact) or in [0, 1), found {m!r}"
    if not (_finite(s.get("eps", 1e-8)) and s.get("eps", 1e-8) > 0):
        return f"eps must be a positive number, found {s['eps']!r}"
    return None


METHODS: dict[str, Method] = {
    "none": Method(_none),
    "fixed": Method(_fixed, required=("scale",), optional=("offset",), check=_check_fixed),
    "running": Method(_running, optional=("momentum", "eps"), check=_check_running),
}


def validate_specs(specs: Mapping[str, Any] | None, reward_names: Sequence[str],
                   field: str = "config.pareto.normalization") -> dict[str, dict[str, Any]]:
    """Checks the per-reward settings and returns a full plain dict: every reward, `none` if unset.

    Raises ConfigError naming `field.<reward>` for unknown rewards, unknown methods, unknown,
    missing or out-of-range settings.
    """
    specs = {} if specs is None else _plain(specs)
    unknown = sorted(set(specs) - set(reward_names))
    if unknown:
        raise ConfigError(f"{field}: rewards {unknown} are not in config.rewards {list(reward_names)}")
    out = {}
    for name in reward_names:
        spec = dict(specs.get(name, {"method": "none"}))
        where = f"{field}.{name}"
        method_name = spec.pop("method", None)
        if method_name not in METHODS:
            raise ConfigError(f"{where}.method={method_name!r}: expected one of {sorted(METHODS)}")
        method = METHODS[method_name]
        missing = [k for k in method.required if k not in spec]
        extra = sorted(set(spec) - set(method.required) - set(method.optional))
        if missing or extra:
            raise ConfigError(f"{where}: method {method_name!r} takes required {list(method.required)} and optional "
                              f"{list(method.optional)}; missing {missing}, unknown {extra}")
        problem = method.check(spec)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        out[name] = {"method": method_name, **spec}
    return out


def normalize(raw: Mapping[str, jax.Array], state: State,
              spec: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, jax.Array], State]:
    """Normalised rewards and the updated state; pure and jit-able (close over `spec`).

    `raw` maps reward names to scores (B,). `spec` maps names to settings as returned by
    `validate_specs`; a name absent from `spec` is passed through (`none`). The returned state
    keeps every entry of `state`, including rewards absent from `raw`.
    """
    normalized, new_state = {}, dict(state)
    for name, values in raw.items():
        settings = dict(spec.get(name, {"method": "none"}))
        method = METHODS[settings.pop("method")]
        normalized[name], new_state[name] = method.apply(values, state[name], **settings)
    return normalized, new_state


def _plain(tree: Any) -> Any:
    """ConfigDict / Mapping → nested plain dicts (ConfigDict is not a collections.abc.Mapping)."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
