"""`reward_backprop`: sample, decode, score, and backpropagate the scalarised rewards into the MM-DiT.

noise → flow-matching Euler sampler (config.sample: num_steps, shift, guidance_scale; CFG
inside the graph) → VAE decode → every configured reward → per-reward normalisation and the
weight vector (`alignax.pareto.loss.multi_reward_loss`) → loss = mean scalarised loss
+ kl_weight · drift. Which sampler steps carry the gradient is the mode
(`config.objective.mode`, registry `MODES`):

- `full`: every step, each under `jax.checkpoint` (`remat`), so memory is flat in the steps.
- `draft_k`: the last `k` steps (DRaFT); the earlier ones run as constants, no backward built.
- `random_k`: the last K steps with K ~ U{1..k_max} per batch (AlignProp). Shapes stay static:
  steps before the last `k_max` are frozen; inside that window a `lax.cond` per step picks the
  frozen or the differentiable branch from the traced boundary k_max − K, and a `cond`'s
  backward runs only the taken branch (see trajectory.run_steps_from).
- `draft_lv`: K = 1 with lower variance (DRaFT-LV): sample x0 without gradients, re-noise it
  `lv_n` times to the last sampler noise level σ_{N−1} with fresh noise, take one differentiable
  step from each copy (one batched model call), and average each reward over the copies.
- `refl`: ReFL (ImageReward): sample without gradients to a step s ~ U{refl_range} (s Euler
  steps done), then one differentiable model call predicts x0 = x_s − σ_s·v, which is scored.
  An empty `refl_range` means the last quarter of the steps, [⌊3N/4⌋, N − 1].

Drift penalty: with `kl_weight` > 0, λ·mean over the differentiable model calls of the
per-element mean (v_θ − v_ref)² at the same x_t, against the frozen start model
(`Models.reference_params`: with LoRA the base without LoRA, else a frozen copy). Steps whose
gradient is cut are not penalised: they would add cost and no gradient.

Objective state = the normalisation state of `multi_reward_loss` (running statistics and
the running Chebyshev ideal), so it is checkpointed and a resume continues it exactly.

`config.pareto.scalarization='mgda'` (`alignax/pareto/gradient_balance.py`): the update is MGDA's
min-norm combination of the per-reward gradients, steered by the weights. The trajectory is sampled,
decoded and scored once (`jax.vjp` keeps its residuals: per-step latents under remat), then k VJPs run
through the same residuals, one per reward, each a full backward through rewards, decoder and the
differentiable sampler steps (recomputing the remat'ed steps); the drift penalty's gradient is one more
VJP when `kl_weight` > 0. So a step costs 1 forward + k backwards (weighted sum: 1 + 1), holds k
gradient trees, and the trainer's own backward through this loss is free (a custom VJP hands it the
combined gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from alignax import pareto, sampling
from alignax.conditioning import guidance
from alignax.errors import ConfigError
from alignax.models import remat as remat_lib
from alignax.objectives import base, register
from alignax.objectives import trajectory as traj
from alignax.pareto import gradient_balance
from alignax.rewards import base as reward_base

DEFAULTS = dict(mode="full", k=1, k_max=1, lv_n=2, refl_range=(), kl_weight=0.0, remat="full")


@dataclasses.dataclass(frozen=True)
class Rollout:
    """What a mode returns: latents to decode and score (copies·B rows, copy-major), the drift
    summed over differentiable calls (B·copies,), that number of calls, and extra metrics."""

    latents: jax.Array
    drift_sum: jax.Array
    live_calls: jax.Array | float
    copies: int = 1
    metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
    """Everything a mode needs, fixed at build time except the arrays."""

    velocity: traj.Velocity
    sigmas: Any  # numpy (num_steps + 1,)
    cfg: ml_collections.ConfigDict

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


def _full(ctx: Context, params, ref, noise, cond, rng) -> Rollout:
    x, drift = traj.run_steps(ctx.velocity, params, ref, noise, ctx.sigmas, cond, ctx.cfg.remat)
    return Rollout(x, drift, float(ctx.num_steps))


def _draft_k(ctx: Context, params, ref, noise, cond, rng) -> Rollout:
    split = ctx.num_steps - ctx.cfg.k
    x = traj.run_frozen(ctx.velocity, params, noise, ctx.sigmas[:split + 1], cond)
    x, drift = traj.run_steps(ctx.velocity, params, ref, x, ctx.sigmas[split:], cond, ctx.cfg.remat)
    return Rollout(x, drift, float(ctx.cfg.k))


def draw_k(rng: jax.Array, k_max: int) -> jax.Array:
    """random_k's K for one batch, uniform in {1, …, k_max}."""
    return jax.random.randint(rng, (), 1, k_max + 1)


