"""`python -m alignax.study.base_point --config=experiments/configs/X.py[:ARG] [--config.k=v] --workdir=DIR`.

A study's base point: the model every arm starts from, evaluated like any trained point. Rather than a
special case in the evaluation, this saves the config's initial train state as `DIR/checkpoints/0`
(built by the trainer itself, so the params are exactly those step 1 of a run would start from, LoRA
and EMA included) and writes `status.json` = finished at step 0 of 0. It compiles no train step and
trains nothing; the data the config generates (`config.data.generate`) is prepared in DIR as a run would,
so the evaluation finds the run's prompts there. Re-running it on a DIR that has `checkpoints/0` does
nothing.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/NAME.py[:ARG]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the base point's directory")
flags.mark_flags_as_required(["config", "workdir"])

REASON = "the base point: the initial params, not trained"


def write_initial_checkpoint(config, workdir: str) -> int:
    """Saves `config`'s initial train state as step 0 of `workdir` (unless it is there) and marks it finished."""
    import jax

    from alignax import config as config_lib
    from alignax.data import setup as data_setup
    from alignax.training import metrics
    from alignax.training.trainer import Trainer

    config_lib.validate(config, jax.device_count())
    data_setup.prepare(config, workdir)
    trainer = Trainer(config, workdir, async_checkpoints=False)
    try:
        if 0 not in trainer.checkpointer.all_steps():
            trainer.save(trainer.initial_state())
        trainer.checkpointer.wait()
    finally:
        trainer.close()
    if jax.process_index() == 0:
        metrics.write_status(workdir, "finished", 0, 0, REASON)
    return 0


def main(argv: list[str]) -> int:
    del argv
    write_initial_checkpoint(_CONFIG.value, _WORKDIR.value)
    print(f"base point: wrote the initial state to {_WORKDIR.value}/checkpoints/0", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from alignax import cli as cli_lib
    cli_lib.run_main(main)
