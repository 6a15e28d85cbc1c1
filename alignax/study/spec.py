"""A study file (`experiments/studies/NAME.py[:ARG]`) and its resolution into points.

`get_study(arg)` returns a dict or ConfigDict:

    rewards   {name: reward settings}  every reward the points are scored by (`config.rewards` entries)
    judges    [names]                  held-out rewards among `rewards` that no arm trains on
    eval      {num_prompts, seeds, ...} passed to the evaluation as is (defaults: 8 prompts, seed 0)
    overrides {dotted key: value}      applied to every arm (e.g. `total_steps`); not part of point names
    base      {config, overrides}      optional: whose initial params the base point holds (default: first arm)
    export_best bool                   optional: after the report, export the best joint-front point as a
                                       diffusers pipeline and sample it once in diffusers (alignax.study.best)
    arms      [{name, config: 'experiments/configs/X.py[:ARG]', overrides: {dotted key: value},
                weights: {rewards: [names], grid: 'simplex:N' | 'dirichlet:N:SEED' | [[w, ...], ...]},
                targets: [names]}]

An arm's `targets` are the study rewards it is meant to raise: the report gives every point's paired
gain over the base on them and flags reward hacking against them. Default: for a point with weights, the
rewards of its largest weight; `targets` names them for an arm that trains on no reward, e.g. `dpo` on
pairs one reward prefers.

An arm without `weights` is one point; with them, one point per weight vector, which sets
`pareto.weights` to that vector over `weights.rewards` and to 0 for every other reward its config
has: a point trains on exactly its weight vector. Point names are `ARM[__OVERRIDES][__w-W1-W2...]`
(e.g. `reward_backprop-draft_k__w-0.75-0.25`): derived from what defines the point, so a re-run finds
its finished points, and changing an arm's overrides or weights makes a new point. Study-wide
`overrides` are not in the names (raising `total_steps` resumes the points to the new length).

The base model is its own point, `base`: `python -m alignax.study.base_point` saves the base
config's initial train state as `checkpoints/0` (nothing is trained) so that it is evaluated by the
same code, on the same prompts and seeds, as every trained point.

Everything is checked before anything runs: the file's shape (an unknown arm field, an empty grid),
every arm against its config (a weight for a reward the config does not have, a study reward whose
settings differ from the arm's, a judge an arm trains on) and every point's config for the device
count, as `alignax.train` will parse and validate it. Errors name the arm and the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from alignax.errors import ConfigError
from alignax.study.weights import format_weight, resolve_grid

BASE = "base"
BASE_MODULE = "alignax.study.base_point"
STUDY_FIELDS = ("rewards", "judges", "eval", "overrides", "base", "arms", "export_best")
ARM_FIELDS = ("name", "config", "overrides", "weights", "targets")
WEIGHT_FIELDS = ("rewards", "grid")
DEFAULT_EVAL = dict(num_prompts=8, seeds=(0,))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One objective configuration: a config file, its overrides (flat) and its weight vectors (or none)."""

    name: str
    config: str
    overrides: dict[str, Any]
    rewards: tuple[str, ...] = ()
    grid: tuple[tuple[float, ...], ...] = ()
    targets: tuple[str, ...] = ()   # the rewards the arm is meant to raise ('' = its largest weights)


@dataclasses.dataclass
class Point:
    """One training run of a study (or the base model). `state` is 'pending' until the runner knows more;
    `objective` and `total_steps` are filled in by `validate` from the parsed config."""

    name: str
    arm: str
    config_path: str
    overrides: dict[str, Any]       # every --config.* flag of the run: study + arm overrides + weights
    weights: dict[str, float]       # reward -> weight ({} for an arm without a grid, and the base)
    workdir: str
    base: bool = False
    objective: str = ""
    total_steps: int = 0
    state: str = "pending"
    targets: tuple[str, ...] = ()   # the rewards it is meant to raise (`default_targets` unless the arm names them)

    @property
    def run(self) -> Any:
        """The `launch.backends.Run` that trains (or, for the base, initialises) this point."""
        from launch import backends
        return backends.Run(self.name, self.overrides, self.workdir, config=self.config_path,
                            module=BASE_MODULE if self.base else "alignax.train")


