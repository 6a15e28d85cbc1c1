"""The run's RNG contract, named once.

Every random draw of a run is a fixed child of `key(config.seed)`, so that a resume, an export
and an evaluation recreate exactly what the trainer drew (a random-init VAE, a LoRA base, the
adapters' init) without storing it, and a step's randomness depends only on (seed, step):

    init_key(seed, TRANSFORMER_INIT)   the MM-DiT's random init (when not pretrained)
    init_key(seed, VAE_INIT)           the VAE's random init (when not pretrained)
    init_key(seed, TRAINABLE_INIT)     LoRA adapters and objective heads
    step_key(run_key, step)            the train step's key: fold_in(fold_in(run, step), 0)

Changing these numbers changes every run's random draws: a checkpoint written before the change
would resume onto a different frozen VAE. Treat them as part of the checkpoint format.
"""

from __future__ import annotations

import jax

TRANSFORMER_INIT = 1
VAE_INIT = 2
TRAINABLE_INIT = 3


def run_key(seed: int) -> jax.Array:
    """The root key of a run."""
    return jax.random.key(seed)


def init_key(seed: int | jax.Array, purpose: int) -> jax.Array:
    """The key of one of the run's initialisations (`TRANSFORMER_INIT`, `VAE_INIT`, `TRAINABLE_INIT`);
    `seed` may be the seed or the run key."""
    root = run_key(seed) if isinstance(seed, int) else seed
    return jax.random.fold_in(root, purpose)


def step_key(run: jax.Array, step: jax.Array | int) -> jax.Array:
    """The key of train step `step` (the same at any resume, on any mesh)."""
    return jax.random.fold_in(jax.random.fold_in(run, step), 0)