def _random_k(ctx: Context, params, ref, noise, cond, rng) -> Rollout:
    k_max = ctx.cfg.k_max
    k = draw_k(rng, k_max)
    split = ctx.num_steps - k_max
    x = traj.run_frozen(ctx.velocity, params, noise, ctx.sigmas[:split + 1], cond)
    x, drift = traj.run_steps_from(ctx.velocity, params, ref, x, ctx.sigmas[split:], k_max - k, cond,
                                   ctx.cfg.remat)
    return Rollout(x, drift, k.astype(jnp.float32), metrics={"differentiable_steps": k.astype(jnp.float32)})


def _draft_lv(ctx: Context, params, ref, noise, cond, rng) -> Rollout:
    n = ctx.cfg.lv_n
    x0 = traj.run_frozen(ctx.velocity, params, noise, ctx.sigmas, cond)
    sigma = jnp.float32(ctx.sigmas[-2])  # the last non-zero noise level of the sampler
    eps = jax.random.normal(rng, (n, *x0.shape), x0.dtype)
    renoised = ((1.0 - sigma) * x0[None] + sigma * eps).reshape(n * x0.shape[0], *x0.shape[1:])
    x, drift = traj.predict_x0(ctx.velocity, params, ref, renoised, sigma, cond.tile(n))
    return Rollout(x, drift, 1.0, copies=n)


