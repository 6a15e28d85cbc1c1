"""Reward settings written as nested dicts in a config file reach the loaders as ConfigDicts: they must load
like plain dicts (today: `TypeError: unhashable type: 'ConfigDict'` for hpsv2/aesthetic `model_config`)."""

import jax
import ml_collections
import numpy as np
import pytest

import alignax.rewards
from alignax.rewards import setup as reward_setup
from tests.rewards import references as ref


@pytest.mark.parametrize("kind, settings", [
    ("hpsv2", lambda p: dict(checkpoint=str(p["open_clip"]), tokenizer=str(p["tokenizer"]),
                             model_config=dict(ref.MODEL_CONFIG))),
    ("aesthetic", lambda p: dict(checkpoint=str(p["aesthetic"]), clip=str(p["open_clip"]),
                                 clip_model_config=dict(ref.MODEL_CONFIG))),
])
def test_model_config_dict_in_a_config_file(checkpoints, kind, settings):
    config = ml_collections.ConfigDict()
    config.judge = dict(kind=kind, **settings(checkpoints))
    setting = "model_config" if kind == "hpsv2" else "clip_model_config"
    assert isinstance(config.judge[setting], ml_collections.ConfigDict)  # what a config file hands over
    built = reward_setup.build(config)["judge"]
    expected = alignax.rewards.get(kind, name="judge", **settings(checkpoints))  # plain dicts
    for a, b in zip(jax.tree.leaves(built.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_array_equal(a, b)
