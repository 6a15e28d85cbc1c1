"""Rewarded soups (`alignax.soup`): vertices are their endpoints bit for bit, the midpoint is the mean,
LoRA runs mix their deltas, mismatched runs are refused naming the param path and both workdirs, and a
soup is a workdir that `alignax.saved_run` / `alignax.evaluate` read like a finished run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax import evaluate, saved_run
from alignax.errors import ConfigError
from alignax.models import pretrained
from alignax.models import setup as model_setup
from alignax.study import soup
from alignax.training import checkpoint as checkpoint_lib
from alignax.training import lora
from tests.training.conftest import assert_trees_equal, tiny_config

STEPS = 6


def _save(workdir, state, config):
    """A 'finished' run as the trainer leaves it: checkpoints/STEPS with the state and the resolved config."""
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1, async_save=False)
    checkpointer.save(STEPS, state, checkpoint_lib.resolved_config(config, 1))
    checkpointer.wait()
    checkpointer.close()


def _state(trainable):
    return {"step": jnp.full((), STEPS, jnp.int32), "rng": jax.random.key_data(jax.random.key(0)),
            "trainable": trainable, "opt_state": {}, "ema": {},
            "objective": {"red": {"mean": jnp.zeros(())}},
            "nonfinite": {"consecutive": jnp.zeros((), jnp.int32), "total": jnp.zeros((), jnp.int32)}}


def _moved(tree, key, scale):
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(structure, [jnp.asarray(x) + scale * jax.random.normal(k, x.shape, x.dtype)
                                          for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Two runs of one config whose trainables differ (small trees: the soup never builds a model)."""
    tmp = tmp_path_factory.mktemp("soup_full")
    base = {"transformer": {"proj_out": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((3,))},
                            "pos_embed": {"pos_embed": jnp.ones((2, 4))}},
            "heads": {"w": jnp.full((5,), -0.0)}}
    states = [_state(_moved(base, key, 0.3)) for key in (1, 2)]
    config = tiny_config(total_steps=STEPS)
    for name, state in zip(("full_a", "full_b"), states, strict=True):
        _save(tmp / name, state, config)
    return config, str(tmp / "full_a"), str(tmp / "full_b"), states


