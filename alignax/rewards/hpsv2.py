"""HPSv2 / HPSv2.1 (Human Preference Score): an open_clip ViT-H/14 fine-tuned on human choices.

Files a user downloads (HF hub `xswu/HPSv2`): `HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt`
(`checkpoint=`), and a CLIP tokenizer directory (`tokenizer=`, e.g. the tokenizer files of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; open_clip's ViT-H-14 uses the standard CLIP BPE).
The score is what HPSv2's `img_score.score` returns: the diagonal of
`image_features @ text_features.T` with both L2-normalised, i.e. the cosine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from alignax.models.pretrained import Pretrained
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

_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}


@register("hpsv2", "hpsv2.1")
def hpsv2(name: str, *, kind: str = "hpsv2", checkpoint: str | None = None, tokenizer: str | None = None,
          model_config: dict | str = "ViT-H-14", benchmark_scale: bool = False, **options: Any) -> Reward:
    """checkpoint: HPS_v2(.1)_compressed.pt (or any open_clip file / transformers CLIP directory).
    tokenizer: directory with a CLIP tokenizer. model_config: open_clip architecture (ViT-H-14).
    benchmark_scale: multiply by 100, as HPSv2's benchmark tables report it.
    options: dtype, compute_dtype, remat (passed to the loader)."""
    source = f"reward {name!r}"
    checkpoint = require_path(checkpoint, name, "checkpoint", _FILES[kind])
    tokenizer = require_path(tokenizer, name, "tokenizer", "CLIP tokenizer directory")
    check_exists(checkpoint, f"{source} checkpoint=")
    tok = load_clip_tokenizer(tokenizer, source=f"{source} tokenizer=")
    model = load_clip(checkpoint, source=f"{source} checkpoint=", open_clip_config=model_config, **options)
    check_vocab(tok, vocab_size(model), f"{source} tokenizer=")
    return hpsv2_reward(name, model, clip_tokenize_fn(tok, name, context_length(model), pad_id=0),
                        benchmark_scale=benchmark_scale)


def hpsv2_reward(name: str, model: Pretrained, tokenize: Callable[[list[str]], dict[str, np.ndarray]], *,
                 benchmark_scale: bool = False) -> Reward:
    """The reward from a loaded CLIP (or an abstract one, as the roofline benchmark compiles)."""
    size, scale = image_size(model), 100.0 if benchmark_scale else 1.0

    def to_score(cosine: jax.Array, params: Any) -> jax.Array:
        return scale * cosine

    return similarity_reward(
        name, model, tokenize=tokenize,
        pixels=lambda images: preprocess.hpsv2_pixels(images, size), to_score=to_score,
        range=f"cosine similarity in [-1, 1]{' x 100' if benchmark_scale else ''}; real images score about "
              f"{'20-35' if benchmark_scale else '0.20-0.35'}",
        preprocessing=f"longest side to {size} (bicubic, antialiased), zero-pad to {size}x{size} "
                      "(left/top get the smaller half), OpenAI mean/std")
