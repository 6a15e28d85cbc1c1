"""The one mapping between Flax param trees and PyTorch state dicts.

alignax modules are named exactly like their PyTorch counterparts (`transformer_blocks.3`,
`to_out.0`), so a param path joined with dots is the torch module path. Only the leaf
differs: Flax `kernel`/`scale`/`embedding` are torch `weight`, Dense kernels are
transposed and conv kernels go HWIO ↔ OIHW.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from alignax.errors import WeightsError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple[str, ...]) -> str:
    return ".".join(path[:-1] + (_LEAF_TO_TORCH.get(path[-1], path[-1]),))


def _to_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and array.ndim == 3:  # Conv1d: WIO -> OIW
        return array.transpose(2, 1, 0)
    return array


def _from_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and array.ndim == 3:
        return array.transpose(2, 1, 0)
    return array


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_torch(path, np.empty(shape, dtype=np.uint8)).shape)


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params → torch-named numpy arrays, in torch layouts."""
    flat = traverse_util.flatten_dict(params)
    return {torch_key(path): np.asarray(_to_torch(path, np.asarray(v))) for path, v in flat.items()}


def check_state_dict(template: Mapping[str, Any], found_shapes: Mapping[str, tuple[int, ...]], *,
                     source: str, ignore_unexpected: Iterable[str] = ()) -> dict[str, tuple[str, ...]]:
    """Checks names and shapes of a checkpoint against the model's param shapes.

    Returns torch key → Flax path. Raises `WeightsError` naming the first offending keys.
    """
    expected = {torch_key(path): (path, _torch_shape(path, tuple(leaf.shape)))
                for path, leaf in traverse_util.flatten_dict(template).items()}
    ignore = [re.compile(p) for p in ignore_unexpected]
    missing = sorted(set(expected) - set(found_shapes))
    unexpected = sorted(k for k in set(found_shapes) - set(expected) if not any(p.fullmatch(k) for p in ignore))
    if missing:
        raise WeightsError(f"{source}: missing key {missing[0]!r} (expected shape {expected[missing[0]][1]})"
                           + (f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else ""))
    if unexpected:
        raise WeightsError(f"{source}: unexpected key {unexpected[0]!r} that the model does not have"
                           + (f" and {len(unexpected) - 1} more: {unexpected[1:6]}" if len(unexpected) > 1 else ""))
    for key, (_, shape) in expected.items():
        if tuple(found_shapes[key]) != shape:
            raise WeightsError(f"{source}: shape mismatch for {key!r}: checkpoint has {tuple(found_shapes[key])}, "
                               f"model expects {shape}")
    return {key: path for key, (path, _) in expected.items()}


def state_dict_to_params(arrays: Iterable[tuple[str, np.ndarray]], key_to_path: Mapping[str, tuple[str, ...]],
                         cast: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """Torch-named arrays (already checked) → nested Flax params, each leaf passed through `cast`."""
    flat = {}
    for key, array in arrays:
        if key in key_to_path:
            path = key_to_path[key]
            flat[path] = cast(_from_torch(path, array))
    return traverse_util.unflatten_dict(flat)
