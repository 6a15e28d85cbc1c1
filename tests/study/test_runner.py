"""alignax.study.runner: points run through the local backend in their own workdirs; a failing point is
isolated, a re-run skips finished points and resumes a killed one; the progress line. Training is faked
by a tiny script (the trainer's own resume is tested in tests/training); one slow test trains for real."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from alignax.study import cli, progress, runner, spec
from launch import backends

REPO = Path(__file__).resolve().parents[2]
SFT = "experiments/configs/sft_tiny.py"

# Stands in for `alignax.train` / `alignax.study.base_point`: resumes from its "checkpoint" (a step number in
# WORKDIR/fake_ckpt), writes metrics.jsonl rows and status.json as the trainer does. `crash` raises at start;
# `killed` is SIGKILLed at step 2 on its first attempt.
FAKE_TRAIN = '''
import json, os, pathlib, signal, sys
name, workdir, total, behaviour = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
marker = workdir / "fake_ckpt"
start = int(marker.read_text()) if marker.exists() else 0
print(f"{name}: start at step {start}", flush=True)
if behaviour == "crash":
    print("Traceback (most recent call last):\\nValueError: boom", flush=True)
    sys.exit(3)
with open(workdir / "metrics.jsonl", "a") as f:
    for step in range(start + 1, total + 1):
        f.write(json.dumps({"step": step, "loss": 1.0, "steps_per_second": 10.0}) + "\\n")
        f.flush()
        marker.write_text(str(step))
        if behaviour == "killed" and step == 2 and start == 0:
            os.kill(os.getpid(), signal.SIGKILL)
(workdir / "status.json").write_text(json.dumps({"state": "finished", "step": total, "total_steps": total,
                                                 "reason": ""}))
'''


def write_study(tmp_path: Path) -> str:
    study = dict(rewards={"red": {"kind": "channel_share", "channel": 0}}, overrides={"total_steps": 4},
                 arms=[{"name": name, "config": SFT} for name in ("ok", "crash", "killed")])
    path = tmp_path / "fake_study.py"
    path.write_text(f"def get_study(arg=''):\n    return {study!r}\n")
    return str(path)


@pytest.fixture
def fake_training(monkeypatch):
    """Replaces each point's command by FAKE_TRAIN; records launches and evaluate/report calls."""
    launched, reported = [], []
    execute = backends.LocalBackend.execute

    def argv(self, config, run):
        arm = run.name.split("__")[0]
        total = "0" if run.module == spec.BASE_MODULE else str(run.overrides["total_steps"])
        return [sys.executable, "-c", FAKE_TRAIN, run.name, run.workdir, total, arm]

    def recording_execute(self, config, runs, log=print, on_event=None):
        launched.append(sorted(run.name for run in runs))
        return execute(self, config, runs, log, on_event)

    monkeypatch.setattr(backends.LocalBackend, "argv", argv)
    monkeypatch.setattr(backends.LocalBackend, "execute", recording_execute)
    monkeypatch.setattr(cli, "evaluate_and_report",
                        lambda study, points, root, evaluate=True: reported.append(
                            {p.name: p.state for p in points} if evaluate else "report only"))
    return launched, reported


def test_a_failing_point_is_isolated_and_a_rerun_resumes_the_killed_one(tmp_path, fake_training, capsys):
    launched, reported = fake_training
    root = tmp_path / "root"
    study = write_study(tmp_path)
    assert cli.run_study(study, str(root), parallel=2, num_devices=1, progress_every=0.05) == 1
    manifest = {p["name"]: p for p in json.loads((root / "study.json").read_text())["points"]}
    assert {n: p["state"] for n, p in manifest.items()} == {
        "base": "finished", "ok": "finished", "crash": "failed", "killed": "failed"}
    assert "ValueError: boom" in manifest["crash"]["log_tail"] and manifest["crash"]["exit_code"] == 3
    assert manifest["killed"]["exit_code"] == -9 and "exit code -9" in manifest["killed"]["reason"]
    assert manifest["ok"]["log_tail"] is None and manifest["ok"]["step"] == 4
    assert reported == [{"base": "finished", "ok": "finished", "crash": "failed", "killed": "failed"}]
    captured = capsys.readouterr()
    assert "study fake_study: 2/4 done, 0 running, 2 failed, 4 total" in captured.err
    assert "2/4 points finished, not finished: crash (failed), killed (failed)" in captured.out

    # --report_only launches nothing and keeps the failures the last run recorded.
    assert cli.run_study(study, str(root), report_only=True) == 0
    assert len(launched) == 1 and reported[-1] == "report only"
    manifest = {p["name"]: p for p in json.loads((root / "study.json").read_text())["points"]}
    assert manifest["crash"]["state"] == "failed" and "ValueError: boom" in manifest["crash"]["log_tail"]
    capsys.readouterr()

    # Again: the finished points are skipped; the killed point resumes from its step 2 and finishes.
    assert cli.run_study(study, str(root), parallel=2, num_devices=1, progress_every=0) == 1
    assert launched == [["base", "crash", "killed", "ok"], ["crash", "killed"]]
    assert (root / "killed" / "train.log").read_text().splitlines() == [
        "killed: start at step 0", "killed: start at step 2"]
    assert (root / "ok" / "train.log").read_text().splitlines() == ["ok: start at step 0"]
    manifest = {p["name"]: p for p in json.loads((root / "study.json").read_text())["points"]}
    assert manifest["killed"]["state"] == "finished" and manifest["crash"]["state"] == "failed"
    assert manifest["ok"]["skipped"] == "status.json: finished at step 4"
    assert manifest["base"]["skipped"] == "status.json: finished at step 0"
    assert "3/4 points finished, not finished: crash (failed)" in capsys.readouterr().out


