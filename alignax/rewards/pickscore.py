"""PickScore: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic, scored as `logit_scale.exp() * cosine`.

Files a user downloads: the transformers directory `yuvalkirstain/PickScore_v1` (`checkpoint=`:
config.json + model.safetensors) and the processor's tokenizer, `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
(`tokenizer=`; defaults to `checkpoint` if that directory carries tokenizer files). The image
side follows that processor (CLIPImageProcessor): shortest side 224 bicubic, centre crop
224 (offset floored, as transformers' `center_crop`), OpenAI mean/std.
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


@register("pickscore")
def pickscore(name: str, *, checkpoint: str | None = None, tokenizer: str | None = None, **options: Any) -> Reward:
    """checkpoint: PickScore_v1 transformers directory. tokenizer: CLIP tokenizer directory (default: checkpoint).
    options: dtype, compute_dtype, remat."""
    source = f"reward {name!r}"
    checkpoint = require_path(checkpoint, name, "checkpoint", "PickScore_v1 transformers directory")
    tokenizer = checkpoint if tokenizer is None else tokenizer
    check_exists(checkpoint, f"{source} checkpoint=")
    tok = load_clip_tokenizer(tokenizer, source=f"{source} tokenizer=")
    model = load_clip(checkpoint, source=f"{source} checkpoint=", open_clip_config="ViT-H-14", **options)
    check_vocab(tok, vocab_size(model), f"{source} tokenizer=")
    size = image_size(model)

    def to_score(cosine: jax.Array, params: Any) -> jax.Array:
        return jnp.exp(params["logit_scale"].astype(jnp.float32)) * cosine

    return similarity_reward(
        name, model, tokenize=clip_tokenize_fn(tok, name, context_length(model)),
        pixels=lambda images: preprocess.clip_pixels(images, size, crop_offset="floor"), to_score=to_score,
        range="logit_scale.exp() * cosine, in [-100, 100] for PickScore_v1 (logit scale 100); "
              "real images score about 18-24",
        preprocessing=f"shortest side to {size} (bicubic, antialiased), centre crop {size} (floor offset), "
                      "OpenAI mean/std")
