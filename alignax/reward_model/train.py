"""`python -m alignax.reward_model.train --config=experiments/configs/reward_model_tiny.py --workdir=DIR`.

Fine-tunes a CLIP into a preference scorer on (prompt, image_0, image_1, label_0) pairs with
HPSv2's loss (alignax/reward_training.py), reports pairwise accuracy on the held-out split at
step 0, every `eval_every` steps and at the end (`workdir/metrics.jsonl`), and writes the
result as a transformers CLIP directory with its tokenizer (`workdir/scorer` unless
`output_dir` is set), which `load_transformers` and the `pickscore` / `clip_score` rewards read:

    alignax.rewards.get("pickscore", checkpoint="DIR/scorer")     # exp(logit_scale) * cosine

The CLIP comes from `model.pretrained` (a transformers CLIP directory, e.g. openai/clip-vit-large-patch14
or laion/CLIP-ViT-H-14-laion2B-s32B-b79K, with `model.tokenizer` when its tokenizer files are
elsewhere), or, when empty, is initialised at random with the sizes in `model.init` and a word-level
tokenizer over the tiny world's captions. Sharding: one mesh axis 'data' over all devices;
the batch is split over it and params and optimiser state are replicated (fine for scorers that
fit one device; ViT-H training would want FSDP via the models' logical axis names).
Resumes from `workdir/checkpoints` when `checkpoint_every` > 0 and a checkpoint exists.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignax import config as config_lib
from alignax.errors import ConfigError, WeightsError
from alignax.reward_model import loss as reward_training
from alignax.rewards import preprocess
from alignax.training import optim

PyTree = Any
DATA_AXIS = "data"
SCORER_NAME = "scorer"
log = logging.getLogger("alignax")  # shown at INFO by alignax.cli; absl's root logger stays at WARNING

# Differentiable preprocessing by name: (vision image size) -> NHWC [0, 1] images -> normalised NCHW pixels.
# 'clip' is CLIPImageProcessor's (what pickscore / clip_score apply when scoring with the result);
# 'hpsv2' is open_clip's resize-longest-and-pad (HPSv2's own transform).
PREPROCESSING: dict[str, Callable[[int], reward_training.PixelFn]] = {
    "clip": lambda size: functools.partial(preprocess.clip_pixels, size=size, crop_offset="floor"),
    "hpsv2": lambda size: functools.partial(preprocess.hpsv2_pixels, size=size),
}

DATA_GENERATORS = ("tiny_world",)


def default_config() -> ml_collections.ConfigDict:
    """Every field a reward-model run may set, with its default (ConfigError on anything else)."""
    base_optim = config_lib.base_config().optim.to_dict()
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 300
    c.batch_size = 32                # pairs per step, global; divisible by the number of devices
    c.eval_batch_size = 64           # pairs per held-out batch; divisible by the number of devices
    c.eval_every = 100               # held-out accuracy cadence (also at step 0 and at the end); 0: ends only
    c.log_every = 10
    c.checkpoint_every = 0           # 0 disables checkpoints (and resume)
    c.keep_checkpoints = 2
    c.data_parallel = True           # shard the batch over all devices; False: one device
    c.preprocessing = "clip"         # a key of PREPROCESSING
    c.output_dir = ""                # default workdir/scorer
    c.model = ml_collections.ConfigDict(dict(
        pretrained="",               # transformers CLIP directory; empty: random init from `init`
        tokenizer="",                # CLIP tokenizer directory; empty: `pretrained` (or the tiny word tokenizer)
        compute_dtype="float32",
        remat="none",
        init=dict(projection_dim=32, logit_scale=2.6592, hidden_act="quick_gelu",
                  text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=16),
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)),
    ))
    c.data = ml_collections.ConfigDict(dict(
        path="",                     # a preference_pairs dataset (or a root holding preference_pairs/)
        generate="",                 # 'tiny_world': generate under workdir/tiny_world when path is empty
        split="train", eval_split="eval", shuffle=True,
        tiny_world=dict(image_size=32, num_train=256, num_eval=64),
    ))
    c.optim = ml_collections.ConfigDict(base_optim)
    return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """ConfigError naming the first unknown or bad field, before anything is loaded or compiled."""
    config_lib.check_against(default_config().to_dict(), config.to_dict())
    for field in ("total_steps", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints",
                  "optim.learning_rate"):
        value = config
        for part in field.split("."):
            value = value[part]
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"config.{field}={value!r}: expected a positive number")
    for field in ("eval_every", "checkpoint_every"):
        if config[field] < 0:
            raise ConfigError(f"config.{field}={config[field]}: expected >= 0 (0 disables)")
    if config.preprocessing not in PREPROCESSING:
        raise ConfigError(f"config.preprocessing={config.preprocessing!r}: expected one of {sorted(PREPROCESSING)}")
    devices = num_devices if config.data_parallel else 1
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % devices:
            raise ConfigError(f"config.{field}={config[field]} is not divisible by the {devices} devices of the "
                              "data mesh (or set config.data_parallel=False)")
    if config.data.generate and config.data.generate not in DATA_GENERATORS:
        raise ConfigError(f"config.data.generate={config.data.generate!r}: expected one of "
                          f"{list(DATA_GENERATORS)} or ''")
    if config.data.generate and config.data.path:
        raise ConfigError(f"config.data.path={config.data.path!r} and config.data.generate="
                          f"{config.data.generate!r} are both set; keep one")
    if not config.data.generate and not config.data.path:
        raise ConfigError("config.data.path is empty: point it at a preference_pairs dataset, or set "
                          "config.data.generate='tiny_world'")
    if config.model.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.compute_dtype={config.model.compute_dtype!r}: expected float32, "
                          "bfloat16 or float16")
    return config


# --- the scorer: a CLIP and its tokenizer ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scorer:
    pretrained: Any                  # alignax.models.Pretrained (a CLIP)
    tokenizer: Any                   # transformers CLIPTokenizer
    tokenizer_dir: Path

    @property
    def context_length(self) -> int:
        return self.pretrained.module.config.text.max_position_embeddings

    @property
    def image_size(self) -> int:
        return self.pretrained.module.config.vision.image_size

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from alignax.rewards.base import batch_key
        from alignax.rewards.tokenize import clip_tokenize_fn

        out = clip_tokenize_fn(self.tokenizer, SCORER_NAME, self.context_length)(prompts)
        return out[batch_key(SCORER_NAME, "input_ids")], out[batch_key(SCORER_NAME, "attention_mask")]


def random_clip_config(init: dict, tokenizer) -> dict:
    """A transformers CLIP config.json dict for a random-init scorer sized by `config.model.init`."""
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    act = init["hidden_act"]
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": init["projection_dim"],
            "logit_scale_init_value": init["logit_scale"],
            "text_config": {**init["text"], "vocab_size": len(tokenizer.get_vocab()), "hidden_act": act,
                            "projection_dim": init["projection_dim"], **special},
            "vision_config": {**init["vision"], "hidden_act": act, "num_channels": 3,
                              "projection_dim": init["projection_dim"]}}


def build_scorer(model_config: ml_collections.ConfigDict, workdir: Path, seed: int) -> Scorer:
    """Loads `model.pretrained` or initialises a random CLIP (logit_scale set to `init.logit_scale`)."""
    from alignax.models import clip, init_params, load_transformers
    from alignax.models.pretrained import Pretrained
    from alignax.rewards.tokenize import check_vocab, load_clip_tokenizer

    options = dict(compute_dtype=None if model_config.compute_dtype == "float32"
                   else jnp.dtype(model_config.compute_dtype), remat=model_config.remat)
    if model_config.pretrained:
        tokenizer_dir = Path(model_config.tokenizer or model_config.pretrained)
        tokenizer = load_clip_tokenizer(tokenizer_dir, source="config.model.tokenizer")
        pretrained = load_transformers(model_config.pretrained, **options)
        if pretrained.architecture.name != "clip":
            raise WeightsError(f"{model_config.pretrained}: model_type {pretrained.architecture.name!r}; "
                               "config.model.pretrained must be a CLIP (model_type 'clip')")
    else:
        if model_config.tokenizer:
            tokenizer_dir = Path(model_config.tokenizer)
        else:
            from alignax.data.pairs_tokens import tiny_world_words, write_word_tokenizer
            tokenizer_dir = workdir / "tokenizer"
            if jax.process_index() == 0 and not tokenizer_dir.is_dir():
                write_word_tokenizer(tokenizer_dir, tiny_world_words())
            _sync("alignax: tokenizer written")
        tokenizer = load_clip_tokenizer(tokenizer_dir, source="config.model.tokenizer")
        config = random_clip_config(model_config.init.to_dict(), tokenizer)
        try:
            module = clip.build(config, **options)
        except ValueError as e:
            raise ConfigError(f"config.model.init: {e}") from e
        params = init_params(clip.ARCHITECTURE, module, jax.random.key(seed))
        params["logit_scale"] = jnp.asarray(model_config.init.logit_scale, params["logit_scale"].dtype)
        pretrained = Pretrained(module=module, params=params, config=config, architecture=clip.ARCHITECTURE)
    check_vocab(tokenizer, pretrained.module.config.text.vocab_size, f"tokenizer {tokenizer_dir}")
    return Scorer(pretrained=pretrained, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)


def save_scorer(scorer: Scorer, params: PyTree, out_dir: str | os.PathLike) -> Path:
    """transformers CLIP directory + tokenizer files, atomically: `out_dir` appears complete or not at all."""
    from alignax.models import save_transformers
    from alignax.models.weights_io import atomic_directory

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        weights = save_transformers(scorer.pretrained.replace(params=jax.device_get(params)), staging / "weights")
        for file in weights.iterdir():
            os.replace(file, staging / file.name)
        shutil.rmtree(weights)
        scorer.tokenizer.save_pretrained(staging)
    return out_dir


# --- data -------------------------------------------------------------------------------------------


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """The preference_pairs dataset directory, generating the tiny world first when asked to."""
    from alignax.data.setup import dataset_path

    if not config.data.generate:
        return dataset_path(config.data, "preference_pairs")
    root = workdir / config.data.generate
    if jax.process_index() == 0 and not (root / "world.json").exists():
        from alignax.data import build_tiny_world
        build_tiny_world(root, seed=config.seed, **config.data.tiny_world.to_dict())
    _sync("alignax: tiny world written")
    return str(root / "preference_pairs")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# --- the run ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    accuracy: float                  # over non-tie pairs
    loss: float                      # mean HPSv2 loss over all pairs
    pairs: int


@dataclasses.dataclass(frozen=True)
class RunResult:
    final_step: int
    evals: list[EvalResult]
    output_dir: Path                 # where the scorer was saved (not written when preempted)
    params: PyTree
    preempted: bool = False          # SIGTERM: the last step is checkpointed, nothing saved; a rerun resumes


def data_mesh(data_parallel: bool) -> Mesh:
    devices = jax.devices() if data_parallel else jax.devices()[:1]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Trains, evaluates and saves as described in the module docstring; returns the held-out history. Runs in
    the small trainers' frame (alignax.training.small_loop: workdir lock, SIGTERM -> checkpoint and stop,
    status.json, resume from the newest readable checkpoint, metrics.jsonl cut back to it).

    `on_step(done)` is called after every finished step (and its checkpoint); tests raise from it to kill a run."""
    from alignax.training.small_loop import SmallLoop

    config = validate(ml_collections.ConfigDict(config.to_dict()), jax.device_count())
    with SmallLoop.for_config(workdir, config) as loop:
        return _run(config, Path(workdir), loop, on_step)


