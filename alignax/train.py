"""`python -m alignax.train --config=experiments/configs/NAME.py[:ARG] --workdir=DIR`.

Starts a run, or resumes it when DIR already holds checkpoints. SIGTERM (TPU preemption) at
any moment exits 0 (the handler is installed first thing in `main`): during training it saves
at the next step boundary; during start-up (data generation, model building, compilation)
there is nothing to save. The scheduler can simply restart the same command.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/NAME.py[:ARG]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, samples")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = on TPU VMs / when coordinator env is set")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process CPU/GPU runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "~/.cache/alignax/xla",
                              "JAX persistent compilation cache ('' disables); reruns skip XLA compilation")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    del argv
    # First of all: from here on a SIGTERM (data generation, model building, compilation, any step,
    # a save) is a clean stop with exit 0, never a -15 (alignax/training/preemption.py).
    from alignax.training import preemption
    preemption.install()
    import jax

    from alignax.training import distributed
    if _CACHE.value and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # Before any other JAX call; the config file was only parsed, never made to touch devices.
    distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)

    from alignax import config as config_lib
    from alignax import fs
    from alignax.data import setup as data_setup
    from alignax.training.trainer import Trainer

    config = _CONFIG.value
    config_lib.validate(config, jax.device_count())
    if fs.is_remote(_WORKDIR.value):
        fs.filesystem(_WORKDIR.value)  # a missing backend (gs:// without gcsfs) fails here, before any work
    try:
        data_setup.prepare(config, _WORKDIR.value)
        if _preempted_during_startup("generating data", config):
            return 0
        trainer = Trainer(config, _WORKDIR.value)  # run() checks for a preemption first thing
    except BaseException as error:
        _startup_failed(error, config)
        raise
    result = trainer.run()
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.final_step}; "
          f"workdir {_WORKDIR.value}", file=sys.stderr)
    return 0


def _checkpointed_step(workdir: str) -> int:
    """The newest step directory under workdir/checkpoints (0 if none), without opening orbax."""
    from alignax import fs
    steps = [int(name) for name in fs.listdir(fs.join(fs.absolute(workdir), "checkpoints")) if name.isdigit()]
    return max(steps, default=0)


def _preempted_during_startup(phase: str, config) -> bool:
    """True (after one clear line and status.json) when a SIGTERM came before the trainer exists."""
    import jax

    from alignax.training import metrics, preemption
    if not preemption.agreed():
        return False
    step = _checkpointed_step(_WORKDIR.value)
    logging.getLogger("alignax").warning("preempted while %s, before the first step: nothing to save%s", phase,
                                         f"; a rerun resumes from step {step}" if step else "")
    if jax.process_index() == 0:
        metrics.write_status(_WORKDIR.value, "preempted", step, config.total_steps,
                             f"SIGTERM while {phase}, before the first step: nothing saved")
    print(f"preempted before the first step (while {phase}); nothing saved; workdir {_WORKDIR.value}",
          file=sys.stderr)
    return True


def _startup_failed(error: BaseException, config) -> None:
    """status.json = failed for an error before the trainer runs (run() writes its own)."""
    import jax

    from alignax.training import metrics
    if jax.process_index() != 0:
        return
    try:
        metrics.write_status(_WORKDIR.value, "failed", _checkpointed_step(_WORKDIR.value), config.total_steps,
                             f"{type(error).__name__}: {error}"[:2000])
    except Exception as e:  # noqa: BLE001 (never mask the original error)
        logging.getLogger("alignax").error("writing status.json failed: %s", e)


def cli() -> None:
    """The `alignax-train` console script (same as `python -m alignax.train`); logging levels and one-line
    command-line errors come from `alignax.cli`."""
    from alignax import cli as cli_lib
    from alignax.training import preemption
    preemption.install()  # before flag parsing and the config file's import: no SIGTERM window exits -15
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
