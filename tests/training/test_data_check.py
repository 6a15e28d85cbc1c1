"""The trainer checks its dataset against the objective and the model when it opens it: before compiling,
with the dataset and field named (today: KeyError 'label_0' in the traced loss, or a Flax shape error)."""

from __future__ import annotations

import os

import pytest

from alignax import mesh as mesh_lib
from alignax.errors import DataError
from alignax.training.trainer import Trainer
from tests.training.conftest import devices, tiny_config


def _trainer(tmp_path, config):
    return Trainer(config, tmp_path / "run", mesh=mesh_lib.make_mesh((1, 1, 1), devices=devices(1)),
                   async_checkpoints=False)


def test_dpo_on_prompts_fails_before_compiling(tmp_path, tiny_world, monkeypatch):
    prompts = os.path.join(tiny_world, "prompts")
    trainer = _trainer(tmp_path, tiny_config(**{"objective": dict(name="dpo"), "data.path": prompts}))
    monkeypatch.setattr(Trainer, "compile", lambda *a: pytest.fail("compiled before checking the dataset"))
    with pytest.raises(DataError, match=rf"dataset {prompts}.*kind 'prompts'.*'preference_pairs' records.*'label_0'"):
        trainer.run()


def test_context_width_mismatch_fails_before_compiling(tmp_path, tiny_world, monkeypatch):
    config = tiny_config(**{"data.path": tiny_world})  # the world's text embeddings are 16 wide
    config.model.transformer.joint_attention_dim = 24
    trainer = _trainer(tmp_path, config)
    monkeypatch.setattr(Trainer, "compile", lambda *a: pytest.fail("compiled before checking the dataset"))
    with pytest.raises(DataError, match=r"captioned_images.*field 'encoder_hidden_states' has shape \[8, 16\].*"
                                        r"joint_attention_dim=24"):
        trainer.run()
