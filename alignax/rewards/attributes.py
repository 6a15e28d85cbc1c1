"""`attribute_match`: the fraction of a tiny-world prompt's attributes a host-side classifier finds in the
image — the shape's colour and the background colour of "a red circle on a blue background" — so 0, ½ or 1.

The classifier is plain numpy: every pixel takes the nearest palette colour; the background is the most
common colour on the border, the shape's colour the most common other colour. Non-differentiable (argmax
and counting), it runs on the host (`alignax.rewards.host`): `grpo` and `evaluate` use it, `reward_backprop`
refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from alignax.data import tiny_world
from alignax.errors import DataError
from alignax.rewards.base import batch_key, register
from alignax.rewards.host import host_reward

COLOURS = tuple(tiny_world.PALETTE)
_PALETTE = np.asarray([tiny_world.PALETTE[c] for c in COLOURS], np.float32) / 255.0
_PROMPT = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")


def requested(prompts: list[str], where: str) -> np.ndarray:
    """[B, 2] palette indices (shape colour, background colour) named by each prompt."""
    out = []
    for prompt in prompts:
        match = _PROMPT.search(prompt)
        if not match or match.group(1) not in COLOURS or match.group(3) not in COLOURS:
            raise DataError(f"{where}: prompt {prompt!r} does not name a shape colour and a background colour "
                            f"of the tiny world ({', '.join(COLOURS)}): 'a red circle on a blue background'")
        out.append((COLOURS.index(match.group(1)), COLOURS.index(match.group(3))))
    return np.asarray(out, np.int32)


def classify(images: np.ndarray) -> np.ndarray:
    """[B, 2] palette indices (shape colour, background colour) found in images [B, H, W, 3] in [0, 1]."""
    distances = np.square(images[..., None, :] - _PALETTE).sum(-1)       # [B, H, W, colours]
    labels = np.argmin(distances, axis=-1)                                # [B, H, W]
    border = np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=1)
    found = []
    for pixels, edge in zip(labels.reshape(len(labels), -1), border, strict=True):
        background = np.bincount(edge, minlength=len(COLOURS)).argmax()
        counts = np.bincount(pixels, minlength=len(COLOURS))
        counts[background] = -1
        found.append((counts.argmax(), background))
    return np.asarray(found, np.int32)


@register("attribute_match")
def attribute_match(name: str) -> Any:
    key = batch_key(name, "requested")

    def host_fn(host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in np.asarray(host_batch["prompt"]).reshape(-1)]
        return {key: requested(prompts, f"reward {name!r}")}

    def score(images: np.ndarray, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.mean(classify(images) == inputs[key], axis=1)

    return host_reward(name, score, inputs=(key,), host_fn=host_fn,
                       range="fraction of the prompt's 2 colour attributes found: 0, 0.5 or 1")
