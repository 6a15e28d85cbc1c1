"""Config validation: each bad config fails before any compilation, naming the field."""

from __future__ import annotations

import math

import pytest

from alignax import config as config_lib
from alignax.errors import ConfigError
from experiments.configs import sft_tiny


def tiny():
    return sft_tiny.get_config("")


def with_rewards(c, weights=None):
    c.rewards.red = dict(kind="channel_mean", channel=0)
    c.rewards.blue = dict(kind="channel_mean", channel=2)
    c.pareto.weights = dict(red=1.0, blue=0.0) if weights is None else weights
    return c


def test_shipped_configs_validate():
    config_lib.validate(tiny(), num_devices=8)
    config_lib.validate(sft_tiny.get_config("lora,ema"), num_devices=8)
    config_lib.validate(with_rewards(tiny()), num_devices=8)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.optim.update({"learning_rat": 1e-3}), r"config\.optim\.learning_rat: unknown key"),
    (lambda c: c.update({"totl_steps": 3}), r"config\.totl_steps: unknown key"),
    (lambda c: c.objective.update({"logit_meen": 0.0}), r"config\.objective\.logit_meen: unknown key"),
])
def test_unknown_keys(mutate, field):
    c = tiny()
    mutate(c)
    with pytest.raises(ConfigError, match=field):
        config_lib.validate(c, num_devices=8)


def test_wrong_types():
    # ConfigDict refuses a wrong type on an existing field, but a config file that rebuilds a
    # sub-dict (c.optim = dict(...)) bypasses that; validation catches it.
    c = tiny()
    c.optim = {**c.optim.to_dict(), "learning_rate": "fast"}
    with pytest.raises(ConfigError, match=r"config\.optim\.learning_rate: expected float, found str 'fast'"):
        config_lib.validate(c, num_devices=8)
    c = tiny()
    c.ema = {**c.ema.to_dict(), "enabled": 1}
    with pytest.raises(ConfigError, match=r"config\.ema\.enabled: expected bool, found int"):
        config_lib.validate(c, num_devices=8)
    raw = tiny().to_dict()
    raw["optim"] = 3
    with pytest.raises(ConfigError, match=r"config\.optim: expected a mapping"):
        config_lib.check_against(config_lib.base_config().to_dict(), raw, free_form=config_lib.FREE_FORM)


@pytest.mark.parametrize("shape, devices, match", [
    ((3, 1, 1), 8, r"config\.mesh\.shape=\(3, 1, 1\): product 3 does not divide the 8 devices"),
    ((2, 2, 1), 8, r"config\.mesh\.shape=\(2, 2, 1\): covers 4 devices, but there are 8"),
    ((-1, -1, 1), 8, r"config\.mesh\.shape=\(-1, -1, 1\): sizes must be positive, with at most one -1"),
    ((2, 2), 4, r"config\.mesh\.shape=\(2, 2\) and config\.mesh\.axes"),
])
def test_mesh_shapes(shape, devices, match):
    c = tiny()
    c.mesh.shape = shape
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(c, num_devices=devices)


def test_batch_must_divide_over_data_shards():
    c = tiny()
    c.batch_size = 6
    c.mesh.shape = (4, 2, 1)
    with pytest.raises(ConfigError, match=r"config\.batch_size=6"):
        config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("weights, match", [
    (dict(red=1.0), r"config\.pareto\.weights.*blue"),
    (dict(red=1.0, blue=0.5, green=1.0), r"config\.pareto\.weights.*green"),
    ((1.0,), r"config\.pareto\.weights"),
    (dict(red=-1.0, blue=1.0), r"config\.pareto\.weights.*red"),
    (dict(red=math.nan, blue=1.0), r"config\.pareto\.weights.*red"),
])
def test_weight_vector_must_match_rewards(weights, match):
    c = with_rewards(tiny(), weights)
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(c, num_devices=8)


