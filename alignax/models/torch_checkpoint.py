"""Single-file PyTorch checkpoints (`.pt`, `.pth`, `.bin`, `.safetensors`) as numpy state dicts.

Pickles are opened with `torch.load(weights_only=True)` only: a full unpickle would run
whatever code the file names, and reward checkpoints come from many hands. torch is
imported only when a pickle is actually read.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from alignax.errors import WeightsError
from alignax.models import torch_layout, weights_io
from alignax.models.pretrained import Architecture, abstract_params

PyTree = Any


def read_file(path: str | os.PathLike) -> Any:
    """The file's top-level object: a dict of numpy arrays for safetensors, else the weights-only unpickle."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: holds more than tensors (a full pickle, e.g. a training checkpoint with "
                           f"its optimizer or args), which alignax does not unpickle; re-save its state_dict "
                           f"with torch.save or as safetensors ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({e})") from e


def to_numpy(state_dict: Any, source: str) -> dict[str, np.ndarray]:
    """A flat {key: tensor} mapping as numpy arrays (bf16 via fp32, which numpy lacks)."""
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"{source}: expected a state dict (key → tensor), found {type(state_dict).__name__}")
    arrays = {}
    for key, value in state_dict.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif hasattr(value, "detach"):
            value = value.detach().cpu()
            arrays[key] = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
        else:
            raise WeightsError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return arrays


def torch_shapes(template: PyTree) -> dict[str, tuple[int, ...]]:
    """torch key → torch-layout shape of every param in an abstract param tree, without allocating."""
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.uint8(0), s.shape), template)
    return {key: array.shape for key, array in torch_layout.params_to_state_dict(zeros).items()}


def load_params(state_dict: Mapping[str, np.ndarray], architecture: Architecture, module: Any, dtype: Any,
                source: str, *, checked: bool = False) -> PyTree:
    """Checks a torch-named numpy state dict against the module's params (keys, shapes, and, unless the caller
    already did, floating-point dtype and finiteness), then casts it into a Flax tree."""
    template, _ = abstract_params(architecture, module)
    key_to_path = torch_layout.check_state_dict(template, {k: v.shape for k, v in state_dict.items()},
                                                source=source, ignore_unexpected=architecture.ignore_unexpected)
    arrays = ((k, state_dict[k] if checked else weights_io.check_array(state_dict[k], k, source)) for k in key_to_path)
    return torch_layout.state_dict_to_params(arrays, key_to_path, lambda a: jnp.asarray(a, dtype=dtype))
