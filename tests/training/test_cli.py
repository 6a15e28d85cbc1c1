"""The train CLI as users run it: fresh start, resume, SIGTERM preemption, two-process multi-host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "experiments/configs/sft_tiny.py"


def train_command(workdir, *extra, mesh="(1,1,1)"):
    return [sys.executable, "-m", "alignax.train", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.mesh.shape={mesh}", *extra]


def env(devices: int = 1):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["PYTHONPATH"] = str(REPO)
    return e


def metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_state(workdir, step):
    from alignax.training.checkpoint import Checkpointer
    return Checkpointer(workdir, keep=100, async_save=False).restore_on_one_device(step)


def test_train_then_resume_from_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.run(train_command(workdir, "--config.total_steps=4", "--config.checkpoint_every=2"),
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 4/4" in first.stderr and "finished at step 4" in first.stderr
    rows = [r for r in metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # every step, though fetched once per log_every window
    assert {"loss", "grad_norm", "learning_rate", "steps_per_second", "examples_per_second_per_device"} <= set(rows[-1])
    assert list((workdir / "tensorboard").iterdir()), "no TensorBoard event file"
    assert (workdir / "samples" / "samples_000004.png").exists()  # eval_every=20, but the last step samples too

    second = subprocess.run(train_command(workdir, "--config.total_steps=6", "--config.checkpoint_every=2",
                                          "--config.eval_every=0"),
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and "finished at step 6" in second.stderr


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(train_command(workdir, "--config.total_steps=100000", "--config.log_every=1",
                                             "--config.checkpoint_every=100000", "--config.eval_every=0"),
                               cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [r for r in metrics(workdir) if "loss" in r]:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "preempted at step" in stderr
    steps = ocp.CheckpointManager(workdir.absolute() / "checkpoints").all_steps()
    assert steps, "no checkpoint after SIGTERM"
    state = final_state(workdir, max(steps))
    assert int(state["step"]) == max(steps) and all(np.isfinite(x).all() for x in
                                                     _leaves(state["trainable"]))


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes × 4 fake devices on a (2,2,2) mesh = 1 process × 8 devices, loss and params."""
    steps = ["--config.total_steps=3", "--config.checkpoint_every=3", "--config.log_every=1", "--config.eval_every=0"]
    single = subprocess.run(train_command(tmp_path / "single", *steps, mesh="(2,2,2)"), cwd=REPO, env=env(8),
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(train_command(tmp_path / "multi", *steps, f"--coordinator_address=localhost:{port}",
                                            "--num_processes=2", f"--process_id={i}", mesh="(2,2,2)"),
                              cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single_loss = [r["loss"] for r in metrics(tmp_path / "single") if "loss" in r]
    multi_loss = [r["loss"] for r in metrics(tmp_path / "multi") if "loss" in r]
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
    a, b = final_state(tmp_path / "multi", 3), final_state(tmp_path / "single", 3)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(_leaves(a["trainable"]), _leaves(b["trainable"]),
                                                          strict=True))
    scale = max(float(np.abs(y).max()) for y in _leaves(b["trainable"]))
    assert diff / scale <= 1e-5
