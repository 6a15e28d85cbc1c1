"""The study report: `ROOT/report/index.html` (one self-contained file) and `ROOT/report/summary.md`.

Reads `ROOT/study.json` (the points the runner resolved, their states and log tails) and every
`ROOT/<point>/eval.json` (`alignax.study.evaluation`), and measures:
- the joint Pareto front over the rewards the points train on (held-out judges are shown beside
  them, not used for dominance), and per objective its own front;
- hypervolumes above one shared reference (each reward's worst score minus 10% of its spread):
  exact by slicing for k ≤ 3 rewards and for study-sized fronts beyond, else Monte Carlo with its
  standard error stated (`alignax.pareto.front.hypervolume_auto`);
- per objective (per arm where several arms share an objective): the hypervolume of its own front,
  its share of the joint front (the joint-front points it contributes), and its hypervolume at equal
  cost (only its points that cost at most the smallest of the objectives' largest costs);
- every point's gain over the base on every reward, paired over prompts (same prompts and seeds),
  with its 95% bootstrap interval; its targets (the rewards it is meant to raise) are marked;
- possible reward hacking: a point that raises one of its targets significantly while losing
  significantly to the base on a held-out judge.

`evaluate_points` (re-exported here) writes the eval.json files; `write_report` builds the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from alignax import fs
from alignax.errors import DataError
from alignax.evaluate import bootstrap_interval
from alignax.pareto.front import hypervolume_auto, non_dominated
from alignax.pareto.report import default_reference
from alignax.study.evaluation import BASE, EVAL_JSON, evaluate_points  # noqa: F401 (the runner's entry point)
from alignax.study.spec import default_targets

STUDY_JSON = "study.json"
COST_KEYS = ("flops", "train_seconds", "steps")  # the first that every trained point has is the cost axis
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Gain:
    """A point's mean change over the base on one reward, and the 95% bootstrap interval of it."""

    mean: float
    low: float
    high: float
    paired: bool  # per-prompt differences (else a difference of means, without an interval)

    @property
    def sign(self) -> int:
        """+1 / -1 when the change is significant (its interval excludes 0), else 0."""
        if not self.paired:
            return int(np.sign(self.mean))
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


@dataclasses.dataclass
class Point:
    """One row of the report: what study.json says about the point, and its evaluation if any."""

    name: str
    arm: str | None
    objective: str
    weights: dict[str, float]
    state: str | None
    log_tail: str
    eval: dict | None = None
    on_front: bool = False            # the joint front (all objectives and the base)
    on_objective_front: bool = False  # its own objective's front
    hacking: list[str] = dataclasses.field(default_factory=list)  # judges it loses on while gaining
    gains: dict[str, Gain] = dataclasses.field(default_factory=dict)  # reward -> paired gain over the base
    study_targets: list[str] = dataclasses.field(default_factory=list)  # study.json's targets, if any

    @property
    def is_base(self) -> bool:
        return self.objective == BASE or self.name == BASE or self.arm == BASE

    @property
    def targets(self) -> list[str]:
        """The rewards it is meant to raise: the study's (study.json) or eval.json's `targets`; without them
        (an older study), its largest weights (`alignax.study.spec.default_targets`), else the rewards it
        trains on."""
        if self.is_base or self.eval is None:
            return []
        named = (self.study_targets or self.eval.get("targets")
                 or default_targets(self.eval.get("weights") or self.weights))
        return list(named or self.eval.get("trained_rewards") or ())

    def mean(self, reward: str) -> float:
        return float(self.eval["rewards"][reward])

    def interval(self, reward: str) -> tuple[float, float] | None:
        ci = (self.eval.get("rewards_ci") or {}).get(reward)
        return (float(ci[0]), float(ci[1])) if ci else None

    def cost(self, key: str) -> float | None:
        value = (self.eval.get("cost") or {}).get(key) if self.eval else None
        return None if value is None else float(value)


@dataclasses.dataclass
class ObjectiveSummary:
    name: str
    num_points: int
    hypervolume: float
    hypervolume_error: float
    front_points: int          # points on its own front
    joint_front_points: int    # of those, on the joint front
    joint_share: float         # joint_front_points / size of the joint front
    max_cost: float | None
    hypervolume_at_budget: float
    points_at_budget: int


@dataclasses.dataclass
class StudyReport:
    root: str
    points: list[Point]            # every point: study.json's, then eval.json-only ones (e.g. soups)
    rewards: list[str]             # every evaluated reward: trained ones first, then judges
    front_rewards: list[str]       # the rewards dominance and hypervolume use
    judges: list[str]
    reference: np.ndarray          # over front_rewards
    hypervolume: float             # of the joint front
    hypervolume_error: float
    hypervolume_method: str        # 'exact' | 'monte_carlo'
    objectives: list[ObjectiveSummary]
    cost_key: str
    budget: float | None           # the equal-cost budget in cost_key units
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def evaluated(self) -> list[Point]:
        return [p for p in self.points if p.eval is not None]

    @property
    def base(self) -> Point | None:
        return next((p for p in self.evaluated if p.is_base), None)

    @property
    def failed(self) -> list[Point]:
        return [p for p in self.points if p.state == "failed"]


