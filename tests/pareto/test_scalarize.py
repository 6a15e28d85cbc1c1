"""Scalarisations against hand-computed formulas, their gradients, and weight-vector validation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignax.errors import ConfigError
from alignax.pareto import init_state, multi_reward_loss, scalarize, validate_ideal, validate_weights

RAW = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, -1.0])}


def test_weighted_sum_by_hand():
    loss, info = scalarize(RAW, {"a": 0.25, "b": 2.0}, "weighted_sum")
    # objective = 0.25·a + 2·b = [0.25 + 6, 0.5 − 2]; the loss is its negative.
    np.testing.assert_allclose(loss, [-6.25, 1.5], rtol=1e-6)
    np.testing.assert_allclose(info["pareto/objective"], (6.25 - 1.5) / 2, rtol=1e-6)


def test_chebyshev_by_hand():
    loss, info = scalarize(RAW, {"a": 1.0, "b": 0.5}, "chebyshev", ideal={"a": 3.0, "b": 4.0})
    # gaps a: 1·(3 − [1, 2]) = [2, 1]; b: 0.5·(4 − [3, −1]) = [0.5, 2.5]; max per sample = [2, 2.5].
    np.testing.assert_allclose(loss, [2.0, 2.5], rtol=1e-6)
    assert float(info["pareto/a/active_fraction"]) == 0.5 and float(info["pareto/b/active_fraction"]) == 0.5


def test_chebyshev_without_ideal_and_unknown_method_raise():
    with pytest.raises(ConfigError, match="ideal"):
        scalarize(RAW, {"a": 1.0, "b": 1.0}, "chebyshev")
    with pytest.raises(ConfigError, match="config.pareto.scalarization"):
        scalarize(RAW, {"a": 1.0, "b": 1.0}, "tchebycheff")
    with pytest.raises(ConfigError, match=r"config.pareto.ideal.*\['b'\]"):
        scalarize(RAW, {"a": 1.0, "b": 1.0}, "chebyshev", ideal={"a": 1.0})


def _loss_grad(raw, weights, method, normalization, ideal=None):
    state = init_state(list(raw))

    def total(r):
        loss, _, _ = multi_reward_loss(r, state, normalization=normalization, weights=weights,
                                       scalarization=method, ideal=ideal)
        return jnp.sum(loss)

    return jax.jit(jax.grad(total))(raw)


def test_weighted_sum_gradient_is_minus_weights():
    weights = {"a": 0.3, "b": 1.7}
    grad = _loss_grad(RAW, weights, "weighted_sum", {})
    for name, w in weights.items():
        np.testing.assert_allclose(grad[name], [-w, -w], rtol=1e-6)


def test_chebyshev_gradient_is_minus_the_argmax_weight():
    weights = {"a": 1.0, "b": 0.5}
    grad = _loss_grad(RAW, weights, "chebyshev", {}, ideal={"a": 3.0, "b": 4.0})
    # sample 0: reward a attains the max, sample 1: reward b (see test_chebyshev_by_hand).
    np.testing.assert_allclose(grad["a"], [-1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grad["b"], [0.0, -0.5], rtol=1e-6)


def test_gradient_through_fixed_and_running_normalisation_skips_the_statistics():
    raw = {"a": jnp.array([1.0, 2.0, 4.0, 7.0]), "b": jnp.array([0.5, 0.1, -0.3, 0.2])}
    weights = {"a": 0.4, "b": 1.5}
    spec = {"a": {"method": "fixed", "scale": 2.5, "offset": 1.0}, "b": {"method": "running", "eps": 1e-8}}
    grad = _loss_grad(raw, weights, "weighted_sum", spec)
    np.testing.assert_allclose(grad["a"], np.full(4, -0.4 / 2.5), rtol=1e-6)
    # Statistics are constants for the gradient: ∂r'/∂r = 1/std of the first batch (population std).
    std_b = math.sqrt(np.var(np.asarray(raw["b"], np.float64)) + 1e-8)
    np.testing.assert_allclose(grad["b"], np.full(4, -1.5 / std_b), rtol=1e-5)


def test_running_ideal_is_the_max_of_batch_means_and_logs_each_reward():
    weights = {"a": 1.0, "b": 1.0}
    state = init_state(["a", "b"])
    step = jax.jit(lambda r, s: multi_reward_loss(r, s, normalization={}, weights=weights,
                                                  scalarization="chebyshev", ideal=None))
    batches = [{"a": jnp.array([1.0, 3.0]), "b": jnp.array([0.0, 0.0])},
               {"a": jnp.array([0.0, 1.0]), "b": jnp.array([5.0, 1.0])}]
    for batch in batches:
        loss, info, state = step(batch, state)
    assert float(state["a"]["ideal"]) == 2.0 and float(state["b"]["ideal"]) == 3.0
    # second batch with z* = (2, 3): gaps a = [2, 1], b = [−2, 2] → loss [2, 2].
    np.testing.assert_allclose(loss, [2.0, 2.0], rtol=1e-6)
    assert float(info["reward/b/raw"]) == 3.0 and float(info["reward/a/normalized"]) == 0.5


# ---- validate_weights -------------------------------------------------------------------------

NAMES = ["aesthetic", "hpsv2", "clip"]


def test_valid_weight_forms():
    assert validate_weights({"clip": 1, "hpsv2": 0.5, "aesthetic": 0}, NAMES) == {
        "aesthetic": 0.0, "hpsv2": 0.5, "clip": 1.0}
    assert validate_weights((0.0, 0.5, 1.0), NAMES) == {"aesthetic": 0.0, "hpsv2": 0.5, "clip": 1.0}
    assert validate_weights(ml_collections.ConfigDict({"aesthetic": 1.0, "hpsv2": 2.0, "clip": 0.0}), NAMES)[
        "hpsv2"] == 2.0
    assert validate_weights(ml_collections.ConfigDict(), []) == {}


def test_configdict_reward_order_is_alphabetical_for_sequences():
    rewards = ml_collections.ConfigDict()
    rewards.zeta = {}
    rewards.alpha = {}
    names = list(rewards.keys())
    assert names == ["alpha", "zeta"]  # ConfigDict sorts its keys: insertion order is NOT kept
    assert validate_weights([1.0, 0.0], names) == {"alpha": 1.0, "zeta": 0.0}


@pytest.mark.parametrize("weights, offending", [
    ({"aesthetic": 1.0, "hpsv2": 1.0, "clip": 1.0, "pickscore": 1.0}, "pickscore"),  # unknown name
    ({"aesthetic": 1.0, "clip": 1.0}, "hpsv2"),                                        # missing name
    ([1.0, 1.0], "2 weights"),                                                           # short sequence
    ((1.0, 1.0, 1.0, 1.0), "4 weights"),                                                 # long sequence
    ({"aesthetic": -0.5, "hpsv2": 1.0, "clip": 1.0}, "-0.5"),                            # negative
    ({"aesthetic": float("nan"), "hpsv2": 1.0, "clip": 1.0}, "nan"),                     # NaN
    ([1.0, float("inf"), 1.0], "inf"),                                                   # infinite
    ([0.0, 0.0, 0], "all weights are zero"),                                             # all zero
    ({"aesthetic": "1", "hpsv2": 1.0, "clip": 1.0}, "'1'"),                              # not a number
    ({"aesthetic": True, "hpsv2": 1.0, "clip": 1.0}, "True"),                            # bool
    ("1,1,1", "str"),                                                                    # wrong type
])
def test_bad_weights_raise_config_error_naming_the_field(weights, offending):
    with pytest.raises(ConfigError) as err:
        validate_weights(weights, NAMES, field="config.pareto.weights")
    assert "config.pareto.weights" in str(err.value)
    assert offending in str(err.value)


def test_weights_for_no_rewards_are_refused():
    with pytest.raises(ConfigError, match=r"config.pareto.weights.*\['hpsv2'\]"):
        validate_weights({"hpsv2": 1.0}, [])


def test_validate_ideal():
    assert validate_ideal(ml_collections.ConfigDict(), NAMES) is None
    assert validate_ideal({"aesthetic": 1, "hpsv2": 2, "clip": 3}, NAMES) == {"aesthetic": 1.0, "hpsv2": 2.0,
                                                                              "clip": 3.0}
    for bad, offending in [({"aesthetic": 1.0}, "hpsv2"), ({"aesthetic": 1, "hpsv2": 2, "clip": float("nan")},
                                                            "nan"), ([1, 2, 3], "[1, 2, 3]")]:
        with pytest.raises(ConfigError) as err:
            validate_ideal(bad, NAMES)
        assert "config.pareto.ideal" in str(err.value) and offending in str(err.value)


def test_resolve_config_feeds_multi_reward_loss_and_names_bad_fields():
    from alignax.pareto import resolve_config

    pareto = ml_collections.ConfigDict(dict(
        weights={"a": 0.25, "b": 2.0}, scalarization="weighted_sum",
        normalization={"a": {"method": "fixed", "scale": 0.5, "offset": 1.0}}, ideal={}))
    kwargs = resolve_config(pareto, ["a", "b"])
    assert kwargs["ideal"] is None and kwargs["normalization"]["b"] == {"method": "none"}
    loss, info, _ = multi_reward_loss(RAW, init_state(["a", "b"]), **kwargs)
    # a' = (a − 1)/0.5 = [0, 2]; objective = 0.25·a' + 2·b = [6, −1.5]
    np.testing.assert_allclose(loss, [-6.0, 1.5], rtol=1e-6)
    assert float(info["reward/a/raw"]) == 1.5 and float(info["reward/a/normalized"]) == 1.0
    pareto.scalarization = "pbi"
    with pytest.raises(ConfigError, match="config.pareto.scalarization"):
        resolve_config(pareto, ["a", "b"])