@dataclasses.dataclass(frozen=True)
class Study:
    """A loaded study file: what `alignax.study.report.evaluate_points` reads (`rewards`, `judges`, `eval`)."""

    spec: str
    name: str
    rewards: dict[str, ml_collections.ConfigDict]
    judges: tuple[str, ...]
    eval: ml_collections.ConfigDict
    overrides: dict[str, Any]
    base: Arm
    arms: tuple[Arm, ...]
    export_best: bool = False   # after the report: export the best front point and sample it in diffusers


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _overrides(raw: Any, where: str) -> dict[str, Any]:
    from launch import backends, sweep
    raw = _plain(raw) if raw is not None else {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{dotted config key: value}}, found {raw!r}")
    flat = sweep.flatten(raw)
    for key, value in flat.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"{where}: {key!r} is not a dotted config key")
        try:
            backends.flag_value(value)
        except ConfigError as e:
            raise ConfigError(f"{where}.{key}: {e}") from e
    return flat


def load_study(spec: str) -> Study:
    """The study `path.py[:arg]` defines, checked for shape (not yet against the configs: `validate`)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--study={spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_alignax_study_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_study"):
        raise ConfigError(f"--study={spec}: {path} defines no get_study()")
    raw = _plain(module.get_study(arg) if arg else module.get_study())
    where = f"study {spec}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: get_study() must return a dict or ConfigDict, found {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; a study has {list(STUDY_FIELDS)}")

    rewards_raw = _plain(raw.get("rewards")) or {}
    if not isinstance(rewards_raw, Mapping) or not all(isinstance(v, Mapping) for v in rewards_raw.values()):
        raise ConfigError(f"{where}: 'rewards' must map reward names to settings dicts, found {rewards_raw!r}")
    from alignax.rewards import setup as reward_setup
    rewards = {str(name): ml_collections.ConfigDict(dict(settings)) for name, settings in rewards_raw.items()}
    try:
        reward_setup.validate_config(ml_collections.ConfigDict(rewards))
    except ConfigError as e:
        raise ConfigError(f"{where}: rewards: {e}") from e

    judges = raw.get("judges") or ()
    if isinstance(judges, str) or not all(isinstance(j, str) for j in judges):
        raise ConfigError(f"{where}: 'judges' must be a list of reward names, found {judges!r}")
    missing = [j for j in judges if j not in rewards]
    if missing:
        raise ConfigError(f"{where}: judges {missing} are not among the study's rewards {sorted(rewards)}")

    eval_cfg = dict(DEFAULT_EVAL)
    eval_cfg.update(_plain(raw.get("eval")) or {})
    seeds = eval_cfg.get("seeds")
    if (isinstance(eval_cfg.get("num_prompts"), bool) or not isinstance(eval_cfg.get("num_prompts"), int)
            or eval_cfg["num_prompts"] < 1):
        raise ConfigError(f"{where}: eval.num_prompts={eval_cfg.get('num_prompts')!r}: expected an integer ≥ 1")
    if (not isinstance(seeds, Sequence) or isinstance(seeds, str) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}: eval.seeds={seeds!r}: expected a non-empty list of integers")
    eval_cfg["seeds"] = tuple(seeds)

    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, Sequence) or isinstance(arms_raw, str) or not arms_raw:
        raise ConfigError(f"{where}: 'arms' must be a non-empty list of arms, found {arms_raw!r}")
    arms, seen = [], set()
    for index, arm_raw in enumerate(arms_raw):
        arm = _arm(_plain(arm_raw), index, where, rewards, tuple(judges), path)
        if arm.name in seen:
            raise ConfigError(f"{where}: arm name {arm.name!r} is used twice")
        seen.add(arm.name)
        arms.append(arm)

    base_raw = _plain(raw.get("base"))
    if base_raw is None:
        base = Arm(BASE, arms[0].config, arms[0].overrides)
    else:
        if not isinstance(base_raw, Mapping) or set(base_raw) - {"config", "overrides"} or "config" not in base_raw:
            raise ConfigError(f"{where}: 'base' must be {{config: 'experiments/configs/X.py[:ARG]', overrides: "
                              f"{{...}}}}, found {base_raw!r}")
        base = Arm(BASE, _config_file(base_raw["config"], f"{where}: base.config", path),
                   _overrides(base_raw.get("overrides"), f"{where}: base.overrides"))
    name = Path(path).stem + (f"-{arg}" if arg else "")
    export_best = raw.get("export_best", False)
    if not isinstance(export_best, bool):
        raise ConfigError(f"{where}: export_best={export_best!r}, expected True or False")
    return Study(spec, name, rewards, tuple(judges), ml_collections.ConfigDict(eval_cfg),
                 _overrides(raw.get("overrides"), f"{where}: overrides"), base, tuple(arms), export_best)


def _config_file(config: Any, where: str, study_file: str) -> str:
    """The absolute `path[:arg]` of an arm's config: relative paths are tried against the current
    directory, then the study file's directory and its ancestors (the repo root for a study in
    experiments/studies/), so a study runs from any directory."""
    if not isinstance(config, str) or not config:
        raise ConfigError(f"{where}={config!r}: expected 'experiments/configs/X.py[:ARG]'")
    path, sep, arg = config.partition(":")
    study_dir = Path(study_file).absolute().parent
    for anchor in (Path.cwd(), study_dir, *study_dir.parents):
        candidate = anchor / path
        if candidate.is_file():
            return str(candidate.resolve()) + sep + arg
    raise ConfigError(f"{where}={config!r}: no file {path} (relative to the current directory {Path.cwd()}, "
                      f"or to {study_dir} and its parent directories)")


def _arm(raw: Any, index: int, where: str, rewards: Mapping[str, Any], judges: tuple[str, ...],
         study_file: str) -> Arm:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: arm {index} must be a dict with {list(ARM_FIELDS)}, found {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise ConfigError(f"{where}: arm {index}: name={name!r}: expected letters, digits and . _ = + - "
                          f"(no '__', which separates the parts of point names)")
    here = f"{where}: arm {name!r}"
    if name == BASE:
        raise ConfigError(f"{here}: the name {BASE!r} is the base model's point; rename the arm")
    unknown = sorted(set(raw) - set(ARM_FIELDS))
    if unknown:
        raise ConfigError(f"{here}: unknown fields {unknown}; an arm has {list(ARM_FIELDS)}")
    config = _config_file(raw.get("config"), f"{here}: config", study_file)
    overrides = _overrides(raw.get("overrides"), f"{here}: overrides")
    targets = _targets(raw.get("targets"), f"{here}: targets", rewards, judges)
    taken = [k for k in overrides if k == "pareto.weights" or k.startswith("pareto.weights.")]
    weights = raw.get("weights")
    if weights is None:
        return Arm(name, config, overrides, targets=targets)
    if taken:
        raise ConfigError(f"{here}: overrides {taken} set the weights that 'weights' sets; remove them")
    if not isinstance(weights, Mapping) or sorted(weights) != sorted(WEIGHT_FIELDS):
        raise ConfigError(f"{here}: weights={weights!r}: expected {{rewards: [names], grid: 'simplex:N' | "
                          f"'dirichlet:N:SEED' | [[w, ...], ...]}}")
    names = weights["rewards"]
    if (isinstance(names, str) or not isinstance(names, Sequence) or not names
            or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
        raise ConfigError(f"{here}: weights.rewards={names!r}: expected a non-empty list of distinct reward names")
    unknown = [n for n in names if n not in rewards]
    if unknown:
        raise ConfigError(f"{here}: weights.rewards names {unknown}, which are not among the study's rewards "
                          f"{sorted(rewards)}: every reward a point trains on is also evaluated")
    judged = [n for n in names if n in judges]
    if judged:
        raise ConfigError(f"{here}: weights.rewards trains on {judged}, which the study holds out as judges")
    grid = resolve_grid(weights["grid"], len(names), f"{here}: weights.grid")
    return Arm(name, config, overrides, tuple(names), grid, targets)


def _targets(raw: Any, where: str, rewards: Mapping[str, Any], judges: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return ()
    raw = _plain(raw)
    if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw or not all(isinstance(n, str) for n in raw):
        raise ConfigError(f"{where}={raw!r}: expected a non-empty list of reward names")
    unknown = [n for n in raw if n not in rewards]
    if unknown:
        raise ConfigError(f"{where} names {unknown}, which are not among the study's rewards {sorted(rewards)}")
    judged = [n for n in raw if n in judges]
    if judged:
        raise ConfigError(f"{where} names {judged}, which the study holds out as judges: a judge is what "
                          f"a target's gain is checked against, not a target")
    return tuple(raw)


def default_targets(weights: Mapping[str, float]) -> tuple[str, ...]:
    """A weighted point's targets: the rewards of its largest weight (all of them on a tie)."""
    if not weights or max(weights.values()) <= 0:
        return ()
    top = max(weights.values())
    return tuple(name for name, w in weights.items() if w == top)


