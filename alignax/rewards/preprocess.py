"""Differentiable image preprocessing of the reward models, NHWC in [0, 1] → NCHW normalised.

The reference pipelines resize 8-bit PIL images with PIL's bicubic filter (Keys cubic,
a = -0.5, support widened by the scale factor when shrinking, weights renormalised at
the border). `jax.image.resize(method="bicubic", antialias=True)` is the same filter, so
the only expected difference is PIL's 8-bit rounding (tests/rewards/test_preprocess.py
measures it). Output sizes are Python ints computed with each reference's own rounding
rule, so every shape is static under jit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# OpenAI CLIP's dataset statistics; HPSv2 (open_clip defaults), PickScore's processor and
# LAION's aesthetic script all normalise with them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Top/left offset of a centre crop given the excess length: transformers' `center_crop`
# floors; torchvision's `CenterCrop` (OpenAI clip, LAION's script) rounds half to even.
CROP_OFFSETS: dict[str, Callable[[int], int]] = {
    "floor": lambda excess: excess // 2,
    "round": lambda excess: int(round(excess / 2.0)),
}


def resize(images: jax.Array, height: int, width: int) -> jax.Array:
    """Bicubic resize of NHWC images (antialiased when shrinking, as PIL); identity if the size is already right."""
    if images.shape[1:3] == (height, width):
        return images
    shape = (images.shape[0], height, width, images.shape[3])
    return jax.image.resize(images.astype(jnp.float32), shape, method="bicubic", antialias=True)


def longest_side_sizes(height: int, width: int, size: int) -> tuple[int, int]:
    """open_clip ResizeMaxSize: scale = size / max side, each side `round(side * scale)` (Python round)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def resize_longest_side_and_pad(images: jax.Array, size: int, fill: float = 0.0) -> jax.Array:
    """HPSv2's eval transform (open_clip `ResizeMaxSize(size, fill=0)`): the longest side to `size`, then pad
    to a square with `fill`, the extra pixel of an odd padding going right/bottom.

    open_clip skips both steps when the longest side already equals `size`, which leaves a non-square
    image the ViT cannot take; here such an image is padded (identical for square images).
    """
    height, width = longest_side_sizes(images.shape[1], images.shape[2], size)
    images = resize(images, height, width)
    pad_h, pad_w = size - height, size - width
    if pad_h or pad_w:
        images = jnp.pad(images, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                                  (0, 0)), constant_values=fill)
    return images


def shortest_side_sizes(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers / torchvision Resize(int): the short side to `size`, the long one `int(size * long / short)`."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shortest_side_and_center_crop(images: jax.Array, size: int, crop: int, crop_offset: str) -> jax.Array:
    """CLIP's eval transform: the shortest side to `size` (bicubic), then a centre crop of `crop`."""
    height, width = shortest_side_sizes(images.shape[1], images.shape[2], size)
    images = resize(images, height, width)
    if height < crop or width < crop:
        raise ValueError(f"a {crop}x{crop} crop does not fit the resized {height}x{width} image")
    top, left = CROP_OFFSETS[crop_offset](height - crop), CROP_OFFSETS[crop_offset](width - crop)
    return images[:, top:top + crop, left:left + crop]


def normalize_to_nchw(images: jax.Array, mean: Sequence[float] = OPENAI_MEAN,
                      std: Sequence[float] = OPENAI_STD) -> jax.Array:
    """(x - mean) / std per channel, NHWC → NCHW as the vision towers take pixels."""
    images = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(images, (0, 3, 1, 2))


def hpsv2_pixels(images: jax.Array, size: int) -> jax.Array:
    """HPSv2 / open_clip `image_transform(size, is_train=False, resize_longest_max=True)`."""
    return normalize_to_nchw(resize_longest_side_and_pad(images, size))


def clip_pixels(images: jax.Array, size: int, crop_offset: str) -> jax.Array:
    """CLIPImageProcessor (crop_offset='floor') or OpenAI clip's preprocess (crop_offset='round')."""
    return normalize_to_nchw(resize_shortest_side_and_center_crop(images, size, size, crop_offset))
