"""`python -m alignax.train --config=experiments/configs/NAME.py[:ARG] --workdir=DIR`.

Starts a run, or resumes it when DIR already holds checkpoints. SIGTERM (TPU preemption)
saves at the next step boundary and exits 0, so the scheduler can simply restart the
same command.
"""

from __future__ import annotations

import logging
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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    del argv
    from alignax import distributed
    distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)  # before any other JAX call, never inside config parsing

    from alignax import config as config_lib
    from alignax import data_setup
    from alignax.trainer import Trainer

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds log every file at INFO
    logging.getLogger("alignax").setLevel(logging.INFO)
    config = _CONFIG.value
    import jax
    config_lib.validate(config, jax.device_count())
    data_setup.prepare(config, _WORKDIR.value)
    result = Trainer(config, _WORKDIR.value).run()
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.final_step}; "
          f"workdir {_WORKDIR.value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
