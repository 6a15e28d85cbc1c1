"""Precomputed SigLIP targets: written into a captioned-images dataset by `alignax.data.siglip_targets`
(its CLI), equal to the SigLIP forward they come from, and trained on by `feature_align`
(targets='batch') through the Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from alignax.data import dataset_splits, open_dataset, siglip_targets
from alignax.errors import WeightsError
from alignax.models import load_transformers
from tests.models.test_siglip import tiny_config
from tests.training.conftest import tiny_world  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[2]


def tiny_siglip_config() -> transformers.SiglipConfig:
    return tiny_config(num_layers=1, image_size=40)  # 40 px / patch 10: the tiny MM-DiT's 4×4 token grid


def save_word_tokenizer(directory: Path, captions: list[str]) -> None:
    """A real transformers tokenizer (tokenizer.json) over the captions' words: SigLIP's own needs its
    sentencepiece file from the hub, but `AutoTokenizer` reads this one the same way."""
    import tokenizers
    words = sorted({w for c in captions for w in c.lower().split()})
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    assert len(vocab) < 99
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.normalizer = tokenizers.normalizers.Lowercase()
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>",
                                         eos_token="</s>").save_pretrained(directory)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, tiny_world):  # noqa: F811
    path = tmp_path_factory.mktemp("siglip")
    transformers.SiglipModel(tiny_siglip_config()).eval().save_pretrained(path)
    source = open_dataset(f"{tiny_world}/captioned_images", "train")
    save_word_tokenizer(path, [source[i]["prompt"] for i in range(len(source))])
    return path


def test_targets_equal_siglip_and_train_feature_align(siglip_dir, tiny_world, tmp_path):  # noqa: F811
    from tests.training.test_trainer import make_trainer
    root = tmp_path / "world"
    dataset = f"{tiny_world}/captioned_images"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-m", "alignax.data.siglip_targets", f"--dataset={dataset}",
                           f"--siglip={siglip_dir}", f"--out={root / 'captioned_images'}", "--batch_size=16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert dataset_splits(str(root / "captioned_images")) == dataset_splits(dataset)

    # Row 3 of the written dataset equals SigLIP on that row alone, through transformers' tokenizer.
    original, written = open_dataset(dataset, "train")[3], open_dataset(str(root / "captioned_images"), "train")[3]
    np.testing.assert_array_equal(written["image"], original["image"])
    siglip = load_transformers(siglip_dir)
    ids = transformers.AutoTokenizer.from_pretrained(siglip_dir)([original["prompt"]], padding="max_length",
                                                                  max_length=16, return_tensors="np")["input_ids"]
    assert (ids > 2).sum() == len(original["prompt"].split())  # every caption word is a known token
    direct = siglip_targets.compute_targets(siglip, original["image"][None], ids)
    for field in ("siglip_text_embeds", "siglip_image_embeds", "siglip_patch_embeds"):
        np.testing.assert_allclose(written[field], direct[field][0], rtol=1e-5, atol=1e-6)
    assert written["siglip_patch_embeds"].shape == (16, 48)

    trainer = make_trainer(tmp_path, str(root), name="fa", **{
        "objective": dict(name="feature_align", sample_posterior=False, targets="batch", target_dim=48,
                          blocks=(0,), granularities=("global", "regional", "token"), regional_grids=(2, 4),
                          global_image=True, head_hidden=16, align_weight=1.0)})
    batch = trainer.device_batch(trainer.make_loader().batch_at(0))
    step, state = trainer.compile(batch), trainer.initial_state()
    losses = []
    for _ in range(8):
        state, metrics = step(state, trainer.frozen, batch)
        losses.append(float(metrics["align_loss"]))
    assert losses[-1] < losses[0], losses  # the heads learn the precomputed targets


def _tiny_clip(image_size: int) -> transformers.CLIPModel:
    torch.manual_seed(0)
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=24, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=image_size, patch_size=8), projection_dim=20)).eval()


def test_clip_targets_are_its_joint_space_features(tiny_world, tmp_path):  # noqa: F811
    """A CLIP (the portrait world's kind) as the target model: pooled image and text features as
    transformers computes them, and the patch tokens post-layernormed and projected into the same space."""
    source = open_dataset(f"{tiny_world}/captioned_images", "train")
    size = source[0]["image"].shape[0]
    reference = _tiny_clip(size)
    reference.save_pretrained(tmp_path / "clip")
    save_word_tokenizer(tmp_path / "clip", [source[i]["prompt"] for i in range(len(source))])
    clip, tokenize = siglip_targets.load_siglip_and_tokenizer(tmp_path / "clip")
    images = np.stack([source[i]["image"] for i in range(3)])
    ids = tokenize([source[i]["prompt"] for i in range(3)])
    ours = siglip_targets.compute_targets(clip, images, ids)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.from_numpy(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        vision = reference.vision_model(pixel_values=pixels)
        patches = reference.visual_projection(reference.vision_model.post_layernorm(vision.last_hidden_state[:, 1:]))
        expected = {"siglip_image_embeds": reference.visual_projection(vision.pooler_output),
                    "siglip_patch_embeds": patches,
                    "siglip_text_embeds": reference.get_text_features(input_ids=torch.from_numpy(ids).long()
                                                                      ).pooler_output}
    for field, value in expected.items():
        np.testing.assert_allclose(ours[field], value.numpy(), rtol=1e-5, atol=1e-6)
    assert ours["siglip_patch_embeds"].shape == (3, (size // 8) ** 2, 20)


def test_bad_checkpoints_are_refused_before_any_work(siglip_dir, tiny_world, tmp_path):  # noqa: F811
    transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16)).save_pretrained(tmp_path / "text_only")
    with pytest.raises(WeightsError, match="'clip_text_model'.*'clip', 'siglip'"):
        siglip_targets.add_targets(f"{tiny_world}/captioned_images", tmp_path / "text_only", tmp_path / "never")
    no_tokenizer = tmp_path / "bare"
    transformers.SiglipModel(tiny_siglip_config()).save_pretrained(no_tokenizer)
    with pytest.raises(WeightsError, match="tokenizer"):
        siglip_targets.add_targets(f"{tiny_world}/captioned_images", no_tokenizer, tmp_path / "never")
    assert not (tmp_path / "never").exists()
