"""SigLIP (transformers `model_type: "siglip"`) in Flax.

SigLIP differs from CLIP in what matters to a reward: no class token (the image embedding
comes from an attention-pooling head over the patches), a bidirectional text tower pooled
at the last token, and sigmoid logits with a learned bias. The patch-level features (the
vision tower's `last_hidden_state`) are exposed for feature-alignment objectives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignax.models import layers
from alignax.models import remat as remat_lib
from alignax.models.clip import (
    MLP,
    ContrastiveOutput,
    Encoder,
    EncoderConfig,
    TextEmbeddings,
    VisionConfig,
    VisionEmbeddings,
    attend,
    dummy_inputs,
    l2_normalize,
    read_section,
)
from alignax.models.pretrained import TRANSFORMERS, Architecture, register

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(EncoderConfig):
    vocab_size: int
    max_position_embeddings: int
    projection_size: int


_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                      layer_norm_eps=1e-6)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    text: SiglipTextConfig
    vision: VisionConfig

    @classmethod
    def from_dict(cls, raw: dict) -> SiglipConfig:
        """From transformers' SigLIP config.json; `projection_size` defaults to the text width, as there."""
        text, vision = dict(raw.get("text_config") or {}), dict(raw.get("vision_config") or {})
        if text.get("projection_size") is None:
            text["projection_size"] = text.get("hidden_size", _TEXT_DEFAULTS["hidden_size"])
        if vision.get("vision_use_head", True) is not True:
            raise ValueError(f"vision_config.vision_use_head={vision['vision_use_head']!r}: SiglipModel needs the "
                             "attention-pooling head for its image embedding")
        return cls(text=read_section(SiglipTextConfig, text, _TEXT_DEFAULTS, "text_config"),
                   vision=read_section(VisionConfig, vision, _VISION_DEFAULTS, "vision_config"))


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's params as torch stores them: fused `in_proj_weight` [3D, D]."""

    num_heads: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, key_value: jax.Array) -> jax.Array:
        width = query.shape[-1]
        dtype = self.dtype or query.dtype
        weight = self.param("in_proj_weight", nn.with_logical_partitioning(layers.default_kernel_init,
                                                                           ("heads", "embed")),
                            (3 * width, width), self.param_dtype).astype(dtype)
        bias = self.param("in_proj_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                          (3 * width,), self.param_dtype).astype(dtype)

        def project(x: jax.Array, part: int) -> jax.Array:
            rows = slice(part * width, (part + 1) * width)
            y = jnp.dot(x.reshape(-1, width).astype(dtype), weight[rows].T) + bias[rows]
            return y.reshape(x.shape[0], x.shape[1], self.num_heads, width // self.num_heads)

        out = attend(project(query, 0), project(key_value, 1), project(key_value, 2))
        out = out.reshape(query.shape[0], query.shape[1], width)
        return layers.Linear(width, kernel_axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                             name="out_proj")(out)


class AttentionPoolingHead(nn.Module):
    """SiglipMultiheadAttentionPoolingHead: one learned probe attends over the patches."""

    config: VisionConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                                 (None, None, "embed")),
                           (1, 1, cfg.hidden_size), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = MultiheadAttention(cfg.num_attention_heads, name="attention", **kw)(probe, x)
        h = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="layernorm", **kw)(x)
        return (x + MLP(cfg.intermediate_size, cfg.hidden_act, name="mlp", **kw)(h))[:, 0]


class SiglipTextTransformer(nn.Module):
    """Bidirectional text tower; pooled output is `head` of the last token (padding or not)."""

    config: SiglipTextConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = TextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, name="embeddings",
                           **kw)(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = Encoder(cfg, self.remat, name="encoder", **kw)(x, mask)
        x = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        head = layers.Linear(cfg.projection_size, kernel_axes=("embed", None), name="head", **kw)
        return x, head(x[:, -1])


class SiglipVisionTransformer(nn.Module):
    """ViT without class token; returns (post-norm patch features [B, N, D], pooled [B, D])."""

    config: VisionConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(cfg, class_token=False, patch_bias=True, name="embeddings", **kw)(pixel_values)
        x = Encoder(cfg, self.remat, name="encoder", **kw)(x)
        x = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="post_layernorm", **kw)(x)
        return x, AttentionPoolingHead(cfg, name="head", **kw)(x)


class SiglipModel(nn.Module):
    """transformers' SiglipModel, plus `get_image_patch_features` for patch-level rewards."""

    config: SiglipConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = SiglipTextTransformer(cfg.text, self.remat, **kw)
        self.vision_model = SiglipVisionTransformer(cfg.vision, self.remat, **kw)
        scalar = nn.with_logical_partitioning(nn.initializers.zeros, (None,))
        self.logit_scale = self.param("logit_scale", scalar, (1,), self.param_dtype)
        self.logit_bias = self.param("logit_bias", scalar, (1,), self.param_dtype)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Attention-pooled image embedding [B, D] (transformers' `pooler_output`)."""
        return self.vision_model(pixel_values)[1]

    def get_image_patch_features(self, pixel_values: jax.Array) -> jax.Array:
        """Patch features after post_layernorm [B, num_patches, D] (transformers' `last_hidden_state`)."""
        return self.vision_model(pixel_values)[0]

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Text embedding [B, projection_size]; SigLIP was trained on max_length padding without a mask."""
        return self.text_model(input_ids, attention_mask)[1]

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> ContrastiveOutput:
        image = l2_normalize(self.get_image_features(pixel_values))
        text = l2_normalize(self.get_text_features(input_ids, attention_mask))
        scale, bias = jnp.exp(self.logit_scale.astype(jnp.float32)), self.logit_bias.astype(jnp.float32)
        logits_per_text = text @ image.T * scale + bias
        return ContrastiveOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                 text_embeds=text, image_embeds=image)


def build(config: dict, *, compute_dtype: Dtype | None = None, remat: str = "none") -> SiglipModel:
    """Runtime options: compute dtype (params keep their stored dtype) and a remat policy name."""
    return SiglipModel(SiglipConfig.from_dict(config), remat=remat_lib.check(remat), dtype=compute_dtype)


ARCHITECTURE = register(TRANSFORMERS, Architecture(
    name="siglip", build=build, dummy_inputs=dummy_inputs, weights_stem="model",
    ignore_unexpected=(r"(text|vision)_model\.embeddings\.position_ids",)))
