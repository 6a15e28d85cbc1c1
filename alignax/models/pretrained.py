"""`Pretrained`: a Flax module, its params as a plain pytree, and the config it came from.

Architectures register themselves by the name their on-disk config uses (diffusers
`_class_name`, transformers `model_type`, ...), so every loader dispatches through a
table instead of an if-chain.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

from alignax.errors import WeightsError
from alignax.registry import Registry

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How to build one model family from its on-disk config.

    build: (config dict, **runtime options) -> Flax module.
    dummy_inputs: module -> (args, kwargs) that trace every param into existence.
    init_method: module method `init` runs, when not `__call__`.
    ignore_unexpected: regexes of checkpoint keys that carry no params (buffers).
    weights_stem: file stem of the safetensors files ('diffusion_pytorch_model', 'model').
    key_aliases: (model key, stored alias) pairs for tied params a checkpoint may store under
      either name (transformers' T5 writes `shared.weight`, older saves `encoder.embed_tokens.weight`
      too); the alias is read when the model key is absent and dropped as a tied copy when both are.
    """

    name: str
    build: Callable[..., nn.Module]
    dummy_inputs: Callable[[nn.Module], tuple[tuple, dict]]
    weights_stem: str
    init_method: str | None = None
    ignore_unexpected: tuple[str, ...] = ()
    key_aliases: tuple[tuple[str, str], ...] = ()


DIFFUSERS: Registry[Architecture] = Registry("diffusers architecture (_class_name)", error=WeightsError)
TRANSFORMERS: Registry[Architecture] = Registry("transformers architecture (model_type)", error=WeightsError)


def register(registry: Registry[Architecture], architecture: Architecture) -> Architecture:
    return registry.register(architecture.name, architecture)


def strip_boxes(boxed: PyTree) -> PyTree:
    """Logical-axis boxes → plain arrays, applying no sharding constraint: callers place params
    with explicit shardings, and a constraint outside `jit` (under `eval_shape`) fails on a mesh."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)


def _boxed_init(architecture: Architecture, module: nn.Module, rng: jax.Array) -> PyTree:
    args, kwargs = architecture.dummy_inputs(module)
    init = functools.partial(module.init, method=architecture.init_method) if architecture.init_method else module.init
    return init(rng, *args, **kwargs)["params"]


def abstract_params(architecture: Architecture, module: nn.Module) -> tuple[PyTree, PyTree]:
    """(param ShapeDtypeStructs, logical PartitionSpecs) without allocating anything."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, architecture, module), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    return strip_boxes(boxed), specs


def init_params(architecture: Architecture, module: nn.Module, rng: jax.Array) -> PyTree:
    """Random params as a plain pytree (logical-axis boxes removed)."""
    return strip_boxes(jax.jit(functools.partial(_boxed_init, architecture, module))(rng))


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A callable model: `m(*args)` applies the module; `m.encode(x)` calls a module method."""

    module: nn.Module
    params: PyTree
    config: dict
    architecture: Architecture

    def __call__(self, *args, **kwargs):
        return self.module.apply({"params": self.params}, *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_") or not callable(getattr(type(self.module), name, None)):
            raise AttributeError(f"{type(self.module).__name__} has no method {name!r}")
        return functools.partial(self.module.apply, {"params": self.params}, method=name)

    def replace(self, **changes) -> Pretrained:
        return dataclasses.replace(self, **changes)

    def logical_specs(self) -> PyTree:
        """Logical axis names of every param, as PartitionSpecs over names like 'embed', 'heads'."""
        return abstract_params(self.architecture, self.module)[1]


def is_partition_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)
