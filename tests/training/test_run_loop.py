"""The run loop's exits and what it writes: a failure never costs the save in flight, SIGTERM at any
moment exits cleanly with the rows written, metrics.jsonl holds each step once across resumes, the
divergence guard and status.json, config changes on resume, and the writers on a remote workdir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from alignax import mesh as mesh_lib
from alignax.training import preemption
from alignax.training.trainer import Trainer
from tests.training.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_preemption():
    """The preemption flag is process-wide and sticky: no test leaks it into another."""
    preemption.clear()
    yield
    preemption.clear()


def make_trainer(workdir, tiny_world, *, async_checkpoints=False, **overrides) -> Trainer:
    config = tiny_config(**overrides)
    config.data.path = tiny_world
    mesh = mesh_lib.make_mesh((1, 1, 1), config.mesh.axes, devices=jax.devices()[:1])
    return Trainer(config, workdir, mesh=mesh, async_checkpoints=async_checkpoints)


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def loss_steps(workdir) -> list[int]:
    return [r["step"] for r in rows(workdir) if "loss" in r]


def status(workdir) -> dict:
    return json.loads((Path(workdir) / "status.json").read_text())


def sigterm_after_saving(trainer: Trainer, monkeypatch, at: int) -> Trainer:
    """SIGTERM delivered to this process right after the checkpoint of step `at` was written."""
    save = trainer.save

    def save_then_sigterm(state):
        save(state)
        if int(jax.device_get(state["step"])) == at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "save", save_then_sigterm)
    return trainer


# ---- every exit path ------------------------------------------------------------------------------

def test_an_error_after_an_async_save_keeps_that_checkpoint_and_is_raised(tmp_path, tiny_world, monkeypatch):
    """issue 9.2: writing samples fails at a checkpoint step, right after the async save started. The
    save completes before the error leaves run(), and the error raised is the original one."""
    workdir = tmp_path / "run"
    trainer = make_trainer(workdir, tiny_world, async_checkpoints=True, total_steps=4, checkpoint_every=2,
                           eval_every=2, log_every=5)

    class SamplesUnwritable(OSError):
        pass

    def write_samples(state, writer, step):
        raise SamplesUnwritable(f"samples/ is not writable at step {step}")

    monkeypatch.setattr(trainer, "write_samples", write_samples)
    with pytest.raises(SamplesUnwritable, match="at step 2"):
        trainer.run()
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "2" in names and not [n for n in names if "tmp" in n], names
    assert (workdir / "checkpoints" / "2" / "state").is_dir()
    assert loss_steps(workdir) == [1, 2]  # the window's rows, though log_every=5, are written
    assert status(workdir) | {"reason": ""} == {"state": "failed", "step": 2, "total_steps": 4, "reason": ""}
    assert "SamplesUnwritable" in status(workdir)["reason"]


def test_sigterm_before_the_run_at_a_saved_step_and_at_the_last_step(tmp_path, tiny_world, monkeypatch):
    """issue 9.3: a SIGTERM before run() is honoured (nothing to save); one right after the save of
    step 2 (checkpoint_every=1) stops there without a second save, with the pending rows written
    (log_every=5); one during the last step's save just finishes."""
    workdir = tmp_path / "run"
    settings = dict(total_steps=3, checkpoint_every=1, log_every=5)
    preemption.request()  # e.g. during data generation in the CLI, before the trainer existed
    early = make_trainer(workdir, tiny_world, **settings).run()
    assert early.preempted and early.final_step == 0 and early.state is None
    assert not list((workdir / "checkpoints").glob("[0-9]*")) and not (workdir / "metrics.jsonl").exists()
    assert status(workdir)["state"] == "preempted" and "nothing saved" in status(workdir)["reason"]
    preemption.clear()

    result = sigterm_after_saving(make_trainer(workdir, tiny_world, **settings), monkeypatch, at=2).run()
    assert result.preempted and result.final_step == 2
    assert sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*")) == [1, 2]
    assert loss_steps(workdir) == [1, 2]
    assert status(workdir) | {"reason": ""} == {"state": "preempted", "step": 2, "total_steps": 3, "reason": ""}
    preemption.clear()

    last = sigterm_after_saving(make_trainer(workdir, tiny_world, **settings), monkeypatch, at=3).run()
    assert not last.preempted and last.final_step == 3
    assert loss_steps(workdir) == [1, 2, 3]
    assert status(workdir)["state"] == "finished" and status(workdir)["step"] == 3