def _run(config: ml_collections.ConfigDict, workdir: Path, loop, on_step: Callable[[int], None] | None) -> RunResult:
    from alignax.data import Loader, open_dataset
    from alignax.data.pairs_tokens import pairs_for_scorer

    dataset = prepare_data(config, workdir)
    train_source = open_dataset(dataset, config.data.split, kind="preference_pairs")
    eval_source = open_dataset(dataset, config.data.eval_split, kind="preference_pairs")
    scorer = build_scorer(config.model, workdir, config.seed)
    pixels = PREPROCESSING[config.preprocessing](scorer.image_size)
    tx, _ = optim.make_optimizer(config.optim, scorer.pretrained.params, config.total_steps)

    mesh = data_mesh(config.data_parallel)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    state = jax.jit(functools.partial(reward_training.init_state, tx=tx), out_shardings=replicated)(
        scorer.pretrained.params)
    state_shardings = jax.tree.map(lambda _: replicated, state)
    train_step = jax.jit(reward_training.make_train_step(scorer.pretrained.module, tx, pixels),
                         in_shardings=(state_shardings, rows), out_shardings=(state_shardings, replicated),
                         donate_argnums=0)
    eval_step = jax.jit(reward_training.make_eval_step(scorer.pretrained.module, pixels),
                        in_shardings=(replicated, rows, rows), out_shardings=replicated)

    def to_device(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(rows, v) for k, v in host.items()}

    loader = Loader(train_source, global_batch_size=config.batch_size, seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    shuffle=config.data.shuffle)
    eval_loader = Loader(eval_source, global_batch_size=config.eval_batch_size, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(), shuffle=False,
                         prefetch=0)

    def evaluate(params: PyTree, step: int) -> EvalResult:
        sums: dict[str, float] = {}
        for batch_index in range(math.ceil(len(eval_source) / config.eval_batch_size)):
            start = batch_index * config.eval_batch_size + jax.process_index() * eval_loader.local_batch_size
            valid = (np.arange(start, start + eval_loader.local_batch_size) < len(eval_source)).astype(np.float32)
            host = pairs_for_scorer(eval_loader.batch_at(batch_index), scorer.tokenize)
            out = jax.device_get(eval_step(params, to_device(host),
                                           jax.make_array_from_process_local_data(rows, valid)))
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        accuracy = sums["correct"] / sums["counted"] if sums["counted"] else float("nan")
        return EvalResult(step, accuracy, sums["loss_sum"] / sums["pairs"], int(sums["pairs"]))

    evals: list[EvalResult] = []

    def record_eval(state, step: int) -> dict[str, float]:
        result = evaluate(state["params"], step)
        evals.append(result)
        log.info("step %d: held-out pairwise accuracy %.4f, loss %.4f (%d pairs)", step, result.accuracy,
                 result.loss, result.pairs)
        return {"eval/accuracy": result.accuracy, "eval/loss": result.loss}

    def step_fn(state, host):
        return train_step(state, to_device(pairs_for_scorer(host, scorer.tokenize)))

    output_dir = Path(config.output_dir or workdir / "scorer")
    if loop.preempted("while building the scorer"):
        return RunResult(final_step=loop.step, evals=[], output_dir=output_dir, params=None, preempted=True)
    start_step, state = loop.restore(state, state_shardings)
    done = loop.train(state, loader.batches(start_step), step_fn, record_eval, start=start_step, on_step=on_step)
    state = done.state
    if done.preempted:
        return RunResult(final_step=done.final_step, evals=evals, output_dir=output_dir, params=state["params"],
                         preempted=True)
    if jax.process_index() == 0:
        save_scorer(scorer, state["params"], output_dir)
    _sync("alignax: scorer saved")
    return RunResult(final_step=done.final_step, evals=evals, output_dir=output_dir, params=state["params"])


# --- CLI --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    del argv
    result = run(_CONFIG.value, _WORKDIR.value)
    if result.preempted:
        print(f"preempted at step {result.final_step} (SIGTERM); nothing saved but the checkpoint; rerun the same "
              f"command to resume from workdir {_WORKDIR.value}", file=sys.stderr)
        return 0
    first, last = result.evals[0], result.evals[-1]
    print(f"finished at step {result.final_step}: held-out pairwise accuracy {first.accuracy:.3f} (step "
          f"{first.step}) -> {last.accuracy:.3f}; scorer saved to {result.output_dir}", file=sys.stderr)
    return 0


def cli() -> None:
    """`alignax-train-reward` / `python -m alignax.reward_model.train`: flags defined here, not at import."""
    global _CONFIG, _WORKDIR
    from absl import flags
    from ml_collections import config_flags

    from alignax import cli as cli_lib
    from alignax.training import preemption

    preemption.install()  # SIGTERM from here on: a clean stop with exit 0 (a checkpoint once training runs)
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/NAME.py[:ARG]", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory: metrics, checkpoints, the saved scorer")
    flags.mark_flags_as_required(["config", "workdir"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