def _read_json(path: str) -> Any:
    try:
        return json.loads(fs.read_text(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from e


def read_points(root: str) -> tuple[list[Point], list[str]]:
    """The points of study.json (a list of point records, or {'points': [...], 'judges': [...]})
    with their eval.json, then any other ROOT/<dir>/eval.json; and the study's judges if listed."""
    study_path = fs.join(root, STUDY_JSON)
    raw = _read_json(study_path) if fs.exists(study_path) else []
    records = raw.get("points", []) if isinstance(raw, dict) else raw
    judges = [str(j) for j in raw.get("judges", [])] if isinstance(raw, dict) else []
    if not isinstance(records, list):
        raise DataError(f"{study_path}: expected a list of points (or {{'points': [...]}}), found {type(records)}")
    points, seen = [], set()
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "name" not in record:
            raise DataError(f"{study_path}: point {i} has no 'name' (found {record!r:.200})")
        name = str(record["name"])
        seen.add(name)
        tail = record.get("log_tail") or record.get("tail") or record.get("log") or ""
        objective = BASE if record.get("base") is True else str(record.get("objective") or "")
        points.append(Point(name, record.get("arm"), objective,
                            {k: float(v) for k, v in (record.get("weights") or {}).items()},
                            record.get("state"), "\n".join(tail) if isinstance(tail, list) else str(tail),
                            study_targets=[str(t) for t in record.get("targets") or ()]))
    for point in points:
        path = fs.join(root, point.name, EVAL_JSON)
        if fs.exists(path):
            point.eval = _read_json(path)
            point.objective = point.objective or str(point.eval.get("objective") or "")
    for name in fs.listdir(root):  # evaluated points the study did not train (soups, hand-made)
        path = fs.join(root, name, EVAL_JSON)
        if name not in seen and fs.exists(path):
            ev = _read_json(path)
            points.append(Point(name, ev.get("arm"), str(ev.get("objective") or ""), ev.get("weights") or {},
                                ev.get("state", "finished"), "", ev))
    for point in points:
        if point.eval is not None:
            if not isinstance(point.eval.get("rewards"), dict) or not point.eval["rewards"]:
                raise DataError(f"{fs.join(root, point.name, EVAL_JSON)}: expected a 'rewards' mapping")
            judges = judges or [str(j) for j in point.eval.get("judges", [])]
    return points, judges


def _front_rewards(evaluated: list[Point], rewards: list[str], judges: list[str]) -> list[str]:
    trained = {r for p in evaluated for r in (p.eval.get("trained_rewards") or [])} & set(rewards)
    trained = trained or (set(rewards) - set(judges)) or set(rewards)
    return sorted(trained)


def _matrix(points: list[Point], names: list[str]) -> np.ndarray:
    return np.asarray([[p.mean(n) for n in names] for p in points], np.float64).reshape(len(points), len(names))


def paired_gain(point: Point, base: Point, reward: str) -> Gain:
    """`point`'s change over the base on `reward`. Both were scored on the same prompts and noise seeds,
    so the comparison is paired: the 95% bootstrap interval (over prompts) of the per-prompt differences,
    which is far tighter than the two points' own intervals. Without per-prompt scores (an eval.json from
    elsewhere), the difference of the means with no interval (`paired=False`)."""
    def scores(p: Point) -> dict[str, float]:
        return {row.get("prompt", row.get("index")): float(row["rewards"][reward])
                for row in p.eval.get("per_prompt") or () if reward in row.get("rewards", {})}
    mine, theirs = scores(point), scores(base)
    if mine and mine.keys() == theirs.keys():
        differences = np.asarray([mine[k] - theirs[k] for k in mine])
        low, high = bootstrap_interval(differences)
        return Gain(float(differences.mean()), float(low), float(high), True)
    change = point.mean(reward) - base.mean(reward)
    return Gain(change, change, change, False)


def paired_change(point: Point, base: Point, reward: str) -> int:
    """+1 / -1 when `point` scores significantly above / below the base on `reward`, else 0 (`paired_gain`)."""
    return paired_gain(point, base, reward).sign


def possible_hacking(point: Point, base: Point, judges: list[str]) -> list[str]:
    """The judges `point` scores significantly below the base on, when it significantly raises one of its
    targets (else []): its gain did not carry over to the held-out rewards. Significance is paired over
    prompts (`paired_change`), so noise does not raise flags."""
    targets = [r for r in point.targets if r in point.eval["rewards"]]
    if point.is_base or not targets or not judges:
        return []
    if not any(paired_change(point, base, r) > 0 for r in targets):
        return []
    return [j for j in judges if j in point.eval["rewards"] and paired_change(point, base, j) < 0]


def _comparability(evaluated: list[Point]) -> list[str]:
    """Warnings when points were not scored on the same prompts and seeds (then rows do not compare)."""
    def key(p: Point) -> tuple:
        return tuple(p.eval.get("seeds") or ()), tuple(r.get("prompt") for r in p.eval.get("per_prompt") or ())
    first = evaluated[0]
    return [f"{p.name} was scored on other prompts or seeds than {first.name}; its row does not compare"
            for p in evaluated[1:] if key(p) != key(first)]


def _name_methods(points: list[Point]) -> None:
    """Points are grouped by objective; where several arms share one (full backprop, DRaFT-K and mgda are
    all `reward_backprop`), each arm is its own method on the front, so the group takes the arm's name."""
    arms: dict[str, set[str]] = {}
    for p in points:
        if not p.is_base and p.arm:
            arms.setdefault(p.objective, set()).add(p.arm)
    for p in points:
        if not p.is_base and p.arm and len(arms.get(p.objective, ())) > 1:
            p.objective = p.arm


def build(root: str) -> StudyReport:
    """Reads the study's points and evaluations and computes fronts, hypervolumes and flags."""
    root = fs.absolute(root)
    points, judges = read_points(root)
    evaluated = [p for p in points if p.eval is not None]
    if not evaluated:
        raise DataError(f"{root}: no point has an {EVAL_JSON} yet (run the study, or its evaluation, first)")
    rewards = sorted(evaluated[0].eval["rewards"])
    for p in evaluated:
        if sorted(p.eval["rewards"]) != rewards:
            raise DataError(f"{fs.join(root, p.name, EVAL_JSON)}: rewards {sorted(p.eval['rewards'])} differ from "
                            f"{evaluated[0].name}'s {rewards}; a study scores every point with the same rewards")
    judges = [j for j in judges if j in rewards]
    _name_methods(points)
    front_rewards = _front_rewards(evaluated, rewards, judges)
    rewards = front_rewards + [r for r in rewards if r not in front_rewards]
    matrix = _matrix(evaluated, front_rewards)
    reference = default_reference(matrix)
    joint = non_dominated(matrix)
    for p, on in zip(evaluated, joint, strict=True):
        p.on_front = bool(on)
    hv, hv_err, method = hypervolume_auto(matrix, reference)

    trained = [p for p in evaluated if not p.is_base]
    cost_key = next((k for k in COST_KEYS if trained and all(p.cost(k) is not None for p in trained)), "steps")
    names = sorted({p.objective for p in trained})
    max_costs = {o: max((p.cost(cost_key) or 0.0) for p in trained if p.objective == o) for o in names}
    budget = min(max_costs.values()) if max_costs else None
    summaries = []
    for objective in names:
        mine = [p for p in trained if p.objective == objective]
        m = _matrix(mine, front_rewards)
        own = non_dominated(m)
        for p, on in zip(mine, own, strict=True):
            p.on_objective_front = bool(on)
        value, error, m_method = hypervolume_auto(m, reference)
        method = "monte_carlo" if m_method == "monte_carlo" else method
        affordable = [p for p in mine if (p.cost(cost_key) or 0.0) <= budget]
        at_budget = hypervolume_auto(_matrix(affordable, front_rewards), reference)[0] if affordable else 0.0
        on_joint = sum(p.on_front for p in mine)
        summaries.append(ObjectiveSummary(objective, len(mine), value, error, int(own.sum()), on_joint,
                                          on_joint / max(int(joint.sum()), 1), max_costs[objective],
                                          at_budget, len(affordable)))
    report = StudyReport(root, points, rewards, front_rewards, judges, reference, hv, hv_err, method, summaries,
                         cost_key, budget, _comparability(evaluated))
    base = report.base
    if base is not None:
        for p in trained:
            p.gains = {r: paired_gain(p, base, r) for r in rewards}
            p.hacking = possible_hacking(p, base, judges)
    return report


def write_report(root: str) -> Path:
    """Writes ROOT/report/index.html (plots and image grids embedded, no external reference) and
    ROOT/report/summary.md; returns the index path."""
    from alignax.study import html, plots
    report = build(root)
    figures = plots.all_figures(report)
    out = fs.join(report.root, "report")
    index = fs.join(out, "index.html")
    fs.write_text_atomic(index, html.render(report, figures))
    fs.write_text_atomic(fs.join(out, "summary.md"), html.summary_markdown(report))
    log.info("wrote the study report to %s", index)
    return Path(index)
