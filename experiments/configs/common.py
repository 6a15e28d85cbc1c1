"""Pieces shared by experiment configs: start from these, override what the experiment is about."""

from __future__ import annotations

import ml_collections

from alignax import config as config_lib


def tiny_run(total_steps: int = 20, batch_size: int = 8) -> ml_collections.ConfigDict:
    """The embedded default world: a random tiny MM-DiT + VAE on generated shapes, CPU-sized."""
    c = config_lib.base_config()
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.log_every = 5
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    c.eval_every = total_steps
    c.data.generate = "tiny_world"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.sample.num_steps = 8
    return c
