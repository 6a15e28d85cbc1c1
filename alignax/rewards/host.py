"""Non-differentiable rewards computed on the host: any numpy or Python scorer (a detector through
onnxruntime, OCR, counting, a VLM judge) called between sampling and the update.

`host_reward` wraps `score(images: np.ndarray [B,H,W,3] in [0, 1], inputs: {key: np.ndarray}) -> scores [B]`
as a `Reward` flagged `differentiable=False`: inside a jitted step the images leave the device through
`jax.pure_callback` (on `stop_gradient(images)`), so objectives that treat rewards as constants (`grpo`) and
`evaluate` use it, and `reward_backprop`, which needs a gradient from every reward, refuses it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.rewards.base import Reward

HostScore = Callable[[np.ndarray, Mapping[str, np.ndarray]], np.ndarray]


def host_reward(name: str, score: HostScore, *, inputs: tuple[str, ...] = (), range: str = "",
                preprocessing: str = "none", host_fields: tuple[str, ...] = (),
                host_fn: Callable[[Mapping[str, Any]], dict[str, np.ndarray]] | None = None) -> Reward:
    """A `Reward` whose scores come from `score` on the host. `inputs` are the batch keys (usually
    written by `host_fn` from host fields such as the prompt) handed to `score` besides the images."""

    def host(images: np.ndarray, *arrays: np.ndarray) -> np.ndarray:
        scores = np.asarray(score(np.asarray(images), dict(zip(inputs, arrays, strict=True))), np.float32)
        return scores.reshape(images.shape[0])

    def score_fn(params, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        shape = jax.ShapeDtypeStruct((images.shape[0],), jnp.float32)
        arrays = [batch[key] for key in inputs]
        scores = jax.pure_callback(host, shape, jax.lax.stop_gradient(images.astype(jnp.float32)), *arrays,
                                   vmap_method="sequential")
        return scores, {}

    return Reward(name=name, score_fn=score_fn, host_fields=host_fields, host_fn=host_fn, differentiable=False,
                  range=range, preprocessing=preprocessing)
