"""Does this dataset fit this objective and this model? Checked when the trainer opens it, before compiling.

`open_dataset` already checks a dataset against its own kind's schema. What it cannot know is
what the run will read: a `dpo` objective on a `prompts` dataset, or 16-wide text embeddings
for a transformer whose `joint_attention_dim` is 24, would otherwise fail inside the traced
loss (`KeyError: 'label_0'`) or inside Flax (`ScopeParamShapeError`). `check_dataset` names the
dataset, the field, and the shape expected against the shape found.

What an objective reads is derived from the schema of its `Objective.data` kind (its required
fields) plus the text conditioning every objective feeds the MM-DiT; an objective may
override that with a `required_fields` attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from alignax.data.schemas import get_schema
from alignax.data.source import Source
from alignax.errors import DataError

CONDITIONING = ("encoder_hidden_states", "pooled_projections")
LATENT_FIELDS = ("latents", "latents_0", "latents_1")
IMAGE_FIELDS = ("image", "image_0", "image_1")


def required_fields(objective: Any) -> tuple[str, ...]:
    """The record fields `objective` reads from every batch."""
    declared = getattr(objective, "required_fields", None)
    if declared is not None:
        return tuple(declared)
    schema = get_schema(objective.data)
    return (*schema.required, *(f for f in CONDITIONING if f not in schema.required))


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


class _Shapes:
    """Per-field shapes of a source: the stored feature spec, or record 0 where a dimension is variable."""

    def __init__(self, source: Source):
        self.source = source
        self._first: dict | None = None

    def __call__(self, key: str) -> tuple[int, ...]:
        found = self.source.features[key]
        dims = found[:-1].split("[", 1)[1].split(",") if "[" in found else []
        dims = [d for d in dims if d]
        if all(d.isdigit() for d in dims):
            return tuple(int(d) for d in dims)
        if self._first is None:
            self._first = self.source[0]
        return tuple(np.shape(self._first[key]))


def vae_downsample_factor(vae_config: Any) -> int | None:
    """Pixels per latent pixel of a `VAEConfig` or diffusers AutoencoderKL config dict (None: unknown)."""
    if vae_config is None:
        return None
    factor = getattr(vae_config, "downsample_factor", None)
    if factor is None and _get(vae_config, "block_out_channels"):
        factor = 2 ** (len(_get(vae_config, "block_out_channels")) - 1)
    return factor


def check_dataset(source: Source, objective: Any, transformer_config: Any, vae_config: Any = None, *,
                  encode_on_the_fly: bool = False) -> None:
    """DataError naming `source.path`, the field, and expected vs found, unless the dataset has every
    field `objective` reads and its embedding widths, latent channels and image sizes fit the model.

    `transformer_config` is the MM-DiT config (an `MMDiTConfig` or a diffusers config dict);
    `vae_config` the VAE's (images are checked against its downsampling when given). Image fields
    may vary per record; the first record stands for them. `encode_on_the_fly`
    (config.text.encode='on_the_fly'): the run encodes `prompt` itself, so the text conditioning fields
    are not needed, the `prompt` field is.
    """
    vae_factor = vae_downsample_factor(vae_config)
    where = f"dataset {source.path} (kind {source.kind!r}, split {source.split!r})"
    needed = required_fields(objective)
    if encode_on_the_fly:
        needed = (*(f for f in needed if f not in CONDITIONING), *(("prompt",) if "prompt" not in needed else ()))
    missing = [f for f in needed if f not in source.features]
    if missing:
        hint = (" (or, for a prompts-only dataset, set config.text.encode='on_the_fly' with config.model.pretrained "
                "a pipeline that has its text encoders)"
                if not encode_on_the_fly and set(missing) <= set(CONDITIONING) and "prompt" in source.features
                else "")
        raise DataError(f"{where}: the objective trains on {objective.data!r} records and needs fields {missing}, "
                        f"which this dataset lacks (it has {sorted(source.features)}); point config.data.path at a "
                        f"{objective.data!r} dataset{hint}")
    shape = _Shapes(source)
    widths = {"encoder_hidden_states": "joint_attention_dim", "pooled_projections": "pooled_projection_dim"}
    for key, attr in widths.items():
        want = _get(transformer_config, attr)
        if key in source.features and want is not None and not encode_on_the_fly and shape(key)[-1:] != (want,):
            raise DataError(f"{where}: field {key!r} has shape {list(shape(key))}, but the transformer's {attr}={want}"
                            f" needs a last dimension of {want}; re-encode the prompts with the model's text encoders")
    patch = int(_get(transformer_config, "patch_size") or 1)
    max_grid = _get(transformer_config, "pos_embed_max_size")
    channels = _get(transformer_config, "in_channels")

    def check_grid(key: str, height: int, width: int, per_latent: int) -> None:
        step = per_latent * patch
        if height % step or width % step:
            raise DataError(f"{where}: field {key!r} is {height}x{width}, not divisible by {step} (patch_size="
                            f"{patch}" + (f" × VAE factor {per_latent})" if per_latent > 1 else ")"))
        grid = max(height, width) // step
        if max_grid is not None and grid > max_grid:
            raise DataError(f"{where}: field {key!r} is {height}x{width}, a {grid}-patch side; the transformer's "
                            f"pos_embed_max_size={max_grid} allows at most {max_grid * step}")

    for key in LATENT_FIELDS:
        if key not in source.features:
            continue
        h, w, c = shape(key)
        if channels is not None and c != channels:
            raise DataError(f"{where}: field {key!r} has shape {[h, w, c]}, but the transformer's in_channels="
                            f"{channels} needs {channels} latent channels; re-encode with the model's VAE")
        check_grid(key, h, w, 1)
    if vae_factor:
        for key in IMAGE_FIELDS:
            if key in source.features:
                h, w = shape(key)[:2]
                check_grid(key, h, w, int(vae_factor))
