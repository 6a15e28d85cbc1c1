"""The VAE objective: reconstruction (L1, L2, image-gradient) + kl_weight · KL(q(z|x) ‖ N(0, I)).

The KL is averaged over latent elements (not summed), and the reconstruction terms over pixels, so
`kl_weight` means the same at every resolution and latent width. The image-gradient term (L1 between
the horizontal and vertical finite differences of input and reconstruction) keeps thin features such
as eyes, mouths and glasses' rims, which plain pixel losses blur away at small sizes.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) averaged over every element."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def image_gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Finite differences of NHWC images along height and width."""
    return x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1]


def reconstruction_terms(images: jax.Array, reconstruction: jax.Array) -> dict[str, jax.Array]:
    """{'l1', 'l2', 'edge'} between NHWC images in [-1, 1] and their reconstruction."""
    diff = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
    (ih, iw), (rh, rw) = image_gradients(images), image_gradients(reconstruction.astype(jnp.float32))
    return {"l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(jnp.square(diff)),
            "edge": 0.5 * (jnp.mean(jnp.abs(rh - ih)) + jnp.mean(jnp.abs(rw - iw)))}


def vae_loss(images: jax.Array, reconstruction: jax.Array, mean: jax.Array, logvar: jax.Array,
             weights: Mapping[str, float]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted total, every term); `weights` holds l1, l2, edge and kl_weight."""
    terms = {**reconstruction_terms(images, reconstruction), "kl": kl_divergence(mean, logvar)}
    total = (weights["l1"] * terms["l1"] + weights["l2"] * terms["l2"] + weights["edge"] * terms["edge"]
             + weights["kl_weight"] * terms["kl"])
    return total, terms


def psnr(images: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image."""
    mse = jnp.mean(jnp.square(jnp.clip(reconstruction, -1, 1) - images), axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
