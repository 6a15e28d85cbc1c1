"""`dpo`: Diffusion-DPO (Wallace et al. 2023) for rectified flow.

For a preferred image x^w and a rejected x^l of one prompt, both are noised with the SAME
noise and the SAME logit-normal t, and the flow error e = mean‖v(x_t) − (ε − x0)‖² is taken
for the trained model θ and a reference. The loss

    −log σ(−β/2 · [(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)])

rewards θ for lowering its error on the winner more than on the loser, relative to the
reference, which keeps θ close to it (the implicit KL of DPO).

Reference model:
- offline (default): the frozen start params (`frozen['reference']`); with LoRA, the base with
  LoRA switched off (`frozen['transformer_base']`), which costs no extra memory.
- online (`reference_refresh_every = N > 0`): a copy of the trainable transformer params lives
  in the objective state and is replaced by the current params every N loss evaluations. It
  costs one extra copy of the trainable params in device memory and in every checkpoint (the
  full model without LoRA; only the adapter with LoRA) and replaces the frozen reference
  copy, which is then not created. The counter counts loss evaluations: with
  `grad_accum_steps = A` there are A per optimiser step, so set N = steps·A.

Labels: `label_0` > 0.5 makes image_0 the winner, < 0.5 image_1. Ties (0.5) carry no
preference: they stay in the batch (so shapes and sharding are fixed) but get weight 0 in the
loss and in every metric; a batch of only ties has loss 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from alignax.errors import ConfigError, DataError
from alignax.objectives import base, flow_matching, register

DEFAULTS = dict(beta=1000.0, timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                loss_weighting="none", sample_posterior=True, reference_refresh_every=0)


def dpo_loss(model_w: jax.Array, model_l: jax.Array, ref_w: jax.Array, ref_l: jax.Array,
             beta: float) -> tuple[jax.Array, jax.Array]:
    """(per-pair loss, per-pair logit). The logit β/2·[(e_ref^w − e_θ^w) − (e_ref^l − e_θ^l)] is
    the implicit reward margin: positive when θ improves more on the winner than on the loser."""
    logit = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -jax.nn.log_sigmoid(logit), logit


def winner_loser(batch: dict, key: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(winner, loser, weight) of `key`_0/`key`_1 by `label_0`; ties get weight 0."""
    label = batch["label_0"].astype(jnp.float32)
    first, second = batch[f"{key}_0"], batch[f"{key}_1"]
    zero_wins = (label > 0.5).reshape(-1, *([1] * (first.ndim - 1)))
    winner = jnp.where(zero_wins, first, second)
    loser = jnp.where(zero_wins, second, first)
    return winner, loser, (label != 0.5).astype(jnp.float32)


def masked_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def pair_latents(models: base.Models, frozen: Any, batch: dict, rng: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x0 winner, x0 loser, weight): pre-encoded `latents_0/1` or VAE latents of `image_0/1`."""
    if ("latents_0" in batch) != ("latents_1" in batch):
        raise DataError(f"preference pairs carry only one of latents_0/latents_1 (batch has {sorted(batch)}); "
                        "pre-encode both images or neither")
    if "latents_0" in batch:
        winner, loser, weight = winner_loser(batch, "latents")
        return winner.astype(jnp.float32), loser.astype(jnp.float32), weight
    winner, loser, weight = winner_loser(batch, "image")
    images = jnp.concatenate([winner, loser]).astype(jnp.float32) / 255.0
    x0 = models.encode(frozen, images, rng)
    count = winner.shape[0]
    return x0[:count], x0[count:], weight


def build(cfg: ml_collections.ConfigDict, models: base.Models, run: base.RunSettings) -> base.Objective:
    refresh_every = int(cfg.reference_refresh_every)
    if refresh_every < 0:
        raise ConfigError(f"config.objective.reference_refresh_every={refresh_every}: expected 0 (frozen "
                          "reference) or a positive number of steps")
    sampler = flow_matching.pick(flow_matching.TIMESTEP_SAMPLERS, cfg.timestep_sampling,
                                 "config.objective.timestep_sampling")
    weighting = flow_matching.pick(flow_matching.LOSS_WEIGHTINGS, cfg.loss_weighting,
                                   "config.objective.loss_weighting")
    online = refresh_every > 0

    def reference_params(trainable, frozen, state):
        if not online:
            return models.reference_params(trainable, frozen)
        return models.transformer_params({**trainable, **state["reference"]}, frozen)

    def errors(params, x0, noise, t, context, pooled):
        prediction = models.velocity(params, flow_matching.noised(x0, noise, t), t * 1000.0, context, pooled)
        return flow_matching.per_sample_error(prediction, flow_matching.velocity_target(x0, noise)) * weighting(t)

    def loss(trainable, frozen, state, batch, rng):
        encode_rng, flow_rng = jax.random.split(rng)
        noise_rng, t_rng = jax.random.split(flow_rng)
        x0_w, x0_l, weight = pair_latents(models, frozen, batch, encode_rng if cfg.sample_posterior else None)
        count = x0_w.shape[0]
        t = sampler(t_rng, count, cfg.logit_mean, cfg.logit_std)
        noise = jax.random.normal(noise_rng, x0_w.shape, jnp.float32)
        # Winner and loser in one forward pass, sharing noise and t.
        both = lambda x: jnp.concatenate([x, x])  # noqa: E731
        x0, noise2, t2 = jnp.concatenate([x0_w, x0_l]), both(noise), both(t)
        context, pooled = both(batch["encoder_hidden_states"]), both(batch["pooled_projections"])

        new_state = state
        if online:
            refresh = (state["count"] > 0) & (state["count"] % refresh_every == 0)
            current = jax.lax.stop_gradient({"transformer": trainable["transformer"]})
            reference = jax.tree.map(lambda new, old: jnp.where(refresh, new, old), current, state["reference"])
            new_state = {"reference": reference, "count": state["count"] + 1,
                         "refreshes": state["refreshes"] + refresh.astype(jnp.int32)}
        model_e = errors(models.transformer_params(trainable, frozen), x0, noise2, t2, context, pooled)
        ref_e = jax.lax.stop_gradient(errors(reference_params(trainable, frozen, new_state), x0, noise2, t2,
                                             context, pooled))
        per_pair, logit = dpo_loss(model_e[:count], model_e[count:], ref_e[:count], ref_e[count:], cfg.beta)
        value = masked_mean(per_pair, weight)
        metrics = {
            "loss": value, "dpo_loss": value,
            "implicit_accuracy": masked_mean((logit > 0).astype(jnp.float32), weight),
            "reward_margin": masked_mean(logit, weight),
            "model_error_winner": masked_mean(model_e[:count], weight),
            "model_error_loser": masked_mean(model_e[count:], weight),
            "reference_error_winner": masked_mean(ref_e[:count], weight),
            "reference_error_loser": masked_mean(ref_e[count:], weight),
            "preference_fraction": jnp.mean(weight), "mean_t": jnp.mean(t),
        }
        return value, (metrics, new_state)

    def init_state(trainable, frozen):
        if not online:
            return {}
        # Nested as {'transformer': ...} so the trainer shards it like trainable['transformer'].
        return {"reference": {"transformer": jax.tree.map(jnp.copy, trainable["transformer"])},
                "count": jnp.zeros((), jnp.int32), "refreshes": jnp.zeros((), jnp.int32)}

    return base.Objective(loss=loss, data="preference_pairs", needs_reference=models.lora is None and not online,
                          init_state=init_state)


SPEC = register(base.ObjectiveSpec(name="dpo", defaults=DEFAULTS, build=build))
