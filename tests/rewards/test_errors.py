"""Bad checkpoints, tokenizers, kwargs and batches give errors that name the path, key or field."""

import argparse
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import alignax.rewards
from alignax.errors import ConfigError, DataError, WeightsError
from tests.models.test_aesthetic import MLP
from tests.models.test_siglip import tiny_config as siglip_config
from tests.rewards import references as ref


def hpsv2(paths, **overrides):
    kwargs = dict(checkpoint=paths["open_clip"], tokenizer=paths["tokenizer"], model_config=ref.MODEL_CONFIG)
    return alignax.rewards.get("hpsv2", **{**kwargs, **overrides})


def test_unknown_reward_and_kwargs():
    with pytest.raises(ConfigError, match=r"unknown reward kind 'hps'; choose one of \[.*'hpsv2'"):
        alignax.rewards.get("hps")
    with pytest.raises(ConfigError, match=r"reward 'brightness'.*unexpected keyword argument 'channel'"):
        alignax.rewards.get("brightness", channel=1)
    with pytest.raises(ConfigError, match=r"channel=3, expected 0 \(R\), 1 \(G\) or 2 \(B\)"):
        alignax.rewards.get("channel_mean", channel=3)


def test_missing_required_path_names_the_kwarg():
    with pytest.raises(ConfigError, match=r"reward 'hpsv2\.1' needs checkpoint=<HPS_v2\.1_compressed\.pt>"):
        alignax.rewards.get("hpsv2.1", tokenizer="tok")
    with pytest.raises(ConfigError, match=r"reward 'aesthetic' needs clip="):
        alignax.rewards.get("aesthetic", checkpoint="x.pth")


@pytest.mark.parametrize("name, kwargs, missing", [
    ("hpsv2", dict(checkpoint="{tmp}/HPS_v2_compressed.pt", tokenizer="{tokenizer}"), "HPS_v2_compressed.pt"),
    ("pickscore", dict(checkpoint="{tmp}/PickScore_v1"), "PickScore_v1"),
    ("clip_score", dict(checkpoint="{tmp}/clip-vit-large-patch14"), "clip-vit-large-patch14"),
    # the .pth is checked before the (large) CLIP is read
    ("aesthetic", dict(checkpoint="{tmp}/sac.pth", clip="{hf}"), "sac.pth"),
])
def test_missing_file_names_it(checkpoints, tmp_path, name, kwargs, missing):
    kwargs = {k: v.format(tmp=tmp_path, tokenizer=checkpoints["tokenizer"], hf=checkpoints["hf"])
              for k, v in kwargs.items()}
    with pytest.raises(WeightsError, match=rf"{missing}: not found \(reward '{name}' checkpoint=\)"):
        alignax.rewards.get(name, **kwargs)


def test_missing_tokenizer(checkpoints, tmp_path):
    with pytest.raises(WeightsError, match=r"tok: tokenizer directory not found \(reward 'hpsv2' tokenizer=\)"):
        hpsv2(checkpoints, tokenizer=tmp_path / "tok")
    # PickScore_v1's directory has no tokenizer files: then tokenizer= must name the processor's directory
    bare = tmp_path / "PickScore_v1"
    shutil.copytree(checkpoints["hf"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(WeightsError, match=r"PickScore_v1: no CLIP tokenizer files"):
        alignax.rewards.get("pickscore", checkpoint=bare)
    assert alignax.rewards.get("pickscore", checkpoint=bare, tokenizer=checkpoints["tokenizer"]).params


def test_tokenizer_larger_than_the_text_tower(checkpoints, tmp_path):
    ref.write_tokenizer(tmp_path / "big", extra_tokens=60)  # 117 tokens; the tower has 99 rows
    with pytest.raises(WeightsError, match=r"big: tokenizer ids go up to 116 but the text tower has 99"):
        hpsv2(checkpoints, tokenizer=tmp_path / "big")


def test_wrong_architecture_for_hpsv2(checkpoints):
    """The tiny checkpoint read as the real ViT-H-14 (the default model_config)."""
    with pytest.raises(WeightsError, match=r"HPS_v2_compressed\.pt: missing open_clip key .*is model_config the "
                                           r"checkpoint's architecture"):
        hpsv2(checkpoints, model_config="ViT-H-14")


def test_siglip_directory_is_not_a_clip(tmp_path):
    transformers.SiglipModel(siglip_config()).save_pretrained(tmp_path / "siglip")
    ref.write_tokenizer(tmp_path / "siglip")
    with pytest.raises(WeightsError, match=r"siglip: model_type 'siglip', but reward 'pickscore' checkpoint= needs a "
                                           r"CLIP"):
        alignax.rewards.get("pickscore", checkpoint=tmp_path / "siglip")


def test_aesthetic_head_of_another_width(checkpoints, tmp_path):
    """LAION's real 768-wide head beside the tiny 24-wide CLIP."""
    torch.save(MLP(input_size=768).state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(WeightsError, match=r"linearMSE\.pth: shape mismatch for 'layers\.0\.weight'"):
        alignax.rewards.get("aesthetic", checkpoint=tmp_path / "sac+logos+ava1-l14-linearMSE.pth",
                            clip=checkpoints["hf"])


def test_missing_keys_name_them(checkpoints, tmp_path):
    state = torch.load(checkpoints["open_clip"], weights_only=True)
    del state["visual.ln_post.bias"]
    torch.save(state, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(WeightsError, match=r"missing open_clip key 'visual\.ln_post\.bias'"):
        hpsv2(checkpoints, checkpoint=tmp_path / "HPS_v2_compressed.pt")
    directory = tmp_path / "PickScore_v1"
    shutil.copytree(checkpoints["hf"], directory)
    tensors = load_file(directory / "model.safetensors")
    del tensors["text_projection.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"text_projection\.weight"):
        alignax.rewards.get("pickscore", checkpoint=directory)


def test_pickles_that_are_not_weights_only_are_refused(checkpoints, tmp_path):
    state = torch.load(checkpoints["open_clip"], weights_only=True)
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(WeightsError, match=r"HPS_v2_compressed\.pt: holds more than tensors"):
        hpsv2(checkpoints, checkpoint=tmp_path / "HPS_v2_compressed.pt")
    torch.save(MLP(input_size=24), tmp_path / "aesthetic.pth")
    with pytest.raises(WeightsError, match=r"aesthetic\.pth: holds more than tensors"):
        alignax.rewards.get("aesthetic", checkpoint=tmp_path / "aesthetic.pth", clip=checkpoints["hf"])


def test_batch_without_token_ids(checkpoints):
    reward = alignax.rewards.get("clip_score", checkpoint=checkpoints["hf"])
    images = ref.sample_images(30, 30)
    with pytest.raises(DataError, match=r"batch has no 'clip_score/input_ids'.*reward\.prepare\(prompts\)"):
        reward.apply(reward.params, images, {"hpsv2/input_ids": np.zeros((2, 16), np.int32)})
    with pytest.raises(DataError, match=r"images must be NHWC with 3 channels, found shape \(2, 3, 30, 30\)"):
        reward(images.transpose(0, 3, 1, 2), reward.prepare(ref.PROMPTS))
