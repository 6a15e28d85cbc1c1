"""The train state as a plain pytree, and its shardings.

    state = {'step', 'rng', 'trainable', 'opt_state', 'ema', 'objective', 'nonfinite'}

Everything a resume needs is in it (the data position is `step`), so saving this one
pytree and the config is a complete checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

PyTree = Any


def _path_key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def specs_by_suffix(tree: PyTree, reference: PyTree, reference_specs: PyTree) -> PyTree:
    """Logical specs for a tree whose leaves mirror `reference` under some prefix
    (optax's mu/nu, an EMA, a LoRA-free copy): a leaf takes the spec of the reference
    leaf with the longest matching path suffix and the same shape; others replicate."""
    table: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
    ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
    spec_leaves = jax.tree.leaves(reference_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(ref_leaves, spec_leaves, strict=True):
        table[tuple(_path_key(p) for p in path)] = (tuple(leaf.shape), spec)

    def spec_of(path, leaf):
        keys = tuple(_path_key(p) for p in path)
        for start in range(len(keys)):
            hit = table.get(keys[start:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def to_shardings(specs: PyTree, shapes: PyTree, mesh, rules) -> PyTree:
    """NamedShardings from logical specs, fitted to the arrays' shapes."""
    from alignax import mesh as mesh_lib
    return mesh_lib.fitted_shardings(specs, shapes, mesh, rules)

