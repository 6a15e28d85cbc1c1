"""launch.sweep: command construction (local, tpu_vm), config_flags round trip of overrides,
validation of every run before anything starts, and a real two-run local sweep."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignax.errors import ConfigError
from launch import backends, sweep

REPO = Path(__file__).resolve().parent.parent

CONFIG_WITH_REWARDS = '''
from experiments.configs import sft_tiny

def get_config(arg=""):
    c = sft_tiny.get_config(arg)
    c.rewards.red = dict(kind="channel_mean", channel=0)
    c.rewards.blue = dict(kind="channel_mean", channel=2)
    c.pareto.weights = dict(red=0.5, blue=0.5)
    return c
'''


def write_sweep(tmp_path: Path, config: str, runs: list[dict]) -> str:
    path = tmp_path / "my_sweep.py"
    path.write_text(f"def get_sweep():\n    return {{'config': {config!r}, 'runs': {runs!r}}}\n")
    return str(path)


@pytest.fixture
def rewards_config(tmp_path) -> str:
    path = tmp_path / "rewards_config.py"
    path.write_text(CONFIG_WITH_REWARDS)
    return str(path)


RUNS = [
    {"name": "red_only", "pareto.weights": {"red": 1.0, "blue": 0.0}, "seed": 0},
    {"pareto": {"weights": {"red": 0.25, "blue": 0.75}}, "seed": 1, "data.path": "/data/my prompts"},
]


def test_dict_overrides_become_leaf_flags_that_config_flags_parses(rewards_config):
    runs = sweep.resolve_runs(RUNS + [{"name": "misc", "mesh.shape": (1, 1, 1), "objective.sample_posterior": True,
                                       "optim.learning_rate": 3e-4}], "/root")
    assert backends.override_flags(runs[0].overrides) == [
        "--config.pareto.weights.red=1.0", "--config.pareto.weights.blue=0.0", "--config.seed=0"]
    assert runs[1].name == "01_red=0.25_blue=0.75_seed=1_path=_data_my_prompts"
    assert runs[1].workdir == f"/root/{runs[1].name}"
    first = sweep.parse_config(f"{rewards_config}:lora", runs[0])
    assert (first.pareto.weights.red, first.pareto.weights.blue, first.seed, first.lora.enabled) == (1.0, 0.0, 0, True)
    second = sweep.parse_config(rewards_config, runs[1])
    assert (second.pareto.weights.red, second.pareto.weights.blue, second.seed) == (0.25, 0.75, 1)
    assert second.data.path == "/data/my prompts" and second.lora.enabled is False
    misc = sweep.parse_config(rewards_config, runs[2])
    assert tuple(misc.mesh.shape) == (1, 1, 1) and misc.objective.sample_posterior is True
    assert misc.optim.learning_rate == 3e-4
    assert misc.pareto.weights.red == 0.5  # untouched fields keep the config file's values


def test_local_dry_run_prints_the_train_commands_and_writes_the_manifest(tmp_path, rewards_config, capsys):
    root = tmp_path / "root"
    code = sweep.launch(write_sweep(tmp_path, rewards_config, RUNS), "local", workdir_root=str(root), dry_run=True,
                        num_devices=8)
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "alignax.train" in line]
    assert [shlex.split(line) for line in lines] == [
        [sys.executable, "-m", "alignax.train", f"--config={rewards_config}", "--config.pareto.weights.red=1.0",
         "--config.pareto.weights.blue=0.0", "--config.seed=0", f"--workdir={root}/red_only"],
        [sys.executable, "-m", "alignax.train", f"--config={rewards_config}", "--config.pareto.weights.red=0.25",
         "--config.pareto.weights.blue=0.75", "--config.seed=1", "--config.data.path=/data/my prompts",
         f"--workdir={root}/01_red=0.25_blue=0.75_seed=1_path=_data_my_prompts"],
    ]
    manifest = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["red_only", "01_red=0.25_blue=0.75_seed=1_path=_data_my_prompts"]
    assert manifest["runs"][0]["overrides"] == {"pareto.weights.red": 1.0, "pareto.weights.blue": 0.0, "seed": 0}
    assert manifest["num_devices"] == 8 and manifest["backend"] == "local"
    assert sorted(p.name for p in root.iterdir()) == ["sweep.json"]  # a dry run starts nothing


def test_a_cloud_sweep_dry_run_prints_the_plan_and_trains_in_the_bucket(tmp_path, capsys, monkeypatch):
    from launch import bundle
    monkeypatch.setattr(bundle, "describe", lambda repo=None, allow_dirty=False: bundle.Bundle("ab" * 20, False,
                                                                                                 "alignax-abab.tar.gz"))
    config = "experiments/configs/sft_tiny.py:lora"
    runs = [{"name": "a", "seed": 0}, {"name": "b", "seed": 1, "data.path": "/mnt/disks/data/my set"}]
    code = sweep.launch(write_sweep(tmp_path, config, runs), "tpu_vm", workdir_root=str(tmp_path / "runs"),
                        dry_run=True, tpu_type="v5litepod-8", zone="us-central2-b", project="my-proj",
                        bucket="gs://b/sweeps")
    assert code == 0
    out = capsys.readouterr().out
    runs_lines = [line for line in out.splitlines() if "alignax.train" in line]
    assert len(runs_lines) == 2
    remote = shlex.split(shlex.split(runs_lines[1])[-1].removeprefix("--command=").split(" && ", 1)[1])
    assert remote == ["python3", "-m", "alignax.train", f"--config={config}", "--config.seed=1",
                      "--config.data.path=/mnt/disks/data/my set", "--workdir=gs://b/sweeps/my-sweep/b"]
    manifest = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [r["workdir"] for r in manifest["runs"]] == ["gs://b/sweeps/my-sweep/a", "gs://b/sweeps/my-sweep/b"]
    with pytest.raises(ConfigError, match="--zone"):
        backends.get("tpu_vm", tpu_type="v5p-8", bucket="gs://b")


@pytest.mark.parametrize("bad_run, field", [
    ({"name": "no_weight", "pareto.weights": {"red": 0.0, "blue": 0.0}}, "config.pareto.weights"),
    ({"name": "typo", "pareto.wieghts.red": 1.0}, "wieghts"),
    ({"name": "indivisible", "batch_size": 6}, "config.batch_size"),
])
def test_a_bad_run_fails_the_sweep_before_anything_runs(tmp_path, rewards_config, monkeypatch, bad_run, field):
    def never(*args, **kwargs):
        raise AssertionError("a run was started although the sweep is invalid")
    monkeypatch.setattr(backends.LocalBackend, "execute", never)
    root = tmp_path / "root"
    runs = [{"name": "fine", "seed": 0}, bad_run, {"name": "also_fine", "seed": 2}]
    with pytest.raises(ConfigError, match=f"run '{bad_run['name']}'") as error:
        sweep.launch(write_sweep(tmp_path, rewards_config, runs), "local", workdir_root=str(root), num_devices=8)
    assert field in str(error.value)
    assert not root.exists()  # no manifest, no workdir


def test_duplicate_names_and_the_cli_exit_code_for_a_bad_sweep(tmp_path, rewards_config):
    with pytest.raises(ConfigError, match="'same' is used twice"):
        sweep.resolve_runs([{"name": "same"}, {"name": "same", "seed": 1}], "/root")
    bad = write_sweep(tmp_path, rewards_config, [{"name": "oops", "pareto.weights.red": -1.0}])
    out = subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={bad}", "--num_devices=8", "--dry_run",
                          f"--workdir_root={tmp_path / 'root'}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "run 'oops'" in out.stderr and "config.pareto.weights" in out.stderr


def test_local_backend_reports_failed_runs_with_logs(tmp_path, rewards_config, monkeypatch):
    """Execution itself, without training: each run's argv is replaced by a tiny script."""
    scripts = {"ok": "print('fine'); import sys; sys.exit(0)", "broken": "print('boom'); import sys; sys.exit(3)"}
    monkeypatch.setattr(backends.LocalBackend, "argv",
                        lambda self, config, run: [sys.executable, "-c", scripts[run.name]])
    root = tmp_path / "root"
    code = sweep.launch(write_sweep(tmp_path, rewards_config, [{"name": "ok"}, {"name": "broken"}]), "local",
                        workdir_root=str(root), num_devices=8, parallel=2)
    assert code == 1
    assert (root / "ok" / "train.log").read_text().strip() == "fine"
    assert (root / "broken" / "train.log").read_text().strip() == "boom"


