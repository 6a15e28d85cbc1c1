"""CLIP (transformers `model_type: "clip"`) in Flax: text and vision towers, projections, logit scale.

CLIP is the backbone of PickScore, HPSv2 (loaded through `open_clip_format`) and the LAION
aesthetic predictor; `CLIPTextModelWithProjection` (`model_type: "clip_text_model"`) is SD3's
`text_encoder` / `text_encoder_2`. Submodules carry transformers' names (`vision_model.encoder.layers.3.
self_attn.q_proj`, `pre_layrnorm` with its typo), so `torch_layout` maps each param to its
torch key without a table. SigLIP reuses the encoder, the config reader and the output type.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from alignax.models import layers
from alignax.models import remat as remat_lib
from alignax.models.pretrained import TRANSFORMERS, Architecture, register

Dtype = Any
T = TypeVar("T")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# Before transformers PR #24773 CLIP configs carried eos_token_id=2 and transformers kept their
# pooling at argmax(input_ids) (the EOT token has the highest id); open_clip pools the same way.
LEGACY_EOS_TOKEN_ID = 2

_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The fields every transformers text or vision tower config shares."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class TextConfig(EncoderConfig):
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int


@dataclasses.dataclass(frozen=True)
class VisionConfig(EncoderConfig):
    image_size: int
    patch_size: int
    num_channels: int


def read_section(cls: type[T], raw: dict, defaults: dict[str, Any], section: str) -> T:
    """Builds `cls` from one config.json section: unknown keys ignored, absent ones defaulted.

    Raises ValueError naming `section.field` for a wrong type, an unknown `hidden_act` or
    a width that the heads do not divide.
    """
    values = {}
    for field in dataclasses.fields(cls):
        value = raw[field.name] if field.name in raw else defaults[field.name]
        if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[field.type]):
            raise ValueError(f"{section}.{field.name}={value!r}: expected {field.type}")
        values[field.name] = value
    if values["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{section}.hidden_act={values['hidden_act']!r} is not supported; "
                         f"alignax knows {sorted(ACTIVATIONS)}")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(f"{section}.hidden_size={values['hidden_size']} is not a multiple of "
                         f"{section}.num_attention_heads={values['num_attention_heads']}")
    return cls(**values)


_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int

    @classmethod
    def from_dict(cls, raw: dict) -> CLIPConfig:
        """From transformers' CLIP config.json; old `*_config_dict` entries override, as in transformers."""
        text = {**(raw.get("text_config") or {}), **(raw.get("text_config_dict") or {})}
        vision = {**(raw.get("vision_config") or {}), **(raw.get("vision_config_dict") or {})}
        projection_dim = raw.get("projection_dim", 512)
        if not isinstance(projection_dim, int) or isinstance(projection_dim, bool):
            raise ValueError(f"projection_dim={projection_dim!r}: expected int")
        return cls(text=read_section(TextConfig, text, _TEXT_DEFAULTS, "text_config"),
                   vision=read_section(VisionConfig, vision, _VISION_DEFAULTS, "vision_config"),
                   projection_dim=projection_dim)


