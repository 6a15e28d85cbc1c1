"""Orbax checkpoints of the train state plus the resolved config, saved asynchronously.

A checkpoint restores onto whatever mesh the current run uses: the target shardings come
from the current run, never from the file. Orbax writes each step to a temporary
directory and renames it when complete, so a killed save never leaves a half checkpoint.

Each step stores the *resolved* config (objective defaults merged, `-1` mesh sizes filled in),
also written as readable `checkpoints/config.json`.

Damage is found before the expensive restore: a step whose `config` item or state metadata
cannot be read (an empty or partial step directory, truncated metadata, missing array files)
is reported by number, moved aside to `checkpoints/N.unreadable` and the next older step is
tried (`config.checkpoint_on_damage='fallback'`), or the run stops naming the directory to
remove (`'stop'`). A restore that still fails falls back the same way. Orbax stores no
checksums, so a flipped byte inside array data is not detectable and restores silently.

The workdir may be local or a URL (`gs://...`): the directory reaches orbax as a string (etils
epath), never through `pathlib.Path`, which would turn `gs://b/run` into the local `gs:/b/run`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from alignax import fs
from alignax.errors import ConfigError

log = logging.getLogger("alignax")

# Config fields that change the shapes or meaning of saved arrays: a resume must match them.
STRUCTURAL_FIELDS = ("model.pretrained", "model.transformer", "model.vae", "lora.enabled", "lora.rank",
                     "lora.targets", "ema.enabled", "objective.name", "optim.frozen", "rewards", "seed")
# Why a field is structural when that is not obvious from its name.
_WHY = {"seed": "the seed draws every frozen param not loaded from config.model.pretrained (a random VAE, "
                "LoRA base or reference model) as well as the data order and noise: a resumed run with another "
                "seed would train against different frozen weights"}
ON_DAMAGE = ("fallback", "stop")  # config.checkpoint_on_damage
CONFIG_JSON = "config.json"       # the resolved config, readable, beside the step directories
UNREADABLE_SUFFIX = ".unreadable"
# Parts of the train state where ±inf is a legitimate value (the running ideal starts at −inf).
_INF_ALLOWED = ("objective",)


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples → lists, as they come back from JSON


def checkpoint_directory(workdir: fs.PathLike) -> str:
    """`workdir/checkpoints`, absolute for local paths; a URL stays a URL (`gs://b/run/checkpoints`)."""
    return fs.join(fs.absolute(workdir), "checkpoints")


def resolved_config(config: ml_collections.ConfigDict | dict, num_devices: int | None = None) -> dict:
    """The config as a run uses it, as plain JSON values: the objective's defaults merged in and,
    given `num_devices`, the `-1` of `mesh.shape` filled in. Idempotent, and a config saved before
    configs were resolved resolves to the same thing, so saved and current compare like with like."""
    from alignax import mesh as mesh_lib
    from alignax import objectives
    tree = _normalise(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    if isinstance(tree.get("objective"), dict):
        try:
            tree["objective"] = _normalise(objectives.with_defaults(
                ml_collections.ConfigDict(tree["objective"])).to_dict())
        except (ConfigError, KeyError, TypeError, ValueError):
            pass  # an objective this version does not know: compared as written
    shape = _lookup(tree, "mesh.shape")
    if num_devices is not None and isinstance(shape, list):
        tree["mesh"]["shape"] = list(mesh_lib.resolve_shape(shape, num_devices))
    return tree


def check_compatible(saved: dict, current: dict, directory: fs.PathLike) -> None:
    """ConfigError naming each structural field where the checkpoint's config differs from this run's
    (both resolved first, so an old unresolved checkpoint config still matches)."""
    saved, current = resolved_config(saved), resolved_config(current)
    diffs = []
    for f in STRUCTURAL_FIELDS:
        old, new = _lookup(saved, f), _lookup(current, f)
        if old != new:
            why = f" ({_WHY[f]})" if f in _WHY else ""
            diffs.append(f"config.{f}: checkpoint has {old!r}, this run has {new!r}{why}")
    if diffs:
        raise ConfigError(f"{directory}: the checkpoint was written by an incompatible config; start a new "
                          "--workdir or restore the old values:\n  " + "\n  ".join(diffs))


@jax.jit
def _finite_parts(state: dict) -> dict:
    def ok(part: str, tree: Any) -> jax.Array:
        test = jnp.isnan if part in _INF_ALLOWED else (lambda x: ~jnp.isfinite(x))
        bad = [jnp.any(test(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return ~jnp.any(jnp.stack(bad)) if bad else jnp.array(True)
    return {part: ok(part, tree) for part, tree in state.items()}


def nonfinite_parts(state: dict) -> list[str]:
    """The top-level parts of a train state holding NaN or ±inf (NaN only for objective state, whose
    running ideal legitimately starts at −inf): what a checkpoint must never store."""
    return sorted(part for part, ok in jax.device_get(_finite_parts(state)).items() if not bool(ok))


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + "…"


def _leaf_map(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} with orbax's and jax's key kinds alike (namedtuple fields, dict keys and
    indices all become their plain names)."""
    def name(key: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves[0]}


