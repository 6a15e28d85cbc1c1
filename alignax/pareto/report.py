"""`python -m alignax.pareto.report --evals='ROOT/*/eval_*.json' [--out=report.md] [--reference=a,b]`.

Collects the evaluations of a sweep (alignax/evaluate.py writes one JSON per run and step),
marks the runs on the Pareto front, and measures the front's hypervolume above a reference
point: by default each reward's worst score minus `margin` × its spread, so every run adds
volume. Prints a markdown table; with two rewards and matplotlib installed, also writes a
scatter plot next to `--out`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignax.errors import DataError
from alignax.pareto.front import hypervolume, non_dominated

# status.json states (written by the trainer in the run's workdir) that make a point untrustworthy.
FLAGGED_STATES = ("diverged", "nonfinite", "failed")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    run: str
    step: int
    weights: Any
    rewards: dict[str, float]
    path: str
    status: dict | None = None  # the run's status.json beside the evaluation, when there is one

    @property
    def flagged(self) -> bool:
        return bool(self.status) and self.status.get("state") in FLAGGED_STATES


@dataclasses.dataclass(frozen=True)
class Report:
    names: list[str]             # reward names, the columns of `points`
    evaluations: list[Evaluation]
    points: np.ndarray           # [runs, rewards]
    on_front: np.ndarray         # bool [runs]
    reference: np.ndarray        # [rewards]
    hypervolume: float


def expand(patterns: Sequence[str]) -> list[str]:
    """Files matching any of the globs (comma-separated or separate), sorted, each once."""
    paths = set()
    for pattern in patterns:
        for part in (p.strip() for p in pattern.split(",")):
            if part:
                matches = glob.glob(part)
                paths.update(matches if matches else ([part] if Path(part).is_file() else []))
    return sorted(paths)


def read(path: str) -> Evaluation:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read an evaluation JSON: {e}") from e
    rewards = raw.get("rewards") if isinstance(raw, dict) else None
    if not isinstance(rewards, dict) or not rewards:
        raise DataError(f"{path}: expected a 'rewards' mapping {{name: mean score}}, found {rewards!r}")
    run = raw.get("run") or Path(path).parent.name
    return Evaluation(str(run), int(raw.get("step", -1)), raw.get("weights"),
                      {k: float(v) for k, v in rewards.items()}, path, _status(Path(path).parent / "status.json"))


def _status(path: Path) -> dict | None:
    """The run's status.json (how training ended), or None when absent or unreadable."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def latest_per_run(evaluations: list[Evaluation]) -> list[Evaluation]:
    """One point per run: the latest evaluated step (an EMA and a raw evaluation of the same step
    are separate runs only if their `run` names differ)."""
    latest: dict[str, Evaluation] = {}
    for e in evaluations:
        if e.run not in latest or e.step > latest[e.run].step:
            latest[e.run] = e
    return sorted(latest.values(), key=lambda e: e.run)


def default_reference(points: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Each reward's worst score minus `margin` × its spread (or × max(|worst|, 1) when all scores are
    equal), so every point adds volume; shared by this report and the study report."""
    points = np.asarray(points, np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    spread = np.where(high > low, high - low, np.maximum(np.abs(low), 1.0))
    return low - margin * spread


def build(evaluations: list[Evaluation], reference: Sequence[float] | None = None, margin: float = 0.1) -> Report:
    if not evaluations:
        raise DataError("no evaluation JSONs matched --evals")
    names = sorted(evaluations[0].rewards)
    for e in evaluations:
        if sorted(e.rewards) != names:
            raise DataError(f"{e.path}: rewards {sorted(e.rewards)} differ from {evaluations[0].path}'s {names}; "
                            "a front compares runs scored with the same rewards")
    points = np.asarray([[e.rewards[n] for n in names] for e in evaluations], np.float64)
    if reference is None:
        reference = default_reference(points, margin)
    reference = np.asarray(reference, np.float64)
    if reference.shape != (len(names),):
        raise DataError(f"--reference={list(reference)}: expected {len(names)} values, one per reward {names}")
    return Report(names, evaluations, points, non_dominated(points), reference, hypervolume(points, reference))


def _weights_text(weights: Any) -> str:
    if isinstance(weights, dict):
        return ", ".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in weights.items())
    return "" if weights is None else str(weights)


def markdown(report: Report) -> str:
    header = ["run", "step", "weights", *report.names, "on front"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e, point, front in zip(report.evaluations, report.points, report.on_front, strict=True):
        run = f"{e.run} ⚠ {e.status['state']}" if e.flagged else e.run
        cells = [run, str(e.step), _weights_text(e.weights), *(f"{v:.6g}" for v in point), "✓" if front else ""]
        lines.append("| " + " | ".join(cells) + " |")
    reference = ", ".join(f"{n}={v:.6g}" for n, v in zip(report.names, report.reference, strict=True))
    lines += ["", f"{int(report.on_front.sum())} of {len(report.evaluations)} runs on the front; "
                  f"hypervolume {report.hypervolume:.6g} above reference ({reference})."]
    flagged = [e for e in report.evaluations if e.flagged]
    if flagged:
        lines += ["", f"⚠ {len(flagged)} run(s) did not end cleanly (their status.json); treat their points with "
                      "care:"]
        lines += [f"- {e.run}: {e.status['state']} at step {e.status.get('step')}"
                  + (f": {e.status['reason']}" if e.status.get("reason") else "") for e in flagged]
    return "\n".join(lines) + "\n"


def scatter(report: Report, path: Path) -> Path | None:
    """A PNG of the two rewards, front highlighted; None without matplotlib or with ≠ 2 rewards."""
    if len(report.names) != 2:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    front = report.points[report.on_front]
    front = front[np.argsort(front[:, 0])]
    ax.scatter(report.points[:, 0], report.points[:, 1], c="grey", label="runs")
    ax.plot(front[:, 0], front[:, 1], "o-", c="C3", label="front")
    for e, (x, y) in zip(report.evaluations, report.points, strict=True):
        ax.annotate(e.run, (x, y), fontsize=7)
    ax.set_xlabel(report.names[0])
    ax.set_ylabel(report.names[1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    from absl import flags
    f = flags.FLAGS
    paths = expand([f.evals, *argv[1:]])  # an unquoted glob arrives shell-expanded as extra arguments
    reference = [float(v) for v in f.reference.split(",")] if f.reference else None
    evaluations = [read(p) for p in paths]
    report = build(evaluations if f.all_steps else latest_per_run(evaluations), reference, f.margin)
    text = markdown(report)
    print(text, end="")
    if f.out:
        Path(f.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f.out).write_text(text)
        png = scatter(report, Path(f.out).with_suffix(".png"))
        print(f"wrote the report of {len(paths)} evaluations to {f.out}" + (f" and the scatter plot to {png}" if png
                                                                           else ""), file=sys.stderr)


def cli() -> None:
    """`alignax-report` / `python -m alignax.pareto.report`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib

    flags.DEFINE_string("evals", None, "glob(s) of evaluation JSONs, comma-separated (quote them)")
    flags.DEFINE_string("out", None, "write the markdown table here (and a .png scatter for two rewards)")
    flags.DEFINE_string("reference", None, "hypervolume reference point, one value per reward in sorted-name order")
    flags.DEFINE_float("margin", 0.1, "default reference: per-reward min − margin × (max − min)")
    flags.DEFINE_bool("all_steps", False, "one point per evaluation instead of per run's latest step")
    flags.mark_flags_as_required(["evals"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
