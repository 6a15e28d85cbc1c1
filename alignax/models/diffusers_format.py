"""diffusers model directories in and out: `load_diffusers`, `save_diffusers`. No torch needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from alignax.models import hf_directory, weights_io
from alignax.models.pretrained import DIFFUSERS, Pretrained

DIFFUSERS_VERSION = "0.42.1"  # written into exported configs, as diffusers does


def load_diffusers(path: str | os.PathLike, *, subfolder: str | None = None, dtype: Any = jnp.float32,
                   **options: Any) -> Pretrained:
    """Loads a diffusers model directory, dispatching on config.json's `_class_name`.

    `dtype` is the storage dtype of the returned params; `options` are runtime choices of
    the Flax module (compute dtype, attention kernel, scan, remat), not part of the weights.
    """
    directory = hf_directory.resolve_directory(path, subfolder)
    config = weights_io.read_json(directory / "config.json")
    architecture = hf_directory.pick_architecture(DIFFUSERS, config, "_class_name", directory / "config.json")
    module = hf_directory.build_module(architecture, config, directory / "config.json", **options)
    params = hf_directory.load_params(directory, architecture, module, dtype)
    return Pretrained(module=module, params=params, config=dict(config), architecture=architecture)


def save_diffusers(pretrained: Pretrained, out_dir: str | os.PathLike, *, dtype: Any = None,
                   max_shard_size: int | str = "5GB") -> Path:
    """Writes a directory that diffusers' `from_pretrained` loads unchanged."""
    config = {k: v for k, v in pretrained.config.items() if not k.startswith("_")}
    config.update(_class_name=pretrained.architecture.name, _diffusers_version=DIFFUSERS_VERSION)
    return hf_directory.save_directory(pretrained, out_dir, config=config, dtype=dtype,
                                       max_shard_size=max_shard_size)
