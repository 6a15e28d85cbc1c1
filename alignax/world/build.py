"""`python -m alignax.world.build --out=DIR [--preset=full|smoke] [--workdir=SCRATCH]`: trains the portrait world.

Every part is trained by alignax's own trainers, in this order (each a stage; a rerun skips the stages
already done and resumes an interrupted one from its checkpoints):

    data        procedural portraits (alignax.world.data), written once without text embeddings
    vae         AutoencoderKL, reconstruction + KL                        (alignax.autoencoder.train)
    clip        vision tower + CLIP-L / bigG-layout text towers, InfoNCE  (alignax.contrastive.train)
    base        the SD3 pipeline root without a trained transformer       (alignax.world.pipeline)
    datasets    captioned images / prompts / preference pairs encoded by the world's own text towers
    identity    IResNet with ArcFace on faces aligned by the fixed landmarks (alignax.identity.train)
    aesthetic   preference scorer fine-tuned from the world CLIP, HPSv2 loss (alignax.reward_model.train)
    realism     the world CLIP's feature statistics of held-out real portraits (alignax.rewards.realism)
    sft         the MM-DiT, rectified flow from scratch (alignax.train, objective sft), exported as the
                pipeline (alignax.export --pipeline)
    assemble    the world directory (alignax.world.paths), weights in fp16
    quality     the quality bars measured on the assembled, fp16 world (alignax.world.quality)

The result appears at --out complete or not at all (built in the scratch directory, swapped in last). The
build is deterministic for a preset and seed on one machine: the data is a function of the seed, every
trainer seeds from it, and the batches are functions of the step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from alignax.world import paths as paths_lib
from alignax.world import pipeline as pipeline_lib
from alignax.world.datasets import vae_latents
from alignax.world.recipe import Recipe

log = logging.getLogger("alignax")
DONE = "done"                      # scratch/done/<stage>.json: the stage's results; its presence means done


@dataclasses.dataclass
class Build:
    """One build: its recipe and seed, the scratch directory, and the world being assembled in it."""

    recipe: Recipe
    seed: int
    scratch: Path
    preset: str
    _data: Any = None

    @property
    def world(self) -> paths_lib.WorldPaths:
        return paths_lib.WorldPaths(self.scratch / "world")

    def run_dir(self, stage: str) -> Path:
        return self.scratch / "runs" / stage

    @property
    def data(self) -> Any:
        """The generated world data (in memory; a pure function of the recipe and seed)."""
        if self._data is None:
            from alignax.world import data as world_data
            r = self.recipe
            self._data = world_data.generate(self.seed, size=r.image_size, num_identities=r.num_identities,
                                             num_train=r.num_train, num_eval=r.num_eval)
        return self._data

    def results(self, stage: str) -> dict | None:
        path = self.scratch / DONE / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, stage: str, results: dict) -> None:
        path = self.scratch / DONE / f"{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
        os.replace(tmp, path)


def _config(defaults: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """`defaults` with nested `overrides` ('a.b': v) applied; an unknown field is a KeyError naming it."""
    config = ml_collections.ConfigDict(defaults.to_dict())
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"world recipe: no field {dotted!r} in the trainer's config")
        node[leaf] = value
    return config


def _zero_text(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Placeholder conditioning for the raw datasets the VAE and CLIP train on (they read images and
    captions only; the SD3 embeddings exist once the text towers do)."""
    return np.zeros((len(prompts), 1, 1), np.float32), np.zeros((len(prompts), 1), np.float32)


# ---- stages ---------------------------------------------------------------------------------------------

def stage_data(b: Build) -> dict:
    from alignax.world import data as world_data
    raw = b.scratch / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    world_data.write_datasets(b.data, raw, _zero_text)
    return {"raw": str(raw)}


