"""`python -m alignax.contrastive.train --config=CONFIG.py --workdir=DIR`: a CLIP with several text towers.

One vision tower (ViT with class token, `model.vision`) and the text towers of `model.text_towers` (each a
transformers CLIPTextModelWithProjection: width, depth, heads, `hidden_act` — quick_gelu for the CLIP-L
layout, gelu for OpenCLIP bigG's), all projecting into one joint space of `model.projection_dim`, are
trained from scratch on the images and captions of a captioned-images dataset. The loss is the mean over
towers of each tower's CLIP loss against the shared image embedding (alignax.contrastive.loss; each tower
has its own temperature). Captions are tokenized to the tokenizer's `model_max_length`, padded, with no
attention mask: how SD3 pipelines run their CLIP text encoders.

Held-out retrieval accuracy (each eval image's own caption ranked first among all distinct eval captions)
is logged per tower at step 0, every `eval_every` steps and at the end. The result goes to `output_dir`
(default `workdir/export`), atomically:

    text_encoder/, text_encoder_2/, ...   one CLIPTextModelWithProjection per tower (an SD3 pipeline's layout)
    tokenizer/, tokenizer_2/              the tokenizer, once per tower
    clip/                                 a CLIPModel: the vision tower with the first text tower, plus the
                                          tokenizer files (what the clip_score / realism rewards load)

Sharding and run frame as the other small trainers (alignax.training.small_loop).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
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
from alignax.contrastive import loss as contrastive
from alignax.errors import ConfigError
from alignax.training import optim

PyTree = Any
DATA_AXIS = "data"
KIND = "captioned_images"
TOWER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size")
log = logging.getLogger("alignax")


def default_config() -> ml_collections.ConfigDict:
    """Every field a contrastive run may set, with its default (ConfigError on anything else)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2000
    c.batch_size = 128               # image-caption pairs per step, global
    c.eval_batch_size = 128
    c.eval_every = 500
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.data_parallel = True
    c.output_dir = ""                # default workdir/export
    c.model = ml_collections.ConfigDict(dict(
        tokenizer="",                # a CLIPTokenizer directory; its model_max_length is the context length
        projection_dim=64,
        logit_scale=2.6592,          # log(1 / 0.07), CLIP's initial temperature
        compute_dtype="float32",
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        text_towers=[dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          hidden_act="quick_gelu"),
                     dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          hidden_act="gelu")],
    ))
    c.data = ml_collections.ConfigDict(dict(path="", split="train", eval_split="eval", shuffle=True))
    c.optim = ml_collections.ConfigDict(config_lib.base_config().optim.to_dict())
    c.optim.learning_rate = 5e-4
    c.optim.weight_decay = 0.1
    return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """ConfigError naming the first unknown or bad field, before anything is loaded or compiled."""
    config_lib.check_against(default_config().to_dict(), config.to_dict(),
                             free_form=("model.vision", "model.text_towers"))
    for field in ("total_steps", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints",
                  "model.projection_dim", "optim.learning_rate"):
        value = config
        for part in field.split("."):
            value = value[part]
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"config.{field}={value!r}: expected a positive number")
    for field in ("eval_every", "checkpoint_every"):
        if config[field] < 0:
            raise ConfigError(f"config.{field}={config[field]}: expected >= 0 (0 disables)")
    towers = list(config.model.text_towers)
    if not towers:
        raise ConfigError("config.model.text_towers is empty: give at least one text tower")
    for i, tower in enumerate(towers):
        missing = [f for f in TOWER_FIELDS if f not in tower]
        unknown = sorted(set(tower) - set(TOWER_FIELDS))
        if missing or unknown:
            raise ConfigError(f"config.model.text_towers[{i}]: needs {list(TOWER_FIELDS)}; missing {missing}, "
                              f"unknown {unknown}")
    vision = dict(config.model.vision)
    missing = [f for f in VISION_FIELDS if f not in vision]
    if missing:
        raise ConfigError(f"config.model.vision: missing {missing} (needs {list(VISION_FIELDS)})")
    if vision["image_size"] % vision["patch_size"]:
        raise ConfigError(f"config.model.vision: image_size={vision['image_size']} is not a multiple of "
                          f"patch_size={vision['patch_size']}")
    if not config.model.tokenizer:
        raise ConfigError("config.model.tokenizer is empty: a CLIPTokenizer directory")
    if not config.data.path:
        raise ConfigError("config.data.path is empty: point it at a captioned_images dataset")
    devices = num_devices if config.data_parallel else 1
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % devices:
            raise ConfigError(f"config.{field}={config[field]} is not divisible by the {devices} devices of the "
                              "data mesh (or set config.data_parallel=False)")
    return config


