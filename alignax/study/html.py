"""Rendering a `StudyReport` as one self-contained HTML page (inline CSS, PNGs as base64 data URIs,
no script and no external reference, so the file can be mailed or attached to a paper review) and
as `summary.md` for the terminal. Both print every number with `number()`, the same 6 significant
digits, so the two agree with each other and with eval.json to that precision."""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING

from alignax import fs
from alignax.study.evaluation import GRID_PNG

if TYPE_CHECKING:
    from alignax.study.report import Point, StudyReport

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.l,th.l{text-align:left}
tr.front td{background:#eef8ee} tr.base td{background:#eef2fb} tr.failed td{background:#fbeeee}
.judge{color:#7a3e9d} .warn{color:#b00;font-weight:600} .ci{color:#777;font-size:11px}
pre{background:#f7f7f7;padding:.6em;font-size:12px;overflow-x:auto;max-height:20em}
figure{display:inline-block;margin:1em 1em 1em 0} figcaption{font-size:13px;color:#555}
img{max-width:100%}
"""
FLAG = "possible reward hacking"


def number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{number(ci[0])}, {number(ci[1])}]"


def weights_text(weights: dict) -> str:
    return ", ".join(f"{k}={number(float(v))}" for k, v in weights.items())


def cost_text(point: Point) -> str:
    if point.eval is None:
        return ""
    cost = point.eval.get("cost") or {}
    parts = [f"{cost.get('steps', point.eval.get('step'))} steps"]
    if cost.get("train_seconds"):
        parts.append(f"{number(cost['train_seconds'])} s")
    if cost.get("flops"):
        parts.append(f"{number(cost['flops'])} FLOPs")
    if cost.get("reward_fwd_bwd"):
        parts.append(f"{cost['reward_fwd_bwd']} reward fwd+bwd")
    return ", ".join(parts)


def front_text(point: Point) -> str:
    if point.eval is None:
        return ""
    return "joint" if point.on_front else ("own" if point.on_objective_front else "dominated")


def hacking_text(point: Point) -> str:
    return f"{FLAG}: loses on {', '.join(point.hacking)}" if point.hacking else ""


def hacking_line(point: Point) -> str:
    raised = [r for r in point.targets if r in point.gains and point.gains[r].sign > 0]
    return f"{point.name} raises {', '.join(raised)} but loses on the held-out {', '.join(point.hacking)}"


def gain_text(point: Point, reward: str) -> str:
    """`+1.45 [+0.665, +2.29]`, with `*` after a target: the paired change over the base."""
    gain = point.gains.get(reward)
    if gain is None:
        return ""
    mark = " *" if reward in point.targets else ""
    if not gain.paired:
        return f"{gain.mean:+.3g} (unpaired){mark}"
    return f"{gain.mean:+.3g} [{gain.low:+.3g}, {gain.high:+.3g}]{mark}"


def target_verdicts(report: StudyReport) -> list[str]:
    """One line per trained point with targets: whether it raised each of them significantly."""
    lines = []
    for p in report.evaluated:
        if p.is_base or not p.targets or not p.gains:
            continue
        words = {1: "raised", 0: "no significant change on", -1: "lowered"}
        parts = [f"{words[p.gains[r].sign]} {r} ({gain_text(p, r).rstrip(' *')})" for r in p.targets if r in p.gains]
        lines.append(f"{p.name}: " + "; ".join(parts))
    return lines


GAINS_NOTE = ("Change over the base, paired over prompts (every point is scored on the same prompts and noise "
              "seeds), with the bootstrap 95% interval of the mean difference; * marks a point's targets, the "
              "rewards it is meant to raise. An interval that excludes 0 is a significant change.")


def _reward_header(report: StudyReport, name: str) -> str:
    return f"{name} (judge)" if name in report.judges else name


def _hypervolume_text(report: StudyReport) -> str:
    if report.hypervolume_method == "exact":
        return f"{number(report.hypervolume)} (exact)"
    return f"{number(report.hypervolume)} ± {number(report.hypervolume_error)} (Monte Carlo, 1 standard error)"


def _headline(report: StudyReport) -> list[str]:
    states: dict[str, int] = {}
    for p in report.points:
        states[p.state or "unknown"] = states.get(p.state or "unknown", 0) + 1
    reference = ", ".join(f"{n}={number(v)}" for n, v in zip(report.front_rewards, report.reference, strict=True))
    budget = (f"equal-cost budget: {number(report.budget)} {report.cost_key}" if report.budget is not None
              else "no trained point evaluated")
    return [f"{len(report.points)} points ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}), "
            f"{len(report.evaluated)} evaluated.",
            f"Front rewards: {', '.join(report.front_rewards)}; held-out judges: "
            f"{', '.join(report.judges) or 'none'}.",
            f"Joint-front hypervolume {_hypervolume_text(report)} above the reference ({reference}); {budget}."]


def _objective_rows(report: StudyReport) -> list[list[str]]:
    rows = []
    for o in report.objectives:
        hv = number(o.hypervolume) + (f" ± {number(o.hypervolume_error)}" if o.hypervolume_error else "")
        rows.append([o.name, str(o.num_points), hv, str(o.front_points),
                     f"{o.joint_front_points} ({100 * o.joint_share:.0f}%)", number(o.max_cost),
                     f"{number(o.hypervolume_at_budget)} ({o.points_at_budget} pts)"])
    return rows


OBJECTIVE_HEADER = ["objective", "points", "hypervolume (own front)", "own-front points", "on joint front (share)",
                    "max cost", "hypervolume at equal cost"]


# ---- summary.md -----------------------------------------------------------------------------------

def summary_markdown(report: StudyReport) -> str:
    header = ["point", "objective", "weights", *[_reward_header(report, r) for r in report.rewards], "front",
              "cost", "state", "flags"]
    lines = ["# Study report", "", *_headline(report), *[f"WARNING: {w}" for w in report.warnings], "",
             "## Points", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in report.points:
        if p.eval is None:
            cells = [p.name, p.objective, weights_text(p.weights), *[""] * len(report.rewards), "", "",
                     str(p.state), ""]
        else:
            cells = [p.name, p.objective, weights_text(p.weights),
                     *[f"{number(p.mean(r))} {interval(p.interval(r))}" for r in report.rewards],
                     front_text(p), cost_text(p), str(p.state), hacking_text(p)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    gained = [p for p in report.evaluated if p.gains]
    if gained:
        lines += ["", "## Gains over the base", "", GAINS_NOTE, "",
                  "| point | " + " | ".join(_reward_header(report, r) for r in report.rewards) + " |",
                  "|" + "---|" * (len(report.rewards) + 1)]
        lines += ["| " + " | ".join([p.name, *[gain_text(p, r) for r in report.rewards]]) + " |" for p in gained]
        lines += ["", *[f"- {line}" for line in target_verdicts(report)]]
    lines += ["", f"## Objectives (cost axis: {report.cost_key})", "",
              "| " + " | ".join(OBJECTIVE_HEADER) + " |", "|" + "---|" * len(OBJECTIVE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _objective_rows(report)]
    flagged = [p for p in report.points if p.hacking]
    if flagged:
        lines += ["", f"## {FLAG.capitalize()}", ""]
        lines += [f"- {hacking_line(p)}" for p in flagged]
    if report.failed:
        lines += ["", "## Failed points", ""]
        for p in report.failed:
            tail = "\n".join(p.log_tail.splitlines()[-10:]) or "(no log)"
            lines += [f"### {p.name}", "", "```", tail, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- index.html -----------------------------------------------------------------------------------

def _e(text: object) -> str:
    return html.escape(str(text))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: list[str], rows: list[tuple[str, list[str]]], left: int = 1) -> str:
    """rows: (css class, cells already escaped); the first `left` columns align left."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join(f'<tr class="{cls}">' + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                                     for i, c in enumerate(cells)) + "</tr>" for cls, cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _points_table(report: StudyReport) -> str:
    header = ["point", "objective", "weights",
              *[f'<span class="judge">{_e(r)} (judge)</span>' if r in report.judges else _e(r)
                for r in report.rewards], "front", "cost", "state", "flags"]
    rows = []
    for p in report.points:
        cls = "base" if p.is_base else "failed" if p.state == "failed" else "front" if p.on_front else ""
        if p.eval is None:
            cells = [_e(p.name), _e(p.objective), _e(weights_text(p.weights)), *[""] * len(report.rewards), "", "",
                     _e(p.state), ""]
        else:
            cells = [_e(p.name), _e(p.objective), _e(weights_text(p.weights)),
                     *[f'{number(p.mean(r))}<br><span class="ci">{interval(p.interval(r))}</span>'
                       for r in report.rewards],
                     front_text(p), _e(cost_text(p)), _e(p.state),
                     f'<span class="warn">{_e(hacking_text(p))}</span>' if p.hacking else ""]
        rows.append((cls, cells))
    return _table(header, rows, left=3)


def _grid(report: StudyReport, point: Point) -> str:
    path = fs.join(report.root, point.name, point.eval.get("grid") or GRID_PNG)
    if not fs.exists(path):
        return ""
    with fs.open_file(path, "rb") as f:
        png = f.read()
    scores = ", ".join(f"{r}={number(point.mean(r))}" for r in report.rewards)
    return f"<figure>{_img(png, point.name)}<figcaption><b>{_e(point.name)}</b> ({_e(point.objective)}): " \
           f"{_e(scores)}</figcaption></figure>"


def render(report: StudyReport, figures: list[tuple[str, bytes]]) -> str:
    """The whole page."""
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>alignax study report</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>Study report</h1><p>{_e(report.root)}</p>",
             "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in _headline(report)) + "</ul>"]
    parts += [f'<p class="warn">{_e(w)}</p>' for w in report.warnings]
    flagged = [p for p in report.points if p.hacking]
    if flagged:
        parts.append(f'<h2 class="warn">{FLAG.capitalize()}</h2><ul>' + "".join(
            f"<li>{_e(hacking_line(p))}</li>" for p in flagged) + "</ul>")
    parts += ["<h2>Points</h2><p>Mean over prompts × seeds; below it the bootstrap 95% interval of the mean over "
              "prompts. front: <i>joint</i> = on the front of every point, <i>own</i> = only on its objective's "
              "front. Judges are not used for dominance.</p>", _points_table(report)]
    gained = [p for p in report.evaluated if p.gains]
    if gained:
        header = ["point", *[f'<span class="judge">{_e(r)} (judge)</span>' if r in report.judges else _e(r)
                             for r in report.rewards]]
        rows = [("front" if p.on_front else "", [_e(p.name), *[_e(gain_text(p, r)) for r in report.rewards]])
                for p in gained]
        parts += [f"<h2>Gains over the base</h2><p>{_e(GAINS_NOTE)}</p>", _table(header, rows),
                  "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in target_verdicts(report)) + "</ul>"]
    parts += [f"<h2>Objectives</h2><p>Hypervolumes above the shared reference; cost axis "
              f"<i>{_e(report.cost_key)}</i>, equal-cost budget {number(report.budget)} (the smallest of the "
              "objectives' largest costs): each objective's hypervolume from its points within it.</p>",
              _table(OBJECTIVE_HEADER, [("", [_e(c) for c in row]) for row in _objective_rows(report)])]
    parts.append("<h2>Plots</h2>" + "".join(f"<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption>"
                                            "</figure>" for caption, png in figures))
    shown = [p for p in report.evaluated if p.is_base] + [p for p in report.evaluated
                                                          if not p.is_base and (p.on_front or p.on_objective_front)]
    seeds = report.base.eval.get("seeds") if report.base else (shown[0].eval.get("seeds") if shown else [])
    parts.append(f"<h2>Image grids</h2><p>The base and every front point, on the same prompts and noise seeds: "
                 f"one row per seed ({_e(seeds)}), one column per prompt.</p>"
                 + "".join(_grid(report, p) for p in shown))
    if report.failed:
        parts.append("<h2>Failed points</h2>" + "".join(
            f"<h3>{_e(p.name)}</h3><pre>{_e(p.log_tail or '(no log)')}</pre>" for p in report.failed))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