def stage_vae(b: Build) -> dict:
    from alignax.autoencoder import train as vae_train
    r = b.recipe
    blocks = len(r.vae["block_out_channels"])
    init = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=r.image_size,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, **r.vae)
    config = _config(vae_train.default_config(), **{
        "seed": b.seed, "total_steps": r.vae_steps, "batch_size": r.vae_batch, "crop_size": r.vae_crop,
        "model.init": init, "log_every": 25,
        "data.path": str(b.scratch / "raw" / "captioned_images"), "output_dir": str(b.run_dir("vae") / "export")})
    result = _trained(vae_train.run(config, b.run_dir("vae")), "vae")
    return {"dir": str(result.output_dir), **_last_eval(result)}


def stage_clip(b: Build) -> dict:
    from alignax.contrastive import train as clip_train
    from alignax.world import tokenizer as world_tokenizer
    r = b.recipe
    tokenizer_dir = b.run_dir("clip") / "tokenizer"
    if not tokenizer_dir.is_dir():
        world_tokenizer.build_tokenizer(tokenizer_dir, max_length=r.clip_max_length)
    config = _config(clip_train.default_config(), **{
        "seed": b.seed, "total_steps": r.clip_steps, "batch_size": r.clip_batch,
        "model.tokenizer": str(tokenizer_dir),
        "model.vision": dict(r.clip_vision, image_size=r.image_size),
        "model.text_towers": [r.clip_text_l, r.clip_text_g], "model.projection_dim": r.clip_projection,
        "data.path": str(b.scratch / "raw" / "captioned_images"), "output_dir": str(b.run_dir("clip") / "export")})
    result = _trained(clip_train.run(config, b.run_dir("clip")), "clip")
    return {"dir": str(result.output_dir), **_last_eval(result)}