@pytest.mark.slow  # ~5 min measured on the shared 2-core machine with two runs in parallel
def test_a_two_run_local_sweep_really_trains(tmp_path):
    """sft_tiny for 2 steps, twice, through the real CLI: the launcher's flags reach alignax.train.
    One CPU device per run and sequential runs, so the second run reuses the first's compilations."""
    from alignax.data import build_tiny_world
    from alignax.data import setup as data_setup
    from alignax.training import checkpoint
    from experiments.configs import sft_tiny

    world = tmp_path / "world"
    build_tiny_world(world, num_train=16, num_eval=8, **data_setup.tiny_world_sizes(sft_tiny.get_config()))
    common = {"total_steps": 2, "data.generate": "", "data.path": str(world), "log_every": 1}
    runs = [{"name": "seed0", "seed": 0, **common}, {"name": "seed1", "seed": 1, **common}]
    root = tmp_path / "root"
    start = time.monotonic()
    sweep_file = write_sweep(tmp_path, "experiments/configs/sft_tiny.py", runs)
    out = subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={sweep_file}",
                          "--backend=local", "--parallel=1", f"--workdir_root={root}"],
                         cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout + out.stderr + "".join(
        (root / r["name"] / "train.log").read_text()[-3000:] for r in runs if (root / r["name"] / "train.log").exists())
    assert "2/2 runs succeeded" in out.stdout
    for seed, name in enumerate(["seed0", "seed1"]):
        ckpt = checkpoint.Checkpointer(root / name, keep=10, async_save=False)
        assert ckpt.all_steps() == [2]
        saved = ckpt.saved_config(2)
        assert (saved["seed"], saved["total_steps"], saved["data"]["path"]) == (seed, 2, str(world))
        assert "finished at step 2" in (root / name / "train.log").read_text()
    print(f"two-run local sweep: {elapsed:.1f}s")


