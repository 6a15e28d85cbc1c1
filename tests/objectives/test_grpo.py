"""grpo (Flow-GRPO): the SDE step's log-probability against scipy's Gaussian, its zero-noise limit against the
Euler sampler, the policy gradient against the REINFORCE estimate worked out by hand, where the clip binds,
group advantages, and through the Trainer on the tiny world: the weighted reward rises, a resumed run equals an
uninterrupted one, and a host-side, non-differentiable reward trains with grpo and is refused by reward_backprop."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from alignax import mesh as mesh_lib
from alignax import sampling
from alignax.errors import ConfigError
from alignax.objectives import grpo
from tests.training.conftest import assert_trees_equal, tiny_world  # noqa: F401  (fixtures)


def test_sde_step_log_prob_is_the_gaussian_density():
    rng = np.random.default_rng(0)
    x, v, eps = (rng.normal(size=(3, 4, 4, 2)).astype(np.float32) for _ in range(3))
    sigma, sigma_next, sigma_one, a = np.float32(0.6), np.float32(0.45), np.float32(0.9), 0.7
    x_next, lp = grpo.sde_step(jnp.asarray(x), jnp.asarray(v), sigma, sigma_next, sigma_one, a, jnp.asarray(eps))
    # Independently: the paper's mean and std, and scipy's log-density averaged over elements.
    s = a * np.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x + (v + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = s * np.sqrt(-dt)
    np.testing.assert_allclose(np.asarray(x_next), mean + std * eps, rtol=1e-5, atol=1e-6)
    expected = stats.norm.logpdf(np.asarray(x_next, np.float64), mean, std).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(lp), expected, rtol=1e-5)
    # At σ = 1 the scale uses 1 − σ₁ (the next level), not 1 − 1.
    np.testing.assert_allclose(float(grpo.sde_scale(jnp.float32(1.0), sigma_one, a)), a * np.sqrt(1 / (1 - 0.9)),
                               rtol=1e-6)


def test_with_noise_level_to_zero_the_sde_path_is_the_euler_sampler():
    _, sigmas = sampling.flow_match_sigmas(6, 3.0)
    rng = np.random.default_rng(1)
    weight = jnp.asarray(rng.normal(size=(2, 2)).astype(np.float32)) * 0.3
    x0 = jnp.asarray(rng.normal(size=(2, 3, 3, 2)).astype(np.float32))

    def velocity(x, t, c, p):  # any smooth field
        return jnp.tanh(x @ weight) + 0.1 * t[:, None, None, None] / 1000.0

    ode = sampling.denoise(velocity, x0, jnp.asarray(sigmas), None, None)
    x = x0
    for i in range(6):
        v = velocity(x, jnp.full((2,), sigmas[i] * 1000.0), None, None)
        x, _ = grpo.sde_step(x, v, sigmas[i], sigmas[i + 1], sigmas[1], 1e-7, jax.random.normal(jax.random.key(i),
                                                                                                x.shape))
    np.testing.assert_allclose(np.asarray(x), np.asarray(ode), atol=1e-5)


def _policy_case():
    """log p(y | mean = θ·x, std) per sample (element mean), a tiny 'policy' with one parameter vector θ."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = rng.normal(size=(6, 5)).astype(np.float32)
    theta = rng.normal(size=(5,)).astype(np.float32)
    std = np.float32(0.8)
    advantages = rng.normal(size=(6,)).astype(np.float32)

    def log_p(t):
        return grpo.log_prob(jnp.asarray(y), jnp.asarray(x) * t, std)

    return x, y, theta, std, advantages, log_p


def test_at_ratio_one_the_gradient_is_reinforce_with_group_advantages():
    x, y, theta, std, advantages, log_p = _policy_case()

    def loss(t):
        lp = log_p(t)
        return grpo.clipped_policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(advantages), 0.2)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(theta)))
    # By hand: ∂/∂θ_k of mean_k'[−(y − θx)²/(2σ²)] = (y_k − θ_k x_k)·x_k / (σ²·K); REINFORCE = −mean_b A_b ∇log p_b.
    grad_log_p = (y - theta * x) * x / (std ** 2 * x.shape[1])
    reinforce = -np.mean(advantages[:, None] * grad_log_p, axis=0)
    np.testing.assert_allclose(grad, reinforce, rtol=1e-5, atol=1e-7)


