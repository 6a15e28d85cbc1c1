"""How big each part of the portrait world is and how long it trains: one `Recipe` per preset.

`full` is the shipped world (`python -m alignax.world.build`); `smoke` shrinks every part to a few steps so
that a test can run the whole build path on 2 CPU cores in about a minute (its models are not meant to
be good). Everything else about the build (which trainer, which data, which objective) is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from alignax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
    # data (alignax.world.data.generate)
    image_size: int
    num_identities: int
    num_train: int
    num_eval: int
    # the VAE (alignax.autoencoder): a diffusers AutoencoderKL config and its training
    vae: dict[str, Any]
    vae_steps: int
    vae_batch: int
    vae_crop: int                # the VAE trains on random crops of this side (0: whole images)
    # the CLIP (alignax.contrastive): vision tower, two text towers, joint width
    clip_vision: dict[str, Any]
    clip_text_l: dict[str, Any]
    clip_text_g: dict[str, Any]
    clip_projection: int
    clip_max_length: int
    clip_steps: int
    clip_batch: int
    # the MM-DiT (alignax.train, objective sft)
    transformer: dict[str, Any]
    sft_steps: int
    sft_batch: int
    sft_learning_rate: float
    # rewards
    identity_crop: int
    identity_model: dict[str, Any]
    identity_steps: int
    scorer_steps: int
    # evaluation of the quality bars
    quality_samples: int
    sample_steps: int


FULL = Recipe(
    image_size=64, num_identities=16, num_train=8192, num_eval=512,
    vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    vae_steps=1500, vae_batch=16, vae_crop=32,
    clip_vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                     patch_size=16),
    clip_text_l=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     hidden_act="quick_gelu"),
    clip_text_g=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                     hidden_act="gelu"),
    clip_projection=64, clip_max_length=32, clip_steps=1500, clip_batch=128,
    transformer=dict(patch_size=2, num_layers=4, attention_head_dim=32, num_attention_heads=3),
    sft_steps=8000, sft_batch=16, sft_learning_rate=3e-4,
    identity_crop=48, identity_model=dict(layers=(1, 1, 1, 1), widths=(32, 64, 96, 128), stem_width=32,
                                          embedding_size=128),
    identity_steps=400, scorer_steps=400,
    quality_samples=128, sample_steps=20,
)

SMOKE = dataclasses.replace(
    FULL, image_size=32, num_identities=4, num_train=64, num_eval=16,
    vae=dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4),
    vae_steps=3, vae_batch=8, vae_crop=16,
    clip_vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    clip_text_l=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     hidden_act="quick_gelu"),
    clip_text_g=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     hidden_act="gelu"),
    clip_projection=8, clip_steps=3, clip_batch=8,
    transformer=dict(patch_size=2, num_layers=1, attention_head_dim=8, num_attention_heads=2),
    sft_steps=3, sft_batch=8,
    identity_crop=32, identity_model=dict(layers=(1, 1, 1, 1), widths=(8, 8, 8, 8), stem_width=8, embedding_size=8),
    identity_steps=3, scorer_steps=3,
    quality_samples=8, sample_steps=2,
)

PRESETS = {"full": FULL, "smoke": SMOKE}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ConfigError(f"--preset={name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]