class Checkpointer:
    """CheckpointManager over `workdir/checkpoints` keeping `keep` steps.

    `directory` is a string: a local absolute path or the workdir's URL + `/checkpoints`."""

    def __init__(self, workdir: fs.PathLike, *, keep: int, async_save: bool = True, create: bool = True):
        # create=False: read-only use (export, evaluate), which must not make `checkpoints/` as a side effect
        self.directory = checkpoint_directory(workdir)
        for path, what in ((fs.absolute(workdir), "--workdir"), (self.directory, "the checkpoint directory")):
            if fs.isfile(path):  # orbax would wait minutes on it, then time out
                raise ConfigError(f"{path}: {what} is a plain file, expected a directory; move the file away")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
        self._config_json: str | None = None  # the text last written to config.json

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, config: dict) -> bool:
        """Starts saving `step` (the state and the resolved `config`) and rewrites config.json; returns
        False, doing nothing, when `step` is already saved or being saved (a preemption or final
        save right after the periodic one), which orbax would refuse with StepAlreadyExistsError."""
        if step in self.manager.all_steps():
            log.info("step %d is already saved in %s", step, self.directory)
            return False
        config = _normalise(config)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)), force=True)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        if jax.process_index() == 0 and text != self._config_json:
            fs.write_text_atomic(fs.join(self.directory, CONFIG_JSON), text)
            self._config_json = text
        return True

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def unreadable(self, step: int) -> str | None:
        """Why `step` cannot be restored, in one line, or None when its config and state metadata read
        back (cheap: small JSON files and per-array headers, no array data)."""
        try:
            config = self.saved_config(step)
            if not isinstance(config, dict):
                return f"its config item holds {type(config).__name__}, not a JSON object"
            metadata = self.manager.item_metadata(step)
            state = metadata.get("state") if hasattr(metadata, "get") else metadata["state"]
            if state is None or not _leaf_map(state):
                return "it has no readable state item"
        except Exception as e:  # noqa: BLE001 (any failure to read is what "unreadable" means)
            return _one_line(e)
        return None

    def restore_latest(self, abstract_state: Any, shardings: Any, *, on_damage: str = "fallback",
                       check_config: Callable[[dict], None] | None = None) -> tuple[int, Any] | None:
        """(step, state) of the newest readable step placed with `shardings`, or None when there is none.

        Each newer unreadable step is reported by number: with `on_damage='stop'` as a ConfigError
        naming the directory to remove; with 'fallback' by a warning, and the step directory is moved
        aside to `N.unreadable` (kept for inspection; a later save of step N needs the name free).
        `check_config(saved_config)` refuses an incompatible run (a ConfigError, never a fallback), and
        a state whose arrays differ from `abstract_state` is refused the same way."""
        if on_damage not in ON_DAMAGE:
            raise ConfigError(f"config.checkpoint_on_damage={on_damage!r}: choose one of {list(ON_DAMAGE)}")
        self.manager.reload()  # the step list as it is on disk now, not as it was when the manager opened
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            problem = self.unreadable(step)
            if problem is None:
                if check_config is not None:
                    check_config(self.saved_config(step))
                self._check_layout(step, abstract_state)
                try:
                    return step, self.restore(step, abstract_state, shardings)
                except Exception as e:  # noqa: BLE001 (array data that fails to read shows only here)
                    problem = _one_line(e)
            self._damaged(step, problem, on_damage)
        if steps:
            log.warning("no readable checkpoint left in %s: starting from step 0", self.directory)
        return None

    def _check_layout(self, step: int, abstract_state: Any) -> None:
        saved = _leaf_map(self.manager.item_metadata(step)["state"])
        wanted = _leaf_map(abstract_state)
        differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        if differ:
            shown = "; ".join(f"{k}: saved {saved.get(k)}, this run {wanted.get(k)}" for k in differ[:3])
            raise ConfigError(f"{fs.join(self.directory, str(step))}: the saved state's arrays differ from this "
                              f"run's in {len(differ)} places ({shown}); it was written by another alignax "
                              "version or config: start a new --workdir")

    def _damaged(self, step: int, problem: str, on_damage: str) -> None:
        where = fs.join(self.directory, str(step))
        if on_damage == "stop":
            raise ConfigError(f"{where}: checkpoint step {step} is unreadable ({problem}); delete or move that "
                              "directory to resume from the newest readable step (or set "
                              "config.checkpoint_on_damage='fallback' to do that automatically)")
        names, name, n = set(fs.listdir(self.directory)), f"{step}{UNREADABLE_SUFFIX}", 1
        while name in names:  # an earlier damaged step N, moved aside already
            n += 1
            name = f"{step}{UNREADABLE_SUFFIX}{n}"
        aside = fs.join(self.directory, name)
        if jax.process_index() == 0:
            filesystem, path = fs.filesystem(where)
            filesystem.mv(path, fs.filesystem(aside)[1], recursive=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"alignax: moved aside unreadable checkpoint {step}")
        self.manager.reload()
        log.warning("checkpoint step %d in %s is unreadable (%s): moved it to %s and trying the next older step",
                    step, self.directory, problem, aside)

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