def test_the_clip_binds_exactly_where_the_ratio_leaves_the_interval():
    eps = 0.2
    ratios = np.asarray([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0, 0.5, 1.5, 1.1], np.float32)
    advantages = np.asarray([1, 1, 1, 1, 1, 1, 1, -1, -1, -1], np.float32)
    log_p_old = np.zeros_like(ratios)

    def per_sample(lp):
        return grpo.clipped_policy_loss(lp, jnp.asarray(log_p_old), jnp.asarray(advantages), eps)[0] * len(lp)

    grads = np.asarray(jax.grad(per_sample)(jnp.log(jnp.asarray(ratios))))
    # A > 0: a ratio above 1 + ε gets no gradient; A < 0: a ratio below 1 − ε gets none; elsewhere −A·ρ.
    binds = ((advantages > 0) & (ratios > 1 + eps)) | ((advantages < 0) & (ratios < 1 - eps))
    np.testing.assert_allclose(grads[binds], 0.0)
    np.testing.assert_allclose(grads[~binds], (-advantages * ratios)[~binds], rtol=1e-6)
    _, fraction, deviation = grpo.clipped_policy_loss(jnp.log(jnp.asarray(ratios)), jnp.asarray(log_p_old),
                                                      jnp.asarray(advantages), eps)
    assert float(fraction) == pytest.approx(np.mean(np.abs(ratios - 1) > eps))
    assert float(deviation) == pytest.approx(1.0, rel=1e-6)  # the ratio 2.0


def test_group_advantages_and_constant_rewards_give_a_zero_update():
    rewards = jnp.asarray([1.0, 5.0, 3.0, 7.0, 2.0, 6.0], jnp.float32)  # 3 copies (G) of 2 prompts, copy-major
    adv = np.asarray(grpo.group_advantages(rewards, 3, eps=0.0))
    groups = np.asarray(rewards).reshape(3, 2)
    expected = (groups - groups.mean(0)) / groups.std(0)
    np.testing.assert_allclose(adv.reshape(3, 2), expected, rtol=1e-6)
    glob = np.asarray(grpo.group_advantages(rewards, 3, eps=0.0, global_std=True))
    np.testing.assert_allclose(glob.reshape(3, 2), (groups - groups.mean(0)) / np.std(np.asarray(rewards)), rtol=1e-6)
    constant = grpo.group_advantages(jnp.full((6,), 0.3), 3)
    assert np.all(np.asarray(constant) == 0.0)
    _, _, theta, _, _, log_p = _policy_case()

    def loss(t):
        lp = log_p(t)
        return grpo.clipped_policy_loss(lp, jax.lax.stop_gradient(lp), jnp.zeros((6,)), 0.2)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(theta)))
    assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


@pytest.mark.parametrize("field, value, message", [
    ("group_size", 1, "group_size=1"), ("inner_epochs", 0, "inner_epochs=0"),
    ("sde_window", (3, 2), "sde_window"), ("sde_window", (0, 9), "sde_window"), ("noise_level", 0.0, "noise_level"),
    ("kl_beta", -1.0, "kl_beta"), ("train_num_steps", -1, "train_num_steps"),
])
def test_bad_fields_are_refused_naming_them(field, value, message):
    from alignax import config as config_lib
    from experiments.configs import grpo_tiny
    c = grpo_tiny.get_config()
    c.objective[field] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c, 1)


# ---- through the Trainer ---------------------------------------------------------------------------------

def trainer_for(tmp_path, world_root, name, arg="", **overrides):
    from alignax.training.trainer import Trainer
    from experiments.configs import grpo_tiny
    c = grpo_tiny.get_config(arg)
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 4, 1, 2, 0
    c.data.generate, c.data.path = "", world_root
    c.mesh.shape = (1, 1, 1)
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    mesh = mesh_lib.make_mesh((1, 1, 1), c.mesh.axes, devices=jax.devices()[:1])
    return Trainer(c, tmp_path / name, mesh=mesh, async_checkpoints=False)


def rows(path) -> list[dict]:
    return [r for r in (json.loads(line) for line in path.read_text().splitlines()) if "loss" in r]


def test_the_weighted_reward_rises_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_world):  # noqa: F811
    steer = {"pareto.weights.red": 1.0, "pareto.weights.blue": 0.0, "optim.learning_rate": 1e-2}
    trainer_for(tmp_path, tiny_world, "rise", total_steps=24, checkpoint_every=100, **steer).run()
    red = [r["reward/red/raw"] for r in rows(tmp_path / "rise" / "metrics.jsonl")]
    early, late = np.mean(red[:6]), np.mean(red[-6:])
    print(f"grpo red share: first 6 steps {early:.4f}, last 6 steps {late:.4f}")
    assert late > early + 0.01
    straight = trainer_for(tmp_path, tiny_world, "straight", arg="fast,kl,running").run()
    trainer_for(tmp_path, tiny_world, "resumed", arg="fast,kl,running").run(stop_after=2)
    resumed = trainer_for(tmp_path, tiny_world, "resumed", arg="fast,kl,running").run()
    assert resumed.final_step == straight.final_step == 4
    for part in ("trainable", "opt_state", "objective", "step"):
        assert_trees_equal(resumed.state[part], straight.state[part])