def _sanitize(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.=+-]", "_", text)).strip("_")


def point_name(arm: Arm, weights: Sequence[float] = ()) -> str:
    """`ARM[__KEY=VALUE...][__w-W1-W2...]`: readable, and the same on every re-run of the study."""
    parts = [arm.name]
    if arm.overrides:
        parts.append("_".join(_sanitize(f"{key}={value}") for key, value in arm.overrides.items()))
    if len(weights):
        parts.append("w-" + "-".join(format_weight(w) for w in weights))
    return "__".join(parts)


def resolve(study: Study, root: str) -> list[Point]:
    """The base point, then every arm's points in grid order; ConfigError naming both sides of a name clash."""
    root = root.rstrip("/")
    points = [Point(BASE, BASE, study.base.config, {**study.overrides, **study.base.overrides}, {},
                    f"{root}/{BASE}", base=True)]
    owners = {BASE: "the base model"}
    for arm in study.arms:
        for vector in arm.grid or [()]:
            name = point_name(arm, vector)
            weights = dict(zip(arm.rewards, vector, strict=True))
            label = f"arm {arm.name!r}" + (f" weights {list(vector)}" if vector else "")
            if name in owners:
                raise ConfigError(f"study {study.spec}: point name {name!r} of {label} is also the name of "
                                  f"{owners[name]}; make the arms or weight vectors distinct")
            owners[name] = label
            overrides = {**study.overrides, **arm.overrides}
            points.append(Point(name, arm.name, arm.config, overrides, weights, f"{root}/{name}",
                                targets=arm.targets or default_targets(weights)))
    return points


