"""T5 encoder (transformers `model_type: "t5"`, `T5EncoderModel`) in Flax: SD3's third text encoder.

Layout as transformers stores it, so `torch_layout` maps every param to its torch key without a
table (`encoder.block.3.layer.1.DenseReluDense.wi_0`): a shared token embedding, pre-RMS-norm
blocks, a relative position bias computed by the first block only and reused by all, no
1/sqrt(d) attention scaling, no biases anywhere, and a gated (`gated-gelu`, T5 v1.1 / T5-XXL) or
plain (`relu`, original T5) feed-forward. Dropout is left out: the encoder is only ever run for
inference or differentiated through in eval mode.

The relative-position buckets are a function of the (static) sequence length alone, so they are
computed on the host with numpy in float32 exactly as transformers does in torch: no device's
`log` approximation can move a distance into a neighbouring bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignax.models import layers
from alignax.models import remat as remat_lib
from alignax.models.clip import ACTIVATIONS as CLIP_ACTIVATIONS
from alignax.models.clip import embed
from alignax.models.pretrained import TRANSFORMERS, Architecture, register

Dtype = Any

# transformers' ACT2FN names a T5 config can use in `feed_forward_proj` ('relu', 'gated-gelu', 'gated-silu', ...).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    **CLIP_ACTIVATIONS, "relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder fields of transformers' T5Config; `dense_act_fn` / `is_gated_act` derived as there."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # transformers maps 'gated-gelu' to the tanh approximation for backward compatibility.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, raw: dict) -> T5Config:
        """From a transformers T5 config.json; unknown keys ignored, absent ones defaulted.

        Raises ValueError naming the field for a wrong type, an unknown activation or a bucket
        layout the bucketing formula cannot use."""
        values = {}
        for field in dataclasses.fields(cls):
            value = raw.get(field.name, field.default)
            expected = {"int": (int,), "float": (int, float), "str": (str,)}[field.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(f"{field.name}={value!r}: expected {field.type}")
            if field.type == "int" and value <= 0:
                raise ValueError(f"{field.name}={value!r}: expected a positive int")
            values[field.name] = value
        config = cls(**values)
        parts = config.feed_forward_proj.split("-")
        if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
            raise ValueError(f"feed_forward_proj={config.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT'")
        if config.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={config.feed_forward_proj!r}: activation {config.dense_act_fn!r} "
                             f"is not supported; alignax knows {sorted(ACTIVATIONS)}")
        max_exact = config.relative_attention_num_buckets // 4
        if max_exact < 1 or config.relative_attention_max_distance <= max_exact:
            raise ValueError(f"relative_attention_num_buckets={config.relative_attention_num_buckets}, "
                             f"relative_attention_max_distance={config.relative_attention_max_distance}: need at "
                             "least 4 buckets and a max distance above a quarter of them")
        return config


@functools.lru_cache(maxsize=32)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[length, length] int32 bucket of (key − query) for a bidirectional encoder.

    transformers' `T5Attention._relative_position_bucket(bidirectional=True)` in numpy, with its
    float32 arithmetic in the same order, so the buckets match torch's exactly."""
    positions = np.arange(length, dtype=np.int64)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    table = (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)
    table.setflags(write=False)  # cached: shared by every caller
    return table


class T5Attention(nn.Module):
    """Self-attention without 1/sqrt(d) scaling; the first block also owns the relative position bias."""

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None,
                 mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        batch, length, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv

        def heads(name: str) -> jax.Array:
            y = layers.Linear(inner, kernel_axes=("embed", "heads"), name=name, **kw)(x)
            return y.reshape(batch, length, cfg.num_heads, cfg.d_kv)

        if self.has_relative_attention_bias:
            buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            table = embed(cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads"),
                          "relative_attention_bias", self.dtype, self.param_dtype)
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None].astype(jnp.float32)
        elif position_bias is None:
            raise ValueError("T5Attention without its own relative_attention_bias needs the first block's bias")
        q, k, v = heads("q"), heads("k"), heads("v")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, inner)
        out = layers.Linear(cfg.d_model, kernel_axes=("heads", "embed"), name="o", **kw)(out)
        return out, position_bias


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None,
                 mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.RMSNorm(epsilon=self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        out, position_bias = T5Attention(self.config, self.has_relative_attention_bias, name="SelfAttention",
                                         **kw)(h, position_bias, mask)
        return x + out, position_bias


class T5DenseActDense(nn.Module):
    """`DenseReluDense`: wi → act → wo, or, gated, act(wi_0) * wi_1 → wo."""

    config: T5Config
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(layers.Linear(cfg.d_ff, kernel_axes=("embed", "mlp"), name="wi_0", **kw)(x))
            h = h * layers.Linear(cfg.d_ff, kernel_axes=("embed", "mlp"), name="wi_1", **kw)(x)
        else:
            h = act(layers.Linear(cfg.d_ff, kernel_axes=("embed", "mlp"), name="wi", **kw)(x))
        return layers.Linear(cfg.d_model, kernel_axes=("mlp", "embed"), name="wo", **kw)(h)


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.RMSNorm(epsilon=self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        return x + T5DenseActDense(self.config, name="DenseReluDense", **kw)(h)


class T5Block(nn.Module):
    """`encoder.block.N`: `layer.0` self-attention, `layer.1` feed-forward; returns the bias for the next block."""

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None,
                 mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, name="layer.0",
                                                **kw)(x, position_bias, mask)
        return T5LayerFF(self.config, name="layer.1", **kw)(x), position_bias


class T5Stack(nn.Module):
    """`encoder`: the blocks and the final RMS norm; `remat` (an alignax.models.remat policy name) per block."""

    config: T5Config
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = T5Block if self.remat == "none" else nn.remat(T5Block, policy=remat_lib.POLICIES[self.remat])
        position_bias = None
        for i in range(cfg.num_layers):
            x, position_bias = block(cfg, i == 0, name=f"block.{i}", **kw)(x, position_bias, mask)
        return layers.RMSNorm(epsilon=cfg.layer_norm_epsilon, name="final_layer_norm", **kw)(x)


class T5Encoder(nn.Module):
    """transformers' `T5EncoderModel`: `m(input_ids, attention_mask=None)` → `last_hidden_state` [B, L, d_model].

    `attention_mask=None` attends to every token, padding included, as SD3's `encode_prompt` runs T5."""

    config: T5Config
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), "shared", **kw)(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return T5Stack(cfg, self.remat, name="encoder", **kw)(x, mask)


def dummy_inputs(module: nn.Module) -> tuple[tuple, dict]:
    return (jnp.zeros((1, 1), jnp.int32),), {}


def build(config: dict, *, compute_dtype: Dtype | None = None, remat: str = "none") -> T5Encoder:
    """Runtime options: compute dtype (params keep their stored dtype) and a remat policy name."""
    return T5Encoder(T5Config.from_dict(config), remat=remat_lib.check(remat), dtype=compute_dtype)


# A full T5 (T5ForConditionalGeneration / T5Model) checkpoint loads too: as in transformers'
# T5EncoderModel, its decoder and LM head are skipped. `encoder.embed_tokens.weight` is the tied
# copy of `shared.weight` that older transformers versions also wrote.
ARCHITECTURE = register(TRANSFORMERS, Architecture(
    name="t5", build=build, dummy_inputs=dummy_inputs, weights_stem="model",
    ignore_unexpected=(r"decoder\..*", r"lm_head\.weight"),
    key_aliases=(("shared.weight", "encoder.embed_tokens.weight"),)))
