"""Flax port of diffusers' `AutoencoderKL`, the VAE of SD1/SDXL/SD3.

Submodules are named like the torch module paths (`encoder.down_blocks.0.resnets.1.conv1`),
so `torch_layout` maps checkpoints with no per-model table. Internally NHWC; the public
`encode`/`decode` take and return NCHW like diffusers. Latent scaling and shift stay with
the caller, as in diffusers: `z = (mean - shift_factor) * scaling_factor`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignax.models import attention, remat
from alignax.models.layers import Conv2d, Dtype, GroupNorm, Linear
from alignax.models.pretrained import DIFFUSERS, Architecture, register

NORM_EPS = 1e-6  # diffusers hard-codes this for every VAE norm (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' get_activation names (matched case-insensitively, as diffusers does).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": _mish,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)


def _maybe_remat(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """`cls` under `nn.remat` with the named alignax.models.remat policy; param names are unchanged."""
    return cls if remat.check(policy) == "none" else nn.remat(cls, policy=remat.POLICIES[policy])


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture fields of a diffusers `AutoencoderKL` config.json, same names and defaults.

    Pipeline-only fields (`force_upcast`, `latents_mean`, `latents_std`) do not change the
    network and are left out; the full dict stays on `Pretrained.config` for export.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # JSON gives lists; a Flax module attribute must be hashable.
        for field in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        self._validate()

    def _validate(self) -> None:
        for field, supported in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for block_type in getattr(self, field):
                if block_type not in supported:
                    raise ValueError(f"{field}: unsupported block type {block_type!r}; "
                                     f"alignax supports {list(supported)}")
        num_blocks = len(self.block_out_channels)
        if num_blocks == 0 or len(self.down_block_types) != num_blocks or len(self.up_block_types) != num_blocks:
            raise ValueError(f"block_out_channels {self.block_out_channels}, down_block_types "
                             f"{self.down_block_types} and up_block_types {self.up_block_types}: expected the "
                             "same non-zero length")
        if self.act_fn.lower() not in ACTIVATIONS:
            raise ValueError(f"act_fn: unsupported activation {self.act_fn!r}; alignax supports {sorted(ACTIVATIONS)}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels "
                                 f"entry {channels}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers config.json dict: `_`-prefixed metadata and unknown keys are dropped."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D without time embedding: norm-act-conv twice plus a (1x1 when widening) skip."""

    features: int
    num_groups: int
    act_fn: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act_fn.lower()]
        norm = functools.partial(GroupNorm, self.num_groups, NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(Conv2d, self.features, dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv(name="conv1")(act(norm(name="norm1")(x)))
        h = conv(name="conv2")(act(norm(name="norm2")(h)))
        if x.shape[-1] != self.features:
            x = conv(kernel_size=1, padding=0, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after diffusers' asymmetric pad: one zero row/column at the bottom/right only."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv2d(x.shape[-1], stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (exact pixel repeat, as torch's `interpolate(mode="nearest")`) then a 3x3 conv."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv2d(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class SpatialSelfAttention(nn.Module):
    """diffusers' VAE mid-block `Attention`: group norm, one head over all channels, residual.

    The head is as wide as the channels (diffusers sets attention_head_dim = channels), so it
    attends over all H*W positions; `kernel` names an `alignax.models.attention` kernel.
    """

    num_groups: int
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = GroupNorm(self.num_groups, NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="group_norm")(x).reshape(batch, height * width, channels)
        proj = functools.partial(Linear, channels, kernel_axes=("embed", "heads"), dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        q, k, v = (proj(name=name)(h)[:, :, None, :] for name in ("to_q", "to_k", "to_v"))
        h = attention.get(self.kernel)(q, k, v)[:, :, 0, :]
        h = Linear(channels, kernel_axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="to_out.0")(h)
        return x + h.reshape(x.shape)


class UNetMidBlock2D(nn.Module):
    """resnet, [attention], resnet at the lowest resolution (diffusers' UNetMidBlock2D, one layer)."""

    num_groups: int
    act_fn: str
    add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = functools.partial(ResnetBlock2D, x.shape[-1], self.num_groups, self.act_fn, **kw)
        x = resnet(name="resnets.0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.num_groups, self.attention, **kw, name="attentions.0")(x)
        return resnet(name="resnets.1")(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then a stride-2 downsample unless this is the last block."""

    features: int
    num_layers: int
    num_groups: int
    act_fn: str
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.features, self.num_groups, self.act_fn, **kw, name=f"resnets.{j}")(x)
        return Downsample2D(**kw, name="downsamplers.0")(x) if self.add_downsample else x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then a nearest-x2 upsample unless this is the last block."""

    features: int
    num_layers: int
    num_groups: int
    act_fn: str
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.features, self.num_groups, self.act_fn, **kw, name=f"resnets.{j}")(x)
        return Upsample2D(**kw, name="upsamplers.0")(x) if self.add_upsample else x


class _Coder(nn.Module):
    """Fields and the mid block shared by `Encoder` and `Decoder`."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    attention: str = "xla"

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _mid_block(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return _maybe_remat(UNetMidBlock2D, self.remat)(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                                                        self.attention, **self._kw(), name="mid_block")(x)


class Encoder(_Coder):
    """Image (NHWC) → latent moments (mean ‖ logvar along channels), before `quant_conv`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, self._kw()
        x = Conv2d(cfg.block_out_channels[0], **kw, name="conv_in")(x)
        last = len(cfg.block_out_channels) - 1
        down_block = _maybe_remat(DownEncoderBlock2D, self.remat)
        for i, channels in enumerate(cfg.block_out_channels):
            x = down_block(channels, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                           add_downsample=i < last, **kw, name=f"down_blocks.{i}")(x)
        return _head(self._mid_block(x), 2 * cfg.latent_channels, cfg, kw)


class Decoder(_Coder):
    """Latent (NHWC, after `post_quant_conv`) → image."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, self._kw()
        x = self._mid_block(Conv2d(cfg.block_out_channels[-1], **kw, name="conv_in")(z))
        last = len(cfg.block_out_channels) - 1
        up_block = _maybe_remat(UpDecoderBlock2D, self.remat)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            x = up_block(channels, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                         add_upsample=i < last, **kw, name=f"up_blocks.{i}")(x)
        return _head(x, cfg.out_channels, cfg, kw)


def _head(x: jax.Array, features: int, cfg: VAEConfig, kw: dict) -> jax.Array:
    """conv_norm_out → SiLU → conv_out. diffusers uses SiLU here whatever `act_fn` says."""
    x = GroupNorm(cfg.norm_num_groups, NORM_EPS, **kw, name="conv_norm_out")(x)
    return Conv2d(features, **kw, name="conv_out")(jax.nn.silu(x))


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: `encode` gives the posterior mean, `decode` the image; NCHW in and out.

    The `_nhwc` methods are the same without the layout transposes, for use inside alignax.
    Sampling the posterior is left to the caller (`latent_dist` gives mean and logvar), so
    the module needs no RNG and `encode` is deterministic, like diffusers' `posterior.mode()`.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32       # compute dtype; norms and softmax still run in fp32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"              # alignax.models.remat policy per down/mid/up block, for reward backprop
    attention: str = "xla"           # alignax.models.attention kernel of the mid-block attention

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw, remat=self.remat, attention=self.attention)
        self.decoder = Decoder(cfg, **kw, remat=self.remat, attention=self.attention)
        latents = cfg.latent_channels
        self.quant_conv = Conv2d(2 * latents, kernel_size=1, padding=0, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(latents, kernel_size=1, padding=0, **kw) if cfg.use_post_quant_conv else None

    def latent_dist_nhwc(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the diagonal Gaussian posterior, logvar clipped as diffusers does."""
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def latent_dist(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, logvar = self.latent_dist_nhwc(_nchw_to_nhwc(x))
        return _nhwc_to_nchw(mean), _nhwc_to_nchw(logvar)

    def encode_nhwc(self, x: jax.Array) -> jax.Array:
        return self.latent_dist_nhwc(x)[0]

    def encode(self, x: jax.Array) -> jax.Array:
        """NCHW images → NCHW posterior mean (diffusers' `encode(x).latent_dist.mean`), unscaled."""
        return _nhwc_to_nchw(self.encode_nhwc(_nchw_to_nhwc(x)))

    def decode_nhwc(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: jax.Array) -> jax.Array:
        """NCHW latents (already unscaled by the caller) → NCHW images (diffusers' `decode(z).sample`)."""
        return _nhwc_to_nchw(self.decode_nhwc(_nchw_to_nhwc(z)))

    def __call__(self, sample: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean, as diffusers' `forward(sample_posterior=False)`."""
        return self.decode(self.encode(sample))


def build(config: Mapping[str, Any], *, compute_dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          remat: str = "none", attention: str = "xla") -> AutoencoderKL:
    """`Architecture.build`: a module from a diffusers config.json dict plus runtime choices.

    The compute dtype is `compute_dtype` because `load_diffusers`' own `dtype` is the storage dtype.
    """
    return AutoencoderKL(VAEConfig.from_dict(config), dtype=compute_dtype, param_dtype=param_dtype, remat=remat,
                         attention=attention)


def _dummy_inputs(module: AutoencoderKL) -> tuple[tuple, dict]:
    """The smallest image that survives every downsample; `__call__` then creates every param."""
    size = module.config.downsample_factor
    return (jnp.zeros((1, module.config.in_channels, size, size), jnp.float32),), {}


register(DIFFUSERS, Architecture(name="AutoencoderKL", build=build, dummy_inputs=_dummy_inputs,
                                 weights_stem="diffusion_pytorch_model"))