def test_sigterm_during_data_generation_exits_zero_with_nothing_saved(tmp_path, tiny_world):
    """issue 9.3: the CLI installs its handler before data generation: exit 0, one clear line."""
    workdir = tmp_path / "run"
    script = (
        "import os, signal\n"
        "from alignax import train\n"
        "from alignax.data import setup as data_setup\n"
        "real = data_setup.prepare\n"
        "def prepare(config, workdir):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(config, workdir)\n"
        "data_setup.prepare = prepare\n"
        "train.cli()\n")  # the console script's entry point, as `python -m alignax.train` runs it
    command = [sys.executable, "-c", script, "--config=experiments/configs/sft_tiny.py", f"--workdir={workdir}",
               "--config.mesh.shape=(1,1,1)", "--config.data.generate=", f"--config.data.path={tiny_world}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preempted before the first step (while generating data); nothing saved" in done.stderr
    assert not (workdir / "checkpoints").exists()
    assert status(workdir)["state"] == "preempted"


# ---- metrics.jsonl across resumes, config changes ---------------------------------------------------

def test_resume_writes_each_step_once_and_records_config_changes(tmp_path, tiny_world):
    """issue 9.4 / 10.6: killed at step 6 with the last checkpoint at 4, resumed to 8 with a smaller
    total_steps: steps 1..8 appear exactly once, and the change is warned about and recorded."""
    workdir = tmp_path / "run"
    first = make_trainer(workdir, tiny_world, total_steps=10, checkpoint_every=4).run(stop_after=6)
    assert first.final_step == 6 and loss_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert status(workdir)["state"] == "stopped"
    resumed = make_trainer(workdir, tiny_world, total_steps=8, checkpoint_every=4).run()
    assert resumed.final_step == 8
    assert loss_steps(workdir) == list(range(1, 9))
    assert [r for r in rows(workdir) if "config_change" in r] == [
        {"step": 4, "config_change": {"total_steps": {"old": 10, "new": 8}}}]
    last = rows(workdir)[-1]
    assert last["step"] == 8 and {"param_norm", "steps_per_second", "io_seconds"} <= set(last)
    assert status(workdir) == {"state": "finished", "step": 8, "total_steps": 8, "reason": ""}


# ---- divergence -----------------------------------------------------------------------------------

def test_divergence_guard_halts_a_huge_learning_rate(tmp_path, tiny_world):
    """issue 9.10: lr=1e4 keeps every loss finite (1.9, then 8e9, ...) yet diverges: the guard halts."""
    from alignax.training.divergence import DivergenceError
    workdir = tmp_path / "run"
    trainer = make_trainer(workdir, tiny_world, total_steps=6, **{
        "optim.learning_rate": 1e4, "optim.warmup_steps": 0, "divergence.enabled": True, "divergence.window": 1})
    with pytest.raises(DivergenceError, match=r"step 2: diverged: \|loss\| .* config.divergence.loss_factor=100"):
        trainer.run()
    assert loss_steps(workdir) == [1, 2] and all(np.isfinite(r["param_norm"]) for r in rows(workdir) if "loss" in r)
    assert status(workdir)["state"] == "diverged" and status(workdir)["step"] == 2
    assert not list((workdir / "checkpoints").glob("[0-9]*"))  # checked before saving: nothing diverged on disk


def test_divergence_guard_rules():
    from alignax.training.divergence import DivergenceGuard
    off = DivergenceGuard({"enabled": False, "param_norm_max": 1.0})
    assert off.check(1, {"loss": 1e30, "param_norm": 1e30, "finite": 1.0}) is None

    guard = DivergenceGuard({"enabled": True, "window": 3, "loss_factor": 10.0, "param_norm_factor": 2.0,
                             "param_norm_max": 1e6})
    for step, loss in enumerate((1.0, -2.0, 1.5), start=1):  # magnitudes: a loss may be negative
        assert guard.check(step, {"loss": loss, "param_norm": 100.0, "finite": 1.0}) is None
    assert guard.check(4, {"loss": 14.0, "param_norm": 150.0, "finite": 1.0}) is None  # < 10 × median 1.5
    assert guard.check(5, {"loss": float("nan"), "param_norm": 1e9, "finite": 0.0}) is None  # the NaN guard's
    assert "|loss| 25" in guard.check(6, {"loss": -25.0, "param_norm": 100.0, "finite": 1.0})
    assert "running median 100" in guard.check(6, {"loss": 1.0, "param_norm": 250.0, "finite": 1.0})
    assert "param_norm_max=1e+06" in guard.check(6, {"loss": 1.0, "param_norm": 2e6, "finite": 1.0})
    fresh = DivergenceGuard({"enabled": True, "window": 20})
    assert "overflowed" in fresh.check(1, {"loss": 1.0, "param_norm": float("inf"), "finite": 1.0})


def test_divergence_and_eval_every_values_are_checked():
    from alignax import config as config_lib
    from alignax.errors import ConfigError
    for key, value, field in (("eval_every", -2, "eval_every"), ("divergence.window", 0, "divergence.window"),
                              ("divergence.loss_factor", 1.0, "divergence.loss_factor"),
                              ("divergence.param_norm_max", -1.0, "divergence.param_norm_max")):
        with pytest.raises(ConfigError, match=rf"config\.{field}="):
            config_lib.validate(tiny_config(**{key: value}))


def test_sample_cadence_follows_total_steps():
    """issue 10.6: eval_every=-1 (the default) is about four grids per run, whatever total_steps is."""
    from alignax.training.trainer import sample_interval
    assert [sample_interval(tiny_config(total_steps=n, eval_every=-1)) for n in (1, 6, 20, 1000)] == [1, 2, 5, 250]
    assert sample_interval(tiny_config(total_steps=1000, eval_every=0)) == 0
    assert sample_interval(tiny_config(total_steps=1000, eval_every=7)) == 7


def test_config_changes_name_old_and_new_values():
    from alignax.training.trainer import config_changes
    saved = {"total_steps": 10, "pareto": {"weights": {"red": 1.0, "blue": 0.0}}, "mesh": {"shape": [1, 1, 1]},
             "rewards": {"red": {"kind": "channel_share"}}, "old_only": 1}
    current = {"total_steps": 10, "pareto": {"weights": {"red": 0.5, "blue": 0.5}}, "mesh": {"shape": (1, 1, 1)},
               "rewards": {"red": {"kind": "brightness"}}, "new_only": 2}
    assert config_changes(saved, current) == {"pareto.weights.red": (1.0, 0.5), "pareto.weights.blue": (0.0, 0.5)}


# ---- writers on a remote workdir -----------------------------------------------------------------

def test_metrics_writer_on_a_memory_workdir():
    """issue 10.4: metrics.jsonl, TensorBoard events, sample PNGs and status.json through fsspec
    (tensorboardX cannot write to gs:// itself: events are staged locally and uploaded)."""
    import io

    import fsspec
    from PIL import Image

    from alignax.training import metrics as metrics_lib
    memory = fsspec.filesystem("memory")
    url = "memory://alignax-run-loop-test/run"
    try:
        writer = metrics_lib.MetricsWriter(url)
        writer.scalars(1, {"loss": 1.0})
        writer.scalars(2, {"loss": 0.5})
        png = writer.images(2, "samples", np.full((4, 8, 8, 3), 0.5, np.float32))
        writer.close()
        metrics_lib.write_status(url, "finished", 2, 2)
        root = "/alignax-run-loop-test/run"
        lines = memory.cat(f"{root}/metrics.jsonl").decode().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
        assert png == f"{url}/samples/samples_000002.png"
        assert Image.open(io.BytesIO(memory.cat(f"{root}/samples/samples_000002.png"))).size == (16, 16)
        events = [p for p in memory.find(f"{root}/tensorboard") if "tfevents" in p]
        assert events and memory.size(events[0]) > 0
        assert json.loads(memory.cat(f"{root}/status.json"))["state"] == "finished"
        assert not Path("memory:").exists()  # nothing written to a local look-alike directory

        resumed = metrics_lib.MetricsWriter(url, purge_step=1)  # a resume from step 1 drops step 2's row
        assert resumed.truncate(1) == 1
        resumed.scalars(2, {"loss": 0.25})
        resumed.close()
        assert [json.loads(line) for line in memory.cat(f"{root}/metrics.jsonl").decode().splitlines()] == [
            {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.25}]
    finally:
        if memory.exists("/alignax-run-loop-test"):
            memory.rm("/alignax-run-loop-test", recursive=True)
