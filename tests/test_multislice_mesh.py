"""Multislice meshes (`alignax.mesh.device_grid`): the `dcn_axis` spans the slices, every other axis stays in
one slice. CPU devices have no `slice_index`, so the 8 test devices are presented as 2 slices of 4 by
wrapping them (the most JAX allows here: no real DCN, no real TPU topology); the grid is then checked
slice by slice and a sharded computation is run on the mesh it defines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignax import mesh as mesh_lib
from alignax.errors import ConfigError


class SliceDevice:
    """A real CPU device presented as a device of TPU slice `slice_index`."""

    def __init__(self, device, slice_index: int):
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def two_slices(devices=None) -> list[SliceDevice]:
    devices = list(devices or jax.devices())
    half = len(devices) // 2
    return [SliceDevice(d, 0 if i < half else 1) for i, d in enumerate(devices)]


def test_one_slice_is_the_plain_reshape():
    devices = jax.devices()
    assert mesh_lib.num_slices(devices) == 1
    grid = mesh_lib.device_grid((-1, 2, 1), mesh_lib.DEFAULT_AXES, devices)
    assert grid.shape == (4, 2, 1) and [d.id for d in grid.flat] == [d.id for d in devices]


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2), (-1, 2, 2), (4, 2, 1)])
def test_the_dcn_axis_spans_the_slices_and_the_others_stay_inside_one(shape):
    fake = two_slices()
    assert mesh_lib.num_slices(fake) == 2
    grid = mesh_lib.device_grid(shape, mesh_lib.DEFAULT_AXES, fake)
    data = grid.shape[0]
    for i in range(data):  # the first half of the data axis is slice 0, the second half slice 1
        assert {d.slice_index for d in grid[i].flat} == {0 if i < data // 2 else 1}
    assert sorted(d.id for d in grid.flat) == sorted(d.id for d in jax.devices())  # every device once


def test_a_sharded_computation_runs_on_the_multislice_mesh():
    grid = mesh_lib.device_grid((2, 2, 2), mesh_lib.DEFAULT_AXES, two_slices())
    mesh = Mesh(np.vectorize(lambda d: d.device, otypes=[object])(grid), mesh_lib.DEFAULT_AXES)
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor")))
    total = jax.jit(lambda a: (a * 2).sum(axis=0))(sharded)
    np.testing.assert_array_equal(np.asarray(total), np.asarray((x * 2).sum(axis=0)))


def test_a_dcn_axis_that_does_not_split_over_the_slices_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"axis 'data' \(config.mesh.dcn_axis\) has size 1, not a multiple of 2"):
        mesh_lib.device_grid((1, -1, 1), mesh_lib.DEFAULT_AXES, two_slices())
    with pytest.raises(ConfigError, match="must span them"):
        mesh_lib.device_grid((2, -1, 1), mesh_lib.DEFAULT_AXES, two_slices(), dcn_axis="replica")
