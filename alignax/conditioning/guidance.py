"""Classifier-free guidance inputs of one batch: the text conditioning and, when guidance is on, its
unconditional branch.

Every sampler of alignax (the trainer's sample grids, `alignax.evaluate`, reward backprop's
rollouts) builds its conditioning here, so "which embeddings the unconditional branch uses" is
decided once: the batch's `negative_encoder_hidden_states` / `negative_pooled_projections` when
present (`negative_prompt.add_to_batch` puts the encoded negative prompt there), else zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Conditioning(NamedTuple):
    """Text conditioning of one batch; `negative_*` set only when classifier-free guidance is on."""

    context: jax.Array
    pooled: jax.Array
    negative_context: jax.Array | None = None
    negative_pooled: jax.Array | None = None
    guidance_scale: float = 1.0

    def tile(self, copies: int) -> Conditioning:
        """The conditioning of `copies` stacked copies of the batch (copy-major rows)."""
        rep = (lambda a: None if a is None else jnp.concatenate([a] * copies)) if copies > 1 else (lambda a: a)
        return Conditioning(rep(self.context), rep(self.pooled), rep(self.negative_context),
                            rep(self.negative_pooled), self.guidance_scale)


def conditioning(batch: dict, guidance_scale: float) -> Conditioning:
    """The batch's conditioning. With guidance (scale ≠ 1), the unconditional branch uses the
    batch's `negative_encoder_hidden_states` / `negative_pooled_projections` when present, else
    zeros of the same shape (the tiny world has no empty-prompt embedding; SD3 pipelines pass
    the encoded empty prompt, which a data pipeline can store under those keys)."""
    context, pooled = batch["encoder_hidden_states"], batch["pooled_projections"]
    if guidance_scale == 1.0:
        return Conditioning(context, pooled)
    negative_context = batch.get("negative_encoder_hidden_states", jnp.zeros_like(context))
    negative_pooled = batch.get("negative_pooled_projections", jnp.zeros_like(pooled))
    return Conditioning(context, pooled, negative_context, negative_pooled, float(guidance_scale))