@flax.struct.dataclass
class ContrastiveOutput:
    """transformers' CLIPOutput/SiglipOutput fields; the embeddings are L2-normalised."""

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| along the last axis, in fp32."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention on (batch, tokens, heads, head_dim); `mask` is True where a query may look.

    Written out rather than taken from `attention.KERNELS`, which has no mask; CLIP's text
    tower needs causal and padding masks.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class SelfAttention(nn.Module):
    """transformers' CLIPAttention / SiglipAttention: separate q, k, v, out projections."""

    num_heads: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        batch, length, width = x.shape

        def project(name: str, axes: tuple[str, str]) -> layers.Linear:
            return layers.Linear(width, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(batch, length, self.num_heads, width // self.num_heads)

        q, k, v = (heads(project(f"{n}_proj", ("embed", "heads"))(x)) for n in "qkv")
        out = attend(q, k, v, mask).reshape(batch, length, width)
        return project("out_proj", ("heads", "embed"))(out)


class MLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.Linear(self.intermediate_size, kernel_axes=("embed", "mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return layers.Linear(x.shape[-1], kernel_axes=("mlp", "embed"), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block (CLIPEncoderLayer, SiglipEncoderLayer)."""

    config: EncoderConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        h = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + SelfAttention(cfg.num_attention_heads, name="self_attn", **kw)(h, mask)
        h = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + MLP(cfg.intermediate_size, cfg.hidden_act, name="mlp", **kw)(h)


class Encoder(nn.Module):
    """`encoder.layers.N`; `remat` (an alignax.models.remat policy name) bounds activation memory in reward backprop."""

    config: EncoderConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """The last state; with `output_hidden_states`, also every layer's input and the last output
        (transformers' `hidden_states`: num_hidden_layers + 1 entries, no final norm)."""
        if self.remat == "none":
            block = EncoderLayer
        else:
            block = nn.remat(EncoderLayer, policy=remat_lib.POLICIES[self.remat])
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = block(self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers.{i}")(x, mask)
            states.append(x)
        return (x, tuple(states)) if output_hidden_states else x


def embed(num: int, features: int, axes: tuple[str | None, str], name: str, dtype: Dtype | None,
          param_dtype: Dtype) -> nn.Embed:
    """nn.Embed (param `embedding` ↔ torch nn.Embedding `weight`) with logical axis names."""
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return nn.Embed(num, features, embedding_init=init, dtype=dtype, param_dtype=param_dtype, name=name)


class TextEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        if length > self.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; the model has {self.max_position_embeddings} positions")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = embed(self.vocab_size, self.hidden_size, ("vocab", "embed"), "token_embedding", **kw)(input_ids)
        positions = embed(self.max_position_embeddings, self.hidden_size, (None, "embed"), "position_embedding",
                          **kw)(jnp.arange(length))
        return tokens + positions


class VisionEmbeddings(nn.Module):
    """Patchify NCHW pixels with a strided conv, prepend CLIP's class token, add positions."""

    config: VisionConfig
    class_token: bool
    patch_bias: bool
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {pixel_values.shape}; the model expects (batch, *{expected}) "
                             "(NCHW)")
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))
        x = layers.Conv2d(cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, padding=0,
                          use_bias=self.patch_bias, kernel_axes=(None, None, None, "embed"), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="patch_embedding")(x)
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)
        if self.class_token:
            init = nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size ** -0.5), ("embed",))
            cls = self.param("class_embedding", init, (cfg.hidden_size,), self.param_dtype).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        positions = embed(x.shape[1], cfg.hidden_size, (None, "embed"), "position_embedding", dtype=self.dtype,
                          param_dtype=self.param_dtype)(jnp.arange(x.shape[1]))
        return x + positions


class CLIPTextTransformer(nn.Module):
    """Causal text tower; pooled output is the final-norm state at the EOS token."""

    config: TextConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> tuple[jax.Array, ...]:
        """(last_hidden_state, pooled), plus transformers' `hidden_states` tuple when asked."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = TextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, name="embeddings",
                           **kw)(input_ids)
        length = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x, states = Encoder(cfg, self.remat, name="encoder", **kw)(x, mask, output_hidden_states=True)
        x = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first EOS: the pad token may be the EOS token too
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return (x, pooled, states) if output_hidden_states else (x, pooled)


class CLIPVisionTransformer(nn.Module):
    """ViT with class token; pooled output is post_layernorm(class token)."""

    config: VisionConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(cfg, class_token=True, patch_bias=False, name="embeddings", **kw)(pixel_values)
        x = layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = Encoder(cfg, self.remat, name="encoder", **kw)(x)
        return x, layers.LayerNorm(epsilon=cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class CLIPModel(nn.Module):
    """transformers' CLIPModel: `get_image_features`, `get_text_features`, and logits from `__call__`."""

    config: CLIPConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(cfg.text, self.remat, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision, self.remat, **kw)
        self.visual_projection = layers.Linear(cfg.projection_dim, kernel_axes=("embed", None), use_bias=False, **kw)
        self.text_projection = layers.Linear(cfg.projection_dim, kernel_axes=("embed", None), use_bias=False, **kw)
        init = nn.with_logical_partitioning(nn.initializers.constant(2.6592), ())
        self.logit_scale = self.param("logit_scale", init, (), self.param_dtype)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected image embedding [B, projection_dim] from NCHW pixels normalised as CLIP expects."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Projected text embedding [B, projection_dim]."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> ContrastiveOutput:
        image = l2_normalize(self.get_image_features(pixel_values))
        text = l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale.astype(jnp.float32))
        return ContrastiveOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                 text_embeds=text, image_embeds=image)


