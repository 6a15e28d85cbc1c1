"""Orbax checkpoints of the train state plus the resolved config, saved asynchronously.

A checkpoint restores onto whatever mesh the current run uses: the target shardings come
from the current run, never from the file. Orbax writes each step to a temporary
directory and renames it when complete, so a killed save never leaves a half checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from alignax.errors import ConfigError

# Config fields that change the shapes or meaning of saved arrays: a resume must match them.
STRUCTURAL_FIELDS = ("model.pretrained", "model.transformer", "model.vae", "lora.enabled", "lora.rank",
                     "lora.targets", "ema.enabled", "objective.name", "optim.frozen", "rewards")


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples → lists, as they come back from JSON


def check_compatible(saved: dict, current: dict, directory: Path) -> None:
    """ConfigError naming each structural field where the checkpoint's config differs from this run's."""
    diffs = [f"config.{f}: checkpoint has {_lookup(saved, f)!r}, this run has {_lookup(current, f)!r}"
             for f in STRUCTURAL_FIELDS if _normalise(_lookup(saved, f)) != _normalise(_lookup(current, f))]
    if diffs:
        raise ConfigError(f"{directory}: the checkpoint was written by an incompatible config; start a new "
                          "--workdir or restore the old values:\n  " + "\n  ".join(diffs))


class Checkpointer:
    """CheckpointManager over `workdir/checkpoints` keeping `keep` steps."""

    def __init__(self, workdir: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(_normalise(config))), force=True)

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> Any:
        """The state at `step`, placed with this run's `shardings` (any mesh)."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                              shardings)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def restore_on_one_device(self, step: int) -> Any:
        """The saved state on this process's first device, whatever mesh wrote it (for export and
        inspection; a sharded resume uses `restore`)."""
        metadata = self.manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata,
                              is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
