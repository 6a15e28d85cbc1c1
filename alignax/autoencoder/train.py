"""`python -m alignax.autoencoder.train --config=CONFIG.py --workdir=DIR`: trains a diffusers `AutoencoderKL`.

The VAE comes from `model.pretrained` (a diffusers AutoencoderKL directory, to fine-tune) or from
`model.init` (a diffusers AutoencoderKL config dict, random init from the seed). It trains on the
`image` field of a captioned-images dataset (`data.path`) with reconstruction + KL (alignax.autoencoder.loss;
the posterior is sampled with the reparameterisation trick), reports the held-out PSNR and KL at step 0,
every `eval_every` steps and at the end (`workdir/metrics.jsonl`), and finally sets the SD3 latent
convention from the trained encoder — `shift_factor` = the mean and `scaling_factor` = 1 / the std of the
posterior means of `stats_images` training images, so that `(z - shift) * scale` is about zero-mean and
unit-variance, what the flow transformer expects — and saves the VAE in diffusers format at `output_dir`
(default `workdir/export`), atomically.

Sharding and run frame as the other small trainers (alignax.training.small_loop): the batch is split over
one 'data' mesh axis, params replicated; SIGTERM checkpoints and stops; a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from alignax import config as config_lib
from alignax.autoencoder import loss as vae_loss
from alignax.errors import ConfigError, WeightsError
from alignax.training import optim

PyTree = Any
DATA_AXIS = "data"
KIND = "captioned_images"
SAVE_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
log = logging.getLogger("alignax")


def default_config() -> ml_collections.ConfigDict:
    """Every field a VAE run may set, with its default (ConfigError on anything else)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2000
    c.batch_size = 32                # images per step, global; divisible by the number of devices
    c.eval_batch_size = 64
    c.eval_every = 500               # held-out PSNR cadence (also at step 0 and at the end); 0: ends only
    c.log_every = 50
    c.checkpoint_every = 500         # 0 disables checkpoints (and resume)
    c.keep_checkpoints = 2
    c.data_parallel = True
    c.output_dir = ""                # default workdir/export
    c.save_dtype = "float32"         # a key of SAVE_DTYPES
    c.stats_images = 512             # training images whose posterior means set shift_factor / scaling_factor
    c.crop_size = 0                  # train on random square crops of this side (the VAE is convolutional: a
                                     # crop costs (crop/size)^2 of a full image); 0: whole images. Eval: whole.
    c.loss = ml_collections.ConfigDict(dict(l1=1.0, l2=0.0, edge=0.5, kl_weight=1e-4))
    c.model = ml_collections.ConfigDict(dict(
        pretrained="",               # a diffusers AutoencoderKL directory to fine-tune; empty: random from `init`
        compute_dtype="float32",
        init=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                  use_post_quant_conv=False, mid_block_add_attention=False),
    ))
    c.data = ml_collections.ConfigDict(dict(path="", split="train", eval_split="eval", shuffle=True))
    c.optim = ml_collections.ConfigDict(config_lib.base_config().optim.to_dict())
    c.optim.learning_rate = 1e-3
    return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """ConfigError naming the first unknown or bad field, before anything is loaded or compiled."""
    config_lib.check_against(default_config().to_dict(), config.to_dict(), free_form=("model.init",))
    for field in ("total_steps", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints", "stats_images",
                  "optim.learning_rate"):
        value = config
        for part in field.split("."):
            value = value[part]
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"config.{field}={value!r}: expected a positive number")
    for field in ("eval_every", "checkpoint_every", "crop_size"):
        if config[field] < 0:
            raise ConfigError(f"config.{field}={config[field]}: expected >= 0 (0 disables)")
    for field, value in config.loss.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"config.loss.{field}={value!r}: expected a number >= 0")
    if config.save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"config.save_dtype={config.save_dtype!r}: expected one of {sorted(SAVE_DTYPES)}")
    if config.model.compute_dtype not in SAVE_DTYPES:
        raise ConfigError(f"config.model.compute_dtype={config.model.compute_dtype!r}: expected one of "
                          f"{sorted(SAVE_DTYPES)}")
    devices = num_devices if config.data_parallel else 1
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % devices:
            raise ConfigError(f"config.{field}={config[field]} is not divisible by the {devices} devices of the "
                              "data mesh (or set config.data_parallel=False)")
    if not config.data.path:
        raise ConfigError("config.data.path is empty: point it at a captioned_images dataset (its images are used)")
    return config


