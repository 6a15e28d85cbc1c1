"""The world's captions as SD3 conditioning, encoded by the world pipeline's own CLIP text towers.

`pipeline_encoder(pipeline_dir)` returns `encode(prompts) -> (encoder_hidden_states [N, L, D],
pooled_projections [N, P])`, float32 numpy, exactly what `TextEncoders.encode_prompt` gives with no T5
and `MAX_SEQUENCE_LENGTH` zero T5 tokens (what `StableDiffusion3Pipeline` computes for the same
prompt). Captions repeat a lot in the world, so each distinct caption is encoded once, in fixed-size
batches (one compiled program).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from alignax.world.pipeline import MAX_SEQUENCE_LENGTH

Encode = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def pipeline_encoder(pipeline_dir: str | os.PathLike, *, batch_size: int = 64) -> Encode:
    from alignax.conditioning import TextEncoders

    encoders = TextEncoders.load(pipeline_dir, use_t5=False)

    def encode(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        prompts = [str(p) for p in prompts]
        distinct = sorted(set(prompts))
        hidden, pooled = [], []
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            h, p = encoders.encode_prompt(padded, max_sequence_length=MAX_SEQUENCE_LENGTH)
            hidden.append(np.asarray(h, np.float32)[:len(chunk)])
            pooled.append(np.asarray(p, np.float32)[:len(chunk)])
        index = {prompt: i for i, prompt in enumerate(distinct)}
        rows = np.asarray([index[p] for p in prompts])
        return np.concatenate(hidden)[rows], np.concatenate(pooled)[rows]

    return encode
