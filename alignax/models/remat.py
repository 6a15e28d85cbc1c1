"""`jax.checkpoint` policies by the names configs use (`config.model.remat`).

`none` means no rematerialisation at all; every other name wraps the function in
`jax.checkpoint` with that policy, trading recompute for activation memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}
NAMES = ("none", *POLICIES)


def check(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"remat policy {name!r} is unknown; choose one of {list(NAMES)}")
    return name


def wrap(fn: Callable, name: str, *, static_argnums: tuple[int, ...] = ()) -> Callable:
    """`fn` under `jax.checkpoint` with the named policy, or `fn` itself for 'none'."""
    if check(name) == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[name], static_argnums=static_argnums)
