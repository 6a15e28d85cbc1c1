"""The MM-DiT forward on a 2x2x2 (data, fsdp, tensor) mesh of fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax import mesh as mesh_lib
from alignax.errors import ConfigError
from alignax.models import load_diffusers
from tests import reference_models as ref


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh_model")
    ref.sd3_transformer(seed=5, **ref.SD35_TINY).save_pretrained(path)
    return load_diffusers(path)


def test_sharded_forward_equals_single_device(model):
    assert jax.device_count() == 8
    mesh = mesh_lib.make_mesh((2, 2, 2))
    inputs = ref.transformer_inputs(ref.SD35_TINY, batch=4)
    args = [jnp.asarray(inputs[k]) for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                              "pooled_projections")]
    expected = np.asarray(jax.jit(model.__call__)(*args))

    params = mesh_lib.shard_params(model.params, model.logical_specs(), mesh)
    kernel = params["transformer_blocks.0"]["ff"]["net.0.proj"]["kernel"]  # (16, 64): embed→fsdp, mlp→tensor
    assert kernel.shape == (16, 64)
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 32)}
    q = params["transformer_blocks.1"]["attn"]["to_q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(8, 8)}

    batch_sharding = mesh_lib.logical_sharding(("activation_batch",), mesh)
    args = [jax.device_put(a, batch_sharding) for a in args]
    assert {s.data.shape[0] for s in args[0].addressable_shards} == {1}  # batch 4 over data x fsdp = 4

    def forward(params, *args):
        return model.replace(params=params)(*args)

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
        out = jax.jit(forward)(params, *args)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,message", [((3, -1, 1), "does not divide"), ((2, 2, 1), "covers 4 devices"),
                                           ((-1, -1, 1), "at most one -1"), ((2, 2), "differ in length")])
def test_bad_mesh_shapes_are_refused(shape, message):
    with pytest.raises(ConfigError, match=message):
        mesh_lib.make_mesh(shape)


def test_minus_one_fills_in():
    assert mesh_lib.make_mesh((-1, 2, 1)).devices.shape == (4, 2, 1)
