"""The parity measure every numerical test uses, and a record of what each test measured."""

from __future__ import annotations

import os

import numpy as np

# (test id, error) of every comparison in this session; `pytest --parity-report` prints the worst per test.
MEASURED: list[tuple[str, float]] = []


def max_rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected|: relative to the tensor's scale, not element-wise,
    so near-zero elements do not dominate."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: {actual.shape} vs {expected.shape}")
    scale = np.abs(expected).max()
    err = float(np.abs(actual - expected).max() / (scale if scale > 0 else 1.0))
    MEASURED.append((os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], err))
    return err


def to_numpy(tensor) -> np.ndarray:
    """torch tensor or array → float numpy, detached."""
    if hasattr(tensor, "detach"):
        return tensor.detach().float().cpu().numpy()
    return np.asarray(tensor)