# --- the model: transformers configs, Flax modules, params -------------------------------------------------

def tower_config(tower: dict, *, vocab_size: int, context: int, projection_dim: int, tokenizer: Any) -> dict:
    """A transformers CLIPTextConfig dict (CLIPTextModelWithProjection) for one text tower."""
    return {"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"],
            **{k: tower[k] for k in TOWER_FIELDS}, "vocab_size": vocab_size, "max_position_embeddings": context,
            "projection_dim": projection_dim, "layer_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def clip_config(vision: dict, first_tower: dict, projection_dim: int, logit_scale: float) -> dict:
    """A transformers CLIPModel config dict: the vision tower and the first text tower."""
    text = {k: v for k, v in first_tower.items() if k not in ("model_type", "architectures", "projection_dim")}
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": projection_dim,
            "logit_scale_init_value": logit_scale, "text_config": text,
            "vision_config": {**vision, "num_channels": 3, "layer_norm_eps": 1e-5}}


@dataclasses.dataclass(frozen=True)
class Model:
    clip: Any                        # alignax.models.clip.CLIPModel (vision tower + first text tower)
    towers: list[Any]                # alignax.models.clip.CLIPTextModelWithProjection per tower
    clip_config: dict
    tower_configs: list[dict]
    tokenizer: Any
    context: int

    def image_embeds(self, params: PyTree, pixels: jax.Array) -> jax.Array:
        vision = {"vision_model": params["vision_model"], "visual_projection": params["visual_projection"],
                  "logit_scale": params["logit_scales"][0]}
        return self.clip.apply({"params": vision}, pixels, method="get_image_features")

    def text_embeds(self, params: PyTree, tower: int, input_ids: jax.Array) -> jax.Array:
        return self.towers[tower].apply({"params": params["towers"][str(tower)]}, input_ids,
                                        method="get_text_features")

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self.tokenizer(list(prompts), padding="max_length", max_length=self.context,
                                         truncation=True)["input_ids"], np.int32)


def build_model(model_config: ml_collections.ConfigDict, seed: int) -> tuple[Model, PyTree]:
    from alignax.models import clip, init_params
    from alignax.rewards.tokenize import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(model_config.tokenizer, source="config.model.tokenizer")
    context = int(tokenizer.model_max_length)
    if context > 512:
        raise ConfigError(f"config.model.tokenizer={model_config.tokenizer}: model_max_length={context}; set it "
                          "in tokenizer_config.json (77 for CLIP)")
    vocab = max(tokenizer.get_vocab().values()) + 1
    compute = None if model_config.compute_dtype == "float32" else jnp.dtype(model_config.compute_dtype)
    towers = [tower_config(dict(t), vocab_size=vocab, context=context, projection_dim=model_config.projection_dim,
                           tokenizer=tokenizer) for t in model_config.text_towers]
    full = clip_config(dict(model_config.vision), towers[0], model_config.projection_dim, model_config.logit_scale)
    try:
        clip_module = clip.build(full, compute_dtype=compute)
        tower_modules = [clip.build_text_model(t, compute_dtype=compute) for t in towers]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from e
    keys = jax.random.split(jax.random.key(seed), len(towers) + 1)
    vision = init_params(clip.ARCHITECTURE, clip_module, keys[0])
    params = {"vision_model": vision["vision_model"], "visual_projection": vision["visual_projection"],
              "logit_scales": jnp.full((len(towers),), model_config.logit_scale, jnp.float32),
              "towers": {str(i): init_params(clip.TEXT_MODEL_ARCHITECTURE, m, keys[i + 1])
                         for i, m in enumerate(tower_modules)}}
    return Model(clip_module, tower_modules, full, towers, tokenizer, context), params