def test_inner_epochs_reuse_the_sampled_batch_the_clip_binds_and_resume_is_exact_mid_reuse(tmp_path,
                                                                                           tiny_world):  # noqa: F811
    """inner_epochs=2: steps 1 and 3 sample, steps 2 and 4 reuse the kept trajectory on the same data batch (so
    ρ ≠ 1 and a tight clip binds); a run stopped after step 1, inside a reuse pair, resumes bit-exact."""
    settings = {"objective.inner_epochs": 2, "objective.clip_range": 1e-4, "optim.learning_rate": 1e-2,
                "optim.warmup_steps": 0}  # (warm-up's first step has learning rate 0: nothing would move)
    with pytest.raises(ConfigError, match="grad_accum_steps=1"):
        trainer_for(tmp_path, tiny_world, "accum", grad_accum_steps=2, **settings)
    straight = trainer_for(tmp_path, tiny_world, "inner", **settings)
    assert straight.objective.batch_period == 2
    result = straight.run()
    logged = rows(tmp_path / "inner" / "metrics.jsonl")
    assert [r["sampled"] for r in logged] == [1.0, 0.0, 1.0, 0.0]
    # Sampling steps evaluate ρ at the params that sampled (1 up to float rounding); reused ones after an update.
    deviations = [r["ratio/max_abs_deviation"] for r in logged]
    print("max |ratio - 1| per step:", deviations, "clip fractions:", [r["clip_fraction"] for r in logged])
    assert deviations[1] > 10 * max(deviations[0], 1e-6) and deviations[3] > 10 * max(deviations[2], 1e-6)
    assert logged[1]["clip_fraction"] > 0.0 and logged[3]["clip_fraction"] > 0.0  # ε = 1e-4 binds
    assert logged[1]["reward/scalarized"] == logged[0]["reward/scalarized"]  # the same samples, scored once
    first = trainer_for(tmp_path, tiny_world, "inner_resumed", checkpoint_every=1, **settings)
    assert first.run(stop_after=1).final_step == 1 and first.checkpointer.latest_step() == 1
    resumed = trainer_for(tmp_path, tiny_world, "inner_resumed", **settings).run()
    for part in ("trainable", "opt_state", "objective", "step"):
        assert_trees_equal(resumed.state[part], result.state[part])


def test_a_host_reward_trains_with_grpo_and_is_refused_by_reward_backprop(tmp_path, tiny_world):  # noqa: F811
    result = trainer_for(tmp_path, tiny_world, "host", arg="host", total_steps=2).run()
    assert result.final_step == 2
    logged = rows(tmp_path / "host" / "metrics.jsonl")
    assert len(logged) == 2 and all(0.0 <= r["reward/attributes/raw"] <= 1.0 for r in logged)
    from alignax.training.trainer import Trainer
    from experiments.configs import reward_backprop_tiny
    c = reward_backprop_tiny.get_config("draft_k")
    c.data.generate, c.data.path = "", tiny_world
    c.rewards.attributes = dict(kind="attribute_match")
    c.pareto.weights.attributes = 0.5
    with pytest.raises(ConfigError, match="config.rewards.attributes: reward kind 'attribute_match' is not "
                                          "differentiable"):
        Trainer(c, tmp_path / "refused", mesh=mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


def test_attribute_match_finds_the_colours_of_real_tiny_world_images():
    """The host classifier on images drawn by the tiny world: their own prompts score 1; a prompt naming another
    background scores ½, one naming two other colours 0."""
    from alignax.data import tiny_world as world
    from alignax.rewards import get
    rng = np.random.default_rng(3)
    images, prompts, wrong_bg, wrong_both = [], [], [], []
    colours = list(world.PALETTE)
    for i in range(12):
        fg, bg = rng.choice(len(colours), 2, replace=False)
        shape = world.SHAPES[i % 3]
        images.append(world.draw(shape, world.PALETTE[colours[fg]], world.PALETTE[colours[bg]], 32, (16.0, 16.0), 9.0))
        other = [c for c in range(len(colours)) if c not in (fg, bg)]
        prompts.append(f"a {colours[fg]} {shape} on a {colours[bg]} background")
        wrong_bg.append(f"a {colours[fg]} {shape} on a {colours[other[0]]} background")
        wrong_both.append(f"a {colours[other[0]]} {shape} on a {colours[other[1]]} background")
    batch_images = jnp.asarray(np.stack(images).astype(np.float32) / 255.0)
    reward = get("attribute_match", name="attributes")
    assert not reward.differentiable
    for texts, expected in ((prompts, 1.0), (wrong_bg, 0.5), (wrong_both, 0.0)):
        batch = reward.prepare_batch({"prompt": np.asarray(texts)})
        scores, _ = jax.jit(lambda im, b: reward.apply({}, im, b))(batch_images, batch)
        np.testing.assert_array_equal(np.asarray(scores), np.full(12, expected, np.float32))
    with pytest.raises(Exception, match="does not name a shape colour"):
        reward.prepare_batch({"prompt": np.asarray(["a photo of a cat"])})
