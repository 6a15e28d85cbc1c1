"""The negative prompt of classifier-free guidance, as precomputed SD3 text embeddings.

SD3 pipelines guide against the *encoded* negative prompt (the empty prompt by default), and
that is not zeros: the CLIP encoders emit BOS/EOS states and a pooled vector even for "".
alignax runs no text encoder, so the embedding is written once with diffusers:

    pipe = StableDiffusion3Pipeline.from_pretrained(PATH)
    context, _, pooled, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False)
    np.savez("negative.npz", encoder_hidden_states=context[0].float().numpy(),
             pooled_projections=pooled[0].float().numpy())

and named by `config.sample.negative_embeddings`. Every row of a batch then carries it as
`negative_encoder_hidden_states` / `negative_pooled_projections` (rows that already have their
own keep them), which is where the sampler's guidance reads it. Without the file, guidance
falls back to zero embeddings: fine for the tiny world, wrong for a real SD3 model, so the
trainer warns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from alignax.errors import DataError

FIELDS = {"encoder_hidden_states": "negative_encoder_hidden_states",
          "pooled_projections": "negative_pooled_projections"}


def load(path: str | os.PathLike, *, joint_attention_dim: int, pooled_projection_dim: int,
         field: str = "config.sample.negative_embeddings") -> dict[str, np.ndarray]:
    """{'negative_encoder_hidden_states': [L, D], 'negative_pooled_projections': [P]} from an `.npz`, checked
    against the MM-DiT's widths."""
    where = f"{field}={os.fspath(path)!r}"
    if not os.path.isfile(path):
        raise DataError(f"{where}: no such file (an .npz with {sorted(FIELDS)})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable .npz ({e})") from e
    missing = [key for key in FIELDS if key not in stored]
    if missing:
        raise DataError(f"{where}: missing arrays {missing}; it has {sorted(stored)}")
    context = _drop_leading_one(stored["encoder_hidden_states"], 2)
    pooled = _drop_leading_one(stored["pooled_projections"], 1)
    if context.ndim != 2 or context.shape[1] != joint_attention_dim:
        raise DataError(f"{where}: encoder_hidden_states has shape {list(stored['encoder_hidden_states'].shape)}, "
                        f"expected [L, {joint_attention_dim}] (the MM-DiT's joint_attention_dim)")
    if pooled.shape != (pooled_projection_dim,):
        raise DataError(f"{where}: pooled_projections has shape {list(stored['pooled_projections'].shape)}, "
                        f"expected [{pooled_projection_dim}] (the MM-DiT's pooled_projection_dim)")
    return {FIELDS["encoder_hidden_states"]: context.astype(np.float32),
            FIELDS["pooled_projections"]: pooled.astype(np.float32)}


def for_run(sample_config: Any, transformer_config: Any) -> dict[str, np.ndarray] | None:
    """The run's negative embeddings, or None; warns when guidance would fall back to zeros."""
    path = sample_config.get("negative_embeddings", "")  # absent from configs saved before it existed
    if not path:
        if sample_config.guidance_scale != 1.0:
            logging.getLogger("alignax").warning(
                "config.sample.guidance_scale=%s with no config.sample.negative_embeddings: guidance runs against "
                "zero text embeddings, which is not what a real SD3 model was trained with (see "
                "alignax/conditioning/negative_prompt.py)", sample_config.guidance_scale)
        return None
    return load(path, joint_attention_dim=transformer_config.joint_attention_dim,
                pooled_projection_dim=transformer_config.pooled_projection_dim)


def guided(batch: Mapping[str, np.ndarray], negatives: Mapping[str, np.ndarray] | None,
           guidance_scale: float) -> dict:
    """`add_to_batch` when guidance is on; the batch unchanged (no extra rows of memory) when it is off."""
    return add_to_batch(batch, negatives) if guidance_scale != 1.0 else dict(batch)


def _drop_leading_one(array: np.ndarray, rank: int) -> np.ndarray:
    return array[0] if array.ndim == rank + 1 and array.shape[0] == 1 else array


def add_to_batch(batch: Mapping[str, np.ndarray], negatives: Mapping[str, np.ndarray] | None) -> dict:
    """The host batch with the negative embeddings broadcast over its rows, unless it has its own."""
    out = dict(batch)
    if not negatives or FIELDS["encoder_hidden_states"] in batch:
        return out
    if "encoder_hidden_states" not in batch:  # prompts encoded on the fly: the negative was encoded alike
        rows = len(batch["prompt"])
        for key, value in negatives.items():
            out[key] = np.broadcast_to(value, (rows, *value.shape))
        return out
    rows = len(batch["encoder_hidden_states"])
    length = np.shape(batch["encoder_hidden_states"])[1]
    negative_context = negatives[FIELDS["encoder_hidden_states"]]
    if negative_context.shape[0] != length:
        raise DataError(f"config.sample.negative_embeddings: {negative_context.shape[0]} text tokens, but the "
                        f"batch's encoder_hidden_states have {length}; encode the negative prompt with the same "
                        "max_sequence_length as the dataset")
    for key, value in negatives.items():
        out[key] = np.broadcast_to(value, (rows, *value.shape))
    return out
