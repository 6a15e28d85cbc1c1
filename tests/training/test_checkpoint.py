"""Checkpoints that survive damage and misuse: skipped unreadable steps, one run per workdir, idempotent
saves, keep-N, the resolved config (also as config.json), the whole-state finiteness guard, gs:// paths."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

from alignax.errors import ConfigError
from alignax.training import checkpoint as checkpoint_lib
from alignax.training import workdir_lock
from alignax.training.checkpoint import Checkpointer
from tests.training.conftest import assert_trees_equal, tiny_config

REPO = Path(__file__).resolve().parents[2]


def small_state(value: float = 1.0) -> dict:
    params = {"w": jnp.full((3, 4), value), "b": jnp.zeros((4,))}
    return {"step": jnp.int32(0), "trainable": params, "opt_state": optax.adam(1e-3).init(params),
            "objective": {"ideal": jnp.full((), -jnp.inf)}}


def one_device(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, tree)


def saved_run(workdir, steps=(1, 2), keep=10) -> Checkpointer:
    ckpt = Checkpointer(workdir, keep=keep, async_save=False)
    for step in steps:
        ckpt.save(step, small_state(float(step)), {"seed": 0, "step_written": step})
    return ckpt


# ---- issue 9 item 5: a damaged latest checkpoint is skipped ------------------------------------------------


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "stray_empty_dir": lambda d: os.makedirs(d),
    "missing_config_item": lambda d: shutil.rmtree(f"{d}/config"),
    "truncated_state_metadata": lambda d: _truncate(f"{d}/state/_METADATA"),
    "missing_state_metadata": lambda d: os.remove(f"{d}/state/_METADATA"),
    "missing_array_files": lambda d: [shutil.rmtree(p) for p in glob.glob(f"{d}/state/d")],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's event loop, on the error path
def test_an_unreadable_latest_step_is_reported_and_an_older_one_restored(tmp_path, caplog, damage):
    ckpt = saved_run(tmp_path, steps=(1, 2) if damage == "stray_empty_dir" else (1, 2, 3))
    bad = 31 if damage == "stray_empty_dir" else 3
    DAMAGE[damage](f"{ckpt.directory}/{bad}")
    abstract = jax.eval_shape(small_state)

    stop = Checkpointer(tmp_path, keep=10, async_save=False)
    with pytest.raises(ConfigError, match=rf"checkpoints/{bad}: checkpoint step {bad} is unreadable .*delete or move"):
        stop.restore_latest(abstract, one_device(abstract), on_damage="stop")
    assert os.path.isdir(f"{ckpt.directory}/{bad}")  # 'stop' touches nothing

    resumed = Checkpointer(tmp_path, keep=10, async_save=False)
    with caplog.at_level(logging.WARNING, logger="alignax"):
        step, state = resumed.restore_latest(abstract, one_device(abstract))
    assert step == 2
    assert_trees_equal(state["trainable"], small_state(2.0)["trainable"])
    assert f"checkpoint step {bad} in {ckpt.directory} is unreadable" in caplog.text
    assert os.path.isdir(f"{ckpt.directory}/{bad}.unreadable")  # kept for inspection, out of orbax's way
    assert resumed.save(bad, small_state(), {"seed": 0}) and bad in resumed.all_steps()  # the step can be saved again


def test_a_failed_restore_falls_back_to_the_previous_step(tmp_path, monkeypatch, caplog):
    ckpt = saved_run(tmp_path)
    real_restore = Checkpointer.restore

    def restore(self, step, abstract_state, shardings):
        if step == 2:
            raise ValueError("DATA_LOSS: Error reading 'trainable.w'")  # what tensorstore says of bad array data
        return real_restore(self, step, abstract_state, shardings)

    monkeypatch.setattr(Checkpointer, "restore", restore)
    abstract = jax.eval_shape(small_state)
    with caplog.at_level(logging.WARNING, logger="alignax"):
        step, _ = Checkpointer(tmp_path, keep=10, async_save=False).restore_latest(abstract, one_device(abstract))
    assert step == 1 and "step 2" in caplog.text and "DATA_LOSS" in caplog.text
    assert os.path.isdir(f"{ckpt.directory}/2.unreadable")


def test_an_incompatible_or_mismatched_checkpoint_is_refused_not_skipped(tmp_path):
    ckpt = saved_run(tmp_path)
    abstract = jax.eval_shape(small_state)

    def refuse(saved):
        raise ConfigError("config.lora.rank: checkpoint has 8, this run has 4")

    with pytest.raises(ConfigError, match="lora.rank"):
        ckpt.restore_latest(abstract, one_device(abstract), check_config=refuse)
    other = {**abstract, "trainable": {**abstract["trainable"], "w": jax.ShapeDtypeStruct((5, 4), jnp.float32)}}
    with pytest.raises(ConfigError, match=r"checkpoints/2: the saved state's arrays differ .*trainable/w"):
        ckpt.restore_latest(other, one_device(other))
    assert ckpt.all_steps() == [1, 2]  # nothing moved aside


def test_checkpoints_as_a_plain_file_is_an_immediate_clear_error(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"checkpoints: the checkpoint directory is a plain file"):
        Checkpointer(tmp_path, keep=3)
    assert time.monotonic() - start < 5  # it used to wait 307 s, then time out


# ---- issue 9 item 3: a second save of one step; issue 10 item 8: keep-N, config.json --------------------------


def test_saving_a_step_again_is_a_no_op(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
    assert ckpt.save(2, small_state(), {"seed": 0})
    assert not ckpt.save(2, small_state(5.0), {"seed": 0})  # while the first save may still be in flight
    ckpt.wait()
    assert not ckpt.save(2, small_state(5.0), {"seed": 0})  # and after it finished
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_keep_n_keeps_only_the_newest_steps(tmp_path):
    ckpt = saved_run(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
    assert ckpt.all_steps() == [4, 5]
    assert sorted(os.listdir(ckpt.directory)) == ["4", "5", "config.json"]


def test_config_json_is_the_saved_config(tmp_path):
    ckpt = saved_run(tmp_path, steps=(1, 2))
    assert json.loads((tmp_path / "checkpoints" / "config.json").read_text()) == ckpt.saved_config(2)


# ---- issue 10 item 4: gs:// stays a URL ------------------------------------------------------------------------


def test_a_gs_workdir_reaches_orbax_as_a_url_and_nothing_local_is_made(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert checkpoint_lib.checkpoint_directory("gs://bucket/run") == "gs://bucket/run/checkpoints"
    opened = {}

    class FakeManager:  # opening the real one would need GCS
        def __init__(self, directory, **kwargs):
            opened["directory"] = directory

    monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", FakeManager)
    monkeypatch.setattr(checkpoint_lib.fs, "isfile", lambda path: opened.setdefault("checked", []).append(path))
    ckpt = Checkpointer("gs://bucket/run", keep=3)
    assert ckpt.directory == opened["directory"] == "gs://bucket/run/checkpoints"
    assert opened["checked"] == ["gs://bucket/run", "gs://bucket/run/checkpoints"]
    with caplog.at_level(logging.WARNING, logger="alignax"):
        lock = workdir_lock.WorkdirLock("gs://bucket/run").acquire()
    assert not lock.held and "no file locks" in caplog.text
    assert os.listdir(tmp_path) == []  # no ./gs:/bucket/... tree


# ---- issue 9 item 6: one run per workdir ------------------------------------------------------------------------


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from alignax.training.workdir_lock import WorkdirLock; "
                               "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another alignax run is using it \(pid {holder.pid} on host "
                                              rf"{socket.gethostname()}"):
            workdir_lock.WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock, so it is never stale
        holder.wait()
    with workdir_lock.WorkdirLock(tmp_path) as lock:
        assert lock.held
        assert workdir_lock.WorkdirLock(tmp_path).acquire().held  # re-entrant within one process
        assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()


# ---- issue 9 item 7, issue 10 item 8: compatibility, the resolved config, the whole-state guard ---------------


def test_a_changed_seed_is_refused_on_resume():
    with pytest.raises(ConfigError, match=r"config\.seed: checkpoint has 0, this run has 1 \(the seed draws every "
                                          r"frozen param"):
        checkpoint_lib.check_compatible({"seed": 0}, {"seed": 1}, "/w/checkpoints")


def test_nonfinite_values_anywhere_in_the_state_are_named():
    state = small_state()
    assert checkpoint_lib.nonfinite_parts(state) == []  # −inf in objective state is its "not seen yet" value
    state["opt_state"] = jax.tree.map(lambda x: x * jnp.nan if x.dtype == jnp.float32 else x, state["opt_state"])
    state["objective"] = {"ideal": jnp.full((), jnp.nan)}
    assert checkpoint_lib.nonfinite_parts(state) == ["objective", "opt_state"]


@pytest.fixture(scope="module")
def trainer(tiny_world, tmp_path_factory):
    """One tiny Trainer (mesh.shape (-1, 1, 1) on one device, EMA on), shared: building one takes seconds."""
    from alignax import mesh as mesh_lib
    from alignax.training.trainer import Trainer
    config = tiny_config(**{"data.path": tiny_world, "mesh.shape": (-1, 1, 1), "ema.enabled": True})
    mesh = mesh_lib.make_mesh((1, 1, 1), config.mesh.axes, devices=jax.devices()[:1])
    trainer = Trainer(config, tmp_path_factory.mktemp("trainer"), mesh=mesh, async_checkpoints=False)
    yield trainer
    trainer.close()


def test_a_trainer_holds_its_workdir_until_closed(trainer):
    probe = [sys.executable, "-c", "import sys; from alignax.training.workdir_lock import WorkdirLock; "
                                   "WorkdirLock(sys.argv[1]).acquire()", str(trainer.workdir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and f"pid {os.getpid()} on host" in refused.stderr
    trainer.close()
    try:
        assert subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True).returncode == 0
    finally:
        trainer.workdir_lock.acquire()


def test_trainer_refuses_to_checkpoint_nonfinite_optimiser_or_ema_state(trainer):
    from alignax.training.trainer import NonFiniteError
    state = trainer.initial_state()
    state["step"] = jnp.int32(7)
    state["ema"] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state["ema"])  # trainable stays finite
    with pytest.raises(NonFiniteError, match=r"step 7: refusing to checkpoint non-finite values in state\['ema'\]"):
        trainer.save(state)
    assert 7 not in trainer.checkpointer.all_steps()


def test_trainer_saves_the_resolved_config_and_resumes_old_unresolved_ones(trainer, caplog):
    from alignax import config as config_lib
    from alignax import objectives
    directory = Path(trainer.checkpointer.directory)
    state = trainer.initial_state()
    trainer.save(state)
    trainer.save(state)  # the same step again: a no-op, not StepAlreadyExistsError
    saved = trainer.checkpointer.saved_config(0)
    assert tuple(trainer.config.mesh.shape) == (-1, 1, 1) and saved["mesh"]["shape"] == [1, 1, 1]
    defaults = objectives.get(trainer.config.objective.name).defaults
    assert defaults and set(defaults) <= set(saved["objective"])  # the objective's defaults merged in
    assert json.loads((directory / "config.json").read_text()) == saved

    # A checkpoint written before configs were resolved (as given) still resumes, past a damaged newer step.
    assert trainer.checkpointer.save(1, state, trainer.config.to_dict())
    os.makedirs(directory / "31")
    with caplog.at_level(logging.WARNING, logger="alignax"):
        restored = trainer.restore_or_init()
    assert "checkpoint step 31" in caplog.text and "unreadable" in caplog.text
    assert_trees_equal(restored["trainable"], state["trainable"])

    os.makedirs(directory / "40")
    trainer.config.checkpoint_on_damage = "stop"
    try:
        with pytest.raises(ConfigError, match=r"checkpoints/40: checkpoint step 40 is unreadable"):
            trainer.restore_or_init()
    finally:
        trainer.config.checkpoint_on_damage = "fallback"
    with pytest.raises(ConfigError, match=r"config\.checkpoint_on_damage='ask'"):
        config_lib.validate(tiny_config(checkpoint_on_damage="ask"))
