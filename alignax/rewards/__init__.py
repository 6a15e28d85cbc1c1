"""Rewards: `alignax.rewards.get(kind, *, name=kind, **kwargs) -> Reward`, scoring NHWC images in [0, 1].

`kind` is the registry entry; `name` is the instance (`config.rewards.<name>`) and prefixes the batch keys.

    reward = alignax.rewards.get("hpsv2", checkpoint=".../HPS_v2_compressed.pt", tokenizer=".../tokenizer")
    batch = reward.prepare(prompts)                          # host: token ids, numpy
    scores, info = jax.jit(reward.apply)(reward.params, images, batch)
    scores, info = reward(images, batch)                     # same, params closed over

Importing this package registers every reward.
"""

from alignax.rewards import (
    aesthetic,  # noqa: F401  (registers aesthetic)
    attributes,  # noqa: F401  (registers attribute_match: non-differentiable, on the host)
    clip_score,  # noqa: F401  (registers clip_score)
    hpsv2,  # noqa: F401  (registers hpsv2, hpsv2.1)
    identity,  # noqa: F401  (registers identity, identity_aesthetic)
    pickscore,  # noqa: F401  (registers pickscore)
    realism,  # noqa: F401  (registers realism)
    toy,  # noqa: F401  (registers brightness, channel_mean, channel_share)
)
from alignax.rewards.base import REGISTRY, Reward, get, register

__all__ = ["REGISTRY", "Reward", "get", "register"]
