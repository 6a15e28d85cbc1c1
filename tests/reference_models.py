"""Tiny random PyTorch reference models, built inside the tests (no hub, fixed seeds)."""

from __future__ import annotations

import numpy as np
import torch

# Small enough for CPU tests, large enough to exercise every code path.
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
SD35_TINY = dict(SD3_TINY, num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Overwrites every param (norm scales and biases included) with seeded noise, so that a
    wrong transpose, swapped chunk or missing bias cannot hide behind default inits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1.0 + noise if name.endswith("norm_q.weight") or "norm_k" in name
                        or "norm_added" in name else noise)
    return model.eval()


def sd3_transformer(seed: int = 0, **config):
    from diffusers import SD3Transformer2DModel
    return randomize_(SD3Transformer2DModel(**config), seed)


def transformer_inputs(config: dict, batch: int = 2, height: int = 8, width: int = 8, text_len: int = 5,
                       seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        hidden_states=rng.standard_normal((batch, config["in_channels"], height, width)).astype(np.float32),
        timestep=rng.uniform(0, 1000, (batch,)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config["joint_attention_dim"])).astype(np.float32),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32),
    )


def run_torch_transformer(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sample.numpy()
