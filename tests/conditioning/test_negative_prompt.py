"""The negative prompt of classifier-free guidance: loaded and checked from its .npz, broadcast into batches,
and really used by the training sampler and the sample grids (not the zero fallback)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from alignax.conditioning import negative_prompt
from alignax.errors import DataError
from tests.training.conftest import pretrained_root, tiny_world  # noqa: F401  (session fixtures)

L, D, P = 5, 16, 16


def write(path, context_shape=(L, D), pooled_shape=(P,), **extra):
    rng = np.random.default_rng(0)
    arrays = {"encoder_hidden_states": rng.standard_normal(context_shape).astype(np.float32),
              "pooled_projections": rng.standard_normal(pooled_shape).astype(np.float32), **extra}
    np.savez(path, **arrays)
    return arrays


def test_load_accepts_pipeline_shapes_and_names_what_is_wrong(tmp_path):
    arrays = write(tmp_path / "neg.npz", (1, L, D), (1, P))  # encode_prompt's [1, L, D] / [1, P]
    loaded = negative_prompt.load(tmp_path / "neg.npz", joint_attention_dim=D, pooled_projection_dim=P)
    np.testing.assert_array_equal(loaded["negative_encoder_hidden_states"], arrays["encoder_hidden_states"][0])
    np.testing.assert_array_equal(loaded["negative_pooled_projections"], arrays["pooled_projections"][0])

    with pytest.raises(DataError, match="no such file"):
        negative_prompt.load(tmp_path / "absent.npz", joint_attention_dim=D, pooled_projection_dim=P)
    np.savez(tmp_path / "half.npz", encoder_hidden_states=np.zeros((L, D), np.float32))
    with pytest.raises(DataError, match=r"half\.npz.*missing arrays \['pooled_projections'\]"):
        negative_prompt.load(tmp_path / "half.npz", joint_attention_dim=D, pooled_projection_dim=P)
    write(tmp_path / "wide.npz", (L, D + 1))
    with pytest.raises(DataError, match=r"encoder_hidden_states has shape \[5, 17\], expected \[L, 16\]"):
        negative_prompt.load(tmp_path / "wide.npz", joint_attention_dim=D, pooled_projection_dim=P)
    write(tmp_path / "pooled.npz", pooled_shape=(P - 1,))
    with pytest.raises(DataError, match=r"pooled_projections has shape \[15\], expected \[16\]"):
        negative_prompt.load(tmp_path / "pooled.npz", joint_attention_dim=D, pooled_projection_dim=P)


def test_broadcast_into_batches_keeps_rows_own_and_checks_length(tmp_path):
    write(tmp_path / "neg.npz")
    negatives = negative_prompt.load(tmp_path / "neg.npz", joint_attention_dim=D, pooled_projection_dim=P)
    batch = {"encoder_hidden_states": np.ones((3, L, D), np.float32), "pooled_projections": np.ones((3, P))}
    out = negative_prompt.add_to_batch(batch, negatives)
    assert out["negative_encoder_hidden_states"].shape == (3, L, D)
    np.testing.assert_array_equal(out["negative_pooled_projections"][2], negatives["negative_pooled_projections"])
    own = {**batch, "negative_encoder_hidden_states": np.zeros((3, L, D)),
           "negative_pooled_projections": np.zeros((3, P))}
    assert negative_prompt.add_to_batch(own, negatives)["negative_encoder_hidden_states"].max() == 0
    assert "negative_encoder_hidden_states" not in negative_prompt.guided(batch, negatives, 1.0)
    short = {**batch, "encoder_hidden_states": np.ones((3, L + 2, D), np.float32)}
    with pytest.raises(DataError, match="5 text tokens, but the batch's encoder_hidden_states have 7"):
        negative_prompt.add_to_batch(short, negatives)


def test_trainer_guides_against_the_configured_negatives(tmp_path, tiny_world, pretrained_root):  # noqa: F811
    """reward_backprop with guidance, from a non-trivial pretrained model (a random init is adaLN-Zero and
    ignores its conditioning): the batch carries the file's negatives, the loss and the sample grid differ
    from the zero fallback's, and a bad file is refused when the Trainer is built."""
    from alignax.data import open_dataset
    from tests.objectives.test_reward_backprop import trainer_for
    length = open_dataset(f"{tiny_world}/prompts", "train")[0]["encoder_hidden_states"].shape[0]
    write(tmp_path / "neg.npz", (length, D))
    guided = {"sample.guidance_scale": 3.0, "model.pretrained": pretrained_root}
    with_file = trainer_for(tmp_path, tiny_world, "file", arg="draft_k",
                            **guided, **{"sample.negative_embeddings": str(tmp_path / "neg.npz")})
    zeros = trainer_for(tmp_path, tiny_world, "zeros", arg="draft_k", **guided)
    batch = with_file.device_batch(with_file.make_loader().batch_at(0))
    np.testing.assert_array_equal(np.asarray(batch["negative_pooled_projections"])[1],
                                  with_file.negatives["negative_pooled_projections"])
    plain = zeros.device_batch(zeros.make_loader().batch_at(0))
    assert "negative_encoder_hidden_states" not in plain
    state = with_file.initial_state()["trainable"]
    loss = lambda t, b: jax.jit(t.objective.loss)(state, t.frozen, t.initial_state()["objective"], b,  # noqa: E731
                                                  jax.random.key(0))[0]
    assert float(loss(with_file, batch)) != float(loss(zeros, plain))
    conditioning = {k: plain[k][:2] for k in ("encoder_hidden_states", "pooled_projections")}
    negatives = {k: np.asarray(batch[k][:2]) for k in batch if k.startswith("negative_")}
    images_file = with_file.sample_images(state, {**conditioning, **negatives})
    images_zero = zeros.sample_images(state, conditioning)
    assert np.abs(np.asarray(images_file) - np.asarray(images_zero)).max() > 1e-4

    with pytest.raises(DataError, match=r"config\.sample\.negative_embeddings=.*absent\.npz.*no such file"):
        trainer_for(tmp_path, tiny_world, "bad", arg="draft_k",
                    **guided, **{"sample.negative_embeddings": str(tmp_path / "absent.npz")})
