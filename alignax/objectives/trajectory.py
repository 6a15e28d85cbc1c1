"""Flow-matching Euler trajectories with a chosen set of differentiable steps, for reward backprop.

`alignax.sampling.denoise` samples; reward backpropagation also needs to decide, step by step,
whether the gradient flows, and to measure the drift from the reference model on the steps
it differentiates. Three building blocks cover every mode:

- `run_steps`: a `lax.scan` over a static range of steps, each step under `jax.checkpoint`
  (when `remat` is set), so the backward pass stores only the per-step latents.
- `run_frozen` / `run_frozen_until`: steps whose gradient is cut. Params and the incoming
  latents are `stop_gradient`ed *before* the steps run, so autodiff sees constants and builds
  no backward for them at all (not a backward multiplied by zero). `run_frozen_until` takes a
  traced step count (`lax.fori_loop` → `while_loop`, fine since nothing is differentiated).
- `run_steps_from`: a static window of steps whose first `boundary` steps (a traced number)
  are frozen. Each step is `lax.cond(j < boundary, frozen step, differentiable step)`: the
  backward of a `cond` runs only the branch that was taken, so frozen steps cost one forward
  and no backward even though K is only known at run time (AlignProp's random K).

The drift penalty ‖v_θ − v_ref‖² is the per-element mean of the squared difference of the
(guided) velocities at the same x_t, summed over the differentiable steps; callers divide by
the number of such steps. Frozen steps contribute nothing to it (they carry no gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax import sampling
from alignax.conditioning.guidance import Conditioning
from alignax.models import remat as remat_lib

PyTree = Any
# (params, x NHWC, timestep[B] in [0, 1000], context, pooled) -> velocity NHWC
Velocity = Callable[[PyTree, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def guided_velocity(velocity: Velocity, params: PyTree, x: jax.Array, sigma: jax.Array,
                    cond: Conditioning) -> jax.Array:
    """The velocity the sampler follows at noise level `sigma` (CFG in one batched call when on)."""
    return sampling.guided_velocity(lambda x_, t, c, p: velocity(params, x_, t, c, p), x,
                                    sigma * sampling.NUM_TRAIN_TIMESTEPS, cond.context, cond.pooled,
                                    cond.negative_context, cond.negative_pooled,
                                    cond.guidance_scale).astype(jnp.float32)


def drift(v: jax.Array, v_ref: jax.Array) -> jax.Array:
    """Per-sample mean of (v − v_ref)², shape (B,)."""
    return jnp.mean(jnp.square(v - v_ref), axis=tuple(range(1, v.ndim)))


def euler_step(velocity: Velocity, params: PyTree, ref_params: PyTree | None, x: jax.Array, sigma: jax.Array,
               sigma_next: jax.Array, cond: Conditioning) -> tuple[jax.Array, jax.Array]:
    """(x at sigma_next, drift (B,) against the reference, zeros without one)."""
    v = guided_velocity(velocity, params, x, sigma, cond)
    penalty = (jnp.zeros((x.shape[0],), jnp.float32) if ref_params is None
               else drift(v, guided_velocity(velocity, ref_params, x, sigma, cond)))
    return x + (sigma_next - sigma) * v, penalty


def _pairs(sigmas: np.ndarray | jax.Array) -> jax.Array:
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return jnp.stack([sigmas[:-1], sigmas[1:]], axis=-1)


def run_steps(velocity: Velocity, params: PyTree, ref_params: PyTree | None, x: jax.Array, sigmas: np.ndarray,
              cond: Conditioning, remat: str = "full") -> tuple[jax.Array, jax.Array]:
    """Differentiable Euler steps sigmas[0] → sigmas[-1]; (x, drift summed over the steps (B,))."""
    def step(carry, pair):
        x, penalty = carry
        x, p = euler_step(velocity, params, ref_params, x, pair[0], pair[1], cond)
        return (x, penalty + p), None

    (x, penalty), _ = jax.lax.scan(remat_lib.wrap(step, remat), (x, jnp.zeros((x.shape[0],), jnp.float32)),
                                   _pairs(sigmas))
    return x, penalty


def run_frozen(velocity: Velocity, params: PyTree, x: jax.Array, sigmas: np.ndarray,
               cond: Conditioning) -> jax.Array:
    """Euler steps with the gradient cut: no backward is built for them."""
    if len(sigmas) < 2:
        return jax.lax.stop_gradient(x)
    params, x = jax.lax.stop_gradient((params, x))
    x, _ = run_steps(velocity, params, None, x, sigmas, cond, remat="none")
    return jax.lax.stop_gradient(x)


def run_frozen_until(velocity: Velocity, params: PyTree, x: jax.Array, sigmas: np.ndarray, num: jax.Array,
                     cond: Conditioning) -> jax.Array:
    """The first `num` (traced) Euler steps of `sigmas`, gradient cut; a while loop, so only the
    steps asked for are computed."""
    params, x = jax.lax.stop_gradient((params, x))
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def body(i, x):
        return euler_step(velocity, params, None, x, sigmas[i], sigmas[i + 1], cond)[0]

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, num, body, x))


def run_steps_from(velocity: Velocity, params: PyTree, ref_params: PyTree | None, x: jax.Array, sigmas: np.ndarray,
                   boundary: jax.Array, cond: Conditioning, remat: str = "full") -> tuple[jax.Array, jax.Array]:
    """Euler steps over `sigmas` where steps j < `boundary` (traced) are frozen and the rest are
    differentiable; (x, drift summed over the differentiable steps (B,))."""
    frozen_params = jax.lax.stop_gradient(params)

    def frozen_step(x, pair):
        x = jax.lax.stop_gradient(x)
        x_next, _ = euler_step(velocity, frozen_params, None, x, pair[0], pair[1], cond)
        return jax.lax.stop_gradient(x_next), jnp.zeros((x.shape[0],), jnp.float32)

    def live_step(x, pair):
        return euler_step(velocity, params, ref_params, x, pair[0], pair[1], cond)

    live_step = remat_lib.wrap(live_step, remat)

    def step(carry, inputs):
        x, penalty = carry
        j, pair = inputs
        x, p = jax.lax.cond(j < boundary, frozen_step, live_step, x, pair)
        return (x, penalty + p), None

    pairs = _pairs(sigmas)
    (x, penalty), _ = jax.lax.scan(step, (x, jnp.zeros((x.shape[0],), jnp.float32)),
                                   (jnp.arange(pairs.shape[0]), pairs))
    return x, penalty


def predict_x0(velocity: Velocity, params: PyTree, ref_params: PyTree | None, x: jax.Array, sigma: jax.Array,
               cond: Conditioning) -> tuple[jax.Array, jax.Array]:
    """One model call: x0 = x_t − σ·v (the Euler step to σ = 0); (x0, drift (B,))."""
    return euler_step(velocity, params, ref_params, x, sigma, jnp.zeros((), jnp.float32), cond)
