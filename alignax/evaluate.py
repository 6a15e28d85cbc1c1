"""`python -m alignax.evaluate --workdir=DIR [--step=N] [--ema] [--num_prompts=K] [--seeds=0,1] [--out=FILE]`.

Scores one checkpoint with every reward the run configured, on fixed prompts (the first K of
the eval split of the run's prompts dataset) and fixed seeds, so evaluations of different runs
and steps are comparable point for point: the Pareto report (alignax/pareto/report.py) puts
one JSON per run on the front. Noise for seed s is `normal(key(s), latent_shape(K))` with
the run's `config.sample` settings, the same images the trainer's sample grids show. Each
reward gets its mean, std and a bootstrap 95% interval of the mean over prompts (fixed seed).
A study (alignax/study/evaluation.py) scores every point with the study's rewards instead of
the run's (`load(rewards_config=...)`, held-out judges included) and the base model as the
run's initial transformer (`load(initial=True)`). Single-host, on one device.
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
from alignax.conditioning import negative_prompt, on_the_fly
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


def load(workdir: str | Path, *, step: int | None = None, ema: bool = False,
         rewards_config: ml_collections.ConfigDict | None = None, initial: bool = False) -> Checkpoint:
    """The checkpoint at `step` (default: latest), with LoRA merged into its base and the VAE rebuilt.
    Only reads `workdir` (see `alignax.saved_run`).

    `rewards_config` replaces the run's `config.rewards` (a study scores every point with the same
    rewards, held-out judges included); `initial=True` takes the run's *initial* transformer (the
    pretrained weights or the seed's random init, as the trainer made them): the base model a
    study compares every point with."""
    run = saved_run.load(workdir, step)
    step, config = run.step, run.config
    if ema and not config.ema.enabled:
        raise ConfigError(f"--ema: the run in {workdir} has config.ema.enabled=False, so it saved no EMA")
    trainable = run.state["ema"] if ema else run.state["trainable"]
    t_src, transformer, v_src, vae_module = model_setup.build_modules(config.model)
    if rewards_config is not None:
        reward_setup.validate_config(rewards_config)
    rewards = reward_setup.build(config.rewards if rewards_config is None else rewards_config)
    scale, shift = model_setup.vae_scaling(vae_module)
    models = objectives.Models(transformer, vae_module, scale, shift, rewards=rewards)
    mesh = saved_run.one_device_mesh()
    params = trainable["transformer"]
    if initial:
        params, step = saved_run.lora_base(config, t_src, transformer), 0
    elif config.lora.enabled:
        from alignax.training import lora
        params = lora.merge(saved_run.lora_base(config, t_src, transformer), params,
                            lora.LoraSpec.from_config(config.lora))
    frozen = {"vae": saved_run.vae_params(config, v_src, vae_module),
              "rewards": {name: getattr(r, "params", {}) or {} for name, r in rewards.items()}}
    return Checkpoint(step, config, models, params, frozen, mesh)


def eval_prompts(config: ml_collections.ConfigDict, num_prompts: int) -> dict[str, Any]:
    """The first `num_prompts` records of the eval split of the run's prompts dataset; with
    config.text.encode='on_the_fly' their prompts encoded by the pipeline's text encoders (and the negative
    prompt, per row, when guidance uses it), as the trainer does."""
    text = on_the_fly.for_evaluation(config)
    path = data_setup.dataset_path(config.data, "prompts")
    source = data.open_dataset(path, config.data.eval_split)
    missing = [f for f in ("prompt", *(() if text else CONDITIONING)) if f not in source.features]
    if missing:
        raise DataError(f"dataset {source.path}: evaluation needs fields {missing} (text conditioning); "
                        f"it has {sorted(source.features)}")
    count = min(num_prompts, len(source))
    batch = data.stack_records(source.get_many(range(count)), where=source.path)
    prompts = [str(p) for p in batch["prompt"]]
    if text is None:
        conditioning = {k: np.asarray(batch[k]) for k in CONDITIONING}
    else:
        conditioning = text.encode_prompts(prompts)
        negatives = on_the_fly.negatives_for_run(config.sample, _transformer_config(config), text)
        conditioning = negative_prompt.guided(conditioning, negatives, config.sample.guidance_scale)
    return {"prompt": prompts, **conditioning,
            **{k: [str(v) for v in batch[k]] for k in HOST_FIELDS if k in batch}}


def _transformer_config(config: ml_collections.ConfigDict) -> Any:
    """The MM-DiT config (its widths check a negative-prompt .npz)."""
    return model_setup.build_modules(config.model)[1].config


def make_sampler(ckpt: Checkpoint) -> Any:
    """The jitted `(params, frozen, noise, batch) -> images` of the run's sample settings; build it once
    and pass it to every `generate` call on `ckpt` (each new closure is traced and compiled again)."""
    models, cfg = ckpt.models, ckpt.config.sample

    @jax.jit
    def sample(params, frozen, noise, batch):
        return sampling.generate_images(models, params, frozen, batch, noise, num_steps=cfg.num_steps,
                                        shift=cfg.shift, guidance_scale=cfg.guidance_scale)

    return sample


def generate(ckpt: Checkpoint, prompts: dict[str, Any], seed: int, batch_size: int | None = None, *,
             sampler: Any = None) -> np.ndarray:
    """Images NHWC in [0, 1], one per prompt, from the noise of `seed` (independent of `batch_size`);
    `sampler`: `make_sampler(ckpt)`, reused across calls."""
    models, cfg = ckpt.models, ckpt.config.sample
    count = len(prompts["prompt"])
    noise = jax.random.normal(jax.random.key(seed), models.latent_shape(count))
    own = [k for k in negative_prompt.FIELDS.values() if k in prompts]  # encoded on the fly by eval_prompts
    negatives = None if own else negative_prompt.for_run(cfg, models.transformer.config)
    conditioning = negative_prompt.guided({k: prompts[k] for k in (*CONDITIONING, *own)}, negatives,
                                          cfg.guidance_scale)
    sample = sampler or make_sampler(ckpt)
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


BOOTSTRAP = dict(resamples=2000, seed=0, confidence=0.95)  # fixed: intervals are reproducible


def bootstrap_interval(per_prompt: np.ndarray, *, resamples: int = BOOTSTRAP["resamples"],
                       seed: int = BOOTSTRAP["seed"], confidence: float = BOOTSTRAP["confidence"]) -> list[float]:
    """Percentile-bootstrap interval of the mean over prompts ([lo, hi]).

    The resampling unit is the prompt (its score averaged over the seeds): prompts are the
    population an evaluation generalises over. The generator's seed is fixed, so the same
    scores always give the same interval; one prompt gives a zero-width interval."""
    values = np.asarray(per_prompt, np.float64).reshape(-1)
    if values.size == 0 or not 0 < confidence < 1:
        raise ConfigError(f"bootstrap_interval: need >= 1 value and 0 < confidence < 1, found {values.size} values "
                          f"and confidence={confidence}")
    rows = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[rows].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return [float(low), float(high)]


def evaluate_checkpoint(ckpt: Checkpoint, *, num_prompts: int = 8, seeds: tuple[int, ...] = (0,),
                        batch_size: int | None = None, sampler: Any = None) -> tuple[dict, np.ndarray]:
    """Samples, decodes and scores `ckpt` with its rewards; returns the evaluation (the JSON body
    without the run's name/workdir) and the images [seeds, prompts, H, W, 3] the scores are of.
    `sampler`: a `make_sampler` of a checkpoint with the same model and sample settings, so that
    evaluating many points compiles the sampler once."""
    if num_prompts < 1 or not seeds:
        raise ConfigError(f"--num_prompts={num_prompts} --seeds={list(seeds)}: need at least one prompt and one seed")
    prompts = eval_prompts(ckpt.config, num_prompts)
    per_seed = {name: [] for name in ckpt.models.rewards}  # name -> [seed][prompt]
    all_images, sampler = [], sampler or make_sampler(ckpt)
    for seed in seeds:
        images = generate(ckpt, prompts, seed, batch_size, sampler=sampler)
        all_images.append(images)
        fields = {k: prompts[k] for k in HOST_FIELDS if k in prompts}
        for name, scores in score(ckpt, images, prompts["prompt"], fields).items():
            per_seed[name].append(scores)
    table = {name: np.stack(rows) for name, rows in per_seed.items()}  # [seeds, prompts]
    result = {
        "step": ckpt.step,
        "seeds": [int(s) for s in seeds],
        "num_prompts": len(prompts["prompt"]),
        "objective": ckpt.config.objective.name,
        "weights": _weights(ckpt.config),
        "rewards": {name: float(t.mean()) for name, t in table.items()},
        "rewards_std": {name: float(t.std()) for name, t in table.items()},
        "rewards_ci": {name: bootstrap_interval(t.mean(axis=0)) for name, t in table.items()},
        "bootstrap": {**BOOTSTRAP, "unit": "prompt"},
        "per_prompt": [
            {"index": i, "prompt": prompt,
             "rewards": {name: float(t[:, i].mean()) for name, t in table.items()},
             "per_seed": {name: [float(v) for v in t[:, i]] for name, t in table.items()}}
            for i, prompt in enumerate(prompts["prompt"])],
    }
    return result, np.stack(all_images)


def write_grid(path: str | Path, images: np.ndarray) -> str:
    """PNG of images [seeds, prompts, H, W, 3]: one row per seed, one column per prompt, so grids of
    different points evaluated on the same prompts and seeds compare cell for cell."""
    import io

    from PIL import Image

    from alignax.training.metrics import image_grid
    seeds, prompts = images.shape[:2]
    grid = image_grid(np.asarray(images, np.float32).reshape(seeds * prompts, *images.shape[2:]), columns=prompts)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    fs.write_bytes_atomic(path, buffer.getvalue())
    return fs.absolute(path)


def evaluate(workdir: str | Path, *, step: int | None = None, ema: bool = False, num_prompts: int = 8,
             seeds: tuple[int, ...] = (0,), batch_size: int | None = None, out: str | Path | None = None) -> dict:
    """Samples, decodes and scores; writes the JSON to `out` (default DIR/eval_step_N.json) and returns it."""
    if num_prompts < 1 or not seeds:
        raise ConfigError(f"--num_prompts={num_prompts} --seeds={list(seeds)}: need at least one prompt and one seed")
    ckpt = load(workdir, step=step, ema=ema)
    if not ckpt.models.rewards:
        raise ConfigError(f"--workdir={workdir}: the run configures no rewards (config.rewards is empty); "
                          "there is nothing to score")
    body, _ = evaluate_checkpoint(ckpt, num_prompts=num_prompts, seeds=seeds, batch_size=batch_size)
    result = {"run": posixpath.basename(fs.absolute(workdir).rstrip("/")), "workdir": fs.absolute(workdir),
              "step": body.pop("step"), "ema": ema, **body}
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
