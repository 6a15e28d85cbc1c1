"""What HPSv2, PickScore and CLIP score share: a CLIP, a tokenizer, a preprocessing, and a
function of cosine(image features, text features)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.errors import DataError, WeightsError
from alignax.models import load_transformers
from alignax.models.clip import l2_normalize
from alignax.models.open_clip_format import load_open_clip
from alignax.models.pretrained import Pretrained
from alignax.rewards.base import Reward, take

PyTree = Any


def check_exists(path: str | os.PathLike, source: str) -> Path:
    """Fails on a missing path before anything big is read; `source` says which reward kwarg it came from."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: not found ({source})")
    return path


def expect_clip(model: Pretrained, path: str | os.PathLike, source: str) -> Pretrained:
    if model.architecture.name != "clip":
        raise WeightsError(f"{path}: model_type {model.architecture.name!r}, but {source} needs a CLIP "
                           "(model_type 'clip')")
    return model


def load_clip(path: str | os.PathLike, *, source: str, open_clip_config: dict | str, **options: Any) -> Pretrained:
    """A transformers CLIP directory (config.json + safetensors) or an open_clip state-dict file."""
    path = check_exists(path, source)
    if path.is_dir() and (path / "config.json").is_file():
        return expect_clip(load_transformers(path, **options), path, source)
    return load_open_clip(path, model_config=open_clip_config, **options)


def image_size(model: Pretrained) -> int:
    return model.module.config.vision.image_size


def context_length(model: Pretrained) -> int:
    return model.module.config.text.max_position_embeddings


def vocab_size(model: Pretrained) -> int:
    return model.module.config.text.vocab_size


def similarity_reward(name: str, model: Pretrained, *, tokenize: Callable[[list[str]], dict[str, np.ndarray]],
                      pixels: Callable[[jax.Array], jax.Array],
                      to_score: Callable[[jax.Array, PyTree], jax.Array], range: str, preprocessing: str) -> Reward:
    """A Reward scoring `to_score(cosine, params)`, with `pixels` mapping NHWC [0, 1] images to the tower's input."""
    module = model.module

    def score_fn(params: PyTree, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        ids, mask = take(batch, name, "input_ids"), take(batch, name, "attention_mask")
        if ids.shape[0] != images.shape[0]:
            raise DataError(f"reward {name!r}: {images.shape[0]} images but {ids.shape[0]} prompts' token ids")
        variables = {"params": params}
        image = module.apply(variables, pixels(images), method="get_image_features")
        text = module.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
        cosine = jnp.sum(l2_normalize(image) * l2_normalize(text), axis=-1)
        return to_score(cosine, params), {"cosine": cosine}

    return Reward(name=name, score_fn=score_fn, params=model.params, specs=model.logical_specs(), tokenize=tokenize,
                  range=range, preprocessing=preprocessing)
