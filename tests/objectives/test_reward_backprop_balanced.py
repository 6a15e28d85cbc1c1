"""reward_backprop with `config.pareto.scalarization='mgda'` (one backward per reward through one shared
trajectory) and a real Chebyshev training run, on the tiny world's conflicting red/blue share rewards."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax import config as config_lib
from alignax.pareto import gradient_balance as gb
from tests.objectives.test_reward_backprop import (
    _RUN_SETTINGS,
    fast_jit,
    make_models,
    objective,
    trainer_for,
    world,  # noqa: F401  (fixture)
)
from tests.training.conftest import tiny_world  # noqa: F401  (fixture)


def _with_scalarization(models, method):
    settings = _RUN_SETTINGS[id(models)]
    _RUN_SETTINGS[id(models)] = dataclasses.replace(settings, pareto={**settings.pareto, "scalarization": method})
    return models


@pytest.mark.slow
def test_mgda_gradient_is_the_balanced_combination_of_per_reward_gradients(world):  # noqa: F811
    """The objective's gradient (as the trainer takes it) = Σ c_i ∇L_i with c from the Gram matrix of the
    per-reward gradients, each computed by its own one-hot weighted-sum objective."""
    rewards = dict(red=dict(kind="channel_mean", channel=0), blue=dict(kind="channel_mean", channel=2))
    weights = dict(blue=0.5, red=0.5)
    rng, state_of = jax.random.key(4), lambda obj: obj.init_state({}, {})
    mgda = objective(_with_scalarization(make_models(weights=weights, rewards=rewards), "mgda"), mode="draft_k", k=2)

    def balanced(params):
        return mgda.loss({"transformer": params}, world["frozen"], state_of(mgda), world["batch"], rng)

    (value, (metrics, _)), grad = fast_jit(jax.value_and_grad(balanced, has_aux=True))(world["params"])
    per_reward = []
    for name in weights:  # the order of config.pareto.weights
        single = objective(make_models(weights={n: float(n == name) for n in weights}, rewards=rewards),
                           mode="draft_k", k=2)
        per_reward.append(fast_jit(jax.grad(lambda p, o=single: o.loss(
            {"transformer": p}, world["frozen"], state_of(o), world["batch"], rng)[0]))(world["params"]))
    flat = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in per_reward])
    c = np.asarray(gb.coefficients(jnp.asarray(flat @ flat.T), list(weights.values())))
    expected = c @ flat
    actual = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad)])
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    gains = flat @ expected
    assert (gains >= -1e-6 * np.abs(gains).max()).all(), gains
    for name in weights:
        assert float(metrics[f"pareto/{name}/update_cosine"]) >= -1e-5
        assert math.isfinite(float(metrics[f"reward/{name}/raw"]))
    raw = {n: float(metrics[f"reward/{n}/raw"]) for n in weights}
    np.testing.assert_allclose(float(value), -float(c @ np.asarray([raw[n] for n in weights])), rtol=1e-5)


def _metrics_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(tmp_path, world_root, name, arg):
    """One step through the real train step; the metrics rows with a loss."""
    trainer = trainer_for(tmp_path, world_root, name, arg=arg, total_steps=1, checkpoint_every=1,
                          **{"pareto.weights.red": 0.7, "pareto.weights.blue": 0.3, "objective.k": 1})
    assert trainer.config.pareto.scalarization == name
    assert trainer.run().final_step == 1
    rows = [r for r in _metrics_rows(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        for reward in ("red", "blue"):
            assert math.isfinite(row[f"reward/{reward}/raw"]) and f"reward/{reward}/normalized" in row
    return rows


def test_mgda_objective_traces_under_grad_with_its_metrics():
    """The mgda loss as the trainer differentiates it, traced only (no compilation: seconds): the gradient
    has the params' structure and the per-reward metrics are there. The numbers are checked by the slow
    tests below and, on toy losses, by tests/pareto/test_gradient_balance.py."""
    from alignax.models import pretrained
    from alignax.models import setup as model_setup
    models = _with_scalarization(make_models(weights=dict(red=0.6, blue=0.4)), "mgda")
    obj = objective(models, mode="draft_k", k=1, kl_weight=0.1)
    abstract = {}
    for key, module in (("transformer", models.transformer), ("vae", models.vae)):
        source = model_setup.transformer_source if key == "transformer" else model_setup.vae_source
        abstract[key], _ = pretrained.abstract_params(source(config_lib.base_config().model).architecture, module)
    frozen = {"vae": abstract["vae"], "reference": abstract["transformer"], "rewards": {"red": {}, "blue": {}}}
    batch = {"encoder_hidden_states": jax.ShapeDtypeStruct((2, 5, 16), jnp.float32),
             "pooled_projections": jax.ShapeDtypeStruct((2, 16), jnp.float32)}

    def grad_fn(params, frozen, batch):
        return jax.value_and_grad(obj.loss, has_aux=True)({"transformer": params}, frozen, obj.init_state({}, {}),
                                                          batch, jax.random.key(0))

    (value, (metrics, _)), grads = jax.eval_shape(grad_fn, abstract["transformer"], frozen, batch)
    assert value.shape == () and jax.tree.structure(grads["transformer"]) == jax.tree.structure(abstract["transformer"])
    for name in ("red", "blue"):
        for key in ("mgda_coefficient", "grad_norm", "update_cosine"):
            assert metrics[f"pareto/{name}/{key}"].shape == ()
        assert f"reward/{name}/raw" in metrics
    assert "kl_drift" in metrics and "loss" in metrics


@pytest.mark.slow
def test_mgda_trains_through_the_trainer(tmp_path, tiny_world):  # noqa: F811
    """A DRaFT-1 step with `mgda` through the real train step: loss and gradient finite, both rewards
    logged, and each reward's coefficient (>= 0) and update cosine (>= 0: not opposed) logged (slow: one
    train-step compilation, ~40 s idle, ~110 s on the busy shared machine)."""
    for row in _train(tmp_path, tiny_world, "mgda", "draft_k,mgda"):
        for reward in ("red", "blue"):
            assert row[f"pareto/{reward}/mgda_coefficient"] >= 0
            assert row[f"pareto/{reward}/update_cosine"] >= -1e-5


@pytest.mark.slow
def test_chebyshev_trains_through_the_trainer(tmp_path, tiny_world):  # noqa: F811
    """Chebyshev (running ideal) through the real train step, not only its unit tests."""
    for row in _train(tmp_path, tiny_world, "chebyshev", "draft_k,chebyshev"):
        assert row["pareto/red/active_fraction"] + row["pareto/blue/active_fraction"] == 1.0
        assert math.isfinite(row["pareto/red/ideal"])
