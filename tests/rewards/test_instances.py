"""Reward instances vs kinds: `config.rewards.<name>` is the instance, `kind` the registry entry; the batch keys a
reward adds come from the instance name, so two instances of one kind keep their token ids apart."""

import jax
import ml_collections
import numpy as np
import pytest

import alignax.rewards
from alignax.errors import ConfigError
from alignax.rewards import setup as reward_setup
from tests.rewards import references as ref


def test_get_defaults_the_instance_name_to_the_kind():
    reward = alignax.rewards.get("channel_mean", channel=1)
    assert (reward.name, reward.kind) == ("channel_mean", "channel_mean")
    named = alignax.rewards.get("channel_mean", name="green", channel=1)
    assert (named.name, named.kind) == ("green", "channel_mean")


def test_two_clip_score_instances_score_with_their_own_tokens(checkpoints, tmp_path):
    """Two clip_score with different tokenizers: each must read the ids its own tokenizer made. Before instance
    names, both wrote `clip_score/input_ids` in `prepare`, the second overwrote the first, and the first scored
    with the other tokenizer's ids."""
    other = ref.write_tokenizer(tmp_path / "other_tokenizer", extra_tokens=10)  # same BPE, different EOT/BOS ids
    config = ml_collections.ConfigDict({
        "own": dict(kind="clip_score", checkpoint=str(checkpoints["hf"])),
        "other": dict(kind="clip_score", checkpoint=str(checkpoints["hf"]), tokenizer=str(other)),
    })
    reward_setup.validate_config(config)
    rewards = reward_setup.build(config)
    assert {n: (r.name, r.kind) for n, r in rewards.items()} == {"own": ("own", "clip_score"),
                                                                 "other": ("other", "clip_score")}
    batch = reward_setup.prepare(rewards, {"prompt": ref.PROMPTS})
    batch = {k: v for k, v in batch.items() if k != "prompt"}  # strings stay on the host
    assert {"own/input_ids", "other/input_ids"} <= set(batch)
    assert not np.array_equal(batch["own/input_ids"], batch["other/input_ids"])

    images = ref.sample_images(ref.IMAGE_SIZE, ref.IMAGE_SIZE)
    for name, reward in rewards.items():
        alone = reward.prepare(ref.PROMPTS)  # this instance's own ids, nothing else in the batch
        expected, _ = jax.jit(reward.apply)(reward.params, images, alone)
        together, _ = jax.jit(reward.apply)(reward.params, images, batch)
        np.testing.assert_array_equal(np.asarray(together), np.asarray(expected), err_msg=name)
    own, _ = rewards["own"](images, batch)
    other, _ = rewards["other"](images, batch)
    assert not np.allclose(np.asarray(own), np.asarray(other))  # the tokenizers really differ


def test_hpsv2_kind_is_passed_to_a_named_instance():
    with pytest.raises(ConfigError, match=r"reward 'judge' needs checkpoint=<HPS_v2\.1_compressed\.pt>"):
        alignax.rewards.get("hpsv2.1", name="judge", tokenizer="tok")


def test_name_is_not_a_reward_setting():
    with pytest.raises(ConfigError, match=r"config\.rewards\.red: \['name'\]"):
        reward_setup.validate_config(ml_collections.ConfigDict({"red": dict(kind="channel_mean", name="x")}))