def test_unknown_reward_kind_and_setting():
    c = with_rewards(tiny())
    c.rewards.red = dict(kind="redness")
    with pytest.raises(ConfigError, match=r"config\.rewards\.red: unknown reward kind 'redness'"):
        config_lib.validate(c, num_devices=8)
    c = with_rewards(tiny())
    c.rewards.red = dict(kind="channel_mean", chanel=0)
    with pytest.raises(ConfigError, match=r"config\.rewards\.red: .*chanel"):
        config_lib.validate(c, num_devices=8)


def test_unknown_objective():
    c = tiny()
    c.objective = dict(name="ppo")
    with pytest.raises(ConfigError, match=r"config\.objective\.name='ppo'"):
        config_lib.validate(c, num_devices=8)


def test_non_positive_numbers():
    c = tiny()
    c.total_steps = 0
    with pytest.raises(ConfigError, match=r"config\.total_steps=0"):
        config_lib.validate(c, num_devices=8)


def _reward_backprop(mode, **fields):
    from experiments.configs import reward_backprop_tiny
    c = reward_backprop_tiny.get_config("")
    c.objective.update(dict(mode=mode, **fields))
    return c


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.sample.update({"guidance_scale": math.nan}), r"config\.sample\.guidance_scale=nan"),
    (lambda c: c.sample.update({"guidance_scale": math.inf}), r"config\.sample\.guidance_scale=inf"),
    (lambda c: c.sample.update({"shift": 0.0}), r"config\.sample\.shift=0\.0"),
    (lambda c: c.sample.update({"shift": -3.0}), r"config\.sample\.shift=-3\.0"),
    (lambda c: c.sample.update({"shift": math.nan}), r"config\.sample\.shift=nan"),
    (lambda c: c.ema.update({"decay": 1.0}), r"config\.ema\.decay=1\.0"),
    (lambda c: c.ema.update({"decay": -0.1}), r"config\.ema\.decay=-0\.1"),
    (lambda c: c.ema.update({"every": 0}), r"config\.ema\.every=0"),
    (lambda c: c.optim.update({"b1": 1.0}), r"config\.optim\.b1=1\.0"),
    (lambda c: c.optim.update({"b2": -0.5}), r"config\.optim\.b2=-0\.5"),
    (lambda c: c.optim.update({"b2": 1.5}), r"config\.optim\.b2=1\.5"),
    (lambda c: c.update({"eval_every": -2}), r"config\.eval_every=-2"),
    (lambda c: c.update({"max_nonfinite_steps": 0}), r"config\.max_nonfinite_steps=0"),
    (lambda c: c.update({"seed": -1}), r"config\.seed=-1"),
    (lambda c: c.update({"seed": 2**32}), r"config\.seed=4294967296"),
])
def test_values_that_run_silently_wrong(mutate, match):
    c = tiny()
    mutate(c)
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("config, match", [
    (lambda: _reward_backprop("draft_k", k=5), r"config\.objective\.k=5: .*num_steps=4"),
    (lambda: _reward_backprop("random_k", k_max=9), r"config\.objective\.k_max=9: .*num_steps=4"),
    (lambda: _reward_backprop("refl", refl_range=(1, 4)), r"config\.objective\.refl_range=\(1, 4\)"),
    (lambda: _reward_backprop("draftk"), r"config\.objective\.mode='draftk'"),
])
def test_objective_steps_checked_by_validate(config, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(config(), num_devices=8)


def test_edge_values_accepted():
    c = tiny()
    c.update(dict(seed=2**32 - 1, eval_every=0, max_nonfinite_steps=1))
    c.ema.update(dict(decay=0.0, every=1))
    c.optim.update(dict(b1=0.0, b2=0.0))
    c.sample.update(dict(guidance_scale=0.0, shift=1.0))
    config_lib.validate(c, num_devices=8)
    c.eval_every = -1  # the derived "about 4 grids per run"
    config_lib.validate(c, num_devices=8)
    config_lib.validate(_reward_backprop("draft_k", k=4), num_devices=8)
