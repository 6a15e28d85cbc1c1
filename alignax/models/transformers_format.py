"""transformers model directories in and out: `load_transformers`, `save_transformers`. No torch needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from alignax.models import hf_directory, weights_io
from alignax.models.pretrained import TRANSFORMERS, Pretrained


def load_transformers(path: str | os.PathLike, *, subfolder: str | None = None, dtype: Any = jnp.float32,
                      **options: Any) -> Pretrained:
    """Loads a transformers model directory, dispatching on config.json's `model_type`."""
    directory = hf_directory.resolve_directory(path, subfolder)
    config = weights_io.read_json(directory / "config.json")
    architecture = hf_directory.pick_architecture(TRANSFORMERS, config, "model_type", directory / "config.json")
    module = hf_directory.build_module(architecture, config, directory / "config.json", **options)
    params = hf_directory.load_params(directory, architecture, module, dtype)
    return Pretrained(module=module, params=params, config=dict(config), architecture=architecture)


def save_transformers(pretrained: Pretrained, out_dir: str | os.PathLike, *, dtype: Any = None,
                      max_shard_size: int | str = "5GB") -> Path:
    """Writes a directory that transformers' `from_pretrained` loads unchanged."""
    config = dict(pretrained.config)
    config["model_type"] = pretrained.architecture.name
    return hf_directory.save_directory(pretrained, out_dir, config=config, dtype=dtype,
                                       max_shard_size=max_shard_size)
