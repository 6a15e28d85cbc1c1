"""Gradient-balanced scalarisation (`mgda`): the min-norm solver against brute force, no weighted reward's
gradient opposing the update, the weights steering it, and the custom-VJP loss the trainer differentiates."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.errors import ConfigError
from alignax.pareto import gradient_balance as gb


def conflicting(k: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    """k gradients in R^dim, each pair with a negative inner product (a real conflict)."""
    rng = np.random.default_rng(seed)
    while True:
        g = rng.normal(size=(k, dim))
        gram = g @ g.T
        if all(gram[i, j] < 0 for i, j in itertools.combinations(range(k), 2)):
            return g


def brute_force_min_norm(v: np.ndarray, divisions: int) -> float:
    """min over a simplex lattice of ‖Σ α_i v_i‖²."""
    k = v.shape[0]
    best = np.inf
    for c in itertools.product(range(divisions + 1), repeat=k - 1):
        if sum(c) <= divisions:
            alpha = np.array([*c, divisions - sum(c)]) / divisions
            best = min(best, float(np.sum((alpha @ v) ** 2)))
    return best


def test_two_rewards_closed_form_is_the_min_norm_point():
    g = conflicting(2)
    alpha = np.asarray(gb.min_norm_weights(jnp.asarray(g @ g.T)))
    # The closed form: α_1 = (v_2 − v_1)·v_2 / ‖v_1 − v_2‖², projected on [0, 1].
    expected = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1]) ** 2), 0, 1)
    np.testing.assert_allclose(alpha, [expected, 1 - expected], rtol=1e-5)
    assert float(np.sum((alpha @ g) ** 2)) <= brute_force_min_norm(g, 2000) + 1e-6
    # Degenerate inputs: equal gradients (any α; no NaN) and one dominated by the other (a vertex).
    assert np.isfinite(np.asarray(gb.min_norm_weights(jnp.ones((2, 2))))).all()
    np.testing.assert_allclose(gb.min_norm_weights(jnp.asarray([[1.0, 2.0], [2.0, 9.0]])), [1.0, 0.0])


def test_frank_wolfe_for_three_rewards_matches_brute_force():
    g = conflicting(3, seed=1)
    alpha = np.asarray(gb.min_norm_weights(jnp.asarray(g @ g.T), iterations=200))
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-5
    assert float(np.sum((alpha @ g) ** 2)) <= brute_force_min_norm(g, 120) + 1e-4


@pytest.mark.parametrize("k", [2, 3])
def test_no_weighted_reward_gradient_opposes_the_update_and_gains_follow_the_weights(k):
    g = conflicting(k, seed=k)
    weights = [0.7, 0.3] if k == 2 else [0.5, 0.3, 0.2]
    c = np.asarray(gb.coefficients(jnp.asarray(g @ g.T), weights, iterations=500))
    d = c @ g
    gains = g @ d                      # first-order gain of each reward along the update
    assert np.linalg.norm(d) > 1e-3   # not stationary: the test is not vacuous
    assert (gains >= -1e-6).all(), gains
    # Active rewards (α > 0) gain w_i·‖d‖², the others more: gains in proportion to the weights.
    active = c > 1e-6
    np.testing.assert_allclose(gains[active], np.asarray(weights)[active] * float(d @ d), rtol=1e-3)
    assert (gains[~active] >= np.asarray(weights)[~active] * float(d @ d) - 1e-6).all()


def test_where_the_weighted_sum_opposes_a_reward_mgda_does_not():
    g = np.asarray([[10.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])  # a large gradient against a small one
    weights = [0.5, 0.5]
    assert (g @ (np.asarray(weights) @ g)).min() < 0        # the weighted sum lowers reward 2
    d = np.asarray(gb.coefficients(jnp.asarray(g @ g.T), weights)) @ g
    assert (g @ d).min() >= -1e-6 and np.linalg.norm(d) > 1e-3


def test_zero_weight_rewards_are_left_out():
    g = conflicting(2)
    c = np.asarray(gb.coefficients(jnp.asarray(g @ g.T), [0.0, 2.0]))
    np.testing.assert_allclose(c, [0.0, 0.5])  # d = g_2 / w_2


def test_balanced_loss_hands_the_trainer_the_combined_gradient():
    """value_and_grad of the custom-VJP loss (as the trainer calls it, under jit, with int and key
    arguments beside the params) = Σ c_i ∇L_i + λ·∇extra, with c from the per-reward gradients."""
    targets = jnp.asarray(conflicting(2, dim=4, seed=3), jnp.float32)

    def parts(params, batch, rng):
        x = params["x"] + 0.0 * batch["ids"].sum() + 0.0 * jax.random.uniform(rng)
        losses = jnp.stack([jnp.sum((x - t) ** 2) for t in targets])
        extra = jnp.sum(x ** 2)
        return (losses, extra), ({"seen": losses[0]}, {"count": batch["ids"][0]})

    weights, lam = [0.6, 0.4], 0.1
    loss = gb.balanced_loss(parts, ["a", "b"], weights, extra_weight=lam)
    params = {"x": jnp.asarray([0.3, -0.2, 0.1, 0.5])}
    batch, rng = {"ids": jnp.arange(3, dtype=jnp.int32)}, jax.random.key(0)
    (value, (metrics, state)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch, rng)

    per_reward = [jax.grad(lambda p, i=i: parts(p, batch, rng)[0][0][i])(params)["x"] for i in range(2)]
    g = np.stack([np.asarray(x) for x in per_reward])
    c = np.asarray(gb.coefficients(jnp.asarray(g @ g.T), weights))
    extra_grad = np.asarray(2 * params["x"])
    np.testing.assert_allclose(grad["x"], c @ g + lam * extra_grad, rtol=1e-5)
    (losses, extra), _ = parts(params, batch, rng)
    np.testing.assert_allclose(value, c @ np.asarray(losses) + lam * float(extra), rtol=1e-5)
    assert int(state["count"]) == 0 and "seen" in metrics
    for name in ("a", "b"):
        assert float(metrics[f"pareto/{name}/update_cosine"]) >= -1e-6
        assert float(metrics[f"pareto/{name}/grad_norm"]) > 0


def test_a_zero_weight_reward_gets_no_backward_and_all_zero_weights_are_refused():
    calls = []

    def parts(params):
        losses = jnp.stack([jnp.sum(params ** 2), jnp.sum((params - 1.0) ** 2)])
        return (losses, jnp.zeros(())), {}

    def counting(params):  # counts the backward passes through `parts` at trace time
        @jax.custom_vjp
        def f(p):
            return parts(p)[0][0][0]

        def f_fwd(p):
            return f(p), p

        def f_bwd(p, ct):
            calls.append(float(ct))  # eager: the cotangent reward a's loss receives
            return (ct * 2 * p,)

        f.defvjp(f_fwd, f_bwd)
        return (jnp.stack([f(params), parts(params)[0][0][1]]), jnp.zeros(())), {}

    x = jnp.asarray([0.2, -0.4])
    grad = jax.grad(lambda p: gb.balanced_loss(counting, ["a", "b"], [0.0, 2.0])(p)[0])(x)
    np.testing.assert_allclose(grad, 2 * (x - 1.0) / 2.0, rtol=1e-6)  # ∇L_b / w_b
    assert calls == [0.0]  # one backward (reward b's); none with reward a's unit cotangent
    with pytest.raises(ConfigError, match="all zero"):
        gb.balanced_loss(parts, ["a", "b"], [0.0, 0.0])
