"""Evaluating a study's points: every finished point and the base model, scored on the same prompts
and noise seeds by every study reward, held-out judges included (`alignax.evaluate` does the
sampling and scoring; this module decides what to evaluate and adds the study's fields).

`ROOT/<point>/eval.json` holds what `alignax.evaluate` writes (per-prompt scores, mean, std and a
bootstrap 95% interval per reward) plus the point's arm, objective, weights, state, the rewards
it trains on, the judges, and its cost (steps, examples, train seconds, matmul FLOPs, reward
forward+backward passes); `ROOT/<point>/grid.png` the images scored (a row per seed, a column per
prompt). The base point is evaluated from its own workdir's checkpoint (`alignax.study.base_point`
saves the initial train state as step 0); without one, the base model is recreated as the
*initial* transformer of the first finished point's saved config (`evaluate.load(initial=True)`;
all arms of a study start from the same model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from alignax import evaluate, fs
from alignax.errors import ConfigError, DataError
from alignax.pareto import gradient_balance
from alignax.rewards import setup as reward_setup

EVAL_JSON = "eval.json"
GRID_PNG = "grid.png"
BASE = "base"
log = logging.getLogger(__name__)


def field(obj: Any, name: str, default: Any = None) -> Any:
    """`obj.name` or `obj[name]` (points and studies may be dataclasses, ConfigDicts or dicts)."""
    if isinstance(obj, Mapping | ml_collections.ConfigDict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def is_base(point: Any) -> bool:
    """The base model's point: flagged `base`, or named or armed 'base' (it is evaluated, not trained)."""
    names = (field(point, "name"), field(point, "arm"), field(point, "objective"))
    return field(point, "base") is True or BASE in names


def trained_rewards(weights: Any) -> list[str]:
    """The rewards a point trains on: those with a non-zero weight."""
    if not isinstance(weights, Mapping | ml_collections.ConfigDict):
        return []
    return sorted(name for name, w in dict(weights).items() if isinstance(w, int | float) and w != 0)


def checkpoint_steps(workdir: str) -> list[int]:
    """The saved steps under `workdir/checkpoints` (names that are plain integers), without opening them."""
    return sorted(int(n) for n in fs.listdir(fs.join(workdir, "checkpoints")) if n.isdigit())


def _mtime(path: str) -> float | None:
    try:
        filesystem, p = fs.filesystem(path)
        info = filesystem.info(p)
    except (OSError, ConfigError):
        return None
    value = info.get("mtime", info.get("created"))
    try:
        return float(value.timestamp() if hasattr(value, "timestamp") else value)
    except (TypeError, ValueError):
        return None