def test_soup_vertices_are_the_endpoints_and_the_midpoint_is_the_mean(full_runs, tmp_path):
    _, a, b, states = full_runs
    soups = soup.make_soups([a, b], "0,0.5,1", str(tmp_path / "soups"))
    assert [s.lambdas for s in soups] == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert [s.name for s in soups] == ["soup__full_a+full_b__l-1-0", "soup__full_a+full_b__l-0.5-0.5",
                                       "soup__full_a+full_b__l-0-1"]
    loaded = [saved_run.load(s.workdir) for s in soups]
    assert_trees_equal(loaded[0].state["trainable"], saved_run.load(a).state["trainable"])
    assert_trees_equal(loaded[2].state["trainable"], saved_run.load(b).state["trainable"])
    mean = jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / np.float32(2), states[0]["trainable"],
                        states[1]["trainable"])
    assert_trees_equal(loaded[1].state["trainable"], mean)
    # A finished run's workdir: status.json, soup.json, the first endpoint's config and step.
    status = json.loads((tmp_path / "soups" / soups[1].name / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == STEPS
    record = json.loads((tmp_path / "soups" / soups[1].name / "soup.json").read_text())
    assert record["lambdas"] == [0.5, 0.5] and [e["workdir"] for e in record["endpoints"]] == [a, b]
    assert record["objective"] == "soup" and record["mode"] == "params"
    assert loaded[1].step == STEPS and loaded[1].config.to_dict() == saved_run.load(a).config.to_dict()
    # Re-running keeps what exists.
    again = soup.make_soups([a, b], "0.5", str(tmp_path / "soups"))
    assert again[0].workdir == soups[1].workdir


def test_mismatched_runs_are_refused_naming_the_path_and_both_workdirs(full_runs, tmp_path):
    config, a, b, states = full_runs
    trainable = jax.tree.map(lambda x: x, states[1]["trainable"])
    trainable["transformer"]["proj_out"]["kernel"] = jnp.zeros((3, 3))
    _save(tmp_path / "other", _state(trainable), config)
    out = tmp_path / "soups"
    with pytest.raises(ConfigError, match=rf"transformer/proj_out/kernel.*{a}.*{tmp_path / 'other'}"):
        soup.make_soups([a, str(tmp_path / "other")], "0.5", str(out))
    assert not out.exists()


def test_mixing_grid():
    assert soup.mixing_grid("0, 0.25,1", 2) == ((1.0, 0.0), (0.75, 0.25), (0.0, 1.0))
    three = soup.mixing_grid("simplex:3", 3)
    assert len(three) == 6 and all(abs(sum(v) - 1) < 1e-9 for v in three) and (1.0, 0.0, 0.0) in three
    for spec, n, match in (("1.5", 2, "in \\[0, 1\\]"), ("0.5", 3, "exactly 2 runs"), ("x", 2, "numbers"),
                           ("0.5", 1, "at least 2")):
        with pytest.raises(ConfigError, match=match):
            soup.mixing_grid(spec, n)


def _lora_soups(tmp_path):
    config = tiny_config(total_steps=STEPS, **{"lora.enabled": True, "lora.rank": 2, "lora.alpha": 4.0})
    t_src, transformer, _, _ = model_setup.build_modules(config.model)
    abstract, _ = pretrained.abstract_params(t_src.architecture, transformer)
    spec = lora.LoraSpec.from_config(config.lora)
    adapters = [_moved(lora.init_lora(abstract, spec, jax.random.key(key)), key, 0.05) for key in (1, 2)]
    states = [_state({"transformer": adapter}) for adapter in adapters]
    for name, state in zip("ab", states, strict=True):
        _save(tmp_path / name, state, config)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    soups = soup.make_soups([a, b], "0,0.25,1", str(tmp_path / "soups"))
    return soups, adapters, spec, a


def test_lora_soup_mixes_the_deltas(tmp_path):
    """Adapters of the tiny MM-DiT's real shapes: vertices are the endpoints' adapters, λ = 0.25 is the
    rank-4 concatenation whose delta is the mix."""
    soups, adapters, spec, a = _lora_soups(tmp_path)
    vertex, quarter, _ = (saved_run.load(s.workdir) for s in soups)
    assert_trees_equal(vertex.state["trainable"], saved_run.load(a).state["trainable"])
    assert vertex.config.lora.rank == 2 and quarter.config.lora.rank == 4 and quarter.config.lora.alpha == 8.0
    spec_mix = lora.LoraSpec.from_config(quarter.config.lora)
    modules = lora._lora_modules(quarter.state["trainable"]["transformer"])
    ends = [lora._lora_modules(adapter) for adapter in adapters]
    assert modules
    for path, module in modules.items():
        expected = 0.75 * lora.delta(ends[0][path], spec) + 0.25 * lora.delta(ends[1][path], spec)
        assert float(jnp.abs(expected).max()) > 0
        np.testing.assert_allclose(lora.delta(module, spec_mix), expected, rtol=1e-5, atol=1e-7)
    assert json.loads((tmp_path / "soups" / soups[1].name / "soup.json").read_text())["mode"] == "lora_delta"


@pytest.mark.slow
def test_lora_soup_evaluates_to_the_mixed_model(tmp_path):
    """`alignax.evaluate` merges the rank-4 adapter into the seed-drawn base: the merged MM-DiT is the mix
    of the merged endpoints (slow: builds the base and the VAE, ~1 min on a busy machine)."""
    soups, adapters, spec, _ = _lora_soups(tmp_path)
    quarter = saved_run.load(soups[1].workdir)
    t_src, transformer, _, _ = model_setup.build_modules(quarter.config.model)
    merged = evaluate.load(soups[1].workdir).transformer
    base = saved_run.lora_base(quarter.config, t_src, transformer)
    want = jax.tree.map(lambda x, y: 0.75 * x + 0.25 * y, lora.merge(base, adapters[0], spec),
                        lora.merge(base, adapters[1], spec))
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