def test_progress_lines_show_steps_and_eta(tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    (running / "metrics.jsonl").write_text(
        '{"step": 0, "compile/flops": 1.0}\n{"step": 1, "loss": 2.0}\n'
        '{"step": 2, "loss": 1.5, "steps_per_second": 0.1}\n{"step": 3, "lo')  # a torn last line
    states = {"a": "finished", "b": "running", "c": "running", "d": "diverged", "e": "pending"}
    line = progress.summary_line(states, {"b": (str(running), 62), "c": (str(tmp_path / "fresh"), 10)})
    assert line == "1/5 done, 2 running, 1 failed, 5 total | b step 2/62 ETA 10m00s | c starting"


def test_final_state_of_a_point():
    done = {"state": "finished", "step": 4, "total_steps": 4, "reason": ""}
    assert runner.final_state(0, done, 4) == ("finished", "")
    assert runner.final_state(0, {**done, "state": "nonfinite", "reason": "NaN"}, 4) == ("nonfinite", "NaN")
    assert runner.final_state(1, {**done, "state": "failed", "reason": "DataError: x"}, 4) == ("failed", "DataError: x")
    assert runner.final_state(0, None, 4) == ("failed", "the process ended without writing status.json")
    assert runner.final_state(0, {**done, "state": "preempted", "step": 2}, 4)[0] == "preempted"


@pytest.mark.slow  # 20 min measured at load ~13 on the shared 2 cores (5.6 CPU-min): 5 real points + evaluation
def test_a_tiny_study_really_trains_and_reports(tmp_path):
    """2 objectives × 2 weight vectors, 2 steps each, through the real CLI: every point finishes, the base
    point holds step 0, and (when alignax.study.report exists) every point has an eval.json and the report."""
    import subprocess
    study = dict(rewards={"red": {"kind": "channel_share", "channel": 0}, "blue": {"kind": "channel_share",
                                                                                 "channel": 2},
                          "green": {"kind": "channel_share", "channel": 1}},
                 judges=["green"], eval={"num_prompts": 2, "seeds": [0]},
                 overrides={"total_steps": 2, "checkpoint_every": 2, "log_every": 1, "eval_every": 0},
                 arms=[{"name": "rb", "config": "experiments/configs/reward_backprop_tiny.py",
                        "weights": {"rewards": ["red", "blue"], "grid": [[1, 0], [0, 1]]}},
                       {"name": "rb-draft_k", "config": "experiments/configs/reward_backprop_tiny.py:draft_k",
                        "weights": {"rewards": ["red", "blue"], "grid": [[1, 0], [0, 1]]}}])
    path = tmp_path / "e2e_study.py"
    path.write_text(f"def get_study(arg=''):\n    return {study!r}\n")
    root = tmp_path / "root"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "alignax.study", f"--study={path}", f"--workdir={root}",
                          "--parallel=2", "--progress_every=10"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    elapsed = time.monotonic() - start
    names = ["base", "rb__w-1-0", "rb__w-0-1", "rb-draft_k__w-1-0", "rb-draft_k__w-0-1"]
    assert out.returncode == 0, out.stdout + out.stderr + "".join(
        (root / n / "train.log").read_text()[-2000:] for n in names if (root / n / "train.log").exists())
    manifest = json.loads((root / "study.json").read_text())
    assert [(p["name"], p["state"]) for p in manifest["points"]] == [(n, "finished") for n in names]
    assert (root / "base" / "checkpoints" / "0").is_dir() and (root / "rb__w-1-0" / "checkpoints" / "2").is_dir()
    assert "5/5 points finished" in out.stdout and "done," in out.stderr
    if (REPO / "alignax" / "study" / "report.py").exists():
        assert all((root / n / "eval.json").is_file() for n in names)
        assert (root / "report" / "index.html").is_file() and "report" in out.stdout.splitlines()[-1]
    print(f"tiny end-to-end study: {elapsed:.1f}s")


def test_run_cost_counts_every_sampler_step(tmp_path):
    """The study's FLOP axis: the loop-aware matmul count when the run logged it, XLA's count otherwise."""
    from alignax import config as config_lib
    from alignax.study import evaluation

    config = config_lib.base_config()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "compile/flops": 10.0, "compile/matmul_flops": 40.0}\n'
                       '{"step": 3, "loss": 1.0, "steps_per_second": 1.0}\n')
    assert evaluation.run_cost(str(tmp_path), config, 3)["flops"] == 120.0
    metrics.write_text('{"step": 0, "compile/flops": 10.0}\n{"step": 3, "loss": 1.0, "steps_per_second": 1.0}\n')
    assert evaluation.run_cost(str(tmp_path), config, 3)["flops"] == 30.0