def refl_bounds(cfg: ml_collections.ConfigDict, num_steps: int) -> tuple[int, int]:
    """(lo, hi) inclusive step range of ReFL; the last quarter when `refl_range` is empty."""
    if len(cfg.refl_range) == 0:
        return min(num_steps - 1, (3 * num_steps) // 4), num_steps - 1
    return int(cfg.refl_range[0]), int(cfg.refl_range[1])


def draw_refl_step(rng: jax.Array, lo: int, hi: int) -> jax.Array:
    """ReFL's stopping step for one batch, uniform in {lo, …, hi}."""
    return jax.random.randint(rng, (), lo, hi + 1)


def _refl(ctx: Context, params, ref, noise, cond, rng) -> Rollout:
    lo, hi = refl_bounds(ctx.cfg, ctx.num_steps)
    s = draw_refl_step(rng, lo, hi)
    x = traj.run_frozen_until(ctx.velocity, params, noise, ctx.sigmas, s, cond)
    sigma = jnp.asarray(ctx.sigmas, jnp.float32)[s]
    x0, drift = traj.predict_x0(ctx.velocity, params, ref, x, sigma, cond)
    return Rollout(x0, drift, 1.0, metrics={"refl_step": s.astype(jnp.float32)})


# ---- config checks, one per field -------------------------------------------------------------

def _steps_field(cfg, num_steps: int, field: str) -> None:
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_steps:
        raise ConfigError(f"config.objective.{field}={value!r}: expected an integer in [1, config.sample.num_steps="
                          f"{num_steps}]")


def _check_refl_range(cfg, num_steps: int) -> None:
    value = tuple(cfg.refl_range)
    if len(value) == 0:
        return
    ok = (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
          and 0 <= value[0] <= value[1] < num_steps)
    if not ok:
        raise ConfigError(f"config.objective.refl_range={value!r}: expected () for the last quarter, or (lo, hi) "
                          f"integers with 0 <= lo <= hi < config.sample.num_steps={num_steps}")


def _check_lv_n(cfg, num_steps: int) -> None:
    if isinstance(cfg.lv_n, bool) or not isinstance(cfg.lv_n, int) or cfg.lv_n < 1:
        raise ConfigError(f"config.objective.lv_n={cfg.lv_n!r}: expected an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Mode:
    rollout: Callable[..., Rollout]
    check: Callable[[ml_collections.ConfigDict, int], None] = lambda cfg, num_steps: None


MODES: dict[str, Mode] = {
    "full": Mode(_full),
    "draft_k": Mode(_draft_k, lambda cfg, n: _steps_field(cfg, n, "k")),
    "random_k": Mode(_random_k, lambda cfg, n: _steps_field(cfg, n, "k_max")),
    "draft_lv": Mode(_draft_lv, _check_lv_n),
    "refl": Mode(_refl, _check_refl_range),
}


def check_fields(cfg: ml_collections.ConfigDict, num_steps: int) -> None:
    """The objective's own fields (mode, its step counts against `config.sample.num_steps`, remat,
    kl_weight): checkable from the config alone, so `config.validate` runs it before any model exists."""
    if cfg.mode not in MODES:
        raise ConfigError(f"config.objective.mode={cfg.mode!r}: expected one of {sorted(MODES)}")
    MODES[cfg.mode].check(cfg, num_steps)
    if cfg.remat not in remat_lib.NAMES:
        raise ConfigError(f"config.objective.remat={cfg.remat!r}: expected one of {list(remat_lib.NAMES)}")
    if not (isinstance(cfg.kl_weight, int | float) and math.isfinite(cfg.kl_weight) and cfg.kl_weight >= 0):
        raise ConfigError(f"config.objective.kl_weight={cfg.kl_weight!r}: expected a finite number >= 0")


def check_config(cfg: ml_collections.ConfigDict, models: base.Models, run: base.RunSettings) -> dict[str, Any]:
    """Every field checked before anything is compiled; returns `multi_reward_loss` kwargs."""
    check_fields(cfg, run.num_steps)
    if not models.rewards:
        raise ConfigError("config.rewards is empty: reward_backprop needs at least one reward to backpropagate")
    for name, reward in models.rewards.items():
        if not getattr(reward, "differentiable", True):
            raise ConfigError(f"config.rewards.{name}: reward kind {getattr(reward, 'kind', name)!r} is not "
                              "differentiable; reward_backprop needs a gradient from every reward")
    if run.pareto is None or sorted(run.pareto["weights"]) != sorted(models.rewards):
        raise ConfigError(f"reward_backprop: config.pareto must weigh the configured rewards {sorted(models.rewards)}; "
                          "build the run settings with RunSettings.from_config(config)")
    return dict(run.pareto)


def build(cfg: ml_collections.ConfigDict, models: base.Models, run: base.RunSettings) -> base.Objective:
    pareto_kwargs = check_config(cfg, models, run)
    _, sigmas = sampling.flow_match_sigmas(run.num_steps, run.shift)
    ctx = Context(velocity=models.velocity, sigmas=sigmas, cfg=cfg)
    mode = MODES[cfg.mode]
    names = list(models.rewards)
    use_reference = cfg.kl_weight > 0

    def forward(trainable, frozen, state, batch, rng):
        """(reward loss, drift, metrics without 'loss', new state): everything up to the scalar loss."""
        noise_rng, mode_rng = jax.random.split(rng)
        params = models.transformer_params(trainable, frozen)
        ref = models.reference_params(trainable, frozen) if use_reference else None
        cond = guidance.conditioning(batch, run.guidance_scale)
        noise = jax.random.normal(noise_rng, models.latent_shape(cond.context.shape[0]), jnp.float32)
        out = mode.rollout(ctx, params, ref, noise, cond, mode_rng)
        images = models.decode(frozen, out.latents)
        scored_batch = batch if out.copies == 1 else {k: jnp.concatenate([v] * out.copies) for k, v in batch.items()}
        raw, reward_info = {}, {}
        for name in names:
            scores, extra = models.rewards[name].apply(frozen["rewards"][name], images, scored_batch)
            raw[name] = jnp.mean(scores.reshape(out.copies, -1), axis=0)  # average over DRaFT-LV copies
            reward_info.update(reward_base.info_metrics(name, extra))
        per_sample, info, new_state = pareto.multi_reward_loss(raw, state, **pareto_kwargs)
        reward_loss = jnp.mean(per_sample)
        drift = jnp.mean(out.drift_sum) / out.live_calls if use_reference else jnp.zeros((), jnp.float32)
        metrics = {**reward_info, **info, **out.metrics, "reward_loss": reward_loss,
                   "reward/mean": jnp.mean(jnp.stack([jnp.mean(raw[n]) for n in names]))}
        if use_reference:
            metrics["kl_drift"] = drift
        return reward_loss, drift, metrics, new_state

    def loss(trainable, frozen, state, batch, rng):
        reward_loss, drift, metrics, new_state = forward(trainable, frozen, state, batch, rng)
        value = reward_loss + cfg.kl_weight * drift if use_reference else reward_loss
        return value, ({**metrics, "loss": value}, new_state)

    if pareto_kwargs["scalarization"] in gradient_balance.METHODS:
        weights = pareto_kwargs["weights"]

        def parts(trainable, frozen, state, batch, rng):
            # Per-reward losses = −batch mean of each normalised reward (multi_reward_loss logs them).
            _, drift, metrics, new_state = forward(trainable, frozen, state, batch, rng)
            losses = jnp.stack([-metrics[f"reward/{n}/normalized"] for n in weights])
            return (losses, drift), (metrics, new_state)

        balanced = gradient_balance.balanced_loss(parts, list(weights), list(weights.values()),
                                                  cfg.kl_weight if use_reference else 0.0)

        def balanced_loss(trainable, frozen, state, batch, rng):
            value, (metrics, new_state) = balanced(trainable, frozen, state, batch, rng)
            return value, ({**metrics, "loss": value}, new_state)

        loss = balanced_loss

    return base.Objective(loss=loss, data="prompts", needs_reference=use_reference,
                          init_state=lambda trainable, frozen: pareto.init_state(names))


SPEC = register(base.ObjectiveSpec(name="reward_backprop", defaults=DEFAULTS, build=build,
                                   check=lambda cfg, config: check_fields(cfg, config.sample.num_steps)))
