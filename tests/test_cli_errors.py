"""The front door: command-line mistakes give one line naming the key and the closest valid one (exit 2),
AlignaxErrors from main one `error:` line (exit 1), libraries stay quiet by default, and every CLI runs
from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from alignax import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
RB = str(CONFIGS / "reward_backprop_tiny.py")
SFT = str(CONFIGS / "sft_tiny.py")
# This checkout first, whether or not (and from where) `pip install -e .` installed alignax.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def parse_error(capsys, *args: str) -> str:
    """The one-line message `cli.parse_flags` prints for `prog --config=... args`, exiting 2."""
    argv = ["prog", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(argv, flag_values)
    assert exit_info.value.code == cli.USAGE_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    return err.splitlines()[0]


def test_override_typo_names_the_key_and_the_closest_one(capsys):
    message = parse_error(capsys, f"--config={SFT}", "--config.totl_steps=3")
    assert message == "error: --config.totl_steps: unknown config key config.totl_steps; did you mean " \
                      "--config.total_steps?"
    message = parse_error(capsys, f"--config={SFT}", "--config.objective.nme=x")
    assert "did you mean --config.objective.name?" in message
    # the right name in another group
    assert "did you mean --config.optim.learning_rate?" in parse_error(capsys, f"--config={SFT}",
                                                                      "--config.learning_rate=0.1")
    assert "config.optim.learning_rate is a float, not a group with field 'x'" in parse_error(
        capsys, f"--config={SFT}", "--config.optim.learning_rate.x=1")


def test_pareto_weight_typo_names_the_configured_rewards(capsys):
    """Was a 55-line traceback ending in `AttributeError: "'green'"`."""
    message = parse_error(capsys, f"--config={RB}", "--config.pareto.weights.green=1")
    assert message == ("error: --config.pareto.weights.green: 'green' is not a configured reward; "
                       "config.rewards has ['blue', 'red']")
    assert "(did you mean 'red'?)" in parse_error(capsys, f"--config={RB}", "--config.pareto.weights.rde=1")
    assert "is unset in this config" in parse_error(capsys, f"--config={SFT}", "--config.pareto.weights.red=1")


def test_missing_or_broken_config_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path from elsewhere than the repository root
    message = parse_error(capsys, "--config=experiments/configs/sft_tny.py")
    assert message == (f"error: --config=experiments/configs/sft_tny.py: config file not found (relative to the "
                       f"current directory {tmp_path}); did you mean --config={CONFIGS / 'sft_tiny.py'}?")
    assert "config file not found" in parse_error(capsys, "--config=experiments/configs/sft_tny.py",
                                                  "--config.total_steps=3")  # overrides make config_flags raise
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert f"--config={broken}: cannot load the config file: SyntaxError" in parse_error(capsys, f"--config={broken}")
    assert "unknown option 'draftk' (did you mean 'draft_k'?)" in parse_error(capsys, f"--config={RB}:draftk")


def run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
                          **kwargs)


CASES = [  # (argv after the interpreter, what stderr must name); the first three run in the fast suite
    (["-m", "alignax.train", f"--config={RB}", "--config.pareto.weights.green=1", "--workdir=w"],
     ["'green' is not a configured reward", "['blue', 'red']"]),
    (["-m", "alignax.train", "--config=experiments/configs/sft_tiny.py", "--config.totl_steps=3", "--workdir=w"],
     ["config file not found", f"did you mean --config={CONFIGS / 'sft_tiny.py'}"]),
    (["-m", "alignax.export", "--wrkdir=w", "--out=o"], ["'wrkdir'", "workdir"]),
    (["-m", "alignax.train", f"--config={SFT}", "--config.totl_steps=3", "--workdir=w"],
     ["config.totl_steps", "--config.total_steps"]),
    (["-m", "alignax.reward_model.train", f"--config={CONFIGS / 'reward_model_tiny.py'}",
      "--config.totl_steps=3", "--workdir=w"], ["--config.total_steps"]),
    (["-m", "alignax.evaluate", "--workdir=w", "--num_prompt=2"], ["'num_prompt'", "num_prompts"]),
    (["-m", "launch.sweep", "--sweep=s.py", "--dry_rn"], ["'dry_rn'", "dry_run"]),
    (["-m", "alignax.pareto.report", "--evals=e", "--all_step"], ["'all_step'", "all_steps"]),
    (["-m", "alignax.data.siglip_targets", "--dataset=d", "--siglip=s", "--out=o", "--batchsize=2"],
     ["'batchsize'", "batch_size"]),
]


def check_clis(cases, cwd: Path) -> None:
    """Runs the CLIs two at a time (each imports jax: ~3.5 s of CPU) and checks the one-line errors."""
    for i in range(0, len(cases), 2):
        procs = [subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV) for args, _ in cases[i:i + 2]]
        for (args, expected), proc in zip(cases[i:i + 2], procs, strict=True):
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == cli.USAGE_EXIT, (args, err[-2000:])
            assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, (args, err[-2000:])
            assert err.startswith("error: ") and all(e in err for e in expected), (args, err)


def test_clis_print_one_line_for_a_command_line_mistake(tmp_path):
    """The real CLIs, run from a directory outside the repository (the package is installed)."""
    check_clis(CASES[:3], tmp_path)


@pytest.mark.slow  # ~25 s of CPU: every other CLI's wiring
def test_every_other_cli_prints_one_line_for_a_command_line_mistake(tmp_path):
    check_clis(CASES[3:], tmp_path)


def test_console_scripts_point_at_the_cli_functions():
    """pyproject's entry points exist (as `python -m` runs the same `cli()`)."""
    import tomllib
    from importlib import import_module

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"alignax-train", "alignax-export", "alignax-evaluate", "alignax-train-reward", "alignax-sweep",
            "alignax-report"} <= set(scripts)
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(import_module(module), function)), target


MAIN = """
import logging, sys
from alignax import cli
from alignax.errors import ConfigError
def main(argv):
    print(logging.getLogger().getEffectiveLevel(), logging.getLogger("alignax").getEffectiveLevel())
    if "fail" in argv:
        raise ConfigError("config.x=1: expected 2")
cli.run_main(main)
"""


def test_alignax_error_from_main_is_one_line_and_logging_defaults(tmp_path):
    quiet = run(["-c", MAIN], tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["30", "20"]  # libraries WARNING, alignax INFO
    assert run(["-c", MAIN, "--verbosity=0"], tmp_path).stdout.split() == ["20", "20"]
    assert run(["-c", MAIN, "--verbosity=1"], tmp_path).stdout.split() == ["10", "10"]
    failed = run(["-c", MAIN, "fail"], tmp_path)
    assert failed.returncode == cli.ERROR_EXIT and failed.stderr == "error: config.x=1: expected 2\n"
    verbose = run(["-c", MAIN, "fail", "--verbosity=1"], tmp_path)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr  # -v 1 keeps the traceback for debugging


def test_writing_a_dataset_prints_nothing(tmp_path, capfd):
    """TFDS printed "Downloading and preparing dataset Unknown size ..." for every locally written dataset."""
    import numpy as np

    from alignax.data import write_prompts
    example = dict(prompt="a", encoder_hidden_states=np.zeros((2, 3), np.float32),
                   pooled_projections=np.zeros(4, np.float32))
    write_prompts(tmp_path / "prompts", [example, example])
    out, err = capfd.readouterr()
    assert out == "" and "Downloading" not in err and "prepared" not in err


def test_benchmarks_and_configs_import_no_tests_package():
    """Benchmarks and configs run from an installed package, where `tests` is not importable."""
    for path in [*REPO.glob("experiments/**/*.py")]:
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text, path
