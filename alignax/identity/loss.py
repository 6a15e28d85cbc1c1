"""ArcFace (additive angular margin) loss, Deng et al. 2019, as insightface's `ArcFace` head computes it.

The logit of the true class is s·cos(θ + m) and every other logit is s·cos θ, where θ is the angle between
the L2-normalised embedding and the L2-normalised class centre (a column of the head's weight matrix).
cos(θ + m) is computed as cos θ·cos m − sin θ·sin m with sin θ = sqrt(1 − cos²θ) (no arccos, whose
gradient is infinite at ±1). Past θ = π − m, cos(θ + m) would rise again with θ, so the margin would
reward moving away from the class centre; insightface then uses the linear continuation
cos θ − m·sin m ("threshold" handling), or, with `easy_margin`, applies the margin only where cos θ > 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# sin θ = sqrt(1 − cos²θ) has an infinite derivative at cos θ = ±1; below this, the gradient is cut.
_MIN_SIN_SQ = 1e-12


def normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps): torch.nn.functional.normalize (finite gradient at 0)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def cosines(embeddings: jax.Array, centres: jax.Array) -> jax.Array:
    """[B, C] cos θ between embeddings [B, D] and class centres, the columns of `centres` [D, C]."""
    e = normalize(embeddings.astype(jnp.float32), axis=-1)
    w = normalize(centres.astype(jnp.float32), axis=0)
    return jnp.clip(e @ w, -1.0, 1.0)


def margin_cosine(cos: jax.Array, margin: float, *, easy_margin: bool = False) -> jax.Array:
    """cos(θ + m) where it decreases with θ, and insightface's continuation past θ = π − m (or, with
    `easy_margin`, cos θ itself wherever cos θ <= 0)."""
    sin = jnp.sqrt(jnp.clip(1.0 - cos * cos, _MIN_SIN_SQ, 1.0))
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    if easy_margin:
        return jnp.where(cos > 0, phi, cos)
    threshold = math.cos(math.pi - margin)
    return jnp.where(cos > threshold, phi, cos - math.sin(math.pi - margin) * margin)


def arcface_logits(embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *, scale: float, margin: float,
                   easy_margin: bool = False) -> jax.Array:
    """[B, C] logits: s·cos(θ_y + m) for the true class y, s·cos θ_j for the others."""
    cos = cosines(embeddings, centres)
    target = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    phi = margin_cosine(cos, margin, easy_margin=easy_margin)
    return scale * (target * phi + (1.0 - target) * cos)


def arcface_loss(embeddings: jax.Array, centres: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                 margin: float = 0.5, easy_margin: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean cross-entropy of the ArcFace logits, metrics): the training loss of `alignax.identity.train`.

    Metrics: `accuracy` (argmax of the margin-free cosines is the label) and `target_cosine` (mean cos θ_y)."""
    cos = cosines(embeddings, centres)
    target = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    phi = margin_cosine(cos, margin, easy_margin=easy_margin)
    logits = scale * (target * phi + (1.0 - target) * cos)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, target))
    metrics = {"accuracy": jnp.mean((jnp.argmax(cos, axis=-1) == labels).astype(jnp.float32)),
               "target_cosine": jnp.mean(jnp.sum(cos * target, axis=-1))}
    return loss, metrics
