"""The end of a study: its front in a few lines, and its best point exported and proven to load.

`best_point(report)`: among the trained points on the joint front, the one whose rewards gain most over
the base, each reward's change divided by that reward's spread over the study (so a CLIP score in
[0, 100] and a cosine in [-1, 1] count alike). `export_best(...)` writes it as a whole diffusers pipeline
(`alignax.export --pipeline`), loads that with diffusers' `StableDiffusion3Pipeline` and samples one image
in PyTorch (the proof that the export is usable outside alignax), saved beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignax import fs
from alignax.study.report import Point, StudyReport

BEST_DIR = "best_pipeline"
CHECK_PNG = "best_pipeline_check.png"


def gains(report: StudyReport, point: Point) -> dict[str, float]:
    """{reward: (point - base) / spread} over the front rewards."""
    base = report.base
    out = {}
    for reward in report.front_rewards:
        values = [p.mean(reward) for p in report.evaluated]
        spread = max(max(values) - min(values), 1e-12)
        out[reward] = (point.mean(reward) - base.mean(reward)) / spread
    return out


def best_point(report: StudyReport) -> Point | None:
    if report.base is None:
        return None
    candidates = [p for p in report.evaluated if p.on_front and not p.is_base]
    return max(candidates, key=lambda p: sum(gains(report, p).values()), default=None)


def front_lines(report: StudyReport) -> list[str]:
    """The front in words: its members and hypervolume, one line per objective, then whether each point
    raised its targets (paired over prompts; `alignax.study.html.target_verdicts`)."""
    from alignax.study.html import target_verdicts
    members = [p.name for p in report.evaluated if p.on_front]
    lines = [f"joint front over ({', '.join(report.front_rewards)}): {len(members)} of {len(report.evaluated)} "
             f"points ({', '.join(members)}); hypervolume {report.hypervolume:.4g}"]
    for s in report.objectives:
        lines.append(f"  {s.name}: hypervolume {s.hypervolume:.4g}, {s.joint_front_points}/{s.num_points} points "
                     f"on the joint front")
    lines += [f"  {line}" for line in target_verdicts(report)]
    return lines


def _workdir(report: StudyReport, point: Point) -> str:
    return str(point.eval.get("workdir") or fs.join(report.root, point.name))


def export_best(report: StudyReport, point: Point, *, sample_steps: int = 10) -> tuple[Path, Path | None]:
    """(the exported pipeline, the PyTorch sample PNG or None when PyTorch/diffusers are missing)."""
    from alignax import export
    workdir = _workdir(report, point)
    out = Path(report.root) / BEST_DIR
    export.export(workdir, out, pipeline=True)
    try:
        import torch
        from diffusers import StableDiffusion3Pipeline
    except ImportError:
        return out, None
    index = json.loads((out / "model_index.json").read_text())
    missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) in (None, [None, None])}
    pipe = StableDiffusion3Pipeline.from_pretrained(out, torch_dtype=torch.float32, **missing)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    rows = point.eval.get("per_prompt") or [{"prompt": ""}]
    prompt = str(rows[0]["prompt"])
    max_sequence_length = _max_sequence_length(workdir)
    image = pipe(prompt, num_inference_steps=sample_steps, guidance_scale=1.0, height=size, width=size,
                 max_sequence_length=max_sequence_length, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    if not np.all(np.isfinite(image)):
        raise RuntimeError(f"{out}: diffusers sampled a non-finite image from the exported pipeline")
    from PIL import Image
    png = Path(report.root) / CHECK_PNG
    Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).save(png)
    return out, png


def _max_sequence_length(workdir: str) -> int:
    """The T5 length the run trained with (its zero tokens count when T5 is dropped), from its saved config."""
    try:
        saved = json.loads(fs.read_text(fs.join(workdir, "checkpoints", "config.json")))
        return int(saved["text"]["max_sequence_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 256
