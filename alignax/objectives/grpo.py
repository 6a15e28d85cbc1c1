"""`grpo`: Flow-GRPO, online RL for flow matching (Liu et al. 2025), and its windowed fast variant.

The flow ODE dx = v dt has an SDE with the same marginals; sampled with Euler–Maruyama from σ to
σ' < σ (dt = σ' − σ < 0), each step is a Gaussian transition

    mean = x·(1 + s²·dt / (2σ)) + v·(1 + s²·(1 − σ) / (2σ))·dt,   std = s·√(−dt),
    s = a·√(σ / (1 − σ))   (a = `noise_level`; at σ = 1 the denominator uses 1 − σ₁, the next level)

so the log-probability of the step actually taken is closed-form (`sde_step`, `log_prob`: the per-element
mean of the Gaussian log-density, as Flow-GRPO averages it). With a → 0 the mean is the Euler step.

One training step: the batch's B prompts are each sampled `group_size` = G times (rows copy-major: prompt i
is rows i, i + B, …) with the current params and no gradient — SDE steps inside `sde_window` (all steps when
empty), ODE steps elsewhere, on `train_num_steps` sampler steps (0: `config.sample.num_steps`) — decoded,
scored by every reward (differentiable or host-side: the images are constants here) and scalarised by
`config.pareto` like every objective. Advantages are group-relative, (r − mean_group) / (std + `adv_eps`)
(`global_std`: the batch's std, the paper's ablation), clipped to ±`adv_clip_max`. The loss re-evaluates
each SDE step's log-probability under the params being trained:

    L = mean over SDE steps and samples of max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)),  ρ = exp(log p_θ − log p_old)
        + kl_beta · mean of ‖mean_θ − mean_ref‖² / (2 std²)   (against the frozen start model)

With `inner_epochs` = 1 each sampled batch gets one update, so ρ = 1 and the gradient is REINFORCE with group
advantages (the clip never binds). With `inner_epochs` = μ > 1, a batch is sampled on every μ-th step and its
trajectory (latents of the SDE steps, old log-probabilities, advantages, rewards) is kept in the objective
state for the next μ − 1 updates, which see the same data batch (`Objective.batch_period`); then ρ ≠ 1 and the
clip binds. The sampled batch and its noise are functions of the step (`alignax.rng`) and the buffer is
checkpointed with the state, so a resumed run equals an uninterrupted one wherever it stops. With μ > 1 the
logged reward metrics are the buffer's (raw means, scalarised mean), without the normalisation's diagnostics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from alignax import pareto, sampling
from alignax.conditioning import guidance
from alignax.errors import ConfigError
from alignax.models import remat as remat_lib
from alignax.objectives import base, register
from alignax.objectives import trajectory as traj
from alignax.rewards import base as reward_base

DEFAULTS = dict(group_size=4, noise_level=0.7, clip_range=1e-4, kl_beta=0.0, inner_epochs=1, sde_window=(),
                train_num_steps=0, adv_eps=1e-4, adv_clip_max=5.0, global_std=False, remat="full")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# ---- the SDE step and its log-probability ------------------------------------------------------

def sde_scale(sigma: jax.Array, sigma_after_one: jax.Array, noise_level: float) -> jax.Array:
    """s = a·√(σ / (1 − σ)), with 1 − σ₁ in place of 0 at σ = 1."""
    denominator = 1.0 - jnp.where(sigma >= 1.0, sigma_after_one, sigma)
    return noise_level * jnp.sqrt(sigma / denominator)


def sde_mean_std(x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array, s: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the Gaussian transition from `x` at σ to σ'."""
    dt = sigma_next - sigma
    mean = x * (1.0 + s ** 2 * dt / (2.0 * sigma)) + v * (1.0 + s ** 2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    return mean, s * jnp.sqrt(-dt)


def log_prob(sample: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Per-sample mean over elements of the Gaussian log-density, shape (B,)."""
    density = -jnp.square(sample - mean) / (2.0 * std ** 2) - jnp.log(std) - LOG_SQRT_2PI
    return jnp.mean(density, axis=tuple(range(1, sample.ndim)))


def sde_step(x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array, sigma_after_one: jax.Array,
             noise_level: float, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x at σ', log p of that step (B,)): one Euler–Maruyama step of the marginal-preserving SDE."""
    mean, std = sde_mean_std(x, v, sigma, sigma_next, sde_scale(sigma, sigma_after_one, noise_level))
    x_next = mean + std * eps
    return x_next, log_prob(x_next, mean, std)


# ---- group advantages and the clipped loss -----------------------------------------------------

def group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-4, global_std: bool = False,
                     clip: float = 5.0) -> jax.Array:
    """(r − group mean) / (std + eps) for copy-major rows (prompt i at rows i, i + B, …); constant groups
    give 0, never NaN."""
    grouped = rewards.reshape(group_size, -1)
    centered = grouped - jnp.mean(grouped, axis=0, keepdims=True)
    std = jnp.std(rewards) if global_std else jnp.std(grouped, axis=0, keepdims=True)
    return jnp.clip((centered / (std + eps)).reshape(rewards.shape), -clip, clip)


def clipped_policy_loss(log_p: jax.Array, log_p_old: jax.Array, advantages: jax.Array, clip_range: float
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean of max(−A·ρ, −A·clip(ρ)), fraction of samples with ρ outside [1 − ε, 1 + ε], max |ρ − 1|)."""
    ratio = jnp.exp(log_p - log_p_old)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    deviation = jax.lax.stop_gradient(jnp.abs(ratio - 1.0))
    return (jnp.mean(jnp.maximum(unclipped, clipped)), jnp.mean((deviation > clip_range).astype(jnp.float32)),
            jnp.max(deviation))


# ---- config --------------------------------------------------------------------------------------

def window(cfg: ml_collections.ConfigDict, num_steps: int) -> tuple[int, int]:
    """[start, end) of the SDE steps; every step when `sde_window` is empty."""
    value = tuple(cfg.sde_window)
    return (0, num_steps) if not value else (int(value[0]), int(value[1]))


def train_steps(cfg: ml_collections.ConfigDict, sample_steps: int) -> int:
    return int(cfg.train_num_steps) or int(sample_steps)


def _integer(cfg, field: str, low: int) -> int:
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.objective.{field}={value!r}: expected an integer >= {low}")
    return value


def _positive(cfg, field: str, allow_zero: bool = False) -> None:
    value = cfg[field]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config.objective.{field}={value!r}: expected a finite number "
                          f"{'>= 0' if allow_zero else '> 0'}")


def check_fields(cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Every field, from the config alone (run by `config.validate`)."""
    _integer(cfg, "group_size", 2)
    inner = _integer(cfg, "inner_epochs", 1)
    if inner > 1 and config.grad_accum_steps != 1:
        raise ConfigError(f"config.objective.inner_epochs={inner} with config.grad_accum_steps="
                          f"{config.grad_accum_steps}: reusing a sampled batch keeps the whole batch's trajectory in "
                          f"the objective state, so it needs grad_accum_steps=1")
    _integer(cfg, "train_num_steps", 0)
    steps = train_steps(cfg, config.sample.num_steps)
    for field in ("noise_level", "clip_range", "adv_eps", "adv_clip_max"):
        _positive(cfg, field)
    _positive(cfg, "kl_beta", allow_zero=True)
    value = tuple(cfg.sde_window)
    if value and not (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                      and 0 <= value[0] < value[1] <= steps):
        raise ConfigError(f"config.objective.sde_window={value!r}: expected () for every step, or (start, end) "
                          f"with 0 <= start < end <= {steps} training sampler steps")
    if cfg.remat not in remat_lib.NAMES:
        raise ConfigError(f"config.objective.remat={cfg.remat!r}: expected one of {list(remat_lib.NAMES)}")


def build(cfg: ml_collections.ConfigDict, models: base.Models, run: base.RunSettings) -> base.Objective:
    if not models.rewards:
        raise ConfigError("config.rewards is empty: grpo needs at least one reward to compute advantages from")
    if run.pareto is None or sorted(run.pareto["weights"]) != sorted(models.rewards):
        raise ConfigError(f"grpo: config.pareto must weigh the configured rewards {sorted(models.rewards)}")
    pareto_kwargs = dict(run.pareto)
    num_steps = train_steps(cfg, run.num_steps)
    _, sigmas = sampling.flow_match_sigmas(num_steps, run.shift)
    start, end = window(cfg, num_steps)
    sigma_after_one = jnp.float32(sigmas[1])
    group, names, use_reference = int(cfg.group_size), list(models.rewards), cfg.kl_beta > 0
    inner = int(cfg.inner_epochs)
    if inner > 1 and run.batch_size < 1:
        raise ConfigError("grpo: inner_epochs > 1 needs RunSettings.batch_size (RunSettings.from_config(config))")
    sde_pairs = jnp.stack([jnp.asarray(sigmas[start:end], jnp.float32), jnp.asarray(sigmas[start + 1:end + 1],
                                                                                  jnp.float32)], axis=-1)

    def rollout(params, noise, cond, rng):
        """ODE to the window, SDE through it (recording x_j, x_{j+1}, log p_old), ODE after; no gradient."""
        params = jax.lax.stop_gradient(params)
        x = traj.run_frozen(models.velocity, params, noise, sigmas[:start + 1], cond)

        def step(x, inputs):
            pair, key = inputs
            v = traj.guided_velocity(models.velocity, params, x, pair[0], cond)
            eps = jax.random.normal(key, x.shape, x.dtype)
            x_next, lp = sde_step(x, v, pair[0], pair[1], sigma_after_one, cfg.noise_level, eps)
            return x_next, (x, x_next, lp)

        x, (xs, xs_next, log_p_old) = jax.lax.scan(step, x, (sde_pairs, jax.random.split(rng, end - start)))
        x = traj.run_frozen(models.velocity, params, x, sigmas[end:], cond)
        return jax.lax.stop_gradient((x, xs, xs_next, log_p_old))

    def sample(params, frozen, pareto_state, batch, cond, rng):
        """A new group of trajectories: (buffer, new pareto state, the rewards' metrics)."""
        noise_rng, sde_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, models.latent_shape(cond.context.shape[0]), jnp.float32)
        x0, xs, xs_next, log_p_old = rollout(params, noise, cond, sde_rng)
        images = models.decode(frozen, x0)
        tiled = {k: jnp.concatenate([v] * group) for k, v in batch.items()}
        raw, reward_info = {}, {}
        for name in names:
            scores, extra = models.rewards[name].apply(frozen["rewards"][name], images, tiled)
            raw[name] = jax.lax.stop_gradient(scores.astype(jnp.float32))
            reward_info.update(reward_base.info_metrics(name, extra))
        per_sample, info, new_pareto = pareto.multi_reward_loss(raw, pareto_state, **pareto_kwargs)
        advantages = group_advantages(-per_sample, group, eps=cfg.adv_eps, global_std=cfg.global_std,
                                      clip=cfg.adv_clip_max)
        buffer = dict(xs=xs, xs_next=xs_next, log_p_old=log_p_old, advantages=jax.lax.stop_gradient(advantages),
                      scalarized=jax.lax.stop_gradient(-per_sample), raw=raw)
        return buffer, new_pareto, {**reward_info, **info}

    def policy_terms(params, ref, buffer, cond):
        """(clipped policy loss, KL, clip fraction) averaged over the SDE steps, and the largest |ρ − 1|."""
        def step(carry, inputs):
            policy_sum, kl_sum, clipped_sum, deviation_max = carry
            x, x_next, lp_old, pair = inputs
            v = traj.guided_velocity(models.velocity, params, x, pair[0], cond)
            s = sde_scale(pair[0], sigma_after_one, cfg.noise_level)
            mean, std = sde_mean_std(x, v, pair[0], pair[1], s)
            policy, clipped, deviation = clipped_policy_loss(log_prob(x_next, mean, std), lp_old,
                                                             buffer["advantages"], cfg.clip_range)
            kl = jnp.zeros((), jnp.float32)
            if ref is not None:
                v_ref = traj.guided_velocity(models.velocity, ref, x, pair[0], cond)
                mean_ref, _ = sde_mean_std(x, v_ref, pair[0], pair[1], s)
                kl = jnp.mean(jnp.square(mean - mean_ref)) / (2.0 * std ** 2)
            carry = (policy_sum + policy, kl_sum + kl, clipped_sum + clipped, jnp.maximum(deviation_max, deviation))
            return carry, None

        zero = jnp.zeros((), jnp.float32)
        (policy, kl, clipped, deviation), _ = jax.lax.scan(
            remat_lib.wrap(step, cfg.remat), (zero, zero, zero, zero),
            (buffer["xs"], buffer["xs_next"], buffer["log_p_old"], sde_pairs))
        steps = float(end - start)
        return policy / steps, kl / steps, clipped / steps, deviation

    def loss(trainable, frozen, state, batch, rng):
        params = models.transformer_params(trainable, frozen)
        cond = guidance.conditioning(batch, run.guidance_scale).tile(group)
        if inner == 1:
            buffer, new_state, reward_metrics = sample(params, frozen, state, batch, cond, rng)
        else:  # sample on the first of `inner` steps (same batch: `batch_period`), reuse the buffer after
            def fresh(_):
                buffer, new_pareto, _ = sample(params, frozen, state["pareto"], batch, cond, rng)
                return buffer, new_pareto

            buffer, new_pareto = jax.lax.cond(state["phase"] == 0, fresh,
                                              lambda _: (state["buffer"], state["pareto"]), None)
            new_state = dict(pareto=new_pareto, buffer=buffer, phase=(state["phase"] + 1) % inner)
            reward_metrics = {f"reward/{n}/raw": jnp.mean(buffer["raw"][n]) for n in names}
            reward_metrics["sampled"] = (state["phase"] == 0).astype(jnp.float32)
        ref = models.reference_params(trainable, frozen) if use_reference else None
        policy, kl, clip_fraction, deviation = policy_terms(params, ref, buffer, cond)
        value = policy + cfg.kl_beta * kl
        metrics = {**reward_metrics, "loss": value, "policy_loss": policy, "kl": kl, "clip_fraction": clip_fraction,
                   "ratio/max_abs_deviation": deviation,
                   "reward/scalarized": jnp.mean(buffer["scalarized"]),
                   "reward/mean": jnp.mean(jnp.stack([jnp.mean(buffer["raw"][n]) for n in names])),
                   "advantage/abs_mean": jnp.mean(jnp.abs(buffer["advantages"]))}
        return value, (metrics, new_state)

    def init_state(trainable, frozen):
        if inner == 1:
            return pareto.init_state(names)
        rows = run.batch_size * group
        latents = models.latent_shape(rows)
        steps = end - start
        buffer = dict(xs=jnp.zeros((steps, *latents), jnp.float32), xs_next=jnp.zeros((steps, *latents), jnp.float32),
                      log_p_old=jnp.zeros((steps, rows), jnp.float32), advantages=jnp.zeros((rows,), jnp.float32),
                      scalarized=jnp.zeros((rows,), jnp.float32),
                      raw={n: jnp.zeros((rows,), jnp.float32) for n in names})
        return dict(pareto=pareto.init_state(names), buffer=buffer, phase=jnp.zeros((), jnp.int32))

    return base.Objective(loss=loss, data="prompts", needs_reference=use_reference, init_state=init_state,
                          batch_period=inner)


SPEC = register(base.ObjectiveSpec(name="grpo", defaults=DEFAULTS, build=build, check=check_fields))
