"""Pieces shared by experiment configs: start from these, override what the experiment is about."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import ml_collections

from alignax import config as config_lib
from alignax.errors import ConfigError


def parse_options(arg: str, known: Iterable[str], *, config_file: str) -> list[str]:
    """The comma-separated options after `NAME.py:`, in order; an unknown one is a ConfigError naming it,
    the closest known option and all of them, so `:draftk` never silently trains the default."""
    known = list(known)
    options = [o.strip() for o in (arg or "").split(",") if o.strip()]
    where = "/".join(Path(config_file).parts[-3:])
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(known) if known else "none: this config takes no option"
            raise ConfigError(f"{where}:{arg}: unknown option {option!r}{hint}; known options: {listed}")
    return options


def tiny_run(total_steps: int = 20, batch_size: int = 8) -> ml_collections.ConfigDict:
    """The embedded default world: a random tiny MM-DiT + VAE on generated shapes, CPU-sized."""
    c = config_lib.base_config()
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.log_every = 5
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    c.eval_every = -1  # about 4 sample grids per run, whatever total_steps becomes
    c.data.generate = "tiny_world"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.sample.num_steps = 8
    return c


def tiny_lora(c: ml_collections.ConfigDict, rank: int = 4) -> None:
    """LoRA adapters of rank `rank` (alpha = rank: scale 1) on every adapted MM-DiT kernel."""
    c.lora.enabled = True
    c.lora.rank = rank
    c.lora.alpha = float(rank)


def running_normalization(names: Iterable[str], momentum: float = 0.9) -> ml_collections.ConfigDict:
    """`config.pareto.normalization` that standardises each reward by its running mean and std."""
    return ml_collections.ConfigDict({name: dict(method="running", momentum=momentum) for name in names})
