"""Closed-form rewards for objective tests: cheap, exactly differentiable, and able to conflict
(channel_mean(channel=0) rewards red what channel_mean(channel=2) rewards blue)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax.errors import ConfigError
from alignax.rewards.base import Reward, register

# Rec. 709 / sRGB luma weights, applied to the values as given (no gamma decoding).
LUMA = (0.2126, 0.7152, 0.0722)


@register("brightness")
def brightness(name: str) -> Reward:
    def score_fn(params, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        luma = jnp.tensordot(images.astype(jnp.float32), jnp.asarray(LUMA, jnp.float32), axes=([-1], [0]))
        return jnp.mean(luma, axis=(1, 2)), {}

    return Reward(name=name, score_fn=score_fn, range="mean Rec. 709 luma, in [0, 1] for images in [0, 1]",
                  preprocessing="none")


@register("channel_mean")
def channel_mean(name: str, channel: int = 0) -> Reward:
    if isinstance(channel, bool) or channel not in (0, 1, 2):
        raise ConfigError(f"reward {name!r}: channel={channel!r}, expected 0 (R), 1 (G) or 2 (B)")

    def score_fn(params, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        return jnp.mean(images[..., channel].astype(jnp.float32), axis=(1, 2)), {}

    return Reward(name=name, score_fn=score_fn, range=f"mean of channel {channel}, in [0, 1] for images in [0, 1]",
                  preprocessing="none")
