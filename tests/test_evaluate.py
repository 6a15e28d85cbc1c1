"""alignax.evaluate on a tiny trained run: scores equal the configured rewards applied by hand to
the images the trainer itself samples from the same state; and the Pareto report on hand-made
evaluations marks the right runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from alignax import evaluate
from alignax.data import setup as data_setup
from alignax.errors import ConfigError, DataError
from alignax.pareto import report
from tests.parity import max_rel_err

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """sft_tiny with red/blue channel_mean rewards, 2 steps; returns (workdir, trainer, final state, world)."""
    from alignax.data import build_tiny_world
    from alignax.training.trainer import Trainer
    from experiments.configs import sft_tiny

    tmp = tmp_path_factory.mktemp("eval_run")
    config = sft_tiny.get_config()
    world = tmp / "world"
    build_tiny_world(world, num_train=16, num_eval=8, **data_setup.tiny_world_sizes(config))
    config.total_steps = 2
    config.data.generate = ""
    config.data.path = str(world)
    config.rewards.red = dict(kind="channel_mean", channel=0)
    config.rewards.blue = dict(kind="channel_mean", channel=2)
    config.pareto.weights = dict(red=0.5, blue=0.5)
    workdir = tmp / "run"
    trainer = Trainer(config, workdir, async_checkpoints=False)
    result = trainer.run()
    assert result.final_step == 2
    return workdir, trainer, result.state, world


def test_evaluate_scores_every_reward_on_the_trainers_own_samples(trained_run, tmp_path):
    from alignax.data import open_dataset

    workdir, trainer, state, world = trained_run
    out = tmp_path / "eval.json"
    result = evaluate.evaluate(workdir, num_prompts=3, seeds=(0, 1), batch_size=2, out=out)
    assert json.loads(out.read_text()) == result
    assert result["step"] == 2 and result["weights"] == {"red": 0.5, "blue": 0.5}
    assert sorted(result["rewards"]) == ["blue", "red"]

    # Reference: the same prompts read independently, sampled by the trainer from its in-memory final state
    # (8-device mesh, VAE from the trainer), scored by hand as channel means.
    records = open_dataset(str(world / "prompts"), "eval").get_many([0, 1, 2])
    conditioning = {k: jnp.asarray(np.stack([r[k] for r in records]))
                    for k in ("encoder_hidden_states", "pooled_projections")}
    assert [p["prompt"] for p in result["per_prompt"]] == [r["prompt"] for r in records]
    # Both go through sampling.generate_images: the trainer's own sampler on its in-memory final state
    # (8-device mesh, the trainer's VAE) equals evaluate's (one device, VAE recreated) for every seed.
    trainer_images = [np.asarray(trainer.sample_images(state["trainable"], conditioning, seed=s)) for s in (0, 1)]
    ckpt = evaluate.load(workdir)
    prompts = evaluate.eval_prompts(ckpt.config, 3)
    eval_images = [evaluate.generate(ckpt, prompts, seed) for seed in (0, 1)]
    for seed in (0, 1):
        assert max_rel_err(eval_images[seed], trainer_images[seed]) <= 1e-5, seed
    assert not np.allclose(eval_images[0], eval_images[1])  # the seeds really differ
    images = np.stack(trainer_images)
    expected = {"red": images[..., 0].mean(axis=(2, 3)), "blue": images[..., 2].mean(axis=(2, 3))}  # [seed, prompt]
    for name, table in expected.items():
        got = np.asarray([p["per_seed"][name] for p in result["per_prompt"]]).T
        assert max_rel_err(got, table) <= 1e-5, name
        assert abs(result["rewards"][name] - table.mean()) <= 1e-5 * abs(table.mean())
    assert not np.allclose(expected["red"], expected["blue"])  # the two rewards really differ


def test_evaluate_cli_default_output_and_errors(trained_run):
    workdir, *_ = trained_run
    out = subprocess.run([sys.executable, "-m", "alignax.evaluate", f"--workdir={workdir}", "--num_prompts=2",
                          "--seeds=0"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"wrote the evaluation of step 2 to {workdir / 'eval_step_2.json'}"
    written = json.loads((workdir / "eval_step_2.json").read_text())
    assert written["num_prompts"] == 2 and written["seeds"] == [0] and sorted(written["rewards"]) == ["blue", "red"]
    with pytest.raises(ConfigError, match="--step=7"):
        evaluate.evaluate(workdir, step=7)
    with pytest.raises(ConfigError, match="ema.enabled=False"):
        evaluate.evaluate(workdir, ema=True)


def test_evaluate_writes_its_json_to_a_remote_out(trained_run):
    import fsspec
    workdir, *_ = trained_run
    result = evaluate.evaluate(workdir, num_prompts=1, seeds=(0,), out="memory://alignax-eval-test/run/eval.json")
    assert json.loads(fsspec.filesystem("memory").cat("/alignax-eval-test/run/eval.json")) == result
    assert not (Path.cwd() / "memory:").exists()  # no local `memory:/...` tree


# ---- the Pareto report ------------------------------------------------------------------------

POINTS = {  # run: (step, red, blue)
    "a": [(1, 0.1, 0.1), (2, 1.0, 0.0)],  # step 1 is superseded by step 2
    "b": [(2, 0.0, 1.0)],
    "c": [(2, 0.6, 0.6)],
    "d": [(2, 0.5, 0.5)],                  # dominated by c
    "e": [(2, 0.9, 0.0)],                  # dominated by a
}


def write_evals(root: Path) -> None:
    for run, evals in POINTS.items():
        for step, red, blue in evals:
            (root / run).mkdir(parents=True, exist_ok=True)
            (root / run / f"eval_step_{step}.json").write_text(json.dumps(
                {"run": run, "step": step, "weights": {"red": red, "blue": 1 - red},
                 "rewards": {"red": red, "blue": blue}}))


def test_report_marks_the_front_and_its_hypervolume(tmp_path):
    write_evals(tmp_path)
    evaluations = report.latest_per_run([report.read(p) for p in report.expand([f"{tmp_path}/*/eval_*.json"])])
    assert [(e.run, e.step) for e in evaluations] == [("a", 2), ("b", 2), ("c", 2), ("d", 2), ("e", 2)]
    built = report.build(evaluations, reference=[-0.1, -0.1])
    assert built.names == ["blue", "red"]
    assert dict(zip([e.run for e in evaluations], built.on_front.tolist(), strict=True)) == {
        "a": True, "b": True, "c": True, "d": False, "e": False}
    # Union of boxes from (-0.1, -0.1), by hand in slabs of red: 0.1·1.1 + 0.6·0.7 + 0.4·0.1.
    assert built.hypervolume == pytest.approx(0.11 + 0.42 + 0.04, rel=1e-12)
    rows = {line.split("|")[1].strip(): line for line in report.markdown(built).splitlines()[2:7]}
    assert {run for run, line in rows.items() if line.rstrip().endswith("✓ |")} == {"a", "b", "c"}
    default = report.build(evaluations)  # reference = min − 0.1·spread = (-0.1, -0.1) here too
    np.testing.assert_allclose(default.reference, [-0.1, -0.1])


def test_report_cli_with_shell_expanded_globs(tmp_path):
    write_evals(tmp_path)
    files = sorted(str(p) for p in tmp_path.glob("*/eval_*.json"))
    out = subprocess.run([sys.executable, "-m", "alignax.pareto.report", f"--evals={files[0]}", *files[1:],
                          f"--out={tmp_path / 'report.md'}", "--reference=-0.1,-0.1"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "3 of 5 runs on the front; hypervolume 0.57 " in text


def test_report_refuses_evaluations_with_different_rewards(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"run": "x", "step": 1, "rewards": {"red": 1.0}}))
    (tmp_path / "y.json").write_text(json.dumps({"run": "y", "step": 1, "rewards": {"blue": 1.0}}))
    with pytest.raises(DataError, match="differ"):
        report.build([report.read(str(tmp_path / "x.json")), report.read(str(tmp_path / "y.json"))])
