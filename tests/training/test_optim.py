"""Optimiser: schedules against closed forms, AdamW against hand-computed steps, clipping, regex groups."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignax.errors import ConfigError
from alignax.models import abstract_params, mmdit
from alignax.training import optim
from tests.reference_models import SD3_TINY


def _cfg(**overrides) -> ml_collections.ConfigDict:
    base = dict(learning_rate=0.1, warmup_steps=0, schedule="constant", end_lr_fraction=0.0, b1=0.9, b2=0.99,
                eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, frozen=(), lr_mults=())
    return ml_collections.ConfigDict({**base, **overrides})


@pytest.fixture(scope="module")
def sd3_params():
    """The tiny SD3 param tree with seeded random values (shapes from eval_shape: nothing compiled)."""
    shapes, _ = abstract_params(mmdit.ARCHITECTURE, mmdit.build(SD3_TINY))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def _names(tree):
    return [optim.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# --- schedules ---------------------------------------------------------------------------------


def test_constant_schedule_with_linear_warmup():
    schedule = optim.make_schedule(_cfg(learning_rate=0.2, warmup_steps=4))
    for step, expected in [(0, 0.0), (1, 0.05), (2, 0.1), (4, 0.2), (9, 0.2), (1000, 0.2)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-9), step
    assert float(optim.make_schedule(_cfg(learning_rate=0.3))(0)) == pytest.approx(0.3)


def test_cosine_schedule_matches_closed_form():
    lr, warmup, total, end_fraction = 0.1, 10, 110, 0.2
    schedule = optim.make_schedule(_cfg(learning_rate=lr, warmup_steps=warmup, schedule="cosine",
                                        end_lr_fraction=end_fraction), total_steps=total)

    def closed_form(step):
        if step < warmup:
            return lr * step / warmup
        progress = min(step - warmup, total - warmup) / (total - warmup)
        end = lr * end_fraction
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in [0, 3, 10, 11, 35, 60, 109, 110, 500]:
        assert float(schedule(step)) == pytest.approx(closed_form(step), rel=1e-5, abs=1e-9), step
    # total_steps may also come from the config itself.
    cfg = _cfg(schedule="cosine", warmup_steps=warmup, end_lr_fraction=end_fraction)
    cfg.total_steps = total
    assert float(optim.make_schedule(cfg)(60)) == pytest.approx(closed_form(60), rel=1e-5)


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="schedule='linear'.*constant.*cosine"):
        optim.make_schedule(_cfg(schedule="linear"))
    with pytest.raises(ConfigError, match="total_steps"):
        optim.make_schedule(_cfg(schedule="cosine", warmup_steps=5))
    with pytest.raises(ConfigError, match="end_lr_fraction"):
        optim.make_schedule(_cfg(schedule="cosine", end_lr_fraction=2.0), total_steps=10)


# --- AdamW and clipping ------------------------------------------------------------------------


def test_adamw_two_steps_match_hand_computed_adam():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.05
    params = {"dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.array([0.25, -1.0])}}
    grads = [{"dense": {"kernel": jnp.array([[0.3, -0.1], [2.0, 0.0]]), "bias": jnp.array([1.0, -0.5])}},
             {"dense": {"kernel": jnp.array([[-0.2, 0.4], [1.0, 0.7]]), "bias": jnp.array([0.1, 0.9])}}]
    tx, _ = optim.make_optimizer(_cfg(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), params)
    state = tx.init(params)
    ours = params
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)

    # Hand-written Adam with bias correction and decoupled weight decay, in float64.
    p = {k: np.asarray(v, np.float64) for k, v in params["dense"].items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        for k in p:
            gk = np.asarray(g["dense"][k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
    for k in p:
        np.testing.assert_allclose(np.asarray(ours["dense"][k]), p[k], rtol=1e-6, atol=1e-7)


def test_clipping_engages_on_the_trainable_norm_only():
    lr, eps, clip = 1.0, 1.0, 1.0  # eps=1 makes Adam's first step depend on the gradient's size
    params = {"w": jnp.zeros((3,)), "frozen_w": jnp.zeros((2,))}
    g_w = np.array([3.0, 4.0, 0.0])  # norm 5
    grads = {"w": jnp.asarray(g_w), "frozen_w": jnp.array([1e3, 1e3])}  # must not count in the norm

    def first_update(grad_clip_norm):
        cfg = _cfg(learning_rate=lr, eps=eps, grad_clip_norm=grad_clip_norm, frozen=("^frozen_w$",))
        tx, _ = optim.make_optimizer(cfg, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return np.asarray(updates["w"]), np.asarray(updates["frozen_w"])

    clipped = g_w * clip / 5.0
    w_update, frozen_update = first_update(clip)
    np.testing.assert_allclose(w_update, -lr * clipped / (np.abs(clipped) + eps), rtol=1e-6)
    assert np.all(frozen_update == 0)
    w_unclipped, _ = first_update(0.0)  # 0 disables clipping
    np.testing.assert_allclose(w_unclipped, -lr * g_w / (np.abs(g_w) + eps), rtol=1e-6)
    w_none, _ = first_update(None)
    np.testing.assert_allclose(w_none, w_unclipped, rtol=0)


# --- parameter groups --------------------------------------------------------------------------


def test_frozen_params_get_zero_updates_and_no_state(sd3_params):
    cfg = _cfg(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0, frozen=(r"transformer_blocks\.0/.*",))
    tx, _ = optim.make_optimizer(cfg, sd3_params)
    labels = dict(zip(_names(sd3_params), jax.tree.leaves(optim.param_labels(sd3_params, cfg)), strict=True))
    expected_frozen = {n for n in labels if n.startswith("transformer_blocks.0/") or n == "pos_embed/pos_embed"}
    assert {n for n, label in labels.items() if label == "frozen"} == expected_frozen
    assert "transformer_blocks.1/attn/to_q/kernel" not in expected_frozen  # '.0/' does not catch '.1'

    state = tx.init(sd3_params)
    step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    params = sd3_params
    for seed in range(3):
        params, state = step(params, state, _random_like(sd3_params, seed + 1))

    before = dict(zip(_names(sd3_params), jax.tree.leaves(sd3_params), strict=True))
    after = dict(zip(_names(params), jax.tree.leaves(params), strict=True))
    for name in before:
        unchanged = np.array_equal(np.asarray(before[name]), np.asarray(after[name]))
        assert unchanged == (name in expected_frozen), name

    # Adam moments exist for trainable params only: no state path ends in a frozen param's name.
    state_names = [optim.param_path(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state) if leaf.ndim > 0]
    trainable = set(before) - expected_frozen

    def names_one_of(state_name, names):
        return any(state_name == n or state_name.endswith("/" + n) for n in names)

    assert state_names and all(names_one_of(n, trainable) for n in state_names)
    assert not any(names_one_of(n, expected_frozen) for n in state_names)
    state_elements = sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.ndim > 0)
    assert state_elements == 2 * sum(before[n].size for n in trainable)  # mu and nu, nothing for frozen


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_lr_mults_scale_updates_first_match_wins():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}, "c": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda x: jnp.array([[0.5, -1.0], [2.0, 0.1]]), params)
    cfg = _cfg(weight_decay=0.01, lr_mults=((r"^b/", 0.1), (r"^(b|c)/", 3.0)))
    tx, _ = optim.make_optimizer(cfg, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["b"]["kernel"]), 0.1 * np.asarray(updates["a"]["kernel"]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["c"]["kernel"]), 3.0 * np.asarray(updates["a"]["kernel"]),
                               rtol=1e-6)
    assert np.all(np.asarray(updates["a"]["kernel"]) != 0)


@pytest.mark.parametrize("field", ["frozen", "lr_mults"])
def test_regex_that_matches_nothing_names_itself(sd3_params, field):
    value = ("no_such_layer/.*",) if field == "frozen" else (("no_such_layer/.*", 0.5),)
    with pytest.raises(ConfigError, match=rf"optim\.{field}.*no_such_layer/\.\*"):
        optim.make_optimizer(_cfg(**{field: value}), sd3_params)
    with pytest.raises(ConfigError, match=r"frozen\[0\].*not a valid regex"):
        optim.make_optimizer(_cfg(frozen=("(",)), sd3_params)


def test_pos_embed_is_never_updated(sd3_params):
    # Even with weight decay, a multiplier on everything and a non-zero gradient for the table.
    cfg = _cfg(weight_decay=0.5, lr_mults=((".*", 2.0),))
    tx, _ = optim.make_optimizer(cfg, sd3_params)
    grads = _random_like(sd3_params, 7)
    assert np.any(np.asarray(grads["pos_embed"]["pos_embed"]) != 0)
    params, state = sd3_params, tx.init(sd3_params)
    for _ in range(2):
        params, state = _apply(tx, params, state, grads)
    np.testing.assert_array_equal(np.asarray(params["pos_embed"]["pos_embed"]),
                                  np.asarray(sd3_params["pos_embed"]["pos_embed"]))
    assert not np.array_equal(np.asarray(params["pos_embed"]["proj"]["kernel"]),
                              np.asarray(sd3_params["pos_embed"]["proj"]["kernel"]))
    assert not jax.tree.leaves(optim.trainable_mask(sd3_params, cfg)["pos_embed"]["pos_embed"])[0]