# ---- re-running a sweep: finished points are skipped, points that ended badly are flagged -------------------

def _status(workdir: Path, state: str, step: int, total_steps: int = 4, reason: str = "") -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "status.json").write_text(json.dumps(
        {"state": state, "step": step, "total_steps": total_steps, "reason": reason}))


def _fake_training(monkeypatch, outcomes: dict[str, tuple[str, int]]) -> list[str]:
    """Each launched run's argv replaced by a script that writes status.json as the trainer would."""
    launched = []
    execute = backends.LocalBackend.execute

    def argv(self, config, run):  # also called for the manifest's commands, so it cannot count launches
        state, code = outcomes.get(run.name, ("finished", 0))
        payload = json.dumps({"state": state, "step": 4 if state == "finished" else 2, "total_steps": 4,
                              "reason": "" if state == "finished" else f"{state} (fake)"})
        script = (f"import pathlib, sys; pathlib.Path({run.workdir!r}, 'status.json').write_text({payload!r}); "
                  f"sys.exit({code})")
        return [sys.executable, "-c", script]

    def recording_execute(self, config, runs, log=print):
        launched.extend(run.name for run in runs)
        return execute(self, config, runs, log)

    monkeypatch.setattr(backends.LocalBackend, "argv", argv)
    monkeypatch.setattr(backends.LocalBackend, "execute", recording_execute)
    return launched


