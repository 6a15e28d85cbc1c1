"""The portrait world's SD3 pipeline directory, assembled from the parts alignax trained.

`write_pipeline_base` writes a diffusers `StableDiffusion3Pipeline` root without T5 (text_encoder_3 and
tokenizer_3 are null in `model_index.json`, as `StableDiffusion3Pipeline(..., text_encoder_3=None)`
saves it): the two contrastively trained CLIP text towers and their tokenizer, the trained VAE, the
flow-matching scheduler SD3 ships with, and a transformer initialised from the seed. That base is
what the world's `sft` run loads (`config.model.pretrained`), and `alignax.export --pipeline` then
writes the finished pipeline with the trained transformer in place of the random one — the same path
a user's export takes.

Without T5 the SD3 pipeline feeds the transformer zeros for the T5 tokens, `max_sequence_length` of them
(diffusers' default: 256). The world trains with `MAX_SEQUENCE_LENGTH` zero tokens (256 would triple the
transformer's tokens on a CPU), so diffusers loads and samples it as SD3 without T5 is documented to:

    pipe = StableDiffusion3Pipeline.from_pretrained(DIR, text_encoder_3=None, tokenizer_3=None)
    pipe(prompt, max_sequence_length=MAX_SEQUENCE_LENGTH, ...)

`world.json` records the value.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from alignax.errors import WeightsError
from alignax.models import Pretrained, init_params, mmdit, save_diffusers
from alignax.models.weights_io import atomic_directory

MAX_SEQUENCE_LENGTH = 2      # zero "T5" tokens the world trains and samples with (the CLIP tokens carry the text)
SCHEDULER_SHIFT = 3.0        # SD3's FlowMatchEulerDiscreteScheduler shift
DIFFUSERS_VERSION = "0.42.1"

MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": [None, None],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": [None, None],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": SCHEDULER_SHIFT,
    "use_dynamic_shifting": False,
}

# component folder -> (what it must hold, to name in an error)
REQUIRED_FILES = {"text_encoder": "config.json", "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                  "vae": "config.json"}


def text_widths(text_encoder_dirs: Mapping[str, str | os.PathLike]) -> tuple[int, int]:
    """(sum of the towers' hidden sizes, sum of their projection sizes): what SD3's transformer reads as
    the CLIP part of `encoder_hidden_states` and as `pooled_projections`."""
    hidden = projection = 0
    for name in ("text_encoder", "text_encoder_2"):
        config = json.loads((Path(text_encoder_dirs[name]) / "config.json").read_text())
        hidden += int(config["hidden_size"])
        projection += int(config["projection_dim"])
    return hidden, projection


def transformer_config(sizes: Mapping[str, Any], *, joint_attention_dim: int, pooled_projection_dim: int,
                       latent_channels: int, latent_size: int) -> dict[str, Any]:
    """The SD3Transformer2DModel config: `sizes` (layers, heads, head dim, patch) fitted to the text and latent
    widths."""
    return dict(sample_size=latent_size, patch_size=sizes["patch_size"], in_channels=latent_channels,
                out_channels=latent_channels, num_layers=sizes["num_layers"],
                attention_head_dim=sizes["attention_head_dim"], num_attention_heads=sizes["num_attention_heads"],
                joint_attention_dim=joint_attention_dim,
                caption_projection_dim=sizes["attention_head_dim"] * sizes["num_attention_heads"],
                pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=latent_size,
                dual_attention_layers=(), qk_norm=sizes.get("qk_norm"))


def write_pipeline_base(out: str | os.PathLike, *, components: Mapping[str, str | os.PathLike],
                        transformer: Mapping[str, Any], seed: int) -> Path:
    """Writes the pipeline root `out` (atomically) from `components` (folder name -> a directory to copy:
    text_encoder, text_encoder_2, tokenizer, optionally tokenizer_2 (default: tokenizer's), vae) and a
    transformer of config `transformer` initialised from `seed`."""
    for name, needed in REQUIRED_FILES.items():
        if name not in components:
            raise WeightsError(f"pipeline base {out}: no {name!r} component given")
        if not (Path(components[name]) / needed).is_file():
            raise WeightsError(f"{components[name]}: no {needed} (the {name!r} component of the pipeline base {out})")
    architecture = mmdit.ARCHITECTURE
    module = architecture.build(dict(transformer))
    params = jax.device_get(init_params(architecture, module, jax.random.key(seed)))
    with atomic_directory(out) as staging:
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "vae"):
            shutil.copytree(components[name], staging / name)
        shutil.copytree(components.get("tokenizer_2", components["tokenizer"]), staging / "tokenizer_2")
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
        save_diffusers(Pretrained(module, params, dict(transformer), architecture), staging / "transformer",
                       dtype=jnp.float32)
        (staging / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return Path(out)