def pixels_fn(image_size: int) -> Callable[[jax.Array], jax.Array]:
    from alignax.rewards import preprocess
    return lambda images_uint8: preprocess.clip_pixels(images_uint8.astype(jnp.float32) / 255.0, image_size,
                                                      crop_offset="floor")


def make_train_step(model: Model, tx: optax.GradientTransformation) -> Callable:
    pixels = pixels_fn(model.clip.config.vision.image_size)

    def loss_fn(params, images, ids, same):
        image = model.image_embeds(params, pixels(images))
        losses = [contrastive.contrastive_loss(image, model.text_embeds(params, t, ids), params["logit_scales"][t],
                                               same)[0] for t in range(len(model.towers))]
        return jnp.mean(jnp.stack(losses)), {f"loss_tower{t}": v for t, v in enumerate(losses)}

    def step(state, images, ids, same):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], images, ids, same)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state}, {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)})

    return step


def retrieval_accuracy(model: Model, params: PyTree, images: np.ndarray, captions: list[str],
                       batch_size: int = 128) -> list[float]:
    """Per tower: the fraction of `images` whose own caption scores highest among the distinct `captions`."""
    pixels = pixels_fn(model.clip.config.vision.image_size)
    image_fn = jax.jit(lambda p, x: contrastive.l2_normalize(model.image_embeds(p, pixels(x))))
    distinct = sorted(set(captions))
    ids = model.tokenize(distinct)
    image = np.concatenate([np.asarray(image_fn(params, jnp.asarray(images[i:i + batch_size])))
                            for i in range(0, len(images), batch_size)])
    own = np.asarray([distinct.index(c) for c in captions])
    accuracies = []
    for t in range(len(model.towers)):
        text_fn = jax.jit(lambda p, x, t=t: contrastive.l2_normalize(model.text_embeds(p, t, x)))
        text = np.concatenate([np.asarray(text_fn(params, jnp.asarray(ids[i:i + batch_size])))
                               for i in range(0, len(ids), batch_size)])
        accuracies.append(float(np.mean(np.argmax(image @ text.T, axis=1) == own)))
    return accuracies


def save(model: Model, params: PyTree, out_dir: str | os.PathLike) -> Path:
    """The layout of the module docstring, atomically."""
    from alignax.models import Pretrained, clip, save_transformers
    from alignax.models.weights_io import atomic_directory

    params = jax.device_get(params)
    with atomic_directory(out_dir) as staging:
        for t, (module, config) in enumerate(zip(model.towers, model.tower_configs, strict=True)):
            suffix = "" if t == 0 else f"_{t + 1}"
            save_transformers(Pretrained(module, params["towers"][str(t)], config, clip.TEXT_MODEL_ARCHITECTURE),
                              staging / f"text_encoder{suffix}")
            model.tokenizer.save_pretrained(staging / f"tokenizer{suffix}")
        full = {"vision_model": params["vision_model"], "visual_projection": params["visual_projection"],
                "logit_scale": params["logit_scales"][0], **params["towers"]["0"]}
        save_transformers(Pretrained(model.clip, full, model.clip_config, clip.ARCHITECTURE), staging / "clip")
        model.tokenizer.save_pretrained(staging / "clip")
    return Path(out_dir)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    retrieval: list[float]           # per tower, over the distinct eval captions

    @property
    def worst(self) -> float:
        return min(self.retrieval)


@dataclasses.dataclass(frozen=True)
class RunResult:
    final_step: int
    evals: list[EvalResult]
    output_dir: Path
    params: PyTree
    preempted: bool = False


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Trains, evaluates and saves as the module docstring says, in the small trainers' run frame."""
    from alignax.training.small_loop import SmallLoop

    config = validate(ml_collections.ConfigDict(config.to_dict()), jax.device_count())
    with SmallLoop.for_config(workdir, config) as loop:
        return _run(config, Path(workdir), loop, on_step)


