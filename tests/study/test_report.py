"""The study report on a hand-made study root (fronts, hypervolumes, equal cost, the hacking flag, the
numbers of index.html and summary.md against eval.json, self-containment), the bootstrap interval, and
the evaluation of a tiny trained run with a held-out judge the run never configured."""

from __future__ import annotations

import base64
import io
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest

from alignax.errors import ConfigError, DataError
from alignax.evaluate import bootstrap_interval
from alignax.study import report as study_report

# name: (objective, weights, trained rewards, {reward: mean}, flops, state)
POINTS = {
    "base": ("base", {}, [], {"red": 0.5, "blue": 0.5, "green": 0.5}, 0.0, "finished"),
    "rb-a": ("reward_backprop", {"red": 1.0, "blue": 0.0}, ["red"], {"red": 0.9, "blue": 0.3, "green": 0.2}, 100.0,
             "finished"),  # beats the base on red, loses on the judge green: flagged
    "rb-b": ("reward_backprop", {"red": 0.5, "blue": 0.5}, ["blue", "red"], {"red": 0.7, "blue": 0.7, "green": 0.6},
             200.0, "finished"),
    "dpo-a": ("dpo", {}, [], {"red": 0.6, "blue": 0.8, "green": 0.5}, 50.0, "finished"),
    "dpo-b": ("dpo", {}, [], {"red": 0.4, "blue": 0.4, "green": 0.4}, 300.0, "finished"),  # dominated
}
LOG_TAIL = "Traceback (most recent call last):\nValueError: boom <in a tag>"


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_root(root: Path, points: dict = POINTS, judges: tuple[str, ...] = ("green",)) -> dict[str, dict]:
    """A study root as the runner and evaluate_points leave it: study.json, eval.json and grid.png per point."""
    records, evals = [], {}
    for i, (name, (objective, weights, trained, means, flops, state)) in enumerate(points.items()):
        records.append(dict(name=name, arm=name.split("-")[0], objective=objective, base=name == "base",
                            weights=weights, workdir=str(root / name), state=state, log_tail=None))
        ci = {r: [m - 0.0123456789 * (i + 1), m + 0.0234567891 * (i + 1)] for r, m in means.items()}
        evals[name] = dict(run=name, point=name, objective=objective, step=0 if name == "base" else 10,
                           seeds=[0, 1], num_prompts=2, weights=weights, rewards=means,
                           rewards_std={r: 0.01 for r in means}, rewards_ci=ci, trained_rewards=trained,
                           judges=list(judges), grid="grid.png",
                           cost=dict(steps=0 if name == "base" else 10, examples=80, train_seconds=1.5 * (i + 1),
                                     flops=flops, reward_fwd_bwd=0))
        (root / name).mkdir(parents=True)
        (root / name / "eval.json").write_text(json.dumps(evals[name]))
        (root / name / "grid.png").write_bytes(_png((40 * i, 100, 200)))
    records.append(dict(name="sft-x", arm="sft", objective="sft", base=False, weights={}, workdir=str(root / "sft-x"),
                        state="failed", log_tail=LOG_TAIL))
    (root / "study.json").write_text(json.dumps(dict(judges=list(judges), points=records)))
    return evals


def test_fronts_hypervolumes_equal_cost_and_flags(tmp_path):
    make_root(tmp_path)
    built = study_report.build(str(tmp_path))
    assert built.front_rewards == ["blue", "red"] and built.judges == ["green"]
    assert built.rewards == ["blue", "red", "green"]
    by_name = {p.name: p for p in built.points}
    assert {n for n, p in by_name.items() if p.on_front} == {"rb-a", "rb-b", "dpo-a"}  # base and dpo-b dominated
    np.testing.assert_allclose(built.reference, [0.25, 0.35])  # min − 0.1·spread (blue, red)
    # Slabs of red above 0.35: 0.2·(0.3−0.25) + 0.1·(0.7−0.25) + 0.25·(0.8−0.25).
    assert built.hypervolume == pytest.approx(0.01 + 0.045 + 0.1375) and built.hypervolume_method == "exact"
    objectives = {o.name: o for o in built.objectives}
    assert sorted(objectives) == ["dpo", "reward_backprop"]  # the base is not an objective
    assert objectives["reward_backprop"].hypervolume == pytest.approx(0.01 + 0.35 * 0.45)
    assert objectives["dpo"].hypervolume == pytest.approx(0.25 * 0.55)
    assert objectives["reward_backprop"].joint_share == pytest.approx(2 / 3)
    assert objectives["dpo"].joint_share == pytest.approx(1 / 3)
    assert built.cost_key == "flops" and built.budget == 200.0  # min(max rb 200, max dpo 300)
    assert objectives["dpo"].points_at_budget == 1  # dpo-b (300 FLOPs) is over the budget
    assert objectives["dpo"].hypervolume_at_budget == pytest.approx(0.25 * 0.55)
    assert by_name["rb-a"].hacking == ["green"]
    assert by_name["rb-b"].hacking == [] and by_name["dpo-a"].hacking == []  # rb-b gains on green too
    assert [p.name for p in built.failed] == ["sft-x"]


