"""MM-DiT: the Stable Diffusion 3 / 3.5 transformer (diffusers' `SD3Transformer2DModel`) in Flax.

Submodules carry diffusers' names (`transformer_blocks.3.attn.to_q`), so the param tree
maps to diffusers' state dict with no table (see torch_layout.py). Internally NHWC and
(batch, tokens, features); NCHW only at the diffusers-compatible `__call__`.

Covered: SD3-medium, SD3.5-medium (MMDiT-X dual attention, rms qk-norm), SD3.5-large.
Not ported: ControlNet residuals, IP-Adapter, `skip_layers` and fused QKV projections,
which are inference-time extras of the diffusers pipeline, not part of the weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignax.models import attention, remat
from alignax.models.layers import LayerNorm, Linear, RMSNorm
from alignax.models.pretrained import DIFFUSERS, Architecture, register

Dtype = Any
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of diffusers' SD3Transformer2DModel config.json, same names and defaults."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; choose one of {list(QK_NORMS)}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal "
                             f"num_attention_heads * attention_head_dim = {self.inner_dim}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers={self.dual_attention_layers} names layers outside "
                             f"0..{self.num_layers - 1}: {bad}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, config: dict) -> MMDiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "dual_attention_layers": list(self.dual_attention_layers)}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How to run the model; not part of the weights."""

    compute_dtype: Dtype = jnp.float32  # params stay as stored; bf16 on TPU
    attention: str = "xla"              # key of alignax.models.attention.KERNELS
    scan_layers: bool = False           # lax.scan over runs of identical blocks
    remat: str = "none"                 # alignax.models.remat policy name, applied per block
    precision: Any = None               # matmul precision, e.g. "highest" for parity on TPU

    def __post_init__(self):
        attention.get(self.attention)
        remat.check(self.remat)

    def dense(self, features: int, kernel_axes: tuple[str | None, str | None], **kwargs: Any) -> Linear:
        return Linear(features, kernel_axes=kernel_axes, dtype=self.compute_dtype, precision=self.precision, **kwargs)


def _qk_rms_norm(name: str, rt: Runtime) -> nn.Module:
    return RMSNorm(epsilon=1e-6, dtype=rt.compute_dtype, name=name)


def _qk_layer_norm(name: str, rt: Runtime) -> nn.Module:
    return LayerNorm(epsilon=1e-6, use_affine=True, dtype=rt.compute_dtype, name=name)


QK_NORMS = {None: None, "rms_norm": _qk_rms_norm, "layer_norm": _qk_layer_norm}


def timestep_features(timestep: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = timestep.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sincos_pos_embed(dim: int, grid_size: int, base_size: int) -> np.ndarray:
    """SD3's fixed 2-D sin-cos table (1, grid*grid, dim), as diffusers computes the `pos_embed` buffer."""
    coords = np.arange(grid_size, dtype=np.float64) / (grid_size / base_size)
    grid_w, grid_h = np.meshgrid(coords, coords)  # rows index h, columns index w

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # diffusers feeds the w-coordinate grid first (meshgrid "xy"), so the first half encodes w.
    table = np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)
    return table[None].astype(np.float32)


class Modulation(nn.Module):
    """adaLN: `linear(silu(temb))` split into `chunks` vectors (shift, scale, gate, ...)."""

    dim: int
    chunks: int
    rt: Runtime

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        emb = self.rt.dense(self.chunks * self.dim, ("embed", "modulation"), kernel_init=nn.initializers.zeros,
                            name="linear")(nn.silu(temb))
        return jnp.split(emb[:, None, :], self.chunks, axis=-1)


def _layer_norm(x: jax.Array) -> jax.Array:
    """The affine-free LayerNorm(eps=1e-6) that every adaLN in SD3 modulates."""
    return LayerNorm(epsilon=1e-6, use_affine=False)(x)


class FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn='gelu-approximate'): net.0.proj → tanh-GELU → net.2."""

    dim: int
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.rt.dense(4 * self.dim, ("embed", "mlp"), name="net.0.proj")(x)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=True),
                                       ("activation_batch", "activation_length", "activation_mlp"))
        return self.rt.dense(self.dim, ("mlp", "embed"), name="net.2")(h)


class Attention(nn.Module):
    """diffusers `Attention` with `JointAttnProcessor2_0`.

    With `context` it is SD3's joint attention: image and text tokens attend together
    (image first), each stream with its own projections. Without it (MMDiT-X `attn2`)
    it is image-only self-attention.
    """

    config: MMDiTConfig
    rt: Runtime
    joint: bool = True
    context_pre_only: bool = False

    def _project(self, x: jax.Array, prefix: str, norm_prefix: str) -> list[jax.Array]:
        cfg, rt = self.config, self.rt
        names = (f"{prefix}q", f"{prefix}k", f"{prefix}v")
        out = []
        for name, role in zip(names, "qkv", strict=False):
            y = rt.dense(cfg.inner_dim, ("embed", "heads"), name=name + ("_proj" if prefix == "add_" else ""))(x)
            y = y.reshape(*y.shape[:-1], cfg.num_attention_heads, cfg.attention_head_dim)
            norm = QK_NORMS[cfg.qk_norm]
            if norm is not None and role in "qk":
                y = norm(f"{norm_prefix}{role}", rt)(y)
            out.append(y)
        return out

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        cfg, rt = self.config, self.rt
        q, k, v = self._project(x, "to_", "norm_")
        if self.joint:
            cq, ck, cv = self._project(context, "add_", "norm_added_")
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = attention.get(rt.attention)(q, k, v)
        out = out.reshape(*out.shape[:2], cfg.inner_dim)
        image_out = rt.dense(cfg.inner_dim, ("heads", "embed"), name="to_out.0")(out[:, : x.shape[1]])
        if not self.joint:
            return image_out
        if self.context_pre_only:
            return image_out, None
        context_out = rt.dense(cfg.inner_dim, ("heads", "embed"), name="to_add_out")(out[:, x.shape[1]:])
        return image_out, context_out


class JointTransformerBlock(nn.Module):
    """One MM-DiT block: adaLN-Zero on both streams, joint attention, per-stream MLPs.

    `context_pre_only` (the last block) updates only the image stream. `dual_attention`
    (MMDiT-X) adds an image-only self-attention with its own modulation.
    """

    config: MMDiTConfig
    rt: Runtime
    context_pre_only: bool = False
    dual_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, rt, dim = self.config, self.rt, self.config.inner_dim
        x = nn.with_logical_constraint(x, ACTIVATION)
        context = nn.with_logical_constraint(context, ACTIVATION)
        mods = Modulation(dim, 9 if self.dual_attention else 6, rt, name="norm1")(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed_x = _layer_norm(x)
        norm_x = normed_x * (1 + scale_msa) + shift_msa

        if self.context_pre_only:
            scale_c, shift_c = Modulation(dim, 2, rt, name="norm1_context")(temb)
            norm_context = _layer_norm(context) * (1 + scale_c) + shift_c
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
                dim, 6, rt, name="norm1_context")(temb)
            norm_context = _layer_norm(context) * (1 + c_scale_msa) + c_shift_msa

        attn_out, context_attn_out = Attention(cfg, rt, joint=True, context_pre_only=self.context_pre_only,
                                               name="attn")(norm_x, norm_context)
        x = x + gate_msa * attn_out
        if self.dual_attention:  # MMDiT-X: a second, image-only attention on the same normed input
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            norm_x2 = normed_x * (1 + scale_msa2) + shift_msa2
            x = x + gate_msa2 * Attention(cfg, rt, joint=False, name="attn2")(norm_x2)
        x = x + gate_mlp * FeedForward(dim, rt, name="ff")(_layer_norm(x) * (1 + scale_mlp) + shift_mlp)

        if self.context_pre_only:
            return x, context
        context = context + c_gate_msa * context_attn_out
        context_ff = FeedForward(dim, rt, name="ff_context")(_layer_norm(context) * (1 + c_scale_mlp) + c_shift_mlp)
        return x, context + c_gate_mlp * context_ff


class PatchEmbed(nn.Module):
    """diffusers `PatchEmbed` with SD3 cropping: a stride-p conv (`proj`) plus the fixed sin-cos
    table (`pos_embed`, (1, max*max, dim)), centre-cropped to the latent grid.

    The conv is applied as one 2-D matmul over flattened patches, which is what it is.
    The table is a stored buffer in diffusers; here it is a param under `stop_gradient`
    (freeze it in the optimiser so weight decay leaves it alone too).
    """

    config: MMDiTConfig
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, rt, p = self.config, self.rt, self.config.patch_size
        h, w = x.shape[1] // p, x.shape[2] // p
        patches = einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        tokens = _PatchProjection(cfg.inner_dim, p, rt, name="proj")(patches)
        size = cfg.pos_embed_max_size
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda *_: jnp.asarray(sincos_pos_embed(cfg.inner_dim, size, cfg.sample_size // p)),
                (None, None, "embed")),
            (1, size * size, cfg.inner_dim))
        top, left = (size - h) // 2, (size - w) // 2
        grid = jax.lax.stop_gradient(table).reshape(size, size, cfg.inner_dim)
        crop = jax.lax.dynamic_slice(grid, (top, left, 0), (h, w, cfg.inner_dim)).reshape(1, h * w, -1)
        return tokens + crop.astype(tokens.dtype)


class _PatchProjection(nn.Module):
    """A p×p, stride-p conv on (B, T, p*p*C) patches; its kernel keeps the conv shape (p, p, C, D)."""

    features: int
    patch_size: int
    rt: Runtime

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        p, dtype = self.patch_size, self.rt.compute_dtype
        channels = patches.shape[-1] // (p * p)
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   (None, None, None, "embed")),
                            (p, p, channels, self.features))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.features,))
        lead = patches.shape[:-1]
        y = jnp.dot(patches.reshape(-1, patches.shape[-1]).astype(dtype),
                    kernel.reshape(-1, self.features).astype(dtype), precision=self.rt.precision)
        return (y + bias.astype(dtype)).reshape(*lead, self.features)


class MMDiT(nn.Module):
    """SD3Transformer2DModel. `__call__` mirrors diffusers' forward; `forward_nhwc` is the internal API."""

    config: MMDiTConfig
    rt: Runtime = Runtime()

    def _block(self, index: int) -> JointTransformerBlock:
        cfg = self.config
        block_cls = JointTransformerBlock
        if self.rt.remat != "none" and not (self.rt.scan_layers and not self.is_initializing()):
            block_cls = nn.remat(JointTransformerBlock, policy=remat.POLICIES[self.rt.remat])
        return block_cls(cfg, self.rt, context_pre_only=index == cfg.num_layers - 1,
                         dual_attention=index in cfg.dual_attention_layers, name=f"transformer_blocks.{index}")

    def block_kinds(self) -> list[tuple[bool, bool]]:
        cfg = self.config
        return [(i == cfg.num_layers - 1, i in cfg.dual_attention_layers) for i in range(cfg.num_layers)]

    @nn.compact
    def forward_nhwc(self, x: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array, *,
                     capture_layers: tuple[int, ...] = ()) -> jax.Array | tuple[jax.Array, dict[int, jax.Array]]:
        """x: (B, H, W, C) latents; timestep: (B,) or scalar in [0, 1000]; context: (B, L, joint_attention_dim);
        pooled: (B, pooled_projection_dim). Returns the (B, H, W, out_channels) velocity and, when
        `capture_layers` is given, the image-stream hidden states after those blocks."""
        cfg, rt = self.config, self.rt
        batch, height, width, _ = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size={p}")
        h, w = height // p, width // p
        if max(h, w) > cfg.pos_embed_max_size:
            raise ValueError(f"latent grid {h}x{w} exceeds pos_embed_max_size={cfg.pos_embed_max_size}")
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (batch,))

        hidden = PatchEmbed(cfg, rt, name="pos_embed")(x)
        temb = self._time_text_embed(timestep, pooled)
        context = rt.dense(cfg.caption_projection_dim, (None, "embed"), name="context_embedder")(context)

        hidden, captured = self._blocks(hidden, context, temb, capture_layers)

        scale, shift = Modulation(cfg.inner_dim, 2, rt, name="norm_out")(temb)
        hidden = _layer_norm(hidden) * (1 + scale) + shift
        out = rt.dense(p * p * cfg.out_channels, ("embed", None), kernel_init=nn.initializers.zeros,
                       name="proj_out")(hidden)
        out = einops.rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p)
        return (out, captured) if capture_layers else out

    def _time_text_embed(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        cfg, rt = self.config, self.rt
        dim = cfg.inner_dim
        t = timestep_features(timestep).astype(pooled.dtype)
        t = rt.dense(dim, (None, "embed"), name="time_text_embed.timestep_embedder.linear_1")(t)
        t = rt.dense(dim, ("embed", "mlp"), name="time_text_embed.timestep_embedder.linear_2")(nn.silu(t))
        c = rt.dense(dim, (None, "embed"), name="time_text_embed.text_embedder.linear_1")(pooled)
        c = rt.dense(dim, ("embed", "mlp"), name="time_text_embed.text_embedder.linear_2")(nn.silu(c))
        return t + c

    def _blocks(self, hidden, context, temb, capture_layers):
        captured: dict[int, jax.Array] = {}
        blocks = [self._block(i) for i in range(self.config.num_layers)]
        if self.rt.scan_layers and not self.is_initializing() and not capture_layers:
            return self._scanned_blocks(hidden, context, temb), captured
        for i, block in enumerate(blocks):
            hidden, context = block(hidden, context, temb)
            if i in capture_layers:
                captured[i] = hidden
        return hidden, captured

    def _scanned_blocks(self, hidden, context, temb):
        """Runs of identical blocks go through one `lax.scan` each: one compiled body per run.

        Params stay per layer (the diffusers layout, so checkpoints do not depend on this
        choice); each run's params are stacked for the scan.
        """
        params = self.variables["params"]
        kinds = self.block_kinds()
        start = 0
        while start < len(kinds):
            end = start
            while end < len(kinds) and kinds[end] == kinds[start]:
                end += 1
            pre_only, dual = kinds[start]
            block = JointTransformerBlock(self.config, self.rt, context_pre_only=pre_only, dual_attention=dual,
                                          parent=None)
            layer_params = [params[f"transformer_blocks.{i}"] for i in range(start, end)]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_params)

            def body(carry, p, block=block):
                return block.apply({"params": p}, *carry, temb), None

            body = remat.wrap(body, self.rt.remat)
            (hidden, context), _ = jax.lax.scan(body, (hidden, context), stacked)
            start = end
        return hidden

    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array) -> jax.Array:
        """diffusers' argument names and NCHW layout: parity with diffusers is a one-liner."""
        x = jnp.transpose(hidden_states, (0, 2, 3, 1))
        out = self.forward_nhwc(x, timestep, encoder_hidden_states, pooled_projections)
        return jnp.transpose(out, (0, 3, 1, 2))


def build(config: dict, **runtime: Any) -> MMDiT:
    return MMDiT(MMDiTConfig.from_dict(config), Runtime(**runtime))


def dummy_inputs(module: MMDiT) -> tuple[tuple, dict]:
    cfg = module.config
    size = 2 * cfg.patch_size
    return (jnp.zeros((1, size, size, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.joint_attention_dim)),
            jnp.zeros((1, cfg.pooled_projection_dim))), {}


ARCHITECTURE = register(DIFFUSERS, Architecture(
    name="SD3Transformer2DModel", build=build, dummy_inputs=dummy_inputs,
    weights_stem="diffusion_pytorch_model", init_method="forward_nhwc"))