def test_rerun_skips_finished_points_and_flags_bad_ones(tmp_path, rewards_config, monkeypatch, capsys):
    root = tmp_path / "root"
    names = ["done", "preempted", "raised_steps", "diverged", "fresh"]
    runs = [{"name": name, "total_steps": 4} for name in names]
    _status(root / "done", "finished", 4)
    _status(root / "preempted", "preempted", 2)
    _status(root / "raised_steps", "finished", 3, total_steps=3)  # total_steps was 3 last time: not done at 4
    launched = _fake_training(monkeypatch, {"preempted": ("finished", 0), "raised_steps": ("finished", 0),
                                            "diverged": ("diverged", 1), "fresh": ("nonfinite", 0)})
    spec = write_sweep(tmp_path, rewards_config, runs)
    code = sweep.launch(spec, "local", workdir_root=str(root), num_devices=8, parallel=2)
    out = capsys.readouterr().out
    assert sorted(launched) == ["diverged", "fresh", "preempted", "raised_steps"]
    assert "skipped 1 finished points" in out and "done (status.json: finished at step 4)" in out
    assert not (root / "done" / "train.log").exists()
    assert code == 1  # one run failed, and `fresh` exited 0 but ended nonfinite
    assert "FLAGGED 2 points" in out and "diverged (diverged at step 2/4: diverged (fake))" in out
    assert "fresh (nonfinite at step 2/4" in out
    manifest = {r["name"]: r for r in json.loads((root / "sweep.json").read_text())["runs"]}
    assert manifest["done"]["skipped"] == "status.json: finished at step 4"
    assert {n: manifest[n]["flagged"] for n in names} == {
        "done": False, "preempted": False, "raised_steps": False, "diverged": True, "fresh": True}
    assert manifest["diverged"]["status"]["state"] == "diverged" and manifest["preempted"]["skipped"] is None

    # Again: now everything but the two flagged points is finished; --rerun_finished relaunches all.
    launched.clear()
    sweep.launch(spec, "local", workdir_root=str(root), num_devices=8, parallel=2)
    assert sorted(launched) == ["diverged", "fresh"]
    launched.clear()
    sweep.launch(spec, "local", workdir_root=str(root), num_devices=8, parallel=2, rerun_finished=True)
    assert sorted(launched) == sorted(names)


def test_a_complete_final_checkpoint_counts_as_finished(tmp_path):
    """A point that finished before status.json existed (or lost it): its final orbax step is complete. A
    stray empty `checkpoints/4/` (issue 9, item 5) or a smaller final step is not."""
    import numpy as np

    from alignax.training import checkpoint

    done, stray, short = (backends.Run(name, {}, str(tmp_path / name)) for name in ("done", "stray", "short"))
    for run, step in ((done, 4), (short, 2)):
        ckpt = checkpoint.Checkpointer(run.workdir, keep=2, async_save=False)
        ckpt.save(step, {"w": np.arange(3.0)}, {"total_steps": 4})
        ckpt.close()
    (tmp_path / "stray" / "checkpoints" / "4").mkdir(parents=True)
    assert sweep.finished(done, 4) == "checkpoints/4 is complete"
    assert sweep.finished(stray, 4) is None and sweep.finished(short, 4) is None
    assert sweep.finished(backends.Run("nothing", {}, str(tmp_path / "nothing")), 4) is None
    assert not (tmp_path / "nothing").exists()  # checking creates nothing


def test_dry_run_lists_only_the_points_it_would_start(tmp_path, rewards_config, capsys):
    root = tmp_path / "root"
    _status(root / "a", "finished", 4)
    spec = write_sweep(tmp_path, rewards_config, [{"name": "a", "total_steps": 4}, {"name": "b", "total_steps": 4}])
    assert sweep.launch(spec, "local", workdir_root=str(root), num_devices=8, dry_run=True) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "alignax.train" in line]
    assert len(commands) == 1 and commands[0].endswith(f"--workdir={root}/b")
    assert "skipped 1 finished points" in out


def test_report_marks_points_that_did_not_end_cleanly(tmp_path):
    from alignax.pareto import report
    for run, red, state in (("ok", 0.2, "finished"), ("bad", 0.9, "diverged")):
        _status(tmp_path / run, state, 4 if state == "finished" else 3, reason="loss 1e30 vs running 0.1")
        (tmp_path / run / "eval_step_4.json").write_text(json.dumps(
            {"run": run, "step": 4, "rewards": {"red": red, "blue": 1 - red}}))
    evaluations = [report.read(p) for p in report.expand([f"{tmp_path}/*/eval_*.json"])]
    text = report.markdown(report.build(evaluations))
    assert "| bad ⚠ diverged | 4 |" in text and "| ok | 4 |" in text
    assert "- bad: diverged at step 3: loss 1e30 vs running 0.1" in text
