"""Projector heads: small MLPs from MM-DiT hidden states to a frozen encoder's feature width.

They exist only for a training loss (feature alignment), so they live in their own trainable
pytree (`trainable['heads']`), are never merged into the transformer and never exported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignax.models import pretrained

PyTree = Any


class ProjectorHead(nn.Module):
    """Dense → SiLU → Dense, applied to 2-D (tokens, width) activations (faster backward on CPU)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead, width = x.shape[:-1], x.shape[-1]
        h = x.reshape(-1, width).astype(jnp.float32)
        h = nn.Dense(self.hidden, name="fc1",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(h)
        h = nn.Dense(self.out, name="fc2",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", None)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(nn.silu(h))
        return h.reshape(*lead, self.out)


def init_heads(rng: jax.Array, names: Mapping[str, Sequence[str]], in_width: int, hidden: int, out: int
               ) -> tuple[PyTree, PyTree]:
    """Params {group: {name: head}} and their logical PartitionSpecs, one head per (group, name)."""
    head = ProjectorHead(hidden, out)
    params, specs = {}, {}
    for g, (group, members) in enumerate(names.items()):
        params[group], specs[group] = {}, {}
        for m, name in enumerate(members):
            boxed = head.init(jax.random.fold_in(jax.random.fold_in(rng, g), m), jnp.zeros((1, in_width)))["params"]
            params[group][name] = pretrained.strip_boxes(boxed)
            specs[group][name] = nn.get_partition_spec(boxed)
    return params, specs


def apply_head(params: PyTree, x: jax.Array) -> jax.Array:
    hidden, out = params["fc1"]["kernel"].shape[1], params["fc2"]["kernel"].shape[1]
    return ProjectorHead(hidden, out).apply({"params": params}, x)
