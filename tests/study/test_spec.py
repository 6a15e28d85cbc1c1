"""alignax.study.spec: study files resolve to stably named points; a bad arm is refused before anything runs,
naming the arm and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alignax.errors import ConfigError
from alignax.study import cli, spec
from alignax.study.weights import resolve_grid
from launch import backends

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments/studies/tiny.py")
RB = "experiments/configs/reward_backprop_tiny.py"

# A config with a third reward, `green`, weighted: an arm on it trains on the study's judge.
GREEN_CONFIG = '''
from experiments.configs import reward_backprop_tiny

def get_config(arg=""):
    c = reward_backprop_tiny.get_config(arg)
    c.rewards.green = dict(kind="channel_share", channel=1)
    c.pareto.weights.green = 0.5
    return c
'''


def write_study(tmp_path: Path, arms: list[dict], **fields) -> str:
    study = dict(rewards={"red": {"kind": "channel_share", "channel": 0},
                          "blue": {"kind": "channel_share", "channel": 2},
                          "green": {"kind": "channel_share", "channel": 1}},
                 judges=["green"], overrides={"total_steps": 4}, arms=arms)
    study.update(fields)
    path = tmp_path / "my_study.py"
    path.write_text(f"def get_study(arg=''):\n    return {study!r}\n")
    return str(path)


def test_tiny_study_resolves_to_stable_readable_points():
    study = spec.load_study(TINY)
    points = spec.resolve(study, "/root/")
    names = [p.name for p in points]
    assert names == ["base",
                     "reward_backprop__w-1-0", "reward_backprop__w-0.5-0.5", "reward_backprop__w-0-1",
                     "reward_backprop-draft_k__w-1-0", "reward_backprop-draft_k__w-0.5-0.5",
                     "reward_backprop-draft_k__w-0-1", "reward_backprop-mgda__w-1-0",
                     "reward_backprop-mgda__w-0.5-0.5", "reward_backprop-mgda__w-0-1", "grpo__w-1-0", "grpo__w-0.5-0.5",
                     "grpo__w-0-1", "dpo", "feature_align", "sft"]
    assert names == [p.name for p in spec.resolve(spec.load_study(TINY), "/root")]  # same on every re-run
    assert points[2].workdir == "/root/reward_backprop__w-0.5-0.5" and points[2].weights == {"red": 0.5, "blue": 0.5}
    assert study.judges == ("green", "brightness") and set(study.rewards) == {"red", "blue", "green", "brightness"}
    configs = spec.validate(study, points, num_devices=1)
    assert [p.objective for p in points] == (["base"] + ["reward_backprop"] * 9 + ["grpo"] * 3
                                             + ["dpo", "feature_align", "sft"])
    assert [p.total_steps for p in points] == [0] + [8] * 15
    first = configs["reward_backprop__w-1-0"]
    assert (first.pareto.weights.red, first.pareto.weights.blue, first.objective.mode) == (1.0, 0.0, "full")
    assert configs["reward_backprop-draft_k__w-0-1"].objective.mode == "draft_k"
    base = points[0]
    assert base.base and base.run.module == spec.BASE_MODULE and base.run.config == str(REPO / RB)
    assert points[1].run.module == "alignax.train"
    # An arm's overrides are part of its points' names: changing them makes new points, not a silent resume.
    arm = spec.Arm("rb", RB, {"optim.learning_rate": 0.0003})
    assert spec.point_name(arm, (0.75, 0.25)) == "rb__optim.learning_rate=0.0003__w-0.75-0.25"
    # Targets: a weighted point's largest weights (ties: all of them); an arm without weights has none.
    assert [p.targets for p in points[1:4]] == [("red",), ("red", "blue"), ("blue",)]
    assert points[-1].targets == ()


def test_an_arm_names_its_targets(tmp_path):
    study = spec.load_study(write_study(tmp_path, [{"name": "d", "config": RB, "targets": ["blue"]},
                                                   {"name": "w", "config": RB, "weights": GRID, "targets": ["red"]}]))
    assert [p.targets for p in spec.resolve(study, str(tmp_path))] == [(), ("blue",), ("red",), ("red",)]


def test_arm_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    """A user runs an installed `alignax-study --study=/abs/experiments/studies/tiny.py` from elsewhere: the
    arms' `experiments/configs/...` paths resolve against the study file's ancestors (the repo root)."""
    monkeypatch.chdir(tmp_path)
    study = spec.load_study(TINY)
    assert all(Path(arm.config.partition(":")[0]).is_absolute() for arm in study.arms)
    assert study.arms[1].config == str(REPO / RB) + ":draft_k"
    with pytest.raises(ConfigError, match=r"arm 'x': config='nowhere/x.py': no file nowhere/x.py \(relative to"):
        spec.load_study(write_study(tmp_path, [{"name": "x", "config": "nowhere/x.py"}]))


def test_weight_grids():
    assert resolve_grid("simplex:3", 2, "g") == ((1.0, 0.0), (0.5, 0.5), (0.0, 1.0))
    dirichlet = resolve_grid("dirichlet:4:7", 3, "g")
    assert dirichlet == resolve_grid("dirichlet:4:7", 3, "g") and len(dirichlet) == 4
    assert all(abs(sum(row) - 1) < 1e-3 and len(row) == 3 for row in dirichlet)
    assert resolve_grid([[1, 0], [0.25, 0.75]], 2, "g") == ((1.0, 0.0), (0.25, 0.75))
    for bad, match in [([], "empty"), ("simplex:0", "simplex:N"), ("grid:3", "simplex:N"),
                       ([[1, 0, 0]], r"g\[0\].*expected 2 weights"), ([[0, 0]], "not all zero"),
                       ([[-1, 2]], "non-negative")]:
        with pytest.raises(ConfigError, match=match):
            resolve_grid(bad, 2, "g")


GRID = {"rewards": ["red", "blue"], "grid": "simplex:2"}


@pytest.mark.parametrize("bad_arm, field", [
    ({"name": "bad", "config": RB, "overrides": {"optim.learnin_rate": 1e-3}}, "learnin_rate"),
    ({"name": "bad", "config": "experiments/configs/sft_tiny.py", "weights": GRID}, "config.rewards"),
    ({"name": "bad", "config": RB, "weights": {"rewards": ["red", "green"], "grid": "simplex:2"}}, "judges"),
    ({"name": "bad", "config": RB, "weights": {"rewards": ["red", "blue"], "grid": []}}, "weights.grid"),
    ({"name": "bad", "config": RB, "weigths": GRID}, "weigths"),
    ({"name": "bad", "config": RB, "weights": {"rewards": ["red", "purple"], "grid": "simplex:2"}}, "purple"),
    ({"name": "bad", "config": RB, "overrides": {"batch_size": 6}}, "config.batch_size"),
    ({"name": "bad", "config": "GREEN", "weights": None}, "config.pareto.weights.green"),
    ({"name": "bad", "config": RB, "targets": ["redd"]}, "targets names ['redd']"),
    ({"name": "bad", "config": RB, "targets": ["green"]}, "holds out as judges"),
    ({"name": "bad", "config": RB, "targets": "red"}, "targets='red'"),
])
def test_a_bad_arm_is_refused_before_anything_runs(tmp_path, monkeypatch, bad_arm, field):
    def never(*args, **kwargs):
        raise AssertionError("a point was started although the study is invalid")
    monkeypatch.setattr(backends.LocalBackend, "execute", never)
    green = tmp_path / "green_config.py"
    green.write_text(GREEN_CONFIG)
    bad_arm = {k: (str(green) if v == "GREEN" else v) for k, v in bad_arm.items() if v is not None}
    arms = [{"name": "fine", "config": RB, "weights": GRID}, bad_arm]
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match="arm 'bad'") as error:
        cli.run_study(write_study(tmp_path, arms), str(root), num_devices=8)
    assert field in str(error.value)
    assert not root.exists()  # no study.json, no workdir


def test_study_reward_settings_must_match_the_arm_config(tmp_path):
    arms = [{"name": "rb", "config": RB, "weights": GRID}]
    path = write_study(tmp_path, arms, rewards={"red": {"kind": "channel_share", "channel": 1},
                                                "blue": {"kind": "channel_share", "channel": 2}}, judges=[])
    study = spec.load_study(path)
    with pytest.raises(ConfigError, match=r"arm 'rb': config.rewards.red=.*differs from the study's rewards.red"):
        spec.validate(study, spec.resolve(study, "/root"), 1)


def test_point_name_collisions_name_both_points(tmp_path):
    arms = [{"name": "rb", "config": RB, "weights": {"rewards": ["red", "blue"],
                                                     "grid": [[0.5, 0.5], [0.500001, 0.499999]]}}]
    study = spec.load_study(write_study(tmp_path, arms))
    with pytest.raises(ConfigError, match=r"'rb__w-0.5-0.5' of arm 'rb' weights \[0.5, 0.5\] is also the name of "
                                          r"arm 'rb' weights \[0.5, 0.5\]"):
        spec.resolve(study, "/root")
    with pytest.raises(ConfigError, match="arm name 'rb' is used twice"):
        spec.load_study(write_study(tmp_path, [arms[0], arms[0]]))
    with pytest.raises(ConfigError, match="'base' is the base model's point"):
        spec.load_study(write_study(tmp_path, [{"name": "base", "config": RB}]))


def test_dry_run_writes_the_manifest_and_the_cli_error_is_one_line(tmp_path, capsys):
    import json
    root = tmp_path / "root"
    assert cli.run_study(TINY + ":2", str(root), dry_run=True, num_devices=1) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if " -m alignax." in line]) == 16
    manifest = json.loads((root / "study.json").read_text())
    assert [p["state"] for p in manifest["points"]] == ["pending"] * 16
    assert manifest["judges"] == ["green", "brightness"] and manifest["eval"]["seeds"] == [0, 1]
    assert sorted(p.name for p in root.iterdir()) == ["study.json"]  # a dry run starts nothing

    bad = write_study(tmp_path, [{"name": "oops", "config": RB, "overrides": {"totl_steps": 3}}])
    result = subprocess.run([sys.executable, "-m", "alignax.study", f"--study={bad}", f"--workdir={root}",
                             "--num_devices=1"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: arm 'oops'") and "totl_steps" in lines[0]