def _run(config: ml_collections.ConfigDict, workdir: Path, loop, on_step: Callable[[int], None] | None) -> RunResult:
    from alignax.data import Loader, open_dataset
    from alignax.reward_model.train import data_mesh

    train_source = open_dataset(config.data.path, config.data.split, kind=KIND)
    eval_source = open_dataset(config.data.path, config.data.eval_split, kind=KIND)
    model, params = build_model(config.model, config.seed)
    tx, _ = optim.make_optimizer(config.optim, params, config.total_steps)
    mesh = data_mesh(config.data_parallel)
    replicated, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                    out_shardings=replicated)(params)
    state_shardings = jax.tree.map(lambda _: replicated, state)
    train_step = jax.jit(make_train_step(model, tx), in_shardings=(state_shardings, rows, rows, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    loader = Loader(train_source, global_batch_size=config.batch_size, seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count(), shuffle=config.data.shuffle)
    eval_images = np.stack([eval_source[i]["image"] for i in range(len(eval_source))])
    eval_captions = [str(eval_source[i]["prompt"]) for i in range(len(eval_source))]

    def put(rows_sharding, value: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(rows_sharding, np.asarray(value))

    evals: list[EvalResult] = []

    def record_eval(state, step: int) -> dict[str, float]:
        result = EvalResult(step, retrieval_accuracy(model, state["params"], eval_images, eval_captions,
                                                     config.eval_batch_size))
        evals.append(result)
        log.info("step %d: held-out retrieval accuracy per tower %s", step, [round(a, 4) for a in result.retrieval])
        return {f"eval/retrieval_tower{t}": a for t, a in enumerate(result.retrieval)}

    def step_fn(state, host):
        prompts = [str(p) for p in host["prompt"]]
        same = np.equal.outer(np.asarray(prompts, object), np.asarray(prompts, object))
        if jax.process_count() > 1:  # duplicates across processes are not seen: each process compares its own rows
            raise ConfigError("alignax.contrastive.train runs on one process")
        return train_step(state, put(rows, host["image"]), put(rows, model.tokenize(prompts)),
                          jnp.asarray(same, bool))

    output_dir = Path(config.output_dir or workdir / "export")
    if loop.preempted("while building the model"):
        return RunResult(final_step=loop.step, evals=[], output_dir=output_dir, params=None, preempted=True)
    start_step, state = loop.restore(state, state_shardings)
    done = loop.train(state, loader.batches(start_step), step_fn, record_eval, start=start_step, on_step=on_step)
    if done.preempted:
        return RunResult(done.final_step, evals, output_dir, done.state["params"], preempted=True)
    if jax.process_index() == 0:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        save(model, done.state["params"], output_dir)
    return RunResult(done.final_step, evals, output_dir, done.state["params"])


# --- CLI --------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    del argv
    result = run(_CONFIG.value, _WORKDIR.value)
    if result.preempted:
        print(f"preempted at step {result.final_step} (SIGTERM); rerun the same command to resume from workdir "
              f"{_WORKDIR.value}", file=sys.stderr)
        return 0
    first, last = result.evals[0], result.evals[-1]
    print(f"finished at step {result.final_step}: held-out retrieval accuracy {first.retrieval} (step {first.step}) "
          f"-> {last.retrieval}; saved to {result.output_dir}", file=sys.stderr)
    return 0


def cli() -> None:
    """`alignax-train-clip` / `python -m alignax.contrastive.train`: flags defined here, not at import."""
    global _CONFIG, _WORKDIR
    from absl import flags
    from ml_collections import config_flags

    from alignax import cli as cli_lib
    from alignax.training import preemption

    preemption.install()
    _CONFIG = config_flags.DEFINE_config_file("config", None, "CONFIG.py[:ARG] returning the run's config",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory: metrics, checkpoints, the saved towers")
    flags.mark_flags_as_required(["config", "workdir"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
