"""Every shipped experiment config validates; the full-size SD3.5 config refuses missing weights by field
before anything compiles, and its `runlocal` shrink trains through the same objective."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import numpy as np
import pytest

from alignax import config as config_lib
from alignax import mesh as mesh_lib
from alignax.errors import AlignaxError, ConfigError
from alignax.training.trainer import Trainer
from tests.training.conftest import tiny_world  # noqa: F401  (session fixture)

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common", "reward_model_tiny", "identity_tiny"))  # own CLIs' configs


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_validates(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config("")
    config_lib.validate(config, num_devices=8)


ALL_CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py")
                     if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_shipped_config_refuses_an_unknown_option(name):
    """`NAME.py:typo` used to train the default silently (`reward_backprop_tiny.py:draftk` ran mode full)."""
    get_config = importlib.import_module(f"experiments.configs.{name}").get_config
    with pytest.raises(ConfigError, match=rf"{name}\.py:bogus: unknown option 'bogus'; known options: "):
        get_config("bogus")


def test_option_typo_suggests_the_closest_option():
    from experiments.configs import reward_backprop_tiny
    with pytest.raises(ConfigError, match=r"unknown option 'draftk' \(did you mean 'draft_k'\?\); known options: "
                                          r".*full.*chebyshev"):
        reward_backprop_tiny.get_config("draftk")
    with pytest.raises(ConfigError, match=r"2 modes \['refl', 'full'\]"):
        reward_backprop_tiny.get_config("refl,full")
    assert reward_backprop_tiny.get_config("draft_k,kl").objective.mode == "draft_k"
    assert reward_backprop_tiny.get_config(" draft_k , kl ").objective.kl_weight == 0.1


def test_sd35_config_names_the_missing_weights_before_compiling(tmp_path):
    from experiments.configs import sd35_reward_backprop
    config = sd35_reward_backprop.get_config("")
    assert config.lora.enabled and config.model.compute_dtype == "bfloat16" and config.objective.mode == "draft_k"
    with pytest.raises(AlignaxError, match=r"config\.model\.pretrained"):
        Trainer(config, tmp_path / "run")


# slow: compiles the SD3.5 layout's train step (~2 min of CPU); its parity is covered in tests/models
@pytest.mark.slow
def test_sd35_runlocal_trains(tmp_path, tiny_world):  # noqa: F811
    from experiments.configs import sd35_reward_backprop
    config = sd35_reward_backprop.get_config("runlocal")
    config.data.generate, config.data.path = "", tiny_world
    config.total_steps, config.eval_every, config.mesh.shape = 2, 0, (1, 1, 1)
    trainer = Trainer(config, tmp_path / "run", mesh=mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                      async_checkpoints=False)
    result = trainer.run()
    assert result.final_step == 2 and int(result.state["nonfinite"]["total"]) == 0
    assert set(result.state["objective"]) >= {"hps", "aesthetic"}  # running normalisation of both rewards
    start = jax.device_get(trainer.initial_state()["trainable"])
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(result.state["trainable"]), start)
    assert max(jax.tree.leaves(moved)) > 0
