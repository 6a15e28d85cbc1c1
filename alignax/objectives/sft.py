"""`sft`: the rectified-flow loss SD3 is pre-trained and fine-tuned with.

Logit-normal timesteps, velocity target ε − x0, optional per-t weighting. Images are
VAE-encoded inside the step (a posterior sample, as diffusers' SD3 training script does)
unless the batch carries pre-encoded `latents`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from alignax.objectives import base, flow_matching, register

DEFAULTS = dict(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, loss_weighting="none",
                sample_posterior=True)


def clean_latents(models: base.Models, frozen: Any, batch: dict, rng: jax.Array | None) -> jax.Array:
    """x0 for the flow: pre-encoded `latents`, or the VAE posterior of `image` (uint8 NHWC):
    a sample when `rng` is given (as diffusers' SD3 scripts train), else its mean. An untrained
    VAE's posterior has std ≈ 1, so the tiny world trains on the mean."""
    if "latents" in batch:
        return batch["latents"].astype(jnp.float32)
    return models.encode(frozen, batch["image"].astype(jnp.float32) / 255.0, rng)


def flow_error(models: base.Models, cfg: ml_collections.ConfigDict, params: Any, x0: jax.Array, batch: dict,
               rng: jax.Array, **velocity_kwargs: Any) -> tuple[jax.Array, jax.Array, Any]:
    """(weighted per-sample error, t, extra outputs of the velocity call such as captured features)."""
    noise_rng, t_rng = jax.random.split(rng)
    sampler = flow_matching.pick(flow_matching.TIMESTEP_SAMPLERS, cfg.timestep_sampling,
                                 "config.objective.timestep_sampling")
    weighting = flow_matching.pick(flow_matching.LOSS_WEIGHTINGS, cfg.loss_weighting,
                                   "config.objective.loss_weighting")
    t = sampler(t_rng, x0.shape[0], cfg.logit_mean, cfg.logit_std)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    out = models.velocity(params, flow_matching.noised(x0, noise, t), t * 1000.0, batch["encoder_hidden_states"],
                          batch["pooled_projections"], **velocity_kwargs)
    prediction, extra = (out if velocity_kwargs.get("capture_layers") else (out, None))
    error = flow_matching.per_sample_error(prediction, flow_matching.velocity_target(x0, noise))
    return error * weighting(t), t, extra


def build(cfg: ml_collections.ConfigDict, models: base.Models, run: base.RunSettings) -> base.Objective:
    def loss(trainable, frozen, state, batch, rng):
        encode_rng, flow_rng = jax.random.split(rng)
        x0 = clean_latents(models, frozen, batch, encode_rng if cfg.sample_posterior else None)
        error, t, _ = flow_error(models, cfg, models.transformer_params(trainable, frozen), x0, batch, flow_rng)
        value = jnp.mean(error)
        return value, ({"loss": value, "sft_loss": value, "mean_t": jnp.mean(t)}, state)

    return base.Objective(loss=loss, data="captioned_images")


SPEC = register(base.ObjectiveSpec(name="sft", defaults=DEFAULTS, build=build))