def validate(study: Study, points: Sequence[Point], num_devices: int | None) -> dict[str, ml_collections.ConfigDict]:
    """Every point's config as `alignax.train` will parse it, validated for `num_devices`; fills in each point's
    `objective`, `total_steps` and full `overrides`. ConfigError naming the arm and the field."""
    from alignax import config as config_lib
    from alignax.pareto.scalarize import validate_weights
    from launch import backends, sweep

    arms = {arm.name: arm for arm in study.arms}
    arm_configs: dict[str, ml_collections.ConfigDict] = {}
    points = [p for p in points if not p.base] + [p for p in points if p.base]  # errors name an arm first
    for point in points:  # once per arm, without the weights: the weights are checked against this config
        if point.arm in arm_configs:
            continue
        arm = study.base if point.base else arms[point.arm]
        here = f"arm {arm.name!r}" if not point.base else "the base point"
        run = backends.Run(point.name, point.overrides, point.workdir, config=point.config_path)
        try:
            arm_configs[point.arm] = config = sweep.parse_config(point.config_path, run)
        except ConfigError as e:
            raise ConfigError(f"{here} ({point.config_path}): {_strip_run(e, point.name)}") from e
        configured = list(config.rewards.keys())
        missing = [n for n in arm.rewards if n not in configured]
        if missing:
            raise ConfigError(f"{here}: weights.rewards names {missing}, which {point.config_path} does not "
                              f"configure (config.rewards: {configured or 'none'})")
        for name in configured:
            if name in study.rewards and config.rewards[name].to_dict() != study.rewards[name].to_dict():
                raise ConfigError(f"{here}: config.rewards.{name}={config.rewards[name].to_dict()} differs from the "
                                  f"study's rewards.{name}={study.rewards[name].to_dict()}; one name, one reward")
    configs = {}
    for point in points:
        here = f"arm {point.arm!r}" if not point.base else "the base point"
        arm_config = arm_configs[point.arm]
        if point.weights:  # exactly this vector: every other configured reward gets 0
            point.overrides = {**point.overrides, **{f"pareto.weights.{name}": float(point.weights.get(name, 0.0))
                                                    for name in arm_config.rewards.keys()}}
        run = backends.Run(point.name, point.overrides, point.workdir, config=point.config_path)
        try:
            config = config_lib.validate(sweep.parse_config(point.config_path, run), num_devices)
        except ConfigError as e:
            raise ConfigError(f"{here}, point {point.name!r}: {_strip_run(e, point.name)}") from e
        trained = {}
        if config.rewards and not point.base:
            weights = validate_weights(config.pareto.weights, list(config.rewards.keys()))
            trained = {name: w for name, w in weights.items() if w > 0}
        judged = sorted(set(trained) & set(study.judges))
        if judged:
            raise ConfigError(f"{here}, point {point.name!r}: config.pareto.weights.{judged[0]}="
                              f"{trained[judged[0]]} trains on {judged[0]!r}, which the study holds out as a judge")
        point.objective = BASE if point.base else str(config.objective.name)
        point.total_steps = 0 if point.base else int(config.total_steps)
        configs[point.name] = config
    return configs


def _strip_run(error: ConfigError, name: str) -> str:
    return str(error).removeprefix(f"run {name!r}: ")
