"""Closed-form rewards for objective tests and the tiny world: cheap and exactly differentiable.

`channel_mean` of red and of blue do not truly conflict (a white image maximises both).
`channel_share` of red and of blue do: the shares of one pixel sum to at most 1, so each is
maximised only where the other channels are dark, and no image maximises both.
"""

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


@register("channel_share")
def channel_share(name: str, channel: int = 0, eps: float = 1e-2) -> Reward:
    if isinstance(channel, bool) or channel not in (0, 1, 2):
        raise ConfigError(f"reward {name!r}: channel={channel!r}, expected 0 (R), 1 (G) or 2 (B)")
    if not eps > 0:
        raise ConfigError(f"reward {name!r}: eps={eps!r}, expected a positive number")

    def score_fn(params, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = images.astype(jnp.float32)
        share = x[..., channel] / (jnp.sum(x, axis=-1) + eps)
        return jnp.mean(share, axis=(1, 2)), {}

    return Reward(name=name, score_fn=score_fn,
                  range=f"mean per-pixel share of channel {channel} in R+G+B (+eps={eps}), in [0, 1)",
                  preprocessing="none")
