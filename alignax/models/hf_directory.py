"""Load and save models in HF directory layout (config.json + safetensors), shared by the
diffusers and transformers loaders; they differ only in which config field names the class."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.errors import WeightsError
from alignax.models import torch_layout, weights_io
from alignax.models.pretrained import Architecture, Pretrained, abstract_params


def resolve_directory(path: str | os.PathLike, subfolder: str | None) -> Path:
    directory = Path(path) / subfolder if subfolder else Path(path)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a directory (expected a model directory with config.json)")
    return directory


def pick_architecture(registry: dict[str, Architecture], config: dict, field: str, source: Path) -> Architecture:
    name = config.get(field)
    if name not in registry:
        raise WeightsError(f"{source}: unknown {field} {name!r}; alignax knows {sorted(registry)}")
    return registry[name]


def build_module(architecture: Architecture, config: dict, source: Path, **options: Any):
    try:
        return architecture.build(config, **options)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: config does not describe a valid {architecture.name}: {e}") from e


def load_params(directory: Path, architecture: Architecture, module, dtype) -> Any:
    """Checks every key and shape from the safetensors headers, then reads and casts the data."""
    infos = weights_io.read_header(directory, architecture.weights_stem)
    stored = {key: key for key in infos}  # model key -> key in the files
    for key, alias in architecture.key_aliases:
        if alias in stored:
            del stored[alias]
            if key not in stored:
                stored[key] = alias
    template, _ = abstract_params(architecture, module)
    key_to_path = torch_layout.check_state_dict(
        template, {k: infos[s].shape for k, s in stored.items()}, source=str(directory),
        ignore_unexpected=architecture.ignore_unexpected)
    model_key = {s: k for k, s in stored.items()}
    arrays = ((model_key[s], a) for s, a in weights_io.load_tensors(infos, [stored[k] for k in key_to_path]))
    return torch_layout.state_dict_to_params(arrays, key_to_path, lambda a: jnp.asarray(a, dtype=dtype))


def save_directory(pretrained: Pretrained, out_dir: str | os.PathLike, *, config: dict, dtype=None,
                   max_shard_size: int | str = "5GB") -> Path:
    """Writes config.json and safetensors atomically: `out_dir` appears complete or not at all."""
    params = jax.device_get(pretrained.params)
    if dtype is not None:
        params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), params)
    tensors = torch_layout.params_to_state_dict(params)
    with weights_io.atomic_directory(out_dir) as tmp:
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        weights_io.write_tensors(tensors, tmp, pretrained.architecture.weights_stem, max_shard_size)
    return Path(out_dir)
