"""`python -m alignax.evaluate --workdir=DIR [--step=N] [--ema] [--num_prompts=K] [--seeds=0,1] [--out=FILE]`.

Scores one checkpoint with every reward the run configured, on fixed prompts (the first K of
the eval split of the run's prompts dataset) and fixed seeds, so evaluations of different runs
and steps are comparable point for point: the Pareto report (alignax/pareto/report.py) puts
one JSON per run on the front. Noise for seed s is `normal(key(s), latent_shape(K))` with
the run's `config.sample` settings, the same images the trainer's sample grids show.
Single-host, on one device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignax import data, fs, objectives, sampling, saved_run
from alignax import mesh as mesh_lib
from alignax.conditioning import negative_prompt
from alignax.data import setup as data_setup
from alignax.errors import ConfigError, DataError
from alignax.models import setup as model_setup
from alignax.rewards import setup as reward_setup

PyTree = Any
CONDITIONING = ("encoder_hidden_states", "pooled_projections")
HOST_FIELDS = ("identity",)  # optional string fields rewards read on the host (`Reward.host_fields`)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A saved run rebuilt for inference: models, the transformer params to sample with, frozen params."""

    step: int
    config: ml_collections.ConfigDict
    models: objectives.Models
    transformer: PyTree  # LoRA already merged
    frozen: PyTree       # {'vae': ..., 'rewards': {name: params}}
    mesh: Any


def load(workdir: str | Path, *, step: int | None = None, ema: bool = False) -> Checkpoint:
    """The checkpoint at `step` (default: latest), with LoRA merged into its base and the VAE rebuilt.
    Only reads `workdir` (see `alignax.saved_run`)."""
    run = saved_run.load(workdir, step)
    step, config = run.step, run.config
    if ema and not config.ema.enabled:
        raise ConfigError(f"--ema: the run in {workdir} has config.ema.enabled=False, so it saved no EMA")
    trainable = run.state["ema"] if ema else run.state["trainable"]
    t_src, transformer, v_src, vae_module = model_setup.build_modules(config.model)
    rewards = reward_setup.build(config.rewards)
    scale, shift = model_setup.vae_scaling(vae_module)
    models = objectives.Models(transformer, vae_module, scale, shift, rewards=rewards)
    mesh = saved_run.one_device_mesh()
    params = trainable["transformer"]
    if config.lora.enabled:
        from alignax.training import lora
        params = lora.merge(saved_run.lora_base(config, t_src, transformer), params,
                            lora.LoraSpec.from_config(config.lora))
    frozen = {"vae": saved_run.vae_params(config, v_src, vae_module),
              "rewards": {name: getattr(r, "params", {}) or {} for name, r in rewards.items()}}
    return Checkpoint(step, config, models, params, frozen, mesh)


def eval_prompts(config: ml_collections.ConfigDict, num_prompts: int) -> dict[str, Any]:
    """The first `num_prompts` records of the eval split of the run's prompts dataset."""
    path = data_setup.dataset_path(config.data, "prompts")
    source = data.open_dataset(path, config.data.eval_split)
    missing = [f for f in ("prompt", *CONDITIONING) if f not in source.features]
    if missing:
        raise DataError(f"dataset {source.path}: evaluation needs fields {missing} (text conditioning); "
                        f"it has {sorted(source.features)}")
    count = min(num_prompts, len(source))
    batch = data.stack_records(source.get_many(range(count)), where=source.path)
    return {"prompt": [str(p) for p in batch["prompt"]], **{k: np.asarray(batch[k]) for k in CONDITIONING},
            **{k: [str(v) for v in batch[k]] for k in HOST_FIELDS if k in batch}}


def generate(ckpt: Checkpoint, prompts: dict[str, Any], seed: int, batch_size: int | None = None) -> np.ndarray:
    """Images NHWC in [0, 1], one per prompt, from the noise of `seed` (independent of `batch_size`)."""
    models, cfg = ckpt.models, ckpt.config.sample
    count = len(prompts["prompt"])
    noise = jax.random.normal(jax.random.key(seed), models.latent_shape(count))
    negatives = negative_prompt.for_run(cfg, models.transformer.config)
    conditioning = negative_prompt.guided({k: prompts[k] for k in CONDITIONING}, negatives, cfg.guidance_scale)

    @jax.jit
    def sample(params, frozen, noise, batch):
        return sampling.generate_images(models, params, frozen, batch, noise, num_steps=cfg.num_steps,
                                        shift=cfg.shift, guidance_scale=cfg.guidance_scale)

    batch_size = batch_size or count
    chunks = []
    with mesh_lib.use_mesh(ckpt.mesh):
        for start in range(0, count, batch_size):
            rows = slice(start, start + batch_size)
            chunk = {k: jnp.asarray(v[rows]) for k, v in conditioning.items()}
            chunks.append(np.asarray(sample(ckpt.transformer, ckpt.frozen, noise[rows], chunk)))
    return np.concatenate(chunks)


