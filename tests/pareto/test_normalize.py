"""Per-reward normalisation: formulas, convergence of running statistics, resume, sharding, validation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignax.errors import ConfigError
from alignax.pareto import init_state, normalize, validate_specs


def _step(spec):
    return jax.jit(lambda raw, state: normalize(raw, state, spec))


def test_none_and_fixed_by_hand():
    spec = validate_specs({"b": {"method": "fixed", "scale": 4.0, "offset": 2.0}}, ["a", "b"])
    raw = {"a": jnp.array([1.0, -3.0]), "b": jnp.array([10.0, 0.0])}
    out, state = _step(spec)(raw, init_state(["a", "b"]))
    np.testing.assert_array_equal(out["a"], [1.0, -3.0])
    np.testing.assert_allclose(out["b"], [2.0, -0.5], rtol=1e-6)  # (10 − 2)/4, (0 − 2)/4
    assert int(state["b"]["count"]) == 0  # fixed leaves the statistics alone


def _stream(seed, num_batches, batch, mean, std):
    return np.random.default_rng(seed).normal(mean, std, size=(num_batches, batch)).astype(np.float32)


def test_exact_running_statistics_equal_the_whole_stream():
    data = _stream(0, 300, 16, mean=3.0, std=2.0)
    step = _step(validate_specs({"r": {"method": "running"}}, ["r"]))
    state = init_state(["r"])
    for batch in data:
        out, state = step({"r": jnp.asarray(batch)}, state)
    flat = data.astype(np.float64).ravel()
    assert int(state["r"]["count"]) == flat.size
    np.testing.assert_allclose(state["r"]["mean"], flat.mean(), rtol=1e-5)
    np.testing.assert_allclose(state["r"]["var"], flat.var(), rtol=1e-4)
    # and the stream's true moments, within sampling error (4800 samples: se(mean) ≈ 0.03)
    assert abs(float(state["r"]["mean"]) - 3.0) < 0.12 and abs(float(np.sqrt(state["r"]["var"])) - 2.0) < 0.1
    np.testing.assert_allclose(out["r"], (data[-1] - flat.mean()) / np.sqrt(flat.var() + 1e-8), rtol=1e-4, atol=1e-5)


def test_momentum_statistics_converge_and_track_a_shift():
    spec = validate_specs({"r": {"method": "running", "momentum": 0.9}}, ["r"])
    step = _step(spec)
    state = init_state(["r"])
    for batch in _stream(1, 200, 32, mean=-1.0, std=0.5):
        _, state = step({"r": jnp.asarray(batch)}, state)
    assert abs(float(state["r"]["mean"]) + 1.0) < 0.05 and abs(float(np.sqrt(state["r"]["var"])) - 0.5) < 0.05
    for batch in _stream(2, 100, 32, mean=4.0, std=0.5):  # the reward distribution moves, as in training
        _, state = step({"r": jnp.asarray(batch)}, state)
    assert abs(float(state["r"]["mean"]) - 4.0) < 0.05 and abs(float(np.sqrt(state["r"]["var"])) - 0.5) < 0.05


def test_first_running_batch_is_standardised_by_its_own_statistics():
    spec = validate_specs({"r": {"method": "running", "momentum": 0.99}}, ["r"])
    out, _ = _step(spec)({"r": jnp.array([1.0, 2.0, 3.0, 6.0])}, init_state(["r"]))
    x = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(out["r"], (x - x.mean()) / np.sqrt(x.var() + 1e-8), rtol=1e-5)


def test_running_jacobian_is_diagonal():
    spec = validate_specs({"r": {"method": "running"}}, ["r"])
    x = jnp.array([0.5, 1.0, -2.0])
    jac = jax.jacobian(lambda r: normalize({"r": r}, init_state(["r"]), spec)[0]["r"])(x)
    # stop_gradient on the statistics: r'_i depends only on r_i, with slope 1/std
    np.testing.assert_allclose(jac, np.eye(3) / np.sqrt(np.var(np.asarray(x)) + 1e-8), rtol=1e-5, atol=1e-7)


def _save(state, path):
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


def _restore(template, path):
    stored = np.load(path)
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[jax.tree_util.keystr(k)]) for k, _ in paths])


def test_state_survives_save_and_restore(tmp_path):
    names = ["a", "b"]
    spec = validate_specs({"a": {"method": "running"}, "b": {"method": "running", "momentum": 0.8}}, names)
    step = _step(spec)
    data = {n: _stream(i + 5, 8, 4, mean=i, std=1.0 + i) for i, n in enumerate(names)}
    state = init_state(names)
    for k in range(4):
        _, state = step({n: jnp.asarray(data[n][k]) for n in names}, state)
    _save(state, tmp_path / "pareto_state.npz")
    restored = _restore(init_state(names), tmp_path / "pareto_state.npz")
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for k in range(4, 8):
        batch = {n: jnp.asarray(data[n][k]) for n in names}
        out, state = step(batch, state)
        out_r, restored = step(batch, restored)
        for n in names:
            np.testing.assert_array_equal(out[n], out_r[n])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, restored)


def test_sharded_batch_gives_global_statistics():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    spec = validate_specs({"r": {"method": "running"}}, ["r"])
    x = jnp.asarray(_stream(7, 1, 64, mean=2.0, std=3.0)[0])
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    out_s, state_s = _step(spec)({"r": sharded}, init_state(["r"]))
    out_u, state_u = normalize({"r": x}, init_state(["r"]), spec)
    np.testing.assert_allclose(state_s["r"]["mean"], np.mean(np.asarray(x, np.float64)), rtol=1e-5)
    np.testing.assert_allclose(state_s["r"]["var"], state_u["r"]["var"], rtol=1e-5)
    np.testing.assert_allclose(out_s["r"], out_u["r"], rtol=1e-5, atol=1e-6)


def test_default_is_none_and_configdict_is_accepted():
    specs = validate_specs(ml_collections.ConfigDict({"b": {"method": "running", "momentum": 0.5}}), ["a", "b"])
    assert specs == {"a": {"method": "none"}, "b": {"method": "running", "momentum": 0.5}}


@pytest.mark.parametrize("specs, offending", [
    ({"c": {"method": "none"}}, "['c']"),                                   # reward not configured
    ({"a": {"method": "zscore"}}, "config.pareto.normalization.a.method"),  # unknown method
    ({"a": {"method": "fixed"}}, "missing ['scale']"),                      # missing setting
    ({"a": {"method": "fixed", "scale": 0.0}}, "scale"),                    # zero scale
    ({"a": {"method": "none", "scale": 2.0}}, "unknown ['scale']"),         # setting the method lacks
    ({"a": {"method": "running", "momentum": 1.0}}, "momentum"),            # momentum out of range
    ({"a": {"method": "running", "eps": -1.0}}, "eps"),                     # bad eps
])
def test_bad_specs_raise_config_error_naming_the_field(specs, offending):
    with pytest.raises(ConfigError) as err:
        validate_specs(specs, ["a", "b"])
    assert "config.pareto.normalization" in str(err.value) and offending in str(err.value)
