"""Device mesh and logical-axis sharding.

Params and activations are annotated with logical names ('embed', 'heads', 'mlp',
'activation_batch', ...); `config.mesh.rules` maps those names to mesh axes. Changing
the parallelism layout is a config edit, never a model edit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignax.errors import ConfigError

DEFAULT_AXES = ("data", "fsdp", "tensor")

# FSDP shards weights over `fsdp` along their model dimension; tensor parallelism splits
# heads and MLP width; the batch is split over both data axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    # adaLN modulation vectors stay replicated: they are split into chunks and feed replicated
    # element-wise ops, and XLA's CPU SPMD partitioner miscomputed the split of a tensor-sharded
    # modulation output (wrong values for some batch shards; see tests/test_mesh.py).
    ("modulation", None),
)

Rules = Sequence[tuple[str, Any]]


def resolve_shape(shape: Sequence[int], num_devices: int, field: str = "config.mesh.shape") -> tuple[int, ...]:
    """Fills one -1 so the mesh covers every device; refuses shapes that cannot."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"{field}={shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ConfigError(f"{field}={shape}: product {known} does not divide the {num_devices} devices")
    resolved = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(resolved) != num_devices:
        raise ConfigError(f"{field}={shape}: covers {math.prod(resolved)} devices, but there are {num_devices}")
    return resolved


def num_slices(devices: Sequence[Any]) -> int:
    """TPU slices the devices span (their distinct `slice_index`; 1 where devices have none, e.g. CPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], axes: Sequence[str], devices: Sequence[Any],
                dcn_axis: str | None = "data") -> np.ndarray:
    """`devices` arranged as the mesh `shape` (one -1 filled in). Over several slices (multislice), the
    `dcn_axis` spans them: each slice holds a contiguous block of that axis, and every other axis stays
    inside a slice, on the fast interconnect (jax's `create_hybrid_device_mesh`)."""
    if len(shape) != len(axes):
        raise ConfigError(f"config.mesh.shape={tuple(shape)} and config.mesh.axes={tuple(axes)} differ in length")
    resolved = resolve_shape(shape, len(devices))
    slices = num_slices(devices)
    if slices == 1:
        return np.asarray(devices, dtype=object).reshape(resolved)
    if dcn_axis not in axes:
        raise ConfigError(f"config.mesh.dcn_axis={dcn_axis!r}: the devices span {slices} slices, so one of "
                          f"config.mesh.axes={tuple(axes)} must span them")
    where = list(axes).index(dcn_axis)
    if resolved[where] % slices:
        raise ConfigError(f"config.mesh.shape={tuple(shape)} resolves to {resolved} on {len(devices)} devices in "
                          f"{slices} slices: axis {dcn_axis!r} (config.mesh.dcn_axis) has size {resolved[where]}, "
                          f"not a multiple of {slices}; e.g. give it {slices} (data parallel over DCN) and "
                          f"-1 to an axis inside the slices")
    ici = [s // slices if i == where else s for i, s in enumerate(resolved)]
    dcn = [slices if i == where else 1 for i in range(len(resolved))]
    from jax.experimental import mesh_utils
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = DEFAULT_AXES,
              devices: Sequence[jax.Device] | None = None, dcn_axis: str | None = "data") -> Mesh:
    """A mesh with Auto axis types over `devices` (default: all), shaped `shape`; multislice-aware
    (`device_grid`)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(shape, axes, devices, dcn_axis), tuple(axes))


def logical_shardings(logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of logical PartitionSpecs → tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def logical_sharding(axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """One array's NamedSharding from its logical axis names, e.g. a batch ('activation_batch', None)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), tuple(rules)))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """The mesh and its logical rules, together, for tracing sharded code.

    Flax's `with_logical_constraint` reads the rules from this context; without them it is a
    silent no-op, and the activation shardings the models declare never reach XLA.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield mesh


def shard_params(params: Any, logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places an existing params pytree on the mesh according to its logical specs."""
    return jax.device_put(params, logical_shardings(logical_specs, mesh, rules))


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (a 3-channel conv, an odd vocab), so a rule
    written for big models never makes a small tensor unshardable; that dim is replicated."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(axes if size and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def fitted_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Like `logical_shardings`, but each sharding is fitted to its array's shape (see `_fit_spec`)."""
    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), tuple(rules))
        return NamedSharding(mesh, _fit_spec(mesh_spec, leaf.shape, mesh))
    return jax.tree.map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
