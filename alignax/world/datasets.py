"""Training data for runs on a built portrait world, generated once and cached.

A built world ships weights, not data: the portraits are a function of the seed, so
`config.data.generate='portrait_world'` (alignax.data.setup) calls `ensure(world)`, which writes, under
`$ALIGNAX_CACHE_DIR/portrait_world/<key>/` (the key hashes the world's manifest and the sizes):

    captioned_images/   portraits with the world pipeline's own text conditioning, pre-encoded VAE latents
                        and the world CLIP's feature targets (`siglip_*`: what feature_align aligns to)
    prompts/            the distinct captions with their `identity` (what reward_backprop samples)
    preference_pairs/   the aesthetic preference pairs (what dpo trains on)

Several runs may ask at once (a study's parallel points): each writes a private directory and renames it
into place; the first rename wins and the others discard theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from alignax.world.paths import WorldPaths

NUM_TRAIN = 2048
NUM_EVAL = 256
KINDS = ("captioned_images", "prompts", "preference_pairs")


def vae_latents(vae_dir: str | os.PathLike, batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images -> the SD3-scaled posterior means `(mean - shift) * scale` [N, h, w, C] float32: what
    sft would encode in every step, computed once (the VAE is frozen)."""
    import jax
    import jax.numpy as jnp

    from alignax.models import load_diffusers
    vae = load_diffusers(vae_dir)
    scale, shift = float(vae.module.config.scaling_factor), float(vae.module.config.shift_factor or 0.0)
    encode = jax.jit(lambda p, x: (vae.module.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1.0,
                                                    method="encode_nhwc") - shift) * scale)

    def latents(images: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(encode(vae.params, jnp.asarray(images[i:i + batch_size])), np.float32)
                               for i in range(0, len(images), batch_size)])

    return latents


def key(world: WorldPaths, num_train: int, num_eval: int) -> str:
    manifest = world.read_manifest()
    blob = json.dumps({"world": manifest.get("recipe"), "seed": manifest.get("seed"), "bytes": manifest.get("bytes"),
                       "num_train": num_train, "num_eval": num_eval}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure(world: WorldPaths, *, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL) -> Path:
    """The cached dataset root for `world` (written first when missing)."""
    from alignax.models import remote_weights
    root = remote_weights.cache_dir() / "portrait_world" / key(world, num_train, num_eval)
    if (root / "world.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(world, scratch, num_train=num_train, num_eval=num_eval)
        try:
            os.rename(scratch, root)
        except OSError:  # another run renamed its copy first: the same data, keep that one
            if not (root / "world.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return root


def write(world: WorldPaths, out: Path, *, num_train: int, num_eval: int) -> None:
    """The three datasets of the module docstring under `out` (world.json last)."""
    from alignax.data import siglip_targets
    from alignax.world import data as world_data
    from alignax.world.conditioning import pipeline_encoder

    manifest = world.read_manifest()
    recipe = manifest["recipe"]
    data = world_data.generate(manifest["seed"], size=recipe["image_size"], num_identities=recipe["num_identities"],
                               num_train=num_train, num_eval=num_eval, faces_per_identity=1,
                               references_per_identity=1)
    staging = out / "staging"
    world_data.write_datasets(data, staging, pipeline_encoder(world.pipeline),
                              latents=vae_latents(world.pipeline / "vae"))
    for kind in ("prompts", "preference_pairs"):
        os.replace(staging / kind, out / kind)
    siglip_targets.add_targets(staging / "captioned_images", world.clip, out / "captioned_images")
    os.replace(staging / "world.json", out / "world.json")
    shutil.rmtree(staging)
