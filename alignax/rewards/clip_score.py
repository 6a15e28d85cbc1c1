"""CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore reports it): 100 * max(cosine, 0).

Files a user downloads: a transformers CLIP directory such as `openai/clip-vit-large-patch14`
(`checkpoint=`; its tokenizer files are used unless `tokenizer=` names another directory).
Preprocessing is that of CLIPProcessor, which torchmetrics uses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from alignax.rewards import preprocess
from alignax.rewards.base import Reward, register, require_path
from alignax.rewards.clip_similarity import (
    check_exists,
    context_length,
    image_size,
    load_clip,
    similarity_reward,
    vocab_size,
)
from alignax.rewards.tokenize import check_vocab, clip_tokenize_fn, load_clip_tokenizer


@register("clip_score")
def clip_score(name: str, *, checkpoint: str | None = None, tokenizer: str | None = None,
               model_config: dict | str = "ViT-L-14", **options: Any) -> Reward:
    """checkpoint: transformers CLIP directory (or open_clip file with `model_config`).
    tokenizer: CLIP tokenizer directory (default: checkpoint). options: dtype, compute_dtype, remat."""
    source = f"reward {name!r}"
    checkpoint = require_path(checkpoint, name, "checkpoint", "transformers CLIP directory")
    tokenizer = checkpoint if tokenizer is None else tokenizer
    check_exists(checkpoint, f"{source} checkpoint=")
    tok = load_clip_tokenizer(tokenizer, source=f"{source} tokenizer=")
    model = load_clip(checkpoint, source=f"{source} checkpoint=", open_clip_config=model_config, **options)
    check_vocab(tok, vocab_size(model), f"{source} tokenizer=")
    size = image_size(model)

    def to_score(cosine: jax.Array, params: Any) -> jax.Array:
        return 100.0 * jnp.maximum(cosine, 0.0)

    return similarity_reward(
        name, model, tokenize=clip_tokenize_fn(tok, name, context_length(model)),
        pixels=lambda images: preprocess.clip_pixels(images, size, crop_offset="floor"), to_score=to_score,
        range="100 * max(cosine, 0), in [0, 100]; matching image-text pairs score about 25-35 with ViT-L/14 "
              "(zero gradient where cosine < 0)",
        preprocessing=f"shortest side to {size} (bicubic, antialiased), centre crop {size} (floor offset), "
                      "OpenAI mean/std")
