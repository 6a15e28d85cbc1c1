"""The tiny SD3-shaped models and inputs the side-by-side benchmarks share, saved in their real formats.

Small enough for a 2-core CPU, but every piece of the real work is there with its real structure: an MM-DiT
(28x28x16 latents -> 196 image + 77 text tokens, width 384, 4 blocks), a 4-level AutoencoderKL decoding
224x224 images (mid-block attention, as SD3's), and a CLIPModel with a ViT/14 at 224, so the reward's
resize is the identity on both sides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from alignax.models import load_diffusers
from alignax.objectives.base import Models
from experiments.benchmarks import common

TEXT_TOKENS = 77
SHIFT = 3.0
GUIDANCE = 4.5
TRANSFORMER = dict(sample_size=28, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                   attention_head_dim=64, num_attention_heads=6, joint_attention_dim=512,
                   caption_projection_dim=384, pooled_projection_dim=512, pos_embed_max_size=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
           latent_channels=16, norm_num_groups=32, sample_size=224, scaling_factor=1.5305, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False)
CLIP_TEXT = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=TEXT_TOKENS, eos_token_id=999, bos_token_id=998,
                 pad_token_id=999)
CLIP_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   image_size=224, patch_size=14)


def save_transformer_and_vae(root: Path) -> None:
    """Random diffusers models under root/transformer and root/vae (`save_pretrained`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    common.randomize_(SD3Transformer2DModel(**TRANSFORMER), seed=0).save_pretrained(root / "transformer")
    common.randomize_(AutoencoderKL(**VAE), seed=1, scale=0.05).save_pretrained(root / "vae")


def load_alignax(root: Path, rewards: dict | None = None) -> tuple[Models, Any, Any]:
    """(Models, MM-DiT params, VAE params) from root/transformer and root/vae through alignax's own loader,
    with the einsum attention (the fastest on CPU)."""
    transformer = load_diffusers(root / "transformer", attention="einsum")
    vae = load_diffusers(root / "vae")
    models = Models(transformer.module, vae.module, VAE["scaling_factor"], VAE["shift_factor"], rewards=rewards or {})
    return models, transformer.params, vae.params


def save_clip(root: Path) -> None:
    """A random transformers CLIPModel under root/clip."""
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=256))
    common.randomize_(clip, seed=2, scale=0.05).save_pretrained(root / "clip")


def prompt_embeddings(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Prompt embeddings and the empty prompt's (for CFG), under the trainer's batch keys."""
    rng = np.random.default_rng(seed)
    width, pooled = TRANSFORMER["joint_attention_dim"], TRANSFORMER["pooled_projection_dim"]
    return {
        "encoder_hidden_states": rng.standard_normal((batch, TEXT_TOKENS, width)).astype(np.float32),
        "pooled_projections": rng.standard_normal((batch, pooled)).astype(np.float32),
        "negative_encoder_hidden_states": rng.standard_normal((batch, TEXT_TOKENS, width)).astype(np.float32) * 0.5,
        "negative_pooled_projections": rng.standard_normal((batch, pooled)).astype(np.float32) * 0.5,
    }


def clip_token_ids(batch: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask): BOS, random words, EOS, EOS padding, of varying lengths."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, TEXT_TOKENS), CLIP_TEXT["eos_token_id"], np.int32)
    mask = np.zeros((batch, TEXT_TOKENS), np.int32)
    for row in range(batch):
        length = 9 + 5 * row
        ids[row, 0] = CLIP_TEXT["bos_token_id"]
        ids[row, 1:length - 1] = rng.integers(1, CLIP_TEXT["vocab_size"] - 10, length - 2)
        mask[row, :length] = 1
    return ids, mask


def latent_shape(batch: int) -> tuple[int, int, int, int]:
    side = TRANSFORMER["sample_size"]
    return batch, side, side, TRANSFORMER["in_channels"]