def build_vae(model_config: ml_collections.ConfigDict, seed: int) -> Any:
    """A `Pretrained` AutoencoderKL: loaded from `model.pretrained`, or random from `model.init`."""
    from alignax.models import Pretrained, init_params, load_diffusers, pretrained

    architecture = pretrained.DIFFUSERS["AutoencoderKL"]
    compute = SAVE_DTYPES[model_config.compute_dtype]
    if model_config.pretrained:
        model = load_diffusers(model_config.pretrained)
        if model.architecture.name != architecture.name:
            raise WeightsError(f"{model_config.pretrained}: a {model.architecture.name}, but config.model.pretrained "
                               "must be an AutoencoderKL directory")
        return dataclasses.replace(model, module=architecture.build(model.config, compute_dtype=compute))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_config.init.to_dict().items()}
    try:
        module = architecture.build(config, compute_dtype=compute)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model.init: {e}") from e
    return Pretrained(module=module, params=init_params(architecture, module, jax.random.key(seed)), config=config,
                      architecture=architecture)


def to_unit(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def make_train_step(module: Any, tx: optax.GradientTransformation, weights: dict) -> Callable:
    def loss_fn(params, images, rng):
        mean, logvar = module.apply({"params": params}, images, method="latent_dist_nhwc")
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        reconstruction = module.apply({"params": params}, z, method="decode_nhwc")
        return vae_loss.vae_loss(images, reconstruction, mean, logvar, weights)

    def step(state, images_uint8, rng):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], to_unit(images_uint8), rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
        return new, {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}

    return step


def make_eval_step(module: Any) -> Callable:
    def step(params, images_uint8):
        images = to_unit(images_uint8)
        mean, logvar = module.apply({"params": params}, images, method="latent_dist_nhwc")
        reconstruction = module.apply({"params": params}, mean, method="decode_nhwc")
        return {"psnr": vae_loss.psnr(images, reconstruction), "kl": vae_loss.kl_divergence(mean, logvar)}

    return step


