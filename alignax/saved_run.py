"""Loading a saved run for inference: the one place `export` and `evaluate` read a workdir.

A saved run is `WORKDIR/checkpoints/<step>/` (orbax: the train state and the resolved config).
What a checkpoint does not store is recreated exactly as the trainer made it, by the RNG
contract of `alignax.rng`: the frozen LoRA base (`lora_base`) and a random-init VAE
(`vae_params`). Loading only reads: a mistyped `--workdir` is a ConfigError naming it, and
nothing is created there (not even an empty `checkpoints/`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from alignax import fs
from alignax import mesh as mesh_lib
from alignax import rng as rng_lib
from alignax.errors import ConfigError
from alignax.models import setup as model_setup

PyTree = Any
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """One checkpoint of a run: its step, the config it was trained with, and the saved state
    (`trainable`, `opt_state`, `ema`, ...) on this process's first device."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    state: PyTree


def check_workdir(workdir: str | Any) -> str:
    """`workdir/checkpoints`, or a ConfigError naming --workdir and what was expected there.

    Called before anything is restored or written; it only reads."""
    where = f"--workdir={fs.absolute(workdir)}"
    if not fs.exists(workdir):
        raise ConfigError(f"{where}: no such directory (expected a training run's workdir holding {CHECKPOINTS}/)")
    if not fs.isdir(workdir):
        raise ConfigError(f"{where}: is a file, not a training run's workdir")
    checkpoints = fs.join(workdir, CHECKPOINTS)
    if not fs.isdir(checkpoints):
        raise ConfigError(f"{where}: has no {CHECKPOINTS}/ directory; it is not a training run's workdir "
                          "(or the run saved no checkpoint yet)")
    return checkpoints


def load(workdir: str | Any, step: int | None = None) -> SavedRun:
    """The checkpoint at `step` (default: the latest) of the run in `workdir`, restored on one device
    whatever mesh wrote it (export and evaluate are single-host jobs)."""
    from alignax.training import checkpoint as checkpoint_lib

    checkpoints = check_workdir(workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1_000_000, async_save=False, create=False)
    try:
        steps = sorted(checkpointer.all_steps())
        if not steps:
            raise ConfigError(f"--workdir={fs.absolute(workdir)}: no checkpoints under {checkpoints}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"--step={step}: not saved in {checkpoints}; saved steps are {steps}")
        problem = checkpointer.unreadable(step)  # before the restore's raw orbax/TensorStore errors
        if problem is not None:
            others = [s for s in steps if s != step]
            raise ConfigError(f"{fs.join(checkpoints, str(step))}: checkpoint step {step} is unreadable ({problem}); "
                              f"pass --step= one of the other saved steps {others}" if others else
                              f"{fs.join(checkpoints, str(step))}: checkpoint step {step} is unreadable ({problem})")
        config = ml_collections.ConfigDict(checkpointer.saved_config(step))
        state = checkpointer.restore_on_one_device(step)
    finally:
        checkpointer.close()
    return SavedRun(fs.absolute(workdir), step, config, state)


def one_device_mesh() -> Any:
    """The (1, 1, 1) mesh on this process's first device that inference on a saved run uses."""
    return mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def lora_base(config: ml_collections.ConfigDict, t_src: model_setup.ModelSource, transformer: Any) -> PyTree:
    """The frozen MM-DiT base a LoRA run trained on, on this process's first device: the pretrained
    weights, or the random init recreated from the seed exactly as the trainer made it."""
    base, _ = model_setup.load_params_sharded(t_src, transformer,
                                              rng_lib.init_key(config.seed, rng_lib.TRANSFORMER_INIT),
                                              one_device_mesh(), mesh_lib.DEFAULT_RULES)
    return base


def vae_params(config: ml_collections.ConfigDict, v_src: model_setup.ModelSource, vae_module: Any) -> PyTree:
    """The VAE params the run used, on this process's first device: the pretrained weights, or the
    random init recreated from the seed exactly as the trainer made it."""
    params, _ = model_setup.load_params_sharded(v_src, vae_module, rng_lib.init_key(config.seed, rng_lib.VAE_INIT),
                                                one_device_mesh(), mesh_lib.DEFAULT_RULES)
    return params
