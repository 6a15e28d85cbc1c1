"""A divergence that stays finite: params drifting to 1e30, a loss a thousand times its usual size.

The non-finite guard (NaN/Inf skips, `max_nonfinite_steps`) never sees these, and a sweep would
report such a point as fine. `config.divergence` (off by default) halts the run with a
`DivergenceError` naming the step, the quantity and its running value, when
- |loss| exceeds `loss_factor` × the median of |loss| over the previous `window` finite steps,
- the param norm exceeds `param_norm_factor` × its running median, or is not finite (its
  square overflows float32 once params pass ~1e19), or
- the param norm exceeds `param_norm_max` (when > 0).
The relative checks start once `window` values are in; the absolute bound applies from step 1.
The loss check uses magnitudes, so it suits losses that cross zero only loosely (e.g. z-scored
rewards): keep `loss_factor` large there, or rely on the param-norm checks.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping

import numpy as np

from alignax.errors import AlignaxError


class DivergenceError(AlignaxError, FloatingPointError):
    """The loss or the params grew out of all proportion while staying finite (config.divergence)."""


class DivergenceGuard:
    """Host-side running medians of |loss| and the param norm; `check` returns a message or None."""

    def __init__(self, config: Mapping):
        self.enabled = bool(config.get("enabled", False))
        self.window = int(config.get("window", 20))
        self.loss_factor = float(config.get("loss_factor", 100.0))
        self.param_norm_factor = float(config.get("param_norm_factor", 10.0))
        self.param_norm_max = float(config.get("param_norm_max", 0.0))
        self._loss = collections.deque(maxlen=self.window)
        self._norm = collections.deque(maxlen=self.window)

    def check(self, step: int, row: Mapping[str, float]) -> str | None:
        """The reason this step diverged, or None; then remembers the step's values. Steps the
        non-finite guard skipped (finite == 0) are left to that guard."""
        if not self.enabled or not row.get("finite", 1.0):
            return None
        loss, norm = row.get("loss"), row.get("param_norm")
        reason = None
        if norm is not None:
            if not math.isfinite(norm):
                reason = (f"the param norm is {norm} (its square overflowed float32: params beyond ~1e19)")
            elif self.param_norm_max and norm > self.param_norm_max:
                reason = f"the param norm {norm:.4g} exceeds config.divergence.param_norm_max={self.param_norm_max:g}"
            elif len(self._norm) == self.window and norm > self.param_norm_factor * float(np.median(self._norm)):
                reason = (f"the param norm {norm:.4g} is more than config.divergence.param_norm_factor="
                          f"{self.param_norm_factor:g} × its running median {float(np.median(self._norm)):.4g} "
                          f"over {self.window} steps")
        if reason is None and loss is not None and math.isfinite(loss) and len(self._loss) == self.window:
            running = float(np.median(self._loss))
            if abs(loss) > self.loss_factor * running:
                reason = (f"|loss| {abs(loss):.4g} is more than config.divergence.loss_factor={self.loss_factor:g} × "
                          f"its running median {running:.4g} over {self.window} steps")
        if reason is not None:
            return (f"step {step}: diverged: {reason}; lower optim.learning_rate or tighten optim.grad_clip_norm, "
                    "or loosen/disable config.divergence")
        if loss is not None and math.isfinite(loss):
            self._loss.append(abs(loss))
        if norm is not None:
            self._norm.append(norm)
        return None
