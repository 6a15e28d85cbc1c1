"""Splash attention (the Pallas TPU flash-attention kernel in `jax.experimental.pallas.ops.tpu`) for the MM-DiT.

Why: XLA's attention writes every attention score to HBM and reads it back (f32 logits, then the bf16
probabilities); for SD3.5-medium at 1024² that is ~1.6 TB per chip per SFT step, which bounds the step at
~25% MFU on v5p (docs/performance.md, "A TPU roofline"). Splash keeps each block of scores in VMEM.

The joint sequence (image + text tokens, 4429 for SD3.5 at 1024²) is padded to a multiple of `BLOCK`; the
padding gets its own segment id, so real queries never attend padded keys and the padded rows are dropped.
q is pre-scaled by 1/sqrt(head_dim) (the kernel does not scale). Under a mesh (`alignax.mesh.use_mesh`) the
kernel runs per device in a `shard_map` over the axes that `activation_batch` maps to: a Pallas call is
opaque to XLA's SPMD partitioner, which would otherwise gather the whole batch onto every device.

Off TPU the kernel runs in Pallas' interpret mode (slow, exact): that is how tests/models/test_attention.py
checks it against the einsum kernel on CPU. Its speed on a TPU has not been measured here.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

BLOCK = 128  # the TPU tile the kernel iterates over, for queries and keys alike


def _kernel(padded_tokens: int, heads: int, interpret: bool):
    """Built per trace, not cached: the kernel holds the mask's block tables as arrays of the trace it was
    made in, and reusing it in another trace leaks them."""
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((padded_tokens, padded_tokens)) for _ in range(heads)])
    blocks = kernel_lib.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                                   block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
    return kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """(B, T, H, D) on one device."""
    batch, tokens, heads, head_dim = q.shape
    padded = math.ceil(tokens / BLOCK) * BLOCK

    def head_major(x: jax.Array) -> jax.Array:
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded - tokens), (0, 0)))

    segments = (jnp.arange(padded) >= tokens).astype(jnp.int32)  # 0: real tokens, 1: padding
    ids = kernel_lib.SegmentIds(q=segments, kv=segments)
    kernel = _kernel(padded, heads, jax.default_backend() != "tpu")
    out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=ids))(
        head_major(q * head_dim ** -0.5), head_major(k), head_major(v))
    return jnp.swapaxes(out[:, :, :tokens], 1, 2)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention over (B, T, H, D); per device under a mesh, the batch split as `activation_batch` says."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local(q, k, v)
    axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(n for n in names if n in mesh.axis_names)
    if not names or q.shape[0] % math.prod(mesh.shape[n] for n in names):
        return _local(q, k, v)  # a batch the mesh does not divide (a tiny eval batch) stays whole
    spec = PartitionSpec(names)
    return jax.shard_map(_local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
