"""The LAION aesthetic predictor ("improved-aesthetic-predictor", `sac+logos+ava1-l14-linearMSE.pth`).

An MLP 768 → 1024 → 128 → 64 → 16 → 1 with dropout between the first layers and no
activations, trained on L2-normalised CLIP ViT-L/14 image embeddings (OpenAI weights,
`openai/clip-vit-large-patch14`). torch's `nn.Sequential` indices (`layers.0, .2, .4, .6, .7`;
the gaps are the Dropouts) are the Flax module names, so the `.pth` keys map directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignax.models import layers, torch_checkpoint
from alignax.models.clip import l2_normalize
from alignax.models.pretrained import Architecture, Pretrained

Dtype = Any

# (nn.Sequential index, output width); the skipped indices are Dropout, a no-op at inference.
_LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))


class AestheticMLP(nn.Module):
    """`__call__` is the torch module's forward; `score` is what the reward uses."""

    input_size: int = 768
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        """[B, input_size] → [B, 1], exactly torch's MLP.forward in eval mode."""
        x = embeddings
        for index, width in _LAYERS:
            # ~1M params: replicated on every device.
            x = layers.Linear(width, kernel_axes=(None, None), dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"layers.{index}")(x)
        return x

    def score(self, image_embeds: jax.Array) -> jax.Array:
        """Aesthetic score [B] of raw CLIP ViT-L/14 image embeddings (`get_image_features`), normalised here."""
        return self(l2_normalize(image_embeds))[:, 0]


def _dummy_inputs(module: AestheticMLP) -> tuple[tuple, dict]:
    return (jnp.zeros((1, module.input_size), jnp.float32),), {}


def _build(config: dict, *, compute_dtype: Dtype | None = None) -> AestheticMLP:
    return AestheticMLP(input_size=config["input_size"], dtype=compute_dtype)


ARCHITECTURE = Architecture(name="laion_aesthetic", build=_build, dummy_inputs=_dummy_inputs,
                            weights_stem="aesthetic")


def load_aesthetic(path: str | os.PathLike, *, input_size: int = 768, dtype: Any = jnp.float32,
                   **options: Any) -> Pretrained:
    """Loads LAION's `.pth` state dict (keys `layers.0.weight` …); `input_size` is the CLIP embedding width."""
    config = {"input_size": input_size}
    module = ARCHITECTURE.build(config, **options)
    state = torch_checkpoint.to_numpy(torch_checkpoint.read_file(Path(path)), str(path))
    params = torch_checkpoint.load_params(state, ARCHITECTURE, module, dtype, str(path))
    return Pretrained(module=module, params=params, config=config, architecture=ARCHITECTURE)
