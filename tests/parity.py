"""Numerical comparison used by every parity test."""

import numpy as np


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: relative to the tensor's scale, so values
    near zero do not blow the ratio up. Parity in fp32 means <= 1e-5."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def to_numpy(tensor) -> np.ndarray:
    """torch tensor or array → float numpy, detached."""
    if hasattr(tensor, "detach"):
        return tensor.detach().float().cpu().numpy()
    return np.asarray(tensor)
