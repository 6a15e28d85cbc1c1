"""The study report's figures (matplotlib, Agg backend), each returned as PNG bytes to embed.

- 2 front rewards: a scatter per objective, its own front drawn, every other point faint, the base
  marked; >= 3: pairwise panels and a parallel-coordinates plot (judges included, each reward
  scaled to [0, 1] over the points).
- Reward against cost, one panel per reward (judges too): each objective's points and its best
  score within each cost, the base as a dashed level.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from alignax.study.report import Point, StudyReport

COST_LABELS = {"flops": "train FLOPs (XLA count)", "train_seconds": "train seconds", "steps": "train steps"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


def _colors(report: StudyReport) -> dict[str, str]:
    return {o.name: f"C{i % 10}" for i, o in enumerate(report.objectives)}


def _mark_base(ax, base: Point | None, x: str, y: str) -> None:
    if base is not None:
        ax.scatter([base.mean(x)], [base.mean(y)], marker="*", s=180, c="k", zorder=5, label="base")


def front_scatter(report: StudyReport) -> bytes:
    """Two rewards: one panel per objective with its front as a line."""
    plt = _pyplot()
    x, y = report.front_rewards
    objectives = report.objectives or []
    n = max(len(objectives), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, sharex=True, sharey=True)
    colors = _colors(report)
    for ax, summary in zip(axes[0], objectives, strict=False):
        everyone = report.evaluated
        ax.scatter([p.mean(x) for p in everyone], [p.mean(y) for p in everyone], c="lightgrey", s=18)
        mine = [p for p in everyone if p.objective == summary.name]
        ax.scatter([p.mean(x) for p in mine], [p.mean(y) for p in mine], c=colors[summary.name], s=30,
                   label=summary.name)
        front = sorted((p for p in mine if p.on_objective_front), key=lambda p: p.mean(x))
        ax.plot([p.mean(x) for p in front], [p.mean(y) for p in front], "-", c=colors[summary.name], lw=1.5)
        for p in mine:
            ax.annotate(p.name, (p.mean(x), p.mean(y)), fontsize=6, alpha=0.8)
        _mark_base(ax, report.base, x, y)
        ax.set_title(f"{summary.name}: HV {summary.hypervolume:.4g}", fontsize=9)
        ax.set_xlabel(x)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(y)
    fig.tight_layout()
    return _png(fig)


def pairwise(report: StudyReport) -> bytes:
    """>= 3 rewards: the lower triangle of reward-vs-reward panels, joint-front points outlined."""
    plt = _pyplot()
    names = report.front_rewards
    k = len(names)
    fig, axes = plt.subplots(k - 1, k - 1, figsize=(3.2 * (k - 1), 3.0 * (k - 1)), squeeze=False)
    colors = _colors(report)
    for row in range(1, k):
        for col in range(k - 1):
            ax = axes[row - 1][col]
            if col >= row:
                ax.axis("off")
                continue
            for p in report.evaluated:
                if p.is_base:
                    continue
                ax.scatter(p.mean(names[col]), p.mean(names[row]), c=colors.get(p.objective, "grey"), s=24,
                           edgecolors="k" if p.on_front else "none")
            _mark_base(ax, report.base, names[col], names[row])
            ax.set_xlabel(names[col], fontsize=8)
            ax.set_ylabel(names[row], fontsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", c=c, label=o) for o, c in colors.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def parallel_coordinates(report: StudyReport) -> bytes:
    """Every reward (judges last) on its own axis, scaled to [0, 1] over the evaluated points."""
    plt = _pyplot()
    names = report.rewards
    points = report.evaluated
    values = np.asarray([[p.mean(n) for n in names] for p in points], np.float64)
    low, high = values.min(axis=0), values.max(axis=0)
    scaled = (values - low) / np.where(high > low, high - low, 1.0)
    colors = _colors(report)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8))
    for p, row in zip(points, scaled, strict=True):
        if p.is_base:
            ax.plot(range(len(names)), row, "k--", lw=2, label="base")
        else:
            ax.plot(range(len(names)), row, c=colors.get(p.objective, "grey"), lw=2 if p.on_front else 0.8,
                    alpha=0.9 if p.on_front else 0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n(judge)" if n in report.judges else n for n in names], fontsize=8)
    ax.set_ylabel("scaled score (min..max over points)")
    handles = [plt.Line2D([], [], c=c, label=o) for o, c in colors.items()]
    ax.legend(handles=handles + ([plt.Line2D([], [], c="k", ls="--", label="base")] if report.base else []),
              fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def reward_vs_cost(report: StudyReport) -> bytes:
    """One panel per reward: each objective's points by cost and its best score within each cost (a step
    curve: what a budget buys), the base as a dashed level."""
    plt = _pyplot()
    names = report.rewards
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    colors = _colors(report)
    for ax, name in zip(axes[0], names, strict=True):
        for summary in report.objectives:
            mine = sorted((p for p in report.evaluated if p.objective == summary.name and not p.is_base),
                          key=lambda p: p.cost(report.cost_key) or 0.0)
            costs = [p.cost(report.cost_key) or 0.0 for p in mine]
            scores = [p.mean(name) for p in mine]
            ax.scatter(costs, scores, c=colors[summary.name], s=16)
            ax.step(costs, np.maximum.accumulate(scores), where="post", c=colors[summary.name], label=summary.name)
        if report.base is not None:
            ax.axhline(report.base.mean(name), c="k", ls="--", lw=1, label="base")
        ax.set_title(f"{name} (judge)" if name in report.judges else name, fontsize=9)
        ax.set_xlabel(COST_LABELS.get(report.cost_key, report.cost_key), fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def all_figures(report: StudyReport) -> list[tuple[str, bytes]]:
    """(caption, PNG) of every figure this study's shape calls for."""
    figures = []
    if len(report.front_rewards) == 2:
        figures.append(("Fronts per objective (the base is the star)", front_scatter(report)))
    elif len(report.front_rewards) >= 3:
        figures.append(("Pairwise reward panels (joint-front points outlined; the base is the star)",
                        pairwise(report)))
    if len(report.rewards) >= 3:
        figures.append(("Parallel coordinates (judges included; thick lines: joint front)",
                        parallel_coordinates(report)))
    figures.append((f"Reward against cost ({COST_LABELS.get(report.cost_key, report.cost_key)})",
                    reward_vs_cost(report)))
    return figures
