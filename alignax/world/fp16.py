"""Halving a built world for shipping: every float32 tensor of every `.safetensors` file becomes float16.

The loaders (alignax's and diffusers'/transformers') read float16 files and compute in the dtype they
are asked for, so nothing else changes; the world's quality bars are measured after the conversion, on
what is shipped. Each file is replaced atomically, keeping its metadata (transformers checks `format`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def convert_file(path: Path) -> bool:
    """Rewrites `path` with float32 tensors as float16; False when it held none."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if not any(t.dtype == np.float32 for t in tensors.values()):
        return False
    half = {k: t.astype(np.float16) if t.dtype == np.float32 else t for k, t in tensors.items()}
    scratch = path.with_name(f".{path.name}.partial")
    save_file(half, str(scratch), metadata=metadata)
    os.replace(scratch, path)
    return True


def convert_tree(root: str | os.PathLike) -> list[str]:
    """Converts every `.safetensors` under `root`; returns those rewritten, relative to `root`."""
    root = Path(root)
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*.safetensors")) if convert_file(p)]
