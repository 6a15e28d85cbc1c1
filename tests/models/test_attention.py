"""The attention kernels agree: splash (Pallas, interpret mode off TPU) against the einsum reference, alone and
per device under a mesh, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alignax import mesh as mesh_lib
from alignax.models import attention
from tests.parity import max_rel_err


def qkv(batch: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, tokens, 3, 16)), jnp.float32) for _ in range(3))


def gradients(kernel, q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(kernel(q, k, v))), argnums=(0, 1, 2))(q, k, v)


def test_splash_matches_einsum_with_padded_tokens():
    """130 tokens: two 128-blocks, the second mostly padding that must not be attended."""
    q, k, v = qkv(2, 130)
    assert max_rel_err(np.asarray(attention.get("splash")(q, k, v)),
                       np.asarray(attention.einsum_attention(q, k, v))) <= 1e-5
    for ours, ref in zip(gradients(attention.get("splash"), q, k, v), gradients(attention.einsum_attention, q, k, v),
                         strict=True):
        assert max_rel_err(np.asarray(ours), np.asarray(ref)) <= 1e-5


def test_splash_runs_per_device_on_a_batch_sharded_mesh():
    """Under `use_mesh`, the kernel is a shard_map over the batch axes: each device attends its own rows."""
    mesh = mesh_lib.make_mesh((2, 4, 1))
    q, k, v = qkv(8, 20, seed=1)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
    with mesh_lib.use_mesh(mesh):
        out = jax.jit(attention.get("splash"))(q, k, v)
        grads = jax.jit(lambda q, k, v: gradients(attention.get("splash"), q, k, v))(q, k, v)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert max_rel_err(np.asarray(out), np.asarray(attention.einsum_attention(q, k, v))) <= 1e-5
    for ours, ref in zip(grads, gradients(attention.einsum_attention, q, k, v), strict=True):
        assert max_rel_err(np.asarray(ours), np.asarray(ref)) <= 1e-5
