"""Rectified-flow training pieces shared by SFT, DPO and feature alignment (SD3 paper, §2–3).

x_t = (1 − t)·x0 + t·ε and the network predicts the velocity ε − x0; the timestep the
MM-DiT sees is 1000·t, as in diffusers' FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from alignax.errors import ConfigError


def logit_normal(rng: jax.Array, batch: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """SD3's logit-normal timestep density: t = sigmoid(n), n ~ N(mean, std)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))


def uniform(rng: jax.Array, batch: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    del mean, std
    return jax.random.uniform(rng, (batch,))


TIMESTEP_SAMPLERS: dict[str, Callable[..., jax.Array]] = {"logit_normal": logit_normal, "uniform": uniform}


def no_weighting(t: jax.Array) -> jax.Array:
    return jnp.ones_like(t)


def cosmap(t: jax.Array) -> jax.Array:
    """SD3's 'cosmap' loss weight, 2 / (π(1 − 2t + 2t²))."""
    return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t * t))


LOSS_WEIGHTINGS: dict[str, Callable[[jax.Array], jax.Array]] = {"none": no_weighting, "cosmap": cosmap}


def pick(registry: dict, name: str, field: str):
    if name not in registry:
        raise ConfigError(f"{field}={name!r}: unknown; choose one of {sorted(registry)}")
    return registry[name]


def noised(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


def per_sample_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error per sample, in fp32."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
