"""Flow-matching Euler sampling with classifier-free guidance, jit-able and differentiable.

The schedule reproduces diffusers' `FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)`
to the bit, including its quirk of shifting the minimum sigma twice (once in `__init__`,
once in `set_timesteps`), so samples match the diffusers pipeline from the same noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.conditioning import guidance
from alignax.models import remat as remat_lib

NUM_TRAIN_TIMESTEPS = 1000
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def shift_sigmas(sigmas, shift: float):
    """SD3's resolution shift of the noise level: s·σ / (1 + (s − 1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_sigmas(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps[num_steps], sigmas[num_steps + 1]) as float32, the last sigma 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one sampling step")
    train_sigma_min = np.float32(1.0 / NUM_TRAIN_TIMESTEPS)
    train_sigma_min = float(shift_sigmas(train_sigma_min, np.float32(shift)))
    train_sigma_max = 1.0  # shift leaves sigma = 1 where it is
    timesteps = np.linspace(train_sigma_max * NUM_TRAIN_TIMESTEPS, train_sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = shift_sigmas(timesteps / NUM_TRAIN_TIMESTEPS, shift).astype(np.float32)
    timesteps = sigmas * np.float32(NUM_TRAIN_TIMESTEPS)
    return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


def as_velocity(model: Any) -> VelocityFn:
    """A `Pretrained` MM-DiT (its NHWC forward) or an already-bound velocity callable, as
    (x NHWC, timestep[B], context, pooled) → velocity NHWC."""
    if hasattr(type(getattr(model, "module", None)), "forward_nhwc"):
        return model.forward_nhwc
    return model


def guided_velocity(velocity: VelocityFn, x: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array,
                    negative_context: jax.Array | None, negative_pooled: jax.Array | None,
                    guidance_scale: float) -> jax.Array:
    """Classifier-free guidance in one batched model call, uncond half first as diffusers does."""
    batch = x.shape[0]
    t = jnp.broadcast_to(timestep, (batch,))
    if negative_context is None:
        return velocity(x, t, context, pooled)
    v = velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([negative_context, context]),
                 jnp.concatenate([negative_pooled, pooled]))
    v_uncond, v_cond = v[:batch], v[batch:]
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def denoise(model: Any, x: jax.Array, sigmas: jax.Array, context: jax.Array, pooled: jax.Array, *,
            guidance_scale: float = 1.0, negative_context: jax.Array | None = None,
            negative_pooled: jax.Array | None = None, remat: str = "none") -> jax.Array:
    """Euler steps from sigmas[0] down to sigmas[-1], NHWC, inside `lax.scan`.

    Each step is one scan iteration; with `remat` set (e.g. 'full'), each step is under
    `jax.checkpoint`, so reward backprop stores only the per-step latents.
    """
    velocity = as_velocity(model)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(x, sigma_pair):
        sigma, sigma_next = sigma_pair[0], sigma_pair[1]
        v = guided_velocity(velocity, x, sigma * NUM_TRAIN_TIMESTEPS, context, pooled, negative_context,
                            negative_pooled, guidance_scale)
        return (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)).astype(x.dtype), None

    pairs = jnp.stack([sigmas[:-1], sigmas[1:]], axis=-1)
    x, _ = jax.lax.scan(remat_lib.wrap(step, remat), x, pairs)
    return x


def sample(model: Any, noise: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array, *,
           num_steps: int, shift: float, guidance_scale: float = 1.0,
           negative_encoder_hidden_states: jax.Array | None = None,
           negative_pooled_projections: jax.Array | None = None, remat: str = "none") -> jax.Array:
    """Final latents (NCHW, like diffusers) from `noise` (NCHW) with `num_steps` Euler steps.

    Guidance is applied when negative embeddings are given, as in the SD3 pipeline.
    """
    if (negative_encoder_hidden_states is None) != (negative_pooled_projections is None):
        raise ValueError("classifier-free guidance needs both negative_encoder_hidden_states and "
                         "negative_pooled_projections, or neither")
    _, sigmas = flow_match_sigmas(num_steps, shift)
    x = jnp.transpose(noise, (0, 2, 3, 1))
    x = denoise(model, x, sigmas, encoder_hidden_states, pooled_projections, guidance_scale=guidance_scale,
                negative_context=negative_encoder_hidden_states, negative_pooled=negative_pooled_projections,
                remat=remat)
    return jnp.transpose(x, (0, 3, 1, 2))


def generate_images(models: Any, params: Any, frozen: Any, batch: dict, noise_or_key: jax.Array, *,
                    num_steps: int, shift: float, guidance_scale: float) -> jax.Array:
    """Images NHWC in [0, 1]: noise → Euler steps (with guidance when the scale is not 1) → VAE decode.

    The one sampling entry point of the trainer's sample grids and `alignax.evaluate`, so both
    show the same images for the same params and noise. `models` is an `objectives.Models`
    (duck-typed: `velocity_fn`, `decode`, `latent_shape`), `params` the MM-DiT params with any
    LoRA already merged, `frozen` holds `'vae'`. `batch` carries `encoder_hidden_states` and
    `pooled_projections`, plus `negative_*` for guidance (zeros when absent, see
    `alignax.conditioning.guidance`). `noise_or_key` is NHWC noise, or a PRNG key from which
    `normal(key, models.latent_shape(B))` is drawn. Jit-able.
    """
    cond = guidance.conditioning(batch, guidance_scale)
    noise = noise_or_key
    if jnp.issubdtype(noise.dtype, jax.dtypes.prng_key):
        noise = jax.random.normal(noise_or_key, models.latent_shape(cond.context.shape[0]))
    _, sigmas = flow_match_sigmas(num_steps, shift)
    latents = denoise(models.velocity_fn(params), noise, sigmas, cond.context, cond.pooled,
                      guidance_scale=cond.guidance_scale, negative_context=cond.negative_context,
                      negative_pooled=cond.negative_pooled)
    return models.decode(frozen, latents)
