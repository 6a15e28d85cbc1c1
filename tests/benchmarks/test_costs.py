"""The roofline's arithmetic: collectives counted per loop iteration, and the hand FLOP count of an MM-DiT."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alignax import compiled_costs
from alignax import mesh as mesh_lib
from alignax.models import mmdit
from alignax.models.pretrained import abstract_params
from experiments.benchmarks import model_flops


def sharded_loop(trips: int):
    """`trips` iterations that each need a collective: the carry and the weights are split over 8 devices
    along the contracted axis, so every matmul ends in a reduction across devices."""
    mesh = mesh_lib.make_mesh((1, 8, 1))
    rows = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    cols = NamedSharding(mesh, PartitionSpec("fsdp", None))

    def f(x, w):
        def body(_, x):
            return jax.lax.with_sharding_constraint(jnp.tanh(x @ w), rows)
        return jax.lax.fori_loop(0, trips, body, x)

    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=rows)
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=cols)
    return jax.jit(f).lower(x, w).compile().as_text()


def test_collectives_are_counted_once_per_loop_iteration():
    once = compiled_costs.collective_bytes(sharded_loop(1), 8)
    five = compiled_costs.collective_bytes(sharded_loop(5), 8)
    assert sum(once.values()) > 0, once
    assert sum(five.values()) == 5 * sum(once.values()), (once, five)


def test_shape_bytes_reads_dtypes_and_tuples():
    assert compiled_costs.shape_bytes("bf16[24,1536]{1,0}") == 2 * 24 * 1536
    assert compiled_costs.shape_bytes("(f32[2]{0}, s8[3,3]{1,0})") == 8 + 9


def test_hand_count_of_an_mmdit_forward_matches_xla():
    """The MFU denominator: within 5% of XLA's count of the same forward (XLA adds the elementwise work,
    adaLN, patch embedding and the output layer, which the hand count leaves out)."""
    config = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
                  pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    module = mmdit.ARCHITECTURE.build(config)
    params, _ = abstract_params(mmdit.ARCHITECTURE, module)
    batch, text = 2, 12
    args = (jax.ShapeDtypeStruct((batch, 16, 16, 4), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch, text, 64), jnp.float32), jax.ShapeDtypeStruct((batch, 32), jnp.float32))
    forward = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method="forward_nhwc"))
    xla = compiled_costs.cost(forward.lower(params, *args).compile())["flops"]
    hand = model_flops.mmdit_forward_flops(config, batch, text)
    np.testing.assert_allclose(hand, xla, rtol=0.05)
    assert hand <= xla


def test_matmul_flops_count_every_loop_trip():
    """XLA's cost analysis counts a scan body once; the HLO count multiplies it by the trip count, and with no
    loop it agrees with XLA on a program of matmuls and a convolution."""
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)

    def scanned(trips):
        def f(x, w):
            return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=trips)[0]
        return jax.jit(f).lower(jax.ShapeDtypeStruct((32, 64), jnp.float32), w).compile()

    one, ten = scanned(1), scanned(10)
    assert compiled_costs.matmul_flops(one.as_text()) == 2 * 32 * 64 * 64
    assert compiled_costs.matmul_flops(ten.as_text()) == 10 * 2 * 32 * 64 * 64
    assert compiled_costs.cost(ten)["flops"] < 2 * compiled_costs.cost(one)["flops"]  # why this module exists

    def conv(x, k, w):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(-1, 64) @ w
    compiled = jax.jit(conv).lower(jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32), kernel, w).compile()
    expected = 2 * (2 * 16 * 16 * 16) * (3 * 3 * 8) + 2 * (2 * 16 * 16 * 16 // 64) * 64 * 64
    assert compiled_costs.matmul_flops(compiled.as_text()) == expected
