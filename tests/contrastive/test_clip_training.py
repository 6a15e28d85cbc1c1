"""alignax.contrastive: the loss against transformers' CLIP loss and a hand computation with duplicate
captions, a tiny run whose retrieval improves, and its saved towers loaded by transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.modeling_clip import image_text_contrastive_loss as clip_loss

from alignax.contrastive import loss as contrastive
from alignax.contrastive import train as clip_train
from alignax.data.pairs_tokens import tiny_world_words, write_word_tokenizer
from alignax.errors import ConfigError
from tests.training.conftest import tiny_world  # noqa: F401  (session fixture)


def config(tiny_world: str, tokenizer: str, **overrides) -> ml_collections.ConfigDict:  # noqa: F811
    c = clip_train.default_config()
    c.total_steps, c.batch_size, c.eval_batch_size, c.eval_every, c.log_every, c.checkpoint_every = 40, 16, 8, 0, 10, 0
    c.model.tokenizer = tokenizer
    c.model.projection_dim = 16
    c.model.vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8)
    c.model.text_towers = [dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                hidden_act="quick_gelu"),
                           dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                hidden_act="gelu")]
    c.data.path = f"{tiny_world}/captioned_images"
    c.optim.learning_rate = 3e-3
    for key, value in overrides.items():
        c[key] = value
    return c


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(write_word_tokenizer(tmp_path_factory.mktemp("tok"), tiny_world_words(), model_max_length=12))


def test_loss_is_clips_and_duplicates_are_joint_positives():
    rng = np.random.default_rng(0)
    image, text, scale = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), np.log(7.0)
    ours, logits = contrastive.contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(scale))
    reference = clip_loss(torch.from_numpy(np.asarray(logits, np.float64)).T)  # transformers: logits per text
    assert float(ours) == pytest.approx(reference.item(), rel=1e-5)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(logits, 7.0 * norm(image) @ norm(text).T, rtol=1e-5)

    captions = np.array(["a", "b", "a", "c", "b"])
    same = captions[:, None] == captions[None]
    ours, logits = contrastive.contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(scale),
                                                jnp.asarray(same))
    logits = np.asarray(logits, np.float64)

    def cross_entropy(rows):  # -sum_j target_ij log softmax_ij, target uniform over the equal captions
        log_p = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
        return -np.mean([log_p[i, same[i]].mean() for i in range(len(rows))])

    assert float(ours) == pytest.approx(0.5 * (cross_entropy(logits) + cross_entropy(logits.T)), rel=1e-5)


def test_a_tiny_run_learns_and_transformers_loads_the_towers(tiny_world, tokenizer, tmp_path):  # noqa: F811
    result = clip_train.run(config(tiny_world, tokenizer), tmp_path / "run")
    first, last = result.evals[0], result.evals[-1]
    assert all(b > a for a, b in zip(first.retrieval, last.retrieval, strict=True)), (first, last)

    out = result.output_dir
    ids = np.asarray(transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")(
        ["a red circle on a blue background"], padding="max_length", max_length=12)["input_ids"])
    for t, folder in enumerate(("text_encoder", "text_encoder_2")):
        reference = transformers.CLIPTextModelWithProjection.from_pretrained(out / folder).eval()
        with torch.no_grad():
            expected = reference(input_ids=torch.from_numpy(ids)).text_embeds.numpy()
        model, _ = clip_train.build_model(config(tiny_world, tokenizer).model, 0)
        ours = np.asarray(model.text_embeds(result.params, t, jnp.asarray(ids)))
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    clip = transformers.CLIPModel.from_pretrained(out / "clip").eval()
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        expected_text = clip.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    model, _ = clip_train.build_model(config(tiny_world, tokenizer).model, 0)
    np.testing.assert_allclose(np.asarray(model.image_embeds(result.params, jnp.asarray(pixels))), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.text_embeds(result.params, 0, jnp.asarray(ids))), expected_text,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # three short runs; the SmallLoop resume machinery is covered in tests/training as well
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_world, tokenizer, tmp_path):  # noqa: F811
    make = lambda: config(tiny_world, tokenizer, total_steps=4, checkpoint_every=2)  # noqa: E731
    straight = clip_train.run(make(), tmp_path / "straight")

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        clip_train.run(make(), tmp_path / "killed", on_step=kill)
    resumed = clip_train.run(make(), tmp_path / "killed")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params), jax.device_get(resumed.params))


def test_bad_config_is_named(tiny_world, tokenizer):  # noqa: F811
    bad = config(tiny_world, tokenizer)
    bad.model.text_towers = [dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  hidden_act="gelu", hiden=3)]
    with pytest.raises(ConfigError, match=r"text_towers\[0\].*hiden"):
        clip_train.validate(bad, 1)
    with pytest.raises(ConfigError, match="config.batch_szie"):
        typo = config(tiny_world, tokenizer)
        typo.batch_szie = 3
        clip_train.validate(typo, 1)