def _md_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Points")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    return {cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def _html_rows(text: str) -> dict[str, list[str]]:
    table = text.split("<h2>Points</h2>")[1].split("</table>")[0]
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        rows[cells[0]] = cells
    return rows


def _numbers(cell: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]


def test_report_numbers_equal_eval_json_and_html_is_self_contained(tmp_path):
    evals = make_root(tmp_path)
    index = study_report.write_report(str(tmp_path))
    assert index == tmp_path / "report" / "index.html"
    page, summary = index.read_text(), (tmp_path / "report" / "summary.md").read_text()
    rewards = ["blue", "red", "green"]  # the column order: trained rewards, then judges
    for rows in (_md_rows(summary), _html_rows(page)):
        assert set(rows) == {*POINTS, "sft-x"}
        for name, ev in evals.items():
            for column, reward in enumerate(rewards, start=3):
                mean, low, high = _numbers(rows[name][column])
                assert mean == pytest.approx(ev["rewards"][reward], rel=5e-6)
                assert [low, high] == pytest.approx(ev["rewards_ci"][reward], rel=5e-6)
        assert "possible reward hacking: loses on green" in rows["rb-a"][-1]
        assert all("hacking" not in cells[-1] for name, cells in rows.items() if name != "rb-a")
    assert "ValueError: boom &lt;in a tag&gt;" in page and "ValueError: boom <in a tag>" in summary
    assert "0.1925 (exact)" in page and "0.1925 (exact)" in summary  # the joint hypervolume
    # Self-contained: every image is a data URI; nothing is fetched.
    sources = re.findall(r"""src\s*=\s*["']([^"']*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(script|link|iframe)|href=|url\(|https?://", page)
    # The base's and every front point's grid are embedded; the dominated dpo-b's is not.
    for name, shown in (("base", True), ("rb-a", True), ("rb-b", True), ("dpo-a", True), ("dpo-b", False)):
        encoded = base64.b64encode((tmp_path / name / "grid.png").read_bytes()).decode()
        assert (encoded in page) == shown, name
    # 3 plots (fronts per objective; parallel coordinates, as judges make 3 rewards; reward vs cost) + 4 grids
    assert page.count("<figure>") == 3 + 4 and "Fronts per objective" in page and "Pairwise" not in page


def test_three_front_rewards_draw_pairwise_and_parallel_plots(tmp_path):
    points = {name: (o, w, ["blue", "red", "green"] if o == "reward_backprop" else t, m, f, s)
              for name, (o, w, t, m, f, s) in POINTS.items()}
    make_root(tmp_path, points, judges=())
    built = study_report.build(str(tmp_path))
    assert built.front_rewards == ["blue", "green", "red"] and built.judges == []
    assert all(not p.hacking for p in built.points)  # no judges, no flag
    page = study_report.write_report(str(tmp_path)).read_text()
    assert "Pairwise reward panels" in page and "Parallel coordinates" in page and "Fronts per objective" not in page


def test_hacking_needs_paired_significance_over_prompts():
    """The study's first real run flagged points whose judge means moved by 1e-3 inside noise of 3e-3: with
    per-prompt scores, a gain or a loss counts only if the paired bootstrap interval excludes 0."""
    def point(name, red, green):
        per_prompt = [dict(index=i, prompt=f"p{i}", rewards=dict(red=r, green=g))
                      for i, (r, g) in enumerate(zip(red, green, strict=True))]
        evaluation = dict(rewards=dict(red=float(np.mean(red)), green=float(np.mean(green))), per_prompt=per_prompt,
                          trained_rewards=[] if name == "base" else ["red"])
        return study_report.Point(name=name, arm=name, objective="base" if name == "base" else "rb", weights={},
                                  state="finished", log_tail="", eval=evaluation)
    rng = np.random.default_rng(0)
    base_red, base_green = rng.uniform(0.3, 0.5, 8), rng.uniform(0.2, 0.4, 8)
    noise = rng.normal(0, 0.01, 8)
    noise -= noise.mean()
    consistent = point("a", base_red + 0.02, base_green - 0.01)  # every prompt: red up, green down
    noisy = point("b", base_red + 0.02, base_green - 0.001 + noise)  # green mean lower, but within noise
    no_gain = point("c", base_red + noise, base_green - 0.01)  # red not significantly up: not a hacking case
    base = point("base", base_red, base_green)
    assert noisy.mean("green") < base.mean("green")  # the old means-only rule flagged this
    assert study_report.possible_hacking(consistent, base, ["green"]) == ["green"]
    assert study_report.possible_hacking(noisy, base, ["green"]) == []
    assert study_report.possible_hacking(no_gain, base, ["green"]) == []


def test_arms_sharing_an_objective_are_separate_methods(tmp_path):
    points = dict(POINTS)
    points["rbk-c"] = ("reward_backprop", {"red": 0.0, "blue": 1.0}, ["blue"], {"red": 0.2, "blue": 0.95, "green": 0.5},
                       120.0, "finished")  # another arm (e.g. DRaFT-K) of the same objective
    make_root(tmp_path, points)
    objectives = {o.name: o for o in study_report.build(str(tmp_path)).objectives}
    assert sorted(objectives) == ["dpo", "rb", "rbk"] and objectives["rbk"].num_points == 1


def test_report_refuses_points_scored_with_different_rewards(tmp_path):
    make_root(tmp_path)
    ev = json.loads((tmp_path / "dpo-b" / "eval.json").read_text())
    del ev["rewards"]["green"]
    (tmp_path / "dpo-b" / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(DataError, match="dpo-b.*differ"):
        study_report.build(str(tmp_path))


def test_report_warns_about_points_scored_on_other_seeds(tmp_path):
    make_root(tmp_path)
    assert study_report.build(str(tmp_path)).warnings == []
    ev = json.loads((tmp_path / "rb-b" / "eval.json").read_text())
    ev["seeds"] = [0]
    (tmp_path / "rb-b" / "eval.json").write_text(json.dumps(ev))
    assert study_report.build(str(tmp_path)).warnings == [
        "rb-b was scored on other prompts or seeds than base; its row does not compare"]


def test_bootstrap_interval_is_fixed_and_sane():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    low, high = bootstrap_interval(values)
    assert bootstrap_interval(values) == [low, high]  # fixed seed: reproducible
    assert low < values.mean() < high
    half = 1.96 * values.std() / np.sqrt(len(values))  # the normal-theory 95% half-width
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    low4, high4 = bootstrap_interval(values[:100])
    assert (high4 - low4) / (high - low) == pytest.approx(2.0, rel=0.2)  # ∝ 1/√n
    assert bootstrap_interval([1.5]) == [1.5, 1.5]
    assert bootstrap_interval([2.0, 2.0, 2.0]) == [2.0, 2.0]
    with pytest.raises(ConfigError, match="confidence"):
        bootstrap_interval(values, confidence=1.0)


# ---- evaluation of a tiny trained run, with a held-out judge ------------------------------------

@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """sft on the tiny world, 2 steps, one device; its config knows only the red reward."""
    from alignax.data import build_tiny_world
    from alignax.data import setup as data_setup
    from alignax.training.trainer import Trainer
    from tests.training.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("study_eval")
    config = tiny_config(total_steps=2, **{"checkpoint_every": 2})
    build_tiny_world(tmp / "world", num_train=16, num_eval=4, **data_setup.tiny_world_sizes(config))
    config.data.path = str(tmp / "world")
    config.rewards.red = dict(kind="channel_mean", channel=0)
    config.pareto.weights = dict(red=1.0)
    config.sample.num_steps = 2  # the evaluation's sampler: the fewer steps, the less to compile
    import jax

    from alignax import mesh as mesh_lib
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = Trainer(config, tmp / "run", mesh=mesh, async_checkpoints=False)
    try:
        assert trainer.run().final_step == 2
    finally:
        trainer.close()
    return tmp


@pytest.mark.slow  # ~80 CPU-seconds: compiling the train step (~45) and the sampler
def test_evaluate_points_scores_with_a_held_out_judge_and_skips_up_to_date(trained_workdir):
    from PIL import Image

    from alignax.study import evaluation

    root = trained_workdir / "study"
    study = types.SimpleNamespace(
        rewards={"red": dict(kind="channel_mean", channel=0), "green": dict(kind="channel_mean", channel=1)},
        judges=["green"], eval=dict(num_prompts=2, seeds=[0, 1]))
    trained = types.SimpleNamespace(name="sft-a", arm="sft", objective="sft", weights={"red": 1.0},
                                    state="finished", workdir=str(trained_workdir / "run"))
    base = types.SimpleNamespace(name="base", arm="base", objective="", weights={}, state="finished",
                                 workdir=str(root / "base"), base=True)  # no checkpoint: recreated from sft-a
    failed = types.SimpleNamespace(name="x", arm="x", objective="sft", weights={}, state="failed", workdir="/nowhere")
    evaluation.evaluate_points(study, [trained, base, failed], str(root))
    assert not (root / "x").exists()
    point, start = (json.loads((root / n / "eval.json").read_text()) for n in ("sft-a", "base"))
    for ev in (point, start):
        assert sorted(ev["rewards"]) == ["green", "red"] and ev["judges"] == ["green"]  # the judge is scored
        assert ev["seeds"] == [0, 1] and ev["num_prompts"] == 2
        for name in ("green", "red"):
            low, high = ev["rewards_ci"][name]
            assert low <= np.mean([p["rewards"][name] for p in ev["per_prompt"]]) <= high
        # grid.png: a row per seed, a column per prompt; its cells' channel means are the scores (to 8 bits).
        grid = np.asarray(Image.open(io.BytesIO((root / ev["run"] / "grid.png").read_bytes())), np.float64) / 255
        cells = grid.reshape(2, grid.shape[0] // 2, 2, grid.shape[1] // 2, 3).mean(axis=(1, 3))  # [seed, prompt, c]
        for channel, name in ((0, "red"), (1, "green")):
            scores = np.asarray([p["per_seed"][name] for p in ev["per_prompt"]]).T
            np.testing.assert_allclose(cells[..., channel], scores, atol=1 / 255)
    assert point["step"] == 2 and point["trained_rewards"] == ["red"] and point["objective"] == "sft"
    assert point["cost"]["steps"] == 2 and point["cost"]["examples"] == 16 and point["cost"]["train_seconds"] > 0
    assert point["cost"]["flops"] == pytest.approx(2 * point["cost"]["flops_per_step"])
    assert start["step"] == 0 and start["objective"] == "base" and start["base_from"].endswith("run")
    assert start["cost"]["steps"] == 0 and start["trained_rewards"] == []
    assert point["rewards"] != start["rewards"]  # two steps of training moved the images
    # Up to date: a second call rewrites nothing.
    stamps = {n: (root / n / "eval.json").stat().st_mtime_ns for n in ("sft-a", "base")}
    evaluation.evaluate_points(study, [trained, base], str(root))
    assert stamps == {n: (root / n / "eval.json").stat().st_mtime_ns for n in ("sft-a", "base")}
    # An unknown judge kind is refused before any checkpoint is opened.
    bad = types.SimpleNamespace(**{**vars(study), "rewards": {**study.rewards, "judge": dict(kind="nope")}})
    with pytest.raises(ConfigError, match="config.rewards.judge"):
        evaluation.evaluate_points(bad, [trained], str(root))


def test_run_cost_counts_one_reward_backward_per_weighted_reward_under_mgda(tmp_path):
    from alignax.study import evaluation
    from experiments.configs import reward_backprop_tiny
    weighted, balanced = reward_backprop_tiny.get_config(), reward_backprop_tiny.get_config("mgda")
    balanced.pareto.weights = {"red": 0.5, "blue": 0.5}
    steps, batch = 8, weighted.batch_size
    assert evaluation.run_cost(str(tmp_path), weighted, steps)["reward_fwd_bwd"] == steps * batch
    assert evaluation.run_cost(str(tmp_path), balanced, steps)["reward_fwd_bwd"] == 2 * steps * batch
    balanced.pareto.weights = {"red": 1.0, "blue": 0.0}  # a zero-weight reward gets no backward
    assert evaluation.run_cost(str(tmp_path), balanced, steps)["reward_fwd_bwd"] == steps * batch


def test_best_point_gains_most_over_the_base_per_reward_spread(tmp_path):
    from alignax.study import best
    points = dict(POINTS)
    points["dpo-a"] = ("dpo", {}, [], {"red": 0.6, "blue": 0.75, "green": 0.5}, 50.0, "finished")
    make_root(tmp_path, points)
    report = study_report.build(str(tmp_path))
    # spreads: red 0.9 - 0.4, blue 0.75 - 0.3; rb-b gains 0.2/0.5 + 0.2/0.45, dpo-a 0.1/0.5 + 0.25/0.45
    gains = best.gains(report, next(p for p in report.points if p.name == "rb-b"))
    assert gains == pytest.approx({"red": 0.4, "blue": 0.2 / 0.45})
    assert best.best_point(report).name == "rb-b"
    lines = best.front_lines(report)
    assert lines[0].startswith("joint front over (blue, red)") or lines[0].startswith("joint front over (red, blue)")
    assert "dpo-b" not in lines[0] and "rb-b" in lines[0]


def _paired_point(name: str, scores: dict[str, np.ndarray], **fields) -> study_report.Point:
    per_prompt = [dict(index=i, prompt=f"p{i}", rewards={r: float(v[i]) for r, v in scores.items()})
                  for i in range(len(next(iter(scores.values()))))]
    evaluation = dict(rewards={r: float(np.mean(v)) for r, v in scores.items()}, per_prompt=per_prompt, **fields)
    return study_report.Point(name=name, arm=name, objective="base" if name == "base" else "rb", weights={},
                              state="finished", log_tail="", eval=evaluation)


def test_a_target_gain_with_a_judge_loss_is_flagged_even_when_other_trained_rewards_fall():
    """The portrait study's aesthetic-heavy point raised aesthetic, lowered identity and alignment (which it also
    trained on, at small weights) and lost on both judges: it was not flagged while the rule asked for a gain on
    every trained reward. The rule is now a significant gain on a target (by default the largest weights)."""
    rng = np.random.default_rng(1)
    base = {r: rng.uniform(0, 1, 12) for r in ("aesthetic", "identity", "realism")}
    hacked = _paired_point("hacked", {"aesthetic": base["aesthetic"] + 1, "identity": base["identity"] - 0.3,
                                      "realism": base["realism"] - 0.1},
                           weights={"aesthetic": 0.8, "identity": 0.2}, trained_rewards=["aesthetic", "identity"])
    honest = _paired_point("honest", {"aesthetic": base["aesthetic"] - 0.2, "identity": base["identity"] + 0.3,
                                      "realism": base["realism"] - 0.1},
                           weights={"aesthetic": 0.2, "identity": 0.8}, trained_rewards=["aesthetic", "identity"])
    named = _paired_point("named", {"aesthetic": base["aesthetic"] + 1, "identity": base["identity"],
                                    "realism": base["realism"] - 0.1}, targets=["identity"])
    base_point = _paired_point("base", base)
    assert hacked.targets == ["aesthetic"] and honest.targets == ["identity"] and named.targets == ["identity"]
    assert study_report.possible_hacking(hacked, base_point, ["realism"]) == ["realism"]
    assert study_report.possible_hacking(honest, base_point, ["realism"]) == ["realism"]  # its target rose too
    assert study_report.possible_hacking(named, base_point, ["realism"]) == []  # its target did not move


def test_gains_table_is_the_paired_bootstrap_of_per_prompt_differences(tmp_path):
    rng = np.random.default_rng(2)
    base = {"red": rng.uniform(0, 1, 10), "green": rng.uniform(0, 1, 10)}
    moved = {"red": base["red"] + rng.normal(0.3, 0.05, 10), "green": base["green"] + rng.normal(0, 0.05, 10)}
    for name, scores, extra in (("base", base, dict(objective="base")),
                                ("rb-x", moved, dict(objective="reward_backprop", weights={"red": 1.0},
                                                     trained_rewards=["red"], targets=["red"]))):
        (tmp_path / name).mkdir()
        body = _paired_point(name, scores, **extra).eval
        body.update(seeds=[0], judges=["green"], cost=dict(steps=0 if name == "base" else 4, flops=1.0))
        (tmp_path / name / "eval.json").write_text(json.dumps(body))
    built = study_report.build(str(tmp_path))
    gain = {p.name: p for p in built.points}["rb-x"].gains
    low, high = bootstrap_interval(moved["red"] - base["red"])
    assert (gain["red"].mean, gain["red"].low, gain["red"].high) == pytest.approx(
        ((moved["red"] - base["red"]).mean(), low, high))
    assert gain["red"].sign == 1 and gain["green"].sign == 0
    summary = study_report.write_report(str(tmp_path)).with_name("summary.md").read_text()
    section = summary.split("## Gains over the base")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| rb-x"))
    assert "*" in row.split("|")[1 + built.rewards.index("red") + 1]  # the target is marked
    assert f"rb-x: raised red (+{(moved['red'] - base['red']).mean():.3g}" in section