def dummy_inputs(module: nn.Module) -> tuple[tuple, dict]:
    """One token and one image: enough to create every param of a CLIP-style model."""
    vision = module.config.vision
    pixels = jnp.zeros((1, vision.num_channels, vision.image_size, vision.image_size), jnp.float32)
    return (jnp.zeros((1, 1), jnp.int32), pixels), {}


def build(config: dict, *, compute_dtype: Dtype | None = None, remat: str = "none") -> CLIPModel:
    """Runtime options: compute dtype (params keep their stored dtype) and a remat policy name."""
    return CLIPModel(CLIPConfig.from_dict(config), remat=remat_lib.check(remat), dtype=compute_dtype)


ARCHITECTURE = register(TRANSFORMERS, Architecture(
    name="clip", build=build, dummy_inputs=dummy_inputs, weights_stem="model",
    ignore_unexpected=(r"(text|vision)_model\.embeddings\.position_ids",)))


# --- CLIPTextModelWithProjection (transformers `model_type: "clip_text_model"`) -------------------------
# How SD3 pipelines store `text_encoder` (CLIP-L) and `text_encoder_2` (OpenCLIP bigG, saved by
# diffusers in the same layout with gelu): `text_model.*` + `text_projection.weight`, a flat config.


@dataclasses.dataclass(frozen=True)
class CLIPTextModelConfig:
    text: TextConfig
    projection_dim: int

    @classmethod
    def from_dict(cls, raw: dict) -> CLIPTextModelConfig:
        """From transformers' CLIPTextConfig config.json (the text fields at the top level)."""
        projection_dim = raw.get("projection_dim", 512)
        if not isinstance(projection_dim, int) or isinstance(projection_dim, bool):
            raise ValueError(f"projection_dim={projection_dim!r}: expected int")
        return cls(text=read_section(TextConfig, raw, _TEXT_DEFAULTS, "config"), projection_dim=projection_dim)


@flax.struct.dataclass
class TextModelOutput:
    """transformers' CLIPTextModelOutput. `hidden_states` has num_hidden_layers + 1 entries (embeddings,
    then each layer's output, without the final norm): SD3 conditions on `hidden_states[-(clip_skip + 2)]`."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


class CLIPTextModelWithProjection(nn.Module):
    """The text tower and its projection; `text_embeds` is SD3's pooled CLIP vector. Under `jit`, the
    hidden states nobody reads are dropped by XLA, so returning them all costs nothing."""

    config: CLIPTextModelConfig
    remat: str = "none"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(cfg.text, self.remat, **kw)
        self.text_projection = layers.Linear(cfg.projection_dim, kernel_axes=("embed", None), use_bias=False, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> TextModelOutput:
        last, pooled, states = self.text_model(input_ids, attention_mask, output_hidden_states=True)
        return TextModelOutput(text_embeds=self.text_projection(pooled), last_hidden_state=last, hidden_states=states)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Projected text embedding [B, projection_dim]."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])


def build_text_model(config: dict, *, compute_dtype: Dtype | None = None,
                     remat: str = "none") -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextModelConfig.from_dict(config), remat=remat_lib.check(remat),
                                       dtype=compute_dtype)


TEXT_MODEL_ARCHITECTURE = register(TRANSFORMERS, Architecture(
    name="clip_text_model", build=build_text_model, dummy_inputs=lambda module: ((jnp.zeros((1, 1), jnp.int32),), {}),
    weights_stem="model", ignore_unexpected=(r"text_model\.embeddings\.position_ids",)))