def run_cost(workdir: str, config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    """What training the point up to `step` cost, from its config and `metrics.jsonl`.

    `train_seconds`: the compiled steps' time (each logging window's steps / its steps_per_second)
    plus checkpoint and sample I/O, without compilation; `flops`: the compiled train step's matmul FLOPs with
    every loop trip counted (`compile/matmul_flops`, per device program; runs logged before it existed fall
    back to XLA's `compile/flops`, which counts a sampler loop once) × steps; `reward_fwd_bwd`: samples
    each reward scored with a backward pass (reward_backprop only: batch × DRaFT-LV copies × steps, times
    the number of weighted rewards for a gradient-balanced scalarisation, which runs one backward each).
    Fields that metrics.jsonl does not give are None."""
    batch = int(config.get("batch_size", 0) or 0)
    cost: dict[str, Any] = {"steps": int(step), "examples": int(step) * batch, "train_seconds": None,
                            "flops_per_step": None, "flops": None, "reward_fwd_bwd": 0}
    objective = config.objective
    if objective.name == "reward_backprop":
        copies = int(objective.get("lv_n", 1)) if objective.get("mode") == "draft_lv" else 1
        pareto = config.get("pareto") or {}
        backwards = 1
        if pareto.get("scalarization") in gradient_balance.METHODS:
            backwards = sum(1 for w in (pareto.get("weights") or {}).values() if w) or 1
        cost["reward_fwd_bwd"] = int(step) * batch * copies * backwards
    path = fs.join(workdir, "metrics.jsonl")
    if not fs.exists(path):
        return cost
    seconds, window = 0.0, 0
    for line in fs.read_text(path).splitlines():
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
        if row_step > step:
            continue
        if "compile/matmul_flops" in row or "compile/flops" in row:
            cost["flops_per_step"] = float(row.get("compile/matmul_flops", row.get("compile/flops")))
        if "loss" in row:
            window += 1
        if row.get("steps_per_second"):
            seconds += window / float(row["steps_per_second"]) + float(row.get("io_seconds", 0.0))
            window = 0
    cost["train_seconds"] = seconds if seconds else None
    if cost["flops_per_step"] is not None:
        cost["flops"] = cost["flops_per_step"] * int(step)
    return cost


def _settings(study: Any) -> tuple[ml_collections.ConfigDict, list[str], int, list[int], int | None]:
    rewards = field(study, "rewards")
    if not rewards:
        raise ConfigError("study: 'rewards' is empty; a study evaluates every point with its rewards")
    rewards = ml_collections.ConfigDict({k: dict(v) for k, v in dict(rewards).items()})
    reward_setup.validate_config(rewards)  # a bad judge fails here, before any checkpoint is opened
    judges = [str(j) for j in (field(study, "judges") or [])]
    unknown = sorted(set(judges) - set(rewards))
    if unknown:
        raise ConfigError(f"study.judges: {unknown} are not study rewards {sorted(rewards)}")
    settings = field(study, "eval") or {}
    num_prompts = int(field(settings, "num_prompts", 8))
    seeds = [int(s) for s in (field(settings, "seeds") or (0,))]
    batch_size = field(settings, "batch_size")
    if num_prompts < 1 or not seeds:
        raise ConfigError(f"study.eval: num_prompts={num_prompts} seeds={seeds}: need >= 1 prompt and >= 1 seed")
    return rewards, judges, num_prompts, seeds, batch_size


def _up_to_date(path: str, step: int, rewards: list[str], num_prompts: int, seeds: list[int],
                newer_than: str | None) -> bool:
    """An existing eval.json of the same checkpoint step, rewards, prompts and seeds, written after
    the checkpoint it evaluates."""
    if not fs.exists(path):
        return False
    try:
        old = json.loads(fs.read_text(path))
    except (OSError, ValueError):
        return False
    same = (old.get("checkpoint_step") == step and sorted(old.get("rewards", {})) == sorted(rewards)
            and old.get("seeds") == seeds and old.get("num_prompts_requested") == num_prompts)
    if not same or newer_than is None:
        return same
    written, saved = _mtime(path), _mtime(newer_than)
    return written is None or saved is None or written >= saved


def evaluate_point(point: Any, root: str, *, source: str, base: bool = False, initial: bool = False,
                   rewards: ml_collections.ConfigDict,
                   judges: Sequence[str], num_prompts: int, seeds: Sequence[int],
                   batch_size: int | None = None, samplers: dict[str, Any] | None = None) -> dict | None:
    """Evaluates one point from the latest checkpoint in `source` (its own workdir; for the base
    without one, `initial=True` and any run whose initial transformer is the base); writes
    ROOT/<point>/eval.json and grid.png and returns the JSON, or None when the existing eval.json is up to date.
    `samplers` (shared across calls) keeps one compiled sampler per model and sample settings."""
    name = str(field(point, "name"))
    steps = checkpoint_steps(source)
    if not steps:
        raise DataError(f"{fs.join(source, 'checkpoints')}: point {name!r} has no checkpoint to evaluate")
    out = fs.join(root, name, EVAL_JSON)
    if _up_to_date(out, steps[-1], list(rewards), num_prompts, list(seeds),
                   None if initial else fs.join(source, "checkpoints", str(steps[-1]))):
        log.info("%s: %s is newer than checkpoint %d; not re-evaluated", name, out, steps[-1])
        return None
    ckpt = evaluate.load(source, rewards_config=rewards, initial=initial)
    key = json.dumps([ckpt.config.model.to_dict(), ckpt.config.sample.to_dict()], sort_keys=True, default=str)
    samplers = {} if samplers is None else samplers
    if key not in samplers:
        samplers[key] = evaluate.make_sampler(ckpt)
    body, images = evaluate.evaluate_checkpoint(ckpt, num_prompts=num_prompts, seeds=tuple(seeds),
                                                batch_size=batch_size, sampler=samplers[key])
    weights = field(point, "weights")
    weights = dict(weights) if isinstance(weights, Mapping | ml_collections.ConfigDict) else {}
    result = {
        "run": name, "point": name, "arm": field(point, "arm"),
        "objective": BASE if base else (field(point, "objective") or body["objective"]),
        "state": field(point, "state"), "workdir": fs.absolute(field(point, "workdir") or source),
        **{k: v for k, v in body.items() if k != "objective"},
        "weights": {} if base else {k: float(v) for k, v in weights.items()},
        "checkpoint_step": steps[-1], "num_prompts_requested": num_prompts,
        "trained_rewards": [] if base else trained_rewards(weights),
        "targets": [] if base else list(field(point, "targets") or ()),
        "judges": list(judges),
        "cost": ({"steps": 0, "examples": 0, "train_seconds": 0.0, "flops_per_step": None, "flops": 0.0,
                  "reward_fwd_bwd": 0} if base else run_cost(source, ckpt.config, ckpt.step)),
        "grid": GRID_PNG,
    }
    if initial:
        result["base_from"] = fs.absolute(source)
    evaluate.write_grid(fs.join(root, name, GRID_PNG), images)
    fs.write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    log.info("evaluated %s (step %d): %s -> %s", name, ckpt.step, result["rewards"], out)
    return result


def evaluate_points(study: Any, points: Sequence[Any], root: str) -> None:
    """Writes ROOT/<point>/eval.json for every finished point and the base point (see the module
    docstring); points whose eval.json is newer than their last checkpoint are skipped. The study's
    rewards are checked before any checkpoint is opened."""
    rewards, judges, num_prompts, seeds, batch_size = _settings(study)
    kwargs = dict(rewards=rewards, judges=judges, num_prompts=num_prompts, seeds=seeds, batch_size=batch_size,
                  samplers={})  # points of one model share one compiled sampler
    finished = [p for p in points if not is_base(p) and field(p, "state") == "finished"]
    for point in finished:
        evaluate_point(point, root, source=str(field(point, "workdir")), initial=False, **kwargs)
    for point in (p for p in points if is_base(p)):
        own = field(point, "workdir")
        candidates = ([str(own)] if own else []) + [str(field(p, "workdir")) for p in finished]
        source = next((c for c in candidates if fs.exists(fs.join(c, "checkpoints")) and checkpoint_steps(c)), None)
        if source is None:
            log.warning("base point %r: no saved run to recreate the base model from (no point finished yet); "
                        "not evaluated", field(point, "name"))
            continue
        evaluate_point(point, root, source=source, base=True, initial=source != candidates[0] or not own, **kwargs)
