"""`python -m alignax.train --config=experiments/configs/NAME.py[:ARG] --workdir=DIR`.

Starts a run, or resumes it when DIR already holds checkpoints. SIGTERM (TPU preemption)
saves at the next step boundary and exits 0, so the scheduler can simply restart the
same command.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
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
    import jax
    from absl import logging as absl_logging

    from alignax.training import distributed
    if _CACHE.value and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # Before any other JAX call; the config file was only parsed, never made to touch devices.
    distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)

    from alignax import config as config_lib
    from alignax.data import setup as data_setup
    from alignax.training.trainer import Trainer

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds log every file at INFO
    logging.getLogger("alignax").setLevel(logging.INFO)
    config = _CONFIG.value
    config_lib.validate(config, jax.device_count())
    data_setup.prepare(config, _WORKDIR.value)
    result = Trainer(config, _WORKDIR.value).run()
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.final_step}; "
          f"workdir {_WORKDIR.value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