def latent_factors(module: Any, params: PyTree, images_uint8: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """(shift_factor, scaling_factor): the mean and 1 / std of the posterior means over `images_uint8`."""
    encode = jax.jit(lambda p, x: module.apply({"params": p}, to_unit(x), method="encode_nhwc"))
    means = np.concatenate([np.asarray(encode(params, jnp.asarray(images_uint8[i:i + batch_size])), np.float64)
                            for i in range(0, len(images_uint8), batch_size)])
    return float(means.mean()), float(1.0 / max(means.std(), 1e-6))


def random_crops(images: np.ndarray, crop: int, key: tuple[int, ...]) -> np.ndarray:
    """One random `crop`-sized square per image (offsets a function of `key`: resume-exact); 0 or a crop as
    large as the images: the images."""
    size = images.shape[1]
    if crop <= 0 or crop >= min(images.shape[1:3]):
        return images
    rng = np.random.default_rng(key)
    top, left = rng.integers(0, size - crop + 1, (2, len(images)))
    return np.stack([image[t:t + crop, s:s + crop] for image, t, s in zip(images, top, left, strict=True)])


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    psnr: float                      # mean held-out PSNR (dB) through the posterior mean
    kl: float                        # mean held-out KL per latent element


@dataclasses.dataclass(frozen=True)
class RunResult:
    final_step: int
    evals: list[EvalResult]
    output_dir: Path                 # where the VAE was saved (not written when preempted)
    params: PyTree
    shift_factor: float | None = None
    scaling_factor: float | None = None
    preempted: bool = False


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Trains, evaluates and saves as the module docstring says, in the small trainers' run frame.
    `on_step(done)` runs after every finished step (tests raise from it to kill a run)."""
    from alignax.training.small_loop import SmallLoop

    config = validate(ml_collections.ConfigDict(config.to_dict()), jax.device_count())
    with SmallLoop.for_config(workdir, config) as loop:
        return _run(config, Path(workdir), loop, on_step)


def _run(config: ml_collections.ConfigDict, workdir: Path, loop, on_step: Callable[[int], None] | None) -> RunResult:
    from alignax.data import Loader, open_dataset
    from alignax.models import save_diffusers
    from alignax.models.weights_io import atomic_directory
    from alignax.reward_model.train import data_mesh

    train_source = open_dataset(config.data.path, config.data.split, kind=KIND)
    eval_source = open_dataset(config.data.path, config.data.eval_split, kind=KIND)
    model = build_vae(config.model, config.seed)
    tx, _ = optim.make_optimizer(config.optim, model.params, config.total_steps)
    weights = {k: float(v) for k, v in config.loss.items()}

    mesh = data_mesh(config.data_parallel)
    replicated, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                    out_shardings=replicated)(model.params)
    state_shardings = jax.tree.map(lambda _: replicated, state)
    train_step = jax.jit(make_train_step(model.module, tx, weights),
                         in_shardings=(state_shardings, rows, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model.module), in_shardings=(replicated, rows),
                        out_shardings=replicated)
    loader = Loader(train_source, global_batch_size=config.batch_size, seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count(), shuffle=config.data.shuffle)
    eval_batches = max(1, len(eval_source) // config.eval_batch_size)
    eval_loader = Loader(eval_source, global_batch_size=config.eval_batch_size, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(), shuffle=False,
                         prefetch=0)
    base_key = jax.random.key(config.seed)

    def to_device(images: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(rows, np.asarray(images))

    evals: list[EvalResult] = []

    def record_eval(state, step: int) -> dict[str, float]:
        psnr, kl = [], []
        for i in range(eval_batches):
            out = jax.device_get(eval_step(state["params"], to_device(eval_loader.batch_at(i)["image"])))
            psnr.append(np.asarray(out["psnr"]))
            kl.append(float(out["kl"]))
        result = EvalResult(step, float(np.mean(np.concatenate(psnr))), float(np.mean(kl)))
        evals.append(result)
        log.info("step %d: held-out PSNR %.2f dB, KL %.4f", step, result.psnr, result.kl)
        return {"eval/psnr": result.psnr, "eval/kl": result.kl}

    def step_fn(state, host):
        step = int(jax.device_get(state["step"]))
        return train_step(state, to_device(random_crops(host["image"], config.crop_size, (config.seed, step))),
                          jax.random.fold_in(base_key, step))

    output_dir = Path(config.output_dir or workdir / "export")
    if loop.preempted("while building the VAE"):
        return RunResult(final_step=loop.step, evals=[], output_dir=output_dir, params=None, preempted=True)
    start_step, state = loop.restore(state, state_shardings)
    done = loop.train(state, loader.batches(start_step), step_fn, record_eval, start=start_step, on_step=on_step)
    params = done.state["params"]
    if done.preempted:
        return RunResult(final_step=done.final_step, evals=evals, output_dir=output_dir, params=params, preempted=True)
    count = min(config.stats_images, len(train_source))
    stats_images = np.stack([train_source[i]["image"] for i in range(count)])
    shift, scale = latent_factors(model.module, params, stats_images)
    if jax.process_index() == 0:
        saved = model.replace(params=jax.device_get(params),
                              config={**model.config, "shift_factor": shift, "scaling_factor": scale})
        with atomic_directory(output_dir) as staging:
            save_diffusers(saved, staging, dtype=SAVE_DTYPES[config.save_dtype])
    log.info("latents: shift_factor %.4f, scaling_factor %.4f (from %d training images)", shift, scale, count)
    return RunResult(final_step=done.final_step, evals=evals, output_dir=output_dir, params=params,
                     shift_factor=shift, scaling_factor=scale)


# --- CLI --------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    del argv
    result = run(_CONFIG.value, _WORKDIR.value)
    if result.preempted:
        print(f"preempted at step {result.final_step} (SIGTERM); rerun the same command to resume from workdir "
              f"{_WORKDIR.value}", file=sys.stderr)
        return 0
    first, last = result.evals[0], result.evals[-1]
    print(f"finished at step {result.final_step}: held-out PSNR {first.psnr:.2f} dB (step {first.step}) -> "
          f"{last.psnr:.2f} dB; VAE saved to {result.output_dir}", file=sys.stderr)
    return 0


def cli() -> None:
    """`alignax-train-vae` / `python -m alignax.autoencoder.train`: flags defined here, not at import."""
    global _CONFIG, _WORKDIR
    from absl import flags
    from ml_collections import config_flags

    from alignax import cli as cli_lib
    from alignax.training import preemption

    preemption.install()
    _CONFIG = config_flags.DEFINE_config_file("config", None, "CONFIG.py[:ARG] returning the VAE run's config",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory: metrics, checkpoints, the saved VAE")
    flags.mark_flags_as_required(["config", "workdir"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
