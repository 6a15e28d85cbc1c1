"""Exponential moving average of the trainable params, updated every `every` steps.

EMA weights usually sample better than the raw weights of a short fine-tune; they are
exported with `python -m alignax.export --ema`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def update(ema: Any, params: Any, step: jax.Array, *, decay: float, every: int) -> Any:
    """ema ← decay·ema + (1 − decay)·params on steps where (step + 1) % every == 0, else unchanged.

    `step` is the step just taken (0-based), so with every=1 the EMA moves on every step.
    """
    take = (step + 1) % every == 0
    rate = jnp.where(take, 1.0 - decay, 0.0)
    return jax.tree.map(lambda e, p: (e + rate.astype(e.dtype) * (p.astype(e.dtype) - e)), ema, params)
