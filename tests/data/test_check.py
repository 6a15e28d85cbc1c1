"""check_dataset: a dataset that does not fit the objective or the model fails when opened, naming the
dataset, the field and the expected shape (instead of a KeyError in the traced loss or a Flax shape error)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from alignax import config as config_lib
from alignax.data import open_dataset, write_captioned_images, write_preference_pairs, write_prompts
from alignax.data.check import check_dataset, required_fields
from alignax.errors import DataError
from alignax.models.mmdit import MMDiTConfig

TRANSFORMER = MMDiTConfig(**config_lib.TINY_TRANSFORMER)  # joint_attention_dim=16, pooled 16, 4 channels, patch 2
VAE = dict(config_lib.TINY_VAE)  # two blocks: factor 2
SFT, DPO, PROMPTS = (types.SimpleNamespace(data=kind) for kind in ("captioned_images", "preference_pairs", "prompts"))
RNG = np.random.default_rng(0)


def _text(width=16, pooled=16):
    return dict(encoder_hidden_states=RNG.standard_normal((3, width)).astype(np.float32),
                pooled_projections=RNG.standard_normal(pooled).astype(np.float32))


def _image(size=16):
    return RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _prompts(path, **text):
    return open_dataset(write_prompts(path, [dict(prompt=f"p{i}", **_text(**text)) for i in range(2)]))


def _captioned(path, size=16, latents=None):
    rows = [dict(prompt="p", image=_image(size), **_text()) for _ in range(2)]
    if latents is not None:
        rows = [dict(r, latents=RNG.standard_normal(latents).astype(np.float32)) for r in rows]
    return open_dataset(write_captioned_images(path, rows))


def test_fitting_datasets_pass(tmp_path):
    check_dataset(_prompts(tmp_path / "p"), PROMPTS, TRANSFORMER, VAE)
    captioned = _captioned(tmp_path / "c", latents=(8, 8, 4))
    check_dataset(captioned, SFT, TRANSFORMER, VAE)
    check_dataset(captioned, PROMPTS, TRANSFORMER, VAE)  # reward_backprop reads a subset of captioned images


@pytest.mark.parametrize("objective, kind, missing", [
    (DPO, "prompts", "label_0"),
    (SFT, "prompts", "image"),
    (SFT, "preference_pairs", "image"),
])
def test_wrong_kind_for_objective(tmp_path, objective, kind, missing):
    if kind == "prompts":
        source = _prompts(tmp_path / "d")
    else:
        rows = [dict(prompt="p", image_0=_image(), image_1=_image(), label_0=1.0, **_text()) for _ in range(2)]
        source = open_dataset(write_preference_pairs(tmp_path / "d", rows))
    with pytest.raises(DataError, match=rf"dataset {tmp_path}/d.*kind '{kind}'.*'{objective.data}' records.*"
                                        rf"'{missing}'"):
        check_dataset(source, objective, TRANSFORMER, VAE)


def test_dpo_needs_text_conditioning(tmp_path):
    """Preference pairs may omit the embeddings (optional in the schema), but dpo conditions on them."""
    rows = [dict(prompt="p", image_0=_image(), image_1=_image(), label_0=1.0) for _ in range(2)]
    source = open_dataset(write_preference_pairs(tmp_path / "d", rows))
    assert "encoder_hidden_states" in required_fields(DPO)
    with pytest.raises(DataError, match=r"needs fields \['encoder_hidden_states', 'pooled_projections'\]"):
        check_dataset(source, DPO, TRANSFORMER, VAE)


@pytest.mark.parametrize("text, match", [
    (dict(width=16), r"field 'encoder_hidden_states' has shape \[3, 16\].*joint_attention_dim=24"),
    (dict(pooled=8), r"field 'pooled_projections' has shape \[8\].*pooled_projection_dim=16"),
])
def test_embedding_width_mismatch(tmp_path, text, match):
    model = dict(config_lib.TINY_TRANSFORMER, joint_attention_dim=24) if text.get("width") else TRANSFORMER
    with pytest.raises(DataError, match=rf"dataset {tmp_path}/p .*{match}"):
        check_dataset(_prompts(tmp_path / "p", **text), PROMPTS, model, VAE)


@pytest.mark.parametrize("size, latents, match", [
    (16, (8, 8, 16), r"field 'latents' has shape \[8, 8, 16\].*in_channels=4"),
    (16, (7, 8, 4), r"field 'latents' is 7x8, not divisible by 2"),
    (16, (20, 20, 4), r"field 'latents' is 20x20, a 10-patch side.*pos_embed_max_size=8"),
    (18, None, r"field 'image' is 18x18, not divisible by 4 \(patch_size=2 × VAE factor 2\)"),
    (48, None, r"field 'image' is 48x48, a 12-patch side.*pos_embed_max_size=8 allows at most 32"),
])
def test_latents_and_images_must_fit_the_model(tmp_path, size, latents, match):
    with pytest.raises(DataError, match=match):
        check_dataset(_captioned(tmp_path / "c", size=size, latents=latents), SFT, TRANSFORMER, VAE)
