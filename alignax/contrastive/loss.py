"""CLIP's symmetric InfoNCE, with equal captions in one batch treated as positives of each other.

A batch drawn from a world with a closed vocabulary holds repeated captions; with one-hot targets each
repeat would be a false negative, pushing apart an image and a caption that match. Here the targets of
row i are uniform over the columns whose caption equals caption i (`same` [B, B]); with distinct captions
this is exactly CLIP's loss: mean of the image→text and text→image cross-entropies of
`exp(logit_scale) · cos`, logit_scale clamped at log(100) as CLIP does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MAX_LOGIT_SCALE = float(jnp.log(100.0))


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                     same: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss, logits [B_image, B_text]); `same[i, j]` true when captions i and j are equal (default: identity)."""
    logits = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE)) * (
        l2_normalize(image_embeds) @ l2_normalize(text_embeds).T)
    same = jnp.eye(logits.shape[0], dtype=bool) if same is None else same
    targets = same.astype(jnp.float32) / jnp.sum(same, axis=-1, keepdims=True)
    loss = 0.5 * (jnp.mean(optax.softmax_cross_entropy(logits, targets))
                  + jnp.mean(optax.softmax_cross_entropy(logits.T, targets.T)))
    return loss, logits