def stage_base(b: Build) -> dict:
    clip_dir = Path(b.results("clip")["dir"])
    vae_dir = Path(b.results("vae")["dir"])
    components = {"text_encoder": clip_dir / "text_encoder", "text_encoder_2": clip_dir / "text_encoder_2",
                  "tokenizer": clip_dir / "tokenizer", "vae": vae_dir}
    joint, pooled = pipeline_lib.text_widths(components)
    vae_config = json.loads((vae_dir / "config.json").read_text())
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    transformer = pipeline_lib.transformer_config(
        b.recipe.transformer, joint_attention_dim=joint, pooled_projection_dim=pooled,
        latent_channels=vae_config["latent_channels"], latent_size=b.recipe.image_size // factor)
    base = b.scratch / "base"
    if base.exists():
        shutil.rmtree(base)
    pipeline_lib.write_pipeline_base(base, components=components, transformer=transformer, seed=b.seed)
    return {"dir": str(base), "transformer": transformer}


def stage_datasets(b: Build) -> dict:
    from alignax.world import data as world_data
    from alignax.world.conditioning import pipeline_encoder
    out = b.scratch / "data"
    if out.exists():
        shutil.rmtree(out)
    world_data.write_datasets(b.data, out, pipeline_encoder(b.results("base")["dir"]),
                              latents=vae_latents(Path(b.results("base")["dir"]) / "vae"))  # sft reads them
    world_data.write_references(b.data, b.world.root / "references")
    return {"dir": str(out)}


def stage_identity(b: Build) -> dict:
    from alignax.identity import train as id_train
    from alignax.world import data as world_data
    r = b.recipe
    faces = b.scratch / "faces"
    if not faces.exists():
        world_data.write_identity_images(b.data, faces, r.identity_crop)
    config = _config(id_train.default_config(), **{
        "seed": b.seed, "total_steps": r.identity_steps, "batch_size": 64, "eval_every": 0,
        "checkpoint_every": max(1, r.identity_steps // 3), "log_every": max(1, r.identity_steps // 20),
        "data.path": str(faces), "output_dir": str(b.run_dir("identity") / "export"),
        **{f"model.{k}": v for k, v in r.identity_model.items()}})
    result = _trained(id_train.run(config, b.run_dir("identity")), "identity")
    return {"dir": str(result.output_dir), **_last_eval(result)}


def stage_aesthetic(b: Build) -> dict:
    from alignax.reward_model import train as reward_train
    r = b.recipe
    clip_dir = Path(b.results("clip")["dir"]) / "clip"
    config = _config(reward_train.default_config(), **{
        "seed": b.seed, "total_steps": r.scorer_steps, "batch_size": 32, "eval_every": 0,
        "checkpoint_every": max(1, r.scorer_steps // 3), "log_every": max(1, r.scorer_steps // 20),
        "model.pretrained": str(clip_dir), "data.path": str(Path(b.results("datasets")["dir"]) / "preference_pairs"),
        "output_dir": str(b.run_dir("aesthetic") / "scorer")})
    result = _trained(reward_train.run(config, b.run_dir("aesthetic")), "aesthetic")
    return {"dir": str(result.output_dir), **_last_eval(result)}


def stage_realism(b: Build) -> dict:
    from alignax.rewards import realism
    clip_dir = Path(b.results("clip")["dir"]) / "clip"
    out = b.scratch / "realism_stats.npz"
    realism.fit_feature_stats(clip_dir, b.data.eval_images, out)
    return {"file": str(out), "images": int(len(b.data.eval_images))}


def sft_config(b: Build) -> ml_collections.ConfigDict:
    from alignax import config as config_lib
    r = b.recipe
    return _config(config_lib.base_config(), **{
        "seed": b.seed, "total_steps": r.sft_steps, "batch_size": r.sft_batch, "log_every": 50,
        "checkpoint_every": max(1, r.sft_steps // 8), "keep_checkpoints": 2, "eval_every": max(1, r.sft_steps // 4),
        "model.pretrained": b.results("base")["dir"], "data.path": b.results("datasets")["dir"],
        "optim.learning_rate": r.sft_learning_rate, "optim.warmup_steps": min(200, r.sft_steps // 10),
        "optim.schedule": "cosine", "optim.end_lr_fraction": 0.1,
        "text.use_t5": False, "text.max_sequence_length": pipeline_lib.MAX_SEQUENCE_LENGTH,
        "sample.num_steps": r.sample_steps, "objective": ml_collections.ConfigDict(dict(name="sft"))})


def stage_sft(b: Build) -> dict:
    from alignax import export
    from alignax.training.trainer import Trainer
    workdir = b.run_dir("sft")
    result = _trained(Trainer(sft_config(b), str(workdir)).run(), "sft")
    out = b.scratch / "pipeline"
    export.export(str(workdir), str(out), pipeline=True)
    return {"dir": str(out), "steps": int(result.final_step)}


def stage_assemble(b: Build) -> dict:
    from alignax.world import fp16
    w = b.world
    for target, source in ((w.pipeline, b.results("sft")["dir"]),
                           (w.clip, Path(b.results("clip")["dir"]) / "clip"),
                           (w.aesthetic, b.results("aesthetic")["dir"]),
                           (w.identity, b.results("identity")["dir"])):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".alignax-export.json"))
    shutil.copyfile(b.results("realism")["file"], w.realism_stats)
    converted = fp16.convert_tree(w.root)
    return {"fp16_files": converted, "bytes": _size(w.root)}


def stage_quality(b: Build) -> dict:
    from alignax.world import quality
    return quality.measure(b.world, b.data, num_samples=b.recipe.quality_samples, seed=b.seed,
                           sample_steps=b.recipe.sample_steps)


STAGES: dict[str, Callable[[Build], dict]] = {
    "data": stage_data, "vae": stage_vae, "clip": stage_clip, "base": stage_base, "datasets": stage_datasets,
    "identity": stage_identity, "aesthetic": stage_aesthetic, "realism": stage_realism, "sft": stage_sft,
    "assemble": stage_assemble, "quality": stage_quality,
}


def _trained(result: Any, stage: str) -> Any:
    """A trainer's result, or a clean stop when SIGTERM preempted it (its checkpoint is saved; a rerun of the
    build resumes the stage from it)."""
    if getattr(result, "preempted", False):
        raise Preempted(f"world build: stage {stage!r} stopped at step {result.final_step} (SIGTERM); rerun the same "
                        "command to resume")
    return result


class Preempted(SystemExit):
    """The build stopped on SIGTERM; a rerun resumes."""


def _last_eval(result: Any) -> dict:
    evals = getattr(result, "evals", None)
    return {"eval": dataclasses.asdict(evals[-1])} if evals else {}


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def manifest(b: Build, seconds: dict[str, float]) -> dict:
    return {
        "preset": b.preset, "seed": b.seed, "recipe": dataclasses.asdict(b.recipe),
        "max_sequence_length": pipeline_lib.MAX_SEQUENCE_LENGTH,
        "identities": [i.name for i in b.data.identities],
        "quality": b.results("quality"),
        "training": {stage: b.results(stage) for stage in ("vae", "clip", "identity", "aesthetic", "sft")},
        "build_seconds": seconds,
        "bytes": _size(b.world.root),
    }


def build(out: str | os.PathLike, *, preset: str = "full", seed: int = 0, scratch: str | os.PathLike | None = None,
          progress: Callable[[str], None] = print) -> Path:
    """Builds (or finishes building) the world and swaps it in at `out`; returns `out`."""
    from alignax.models.weights_io import atomic_directory
    from alignax.world.recipe import preset as recipe_preset

    recipe = recipe_preset(preset)
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out / paths_lib.MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(f"--out={out}: exists, is not empty and holds no built world ({paths_lib.MANIFEST}); "
                              "choose an empty or new directory")
    scratch = Path(scratch) if scratch else out.parent / f".{out.name}.build-{preset}-{seed}"
    b = Build(recipe=recipe, seed=seed, scratch=scratch.resolve(), preset=preset)
    seconds: dict[str, float] = json.loads((b.scratch / "seconds.json").read_text()) \
        if (b.scratch / "seconds.json").is_file() else {}
    for i, (name, stage) in enumerate(STAGES.items(), 1):
        if b.results(name) is not None:
            progress(f"[{i}/{len(STAGES)}] {name}: done earlier")
            continue
        progress(f"[{i}/{len(STAGES)}] {name} ...")
        start = time.perf_counter()
        results = stage(b)
        seconds[name] = round(time.perf_counter() - start, 1)
        b.finish(name, results)
        (b.scratch / "seconds.json").write_text(json.dumps(seconds, indent=2) + "\n")
        progress(f"[{i}/{len(STAGES)}] {name}: {seconds[name]:.0f} s {_summary(results)}")
    (b.world.manifest).write_text(json.dumps(manifest(b, seconds), indent=2, default=float) + "\n")
    with atomic_directory(out) as staging:
        shutil.copytree(b.world.root, staging, dirs_exist_ok=True)
    return out


def _summary(results: dict) -> str:
    shown = {k: v for k, v in results.items() if isinstance(v, int | float | str) and k != "dir"}
    return json.dumps(shown, default=float)[:200] if shown else ""


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    out = build(f.out, preset=f.preset, seed=f.seed, scratch=f.workdir or None)
    size = _size(out) / 2 ** 20
    print(f"built the portrait world ({f.preset}, seed {f.seed}, {size:.1f} MiB) at {out}")


def cli() -> None:
    """`alignax-build-world` / `python -m alignax.world.build`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib
    from alignax.world.recipe import PRESETS
    flags.DEFINE_string("out", None, "directory the built world goes to (new, empty, or an earlier build)",
                        required=True)
    flags.DEFINE_enum("preset", "full", sorted(PRESETS), "full: the shipped world; smoke: every part for a few steps")
    flags.DEFINE_integer("seed", 0, "seed of the data and of every trainer")
    flags.DEFINE_string("workdir", "", "scratch directory for the training runs (default: beside --out); a rerun "
                                       "with the same one resumes")
    cli_lib.run_main(main)


if __name__ == "__main__":
    sys.exit(cli())