def score(ckpt: Checkpoint, images: np.ndarray, prompts: list[str],
          fields: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """{reward name: scores [N]} for every configured reward; `fields`: other host fields the rewards
    read (e.g. `identity`), one entry per prompt."""
    host = reward_setup.prepare(ckpt.models.rewards, {**(fields or {}), "prompt": list(prompts)})
    batch = {k: jnp.asarray(v) for k, v in host.items() if np.asarray(v).dtype.kind not in "OUS"}
    out = {}
    for name, reward in ckpt.models.rewards.items():
        scores, _ = jax.jit(reward.apply)(ckpt.frozen["rewards"][name], jnp.asarray(images), batch)
        out[name] = np.asarray(scores, np.float64).reshape(len(prompts))
    return out


def _weights(config: ml_collections.ConfigDict) -> Any:
    weights = config.pareto.weights
    return weights.to_dict() if hasattr(weights, "to_dict") else weights


def evaluate(workdir: str | Path, *, step: int | None = None, ema: bool = False, num_prompts: int = 8,
             seeds: tuple[int, ...] = (0,), batch_size: int | None = None, out: str | Path | None = None) -> dict:
    """Samples, decodes and scores; writes the JSON to `out` (default DIR/eval_step_N.json) and returns it."""
    if num_prompts < 1 or not seeds:
        raise ConfigError(f"--num_prompts={num_prompts} --seeds={list(seeds)}: need at least one prompt and one seed")
    ckpt = load(workdir, step=step, ema=ema)
    if not ckpt.models.rewards:
        raise ConfigError(f"--workdir={workdir}: the run configures no rewards (config.rewards is empty); "
                          "there is nothing to score")
    prompts = eval_prompts(ckpt.config, num_prompts)
    per_seed = {name: [] for name in ckpt.models.rewards}  # name -> [seed][prompt]
    for seed in seeds:
        images = generate(ckpt, prompts, seed, batch_size)
        fields = {k: prompts[k] for k in HOST_FIELDS if k in prompts}
        for name, scores in score(ckpt, images, prompts["prompt"], fields).items():
            per_seed[name].append(scores)
    table = {name: np.stack(rows) for name, rows in per_seed.items()}  # [seeds, prompts]
    result = {
        "run": posixpath.basename(fs.absolute(workdir).rstrip("/")),
        "workdir": fs.absolute(workdir),
        "step": ckpt.step,
        "ema": ema,
        "seeds": [int(s) for s in seeds],
        "num_prompts": len(prompts["prompt"]),
        "objective": ckpt.config.objective.name,
        "weights": _weights(ckpt.config),
        "rewards": {name: float(t.mean()) for name, t in table.items()},
        "rewards_std": {name: float(t.std()) for name, t in table.items()},
        "per_prompt": [
            {"index": i, "prompt": prompt,
             "rewards": {name: float(t[:, i].mean()) for name, t in table.items()},
             "per_seed": {name: [float(v) for v in t[:, i]] for name, t in table.items()}}
            for i, prompt in enumerate(prompts["prompt"])],
    }
    out = output_path(workdir, ckpt.step, ema, out)
    fs.write_text_atomic(out, json.dumps(result, indent=2) + "\n")  # local, gs:// or memory://
    logging.info("evaluated step %d of %s: %s → %s", ckpt.step, workdir, result["rewards"], out)
    return result


def output_path(workdir: str | Path, step: int, ema: bool, out: str | Path | None = None) -> str:
    """Where `evaluate` writes its JSON: `out`, or WORKDIR/eval_step_N[_ema].json (local path or URL)."""
    return fs.absolute(out) if out else fs.join(fs.absolute(workdir), f"eval_step_{step}{'_ema' if ema else ''}.json")


def main(argv: list[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    try:
        seeds = tuple(int(s) for s in f.seeds.split(",") if s.strip())
    except ValueError as e:
        raise ConfigError(f"--seeds={f.seeds!r}: expected comma-separated integers") from e
    result = evaluate(f.workdir, step=f.step, ema=f.ema, num_prompts=f.num_prompts, seeds=seeds,
                      batch_size=f.batch_size, out=f.out)
    print(json.dumps({"step": result["step"], "rewards": result["rewards"]}))
    print(f"wrote the evaluation of step {result['step']} to {output_path(f.workdir, result['step'], f.ema, f.out)}")


def cli() -> None:
    """`alignax-evaluate` / `python -m alignax.evaluate`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib

    flags.DEFINE_string("workdir", None, "the run directory (holds checkpoints/)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_bool("ema", False, "evaluate the EMA weights")
    flags.DEFINE_integer("num_prompts", 8, "the first K prompts of the eval split")
    flags.DEFINE_string("seeds", "0", "comma-separated noise seeds; each prompt is sampled once per seed")
    flags.DEFINE_integer("batch_size", None, "prompts per sampling call (default: all at once)")
    flags.DEFINE_string("out", None, "output JSON (default DIR/eval_step_N.json)")
    flags.mark_flags_as_required(["workdir"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
