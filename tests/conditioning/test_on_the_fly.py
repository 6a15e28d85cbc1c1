"""`config.text.encode='on_the_fly'`: a prompts-only dataset trained on with the pipeline's text encoders
encoding inside the compiled step (alignax/conditioning/on_the_fly.py), the negative prompt encoded at
start-up, `evaluate`'s prompts encoded alike, and the errors when the mode cannot work.

The fast trainer test compiles one reward_backprop step (on_the_fly) on the tiny random SD3 pipeline and checks
what it encodes through `OnTheFly.encode`; the slow one compiles the dataset-mode step too and compares.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from alignax import config as config_lib
from alignax import mesh as mesh_lib
from alignax.conditioning import TextEncoders
from alignax.data import open_dataset, write_prompts
from alignax.data.check import check_dataset
from alignax.errors import ConfigError, DataError

PROMPTS = ["portrait of a person", "a red fox", "the blue smiling person", "x"]
T5_LENGTH = 8


@pytest.fixture(scope="module")
def encoders(tiny_sd3_pipeline):
    return TextEncoders.load(tiny_sd3_pipeline)


def _run_config(pipeline: str, data_path: str, encode: str, negative_npz: str = ""):
    from experiments.configs import reward_backprop_tiny
    c = reward_backprop_tiny.get_config("draft_k")
    c.objective.k = 1
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every, c.eval_every = 2, 2, 1, 100, 0
    c.data.generate, c.data.path = "", data_path
    c.mesh.shape = (1, 1, 1)
    c.model.pretrained = pipeline
    c.sample.num_steps, c.sample.guidance_scale = 2, 2.0  # guidance: the negative prompt is used
    c.sample.negative_embeddings = negative_npz
    c.text.encode, c.text.max_sequence_length = encode, T5_LENGTH
    return c


def _losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]


def _train(tmp_path, pipeline: str, name: str, encode: str, npz: str = ""):
    from alignax.training.trainer import Trainer
    c = _run_config(pipeline, str(tmp_path / name), encode, npz)
    mesh = mesh_lib.make_mesh(c.mesh.shape, c.mesh.axes, devices=jax.devices()[:1])
    return Trainer(c, tmp_path / f"run_{name}", mesh=mesh, async_checkpoints=False)


@pytest.fixture(scope="module")
def on_the_fly_run(tmp_path_factory, tiny_sd3_pipeline, encoders):
    """Two reward_backprop steps on a prompts-only dataset, negative '' encoded at start-up; what the step
    encodes for batch 0 (the hook: `OnTheFly.encode`, which train_step applies first) is recorded."""
    tmp_path = tmp_path_factory.mktemp("on_the_fly")
    write_prompts(tmp_path / "only", [{"prompt": p} for p in PROMPTS])
    trainer = _train(tmp_path, tiny_sd3_pipeline, "only", "on_the_fly")
    host = trainer.make_loader().batch_at(0)
    batch = trainer.device_batch(host)
    encoded = jax.jit(trainer.text.encode)(trainer.frozen["text_encoders"], batch)
    info = dict(prompts=[str(p) for p in host["prompt"]], batch_keys=sorted(batch),
                ids_shape=batch["text_ids_t5"].shape, encoded=jax.device_get(encoded),
                has_text_params="text_encoders" in trainer.frozen)
    info["state"] = jax.device_get(trainer.run().state["trainable"])
    info["losses"] = _losses(tmp_path / "run_only")
    return info


def test_prompts_only_run_trains_on_encode_prompt_embeddings(on_the_fly_run, encoders):
    run = on_the_fly_run
    assert run["has_text_params"] and run["ids_shape"] == (2, T5_LENGTH)
    assert "encoder_hidden_states" not in run["batch_keys"]  # the host ships ids, not embeddings
    embeds, pooled = encoders.encode_prompt(run["prompts"], max_sequence_length=T5_LENGTH)
    np.testing.assert_allclose(run["encoded"]["encoder_hidden_states"], np.asarray(embeds), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["encoded"]["pooled_projections"], np.asarray(pooled), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["encoded"]["negative_encoder_hidden_states"][0],
                               np.asarray(encoders.encode_prompt("", max_sequence_length=T5_LENGTH)[0])[0],
                               rtol=1e-5, atol=1e-6)  # the negative prompt '' rides along, encoded once
    assert len(run["losses"]) == 2 and np.all(np.isfinite(run["losses"]))


@pytest.mark.slow
def test_prompts_only_run_equals_run_on_cached_embeddings(tmp_path, tiny_sd3_pipeline, encoders, on_the_fly_run):
    """The same two steps on the prompts with `encode_prompt` embeddings stored in the dataset and the
    negative in an .npz (encode='dataset'): equal losses and params."""
    embeds, pooled = (np.asarray(x) for x in encoders.encode_prompt(PROMPTS, max_sequence_length=T5_LENGTH))
    write_prompts(tmp_path / "cached", [{"prompt": p, "encoder_hidden_states": e, "pooled_projections": q}
                                        for p, e, q in zip(PROMPTS, embeds, pooled, strict=True)])
    negative = [np.asarray(x) for x in encoders.encode_prompt("", max_sequence_length=T5_LENGTH)]
    np.savez(tmp_path / "negative.npz", encoder_hidden_states=negative[0], pooled_projections=negative[1])
    state = _train(tmp_path, tiny_sd3_pipeline, "cached", "dataset", str(tmp_path / "negative.npz")).run().state
    np.testing.assert_allclose(on_the_fly_run["losses"], _losses(tmp_path / "run_cached"), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(on_the_fly_run["state"]), jax.tree.leaves(state["trainable"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_on_the_fly_without_text_encoders_is_a_config_error(tmp_path):
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    c = _run_config(str(tmp_path / "pipe"), str(tmp_path / "data"), "on_the_fly")
    with pytest.raises(ConfigError, match=r"config\.text\.encode='on_the_fly'.*pipe'.*\['tokenizer', 'text_encoder'"):
        config_lib.validate(c)
    c.model.pretrained = ""
    with pytest.raises(ConfigError, match=r"config\.text\.encode='on_the_fly' needs config\.model\.pretrained"):
        config_lib.validate(c)
    c.text.encode = "later"
    with pytest.raises(ConfigError, match=r"config\.text\.encode='later'"):
        config_lib.validate(c)


def test_prompts_only_dataset_is_refused_unless_encoded_on_the_fly(tmp_path):
    import types
    write_prompts(tmp_path / "only", [{"prompt": p} for p in PROMPTS])
    source = open_dataset(str(tmp_path / "only"))
    objective = types.SimpleNamespace(data="prompts")
    transformer = dict(joint_attention_dim=16, pooled_projection_dim=16)
    with pytest.raises(DataError, match=r"needs fields \['encoder_hidden_states', 'pooled_projections'\].*"
                                        r"config\.text\.encode='on_the_fly'"):
        check_dataset(source, objective, transformer)
    check_dataset(source, objective, transformer, encode_on_the_fly=True)


def test_evaluate_encodes_prompts_and_negative_on_the_fly(tmp_path, tiny_sd3_pipeline, encoders):
    from alignax import evaluate
    write_prompts(tmp_path / "data", {"train": [{"prompt": "x"}], "eval": [{"prompt": p} for p in PROMPTS]})
    c = _run_config(tiny_sd3_pipeline, str(tmp_path / "data"), "on_the_fly")
    prompts = evaluate.eval_prompts(c, 2)
    embeds, pooled = encoders.encode_prompt(PROMPTS[:2], max_sequence_length=T5_LENGTH)
    np.testing.assert_allclose(prompts["encoder_hidden_states"], np.asarray(embeds), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prompts["pooled_projections"], np.asarray(pooled), rtol=1e-6, atol=1e-6)
    negative, _ = encoders.encode_prompt("", max_sequence_length=T5_LENGTH)
    np.testing.assert_allclose(prompts["negative_encoder_hidden_states"][1], np.asarray(negative)[0], rtol=1e-6,
                               atol=1e-6)
