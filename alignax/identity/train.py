"""`python -m alignax.identity.train --config=experiments/configs/identity_tiny.py --workdir=DIR` (alignax-train-id).

Trains an IResNet identity embedder (alignax/models/iresnet.py, any depth) with the ArcFace additive angular
margin loss (alignax/identity/loss.py) on an `identity_images` dataset, reports held-out verification accuracy
at step 0, every `eval_every` steps and at the end (`workdir/metrics.jsonl`), and exports the embedder with
`iresnet.save` to `workdir/export` (or `config.output_dir` / `--out`), the directory the `identity` reward
reads through `iresnet.load_any`; with `--export_onnx` (config.export_onnx) also `export/model.onnx` in
insightface's layout (alignax/models/iresnet_onnx.py), which insightface's tools and `load_insightface` read.

Verification: every same-identity pair of the validation (and test) split, and as many different-identity
pairs drawn at random, so chance is 50%. The cosine threshold that best separates the validation pairs is
applied to the test pairs; `eval/verification_accuracy` is the test accuracy at that threshold, and
`eval/cosine_margin` the mean same-identity minus mean different-identity cosine on the test pairs.

Data: `config.data.path` (an identity_images dataset with train / validation / test splits, e.g. written by
`alignax.identity.data.write_identity_images(out, from_identity_directory(images_root, image_size=112))`),
`config.data.images` (a directory per identity, converted to WORKDIR/identity_images once), or
`config.data.generate='synthetic'` (a tiny procedural identity world, alignax.identity.data).

Sharding: one data mesh over all devices (alignax.mesh, axes data × fsdp); the batch is split over it, params
and optimiser state are replicated, and BatchNorm's batch statistics are those of the whole global batch (the
mean under jit over a sharded batch is a global mean). Resume is exact: the checkpoint holds params, BN
running statistics and optimiser state; batch `step` is `Loader.batch_at(step)` and its random flips come from
`fold_in(key(seed), step)`.

The run frame (alignax/training/small_loop.py, shared with alignax.reward_model.train): one run per workdir
(the workdir lock), SIGTERM -> the step checkpointed and a clean stop (exit 0, nothing exported; rerun to
resume), `status.json`, resume from the newest readable checkpoint, metrics.jsonl cut back to it.
"""

from __future__ import annotations

import dataclasses
import functools
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
from alignax import fs
from alignax import mesh as mesh_lib
from alignax.errors import ConfigError, DataError
from alignax.identity import loss as arcface
from alignax.schema import check_against
from alignax.training import optim

PyTree = Any
KIND = "identity_images"
BATCH_AXES = ("data", "fsdp")
DATA_GENERATORS = ("synthetic",)
ONNX_NAME = "model.onnx"             # config.export_onnx: beside the safetensors export
log = logging.getLogger("alignax")


def default_config() -> ml_collections.ConfigDict:
    """Every field an identity-embedder run may set, with its default (ConfigError on anything else)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2000
    c.batch_size = 128               # images per step, global; divisible by the number of devices
    c.eval_batch_size = 128          # images per embedding batch in evaluation; divisible likewise
    c.eval_every = 500               # verification cadence (also at step 0 and at the end); 0: ends only
    c.log_every = 50
    c.checkpoint_every = 500         # 0 disables checkpoints (and resume)
    c.keep_checkpoints = 2
    c.data_parallel = True           # shard the batch over all devices; False: one device
    c.output_dir = ""                # default workdir/export
    c.export_onnx = False            # also write output_dir/model.onnx in insightface's layout (iresnet_onnx)
    c.loss = ml_collections.ConfigDict(dict(
        scale=64.0,                  # s: logits are s·cos
        margin=0.5,                  # m: the true class's logit is s·cos(θ + m)
        easy_margin=False,           # True: margin only where cos θ > 0; False: insightface's threshold handling
    ))
    c.augment = ml_collections.ConfigDict(dict(flip=True))  # random horizontal flips (faces are near-symmetric)
    c.model = ml_collections.ConfigDict(dict(
        pretrained="",               # an insightface .onnx or an iresnet.save directory to start from
        layers=(2, 2, 2, 2),         # IResNet blocks per stage: r18 (2,2,2,2), r50 (3,4,14,3), r100 (3,13,30,3)
        widths=(64, 128, 256, 512),
        stem_width=64,
        embedding_size=512,
        compute_dtype="float32",
    ))
    c.data = ml_collections.ConfigDict(dict(
        path="",                     # an identity_images dataset (train / validation / test splits)
        images="",                   # or a directory per identity, converted under workdir once
        generate="",                 # or 'synthetic': a tiny procedural identity world under workdir
        image_size=112,              # `images`: the size images are resized to
        num_validation=2,            # `images`: held-out images per identity for choosing the threshold
        num_test=2,                  # `images`: held-out images per identity for the reported accuracy
        num_identities=0,            # classes of the ArcFace head; 0: counted from the train split's labels
        split="train", validation_split="validation", test_split="test", shuffle=True,
        max_pairs=3000,              # verification: at most this many same (and as many different) pairs
        synthetic=dict(num_identities=16, images_per_identity=16, image_size=32, num_validation=2, num_test=2),
    ))
    c.optim = ml_collections.ConfigDict(config_lib.base_config().optim.to_dict())
    return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """ConfigError naming the first unknown or bad field, before anything is loaded or compiled."""
    check_against(default_config().to_dict(), config.to_dict())
    for field in ("total_steps", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints",
                  "optim.learning_rate", "loss.scale", "model.stem_width", "model.embedding_size",
                  "data.max_pairs"):
        value = config
        for part in field.split("."):
            value = value[part]
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0):
            raise ConfigError(f"config.{field}={value!r}: expected a positive number")
    for field in ("eval_every", "checkpoint_every", "data.num_identities"):
        value = config
        for part in field.split("."):
            value = value[part]
        if value < 0:
            raise ConfigError(f"config.{field}={value}: expected >= 0 (0: see its comment in default_config)")
    if not 0 <= config.loss.margin < math.pi / 2:
        raise ConfigError(f"config.loss.margin={config.loss.margin}: expected an angle in radians in [0, pi/2) "
                          "(ArcFace uses 0.5)")
    layers, widths = tuple(config.model.layers), tuple(config.model.widths)
    if not layers or any(not isinstance(n, int) or n < 1 for n in layers):
        raise ConfigError(f"config.model.layers={layers}: expected positive block counts per stage")
    if len(widths) != len(layers) or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"config.model.widths={widths}: expected one positive width per stage of "
                          f"config.model.layers={layers}")
    if config.model.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.compute_dtype={config.model.compute_dtype!r}: expected float32, "
                          "bfloat16 or float16")
    devices = num_devices if config.data_parallel else 1
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % devices:
            raise ConfigError(f"config.{field}={config[field]} is not divisible by the {devices} devices of the "
                              "data mesh (or set config.data_parallel=False)")
    sources = {k: config.data[k] for k in ("path", "images", "generate") if config.data[k]}
    if len(sources) != 1:
        which = " and ".join(f"config.data.{k}={v!r}" for k, v in sources.items()) or "none of them"
        raise ConfigError(f"set exactly one of config.data.path (a dataset), config.data.images (a directory per "
                          f"identity) and config.data.generate ('synthetic'); found {which}")
    if config.data.generate and config.data.generate not in DATA_GENERATORS:
        raise ConfigError(f"config.data.generate={config.data.generate!r}: expected one of {list(DATA_GENERATORS)}")
    return config


# --- the model: an IResNet and the ArcFace class centres -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    """The IResNet to train (Flax BN convention: `batch_stats` beside `params`) and what `iresnet.save` needs."""

    module: Any                      # iresnet.IResNet, NHWC input, stats_collection='batch_stats'
    params: PyTree
    batch_stats: PyTree
    config: dict                     # iresnet.config_of(module): what the export's config.json holds

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 NHWC -> what the network takes: (x − 127.5) / 127.5 for IResNets trained here and insightface's
        torch-converted files; a file whose graph normalises its own input says so in its config."""
        mean, std = self.config.get("input_mean", 127.5), self.config.get("input_std", 127.5)
        return (images.astype(jnp.float32) - mean) / std


def build_model(model_config: ml_collections.ConfigDict, image_shape: tuple[int, int, int], seed: int) -> Model:
    """`model.pretrained` (an insightface .onnx or an `iresnet.save` directory) to fine-tune, or a random IResNet
    of the configured size whose fc fits `image_shape`."""
    from alignax.models import iresnet

    dtype = None if model_config.compute_dtype == "float32" else jnp.dtype(model_config.compute_dtype)
    if model_config.pretrained:
        loaded = iresnet.load_any(model_config.pretrained)
        module = iresnet.build(loaded.config, compute_dtype=dtype, stats_collection="batch_stats",
                               input_layout="NHWC")
        if tuple(module.input_size) != tuple(image_shape[:2]):
            raise ConfigError(f"config.model.pretrained={model_config.pretrained!r} takes {module.input_size[0]}x"
                              f"{module.input_size[1]} images, the dataset has {image_shape[0]}x{image_shape[1]}: "
                              "rebuild the dataset at that size (config.data.image_size)")
        params, batch_stats = iresnet.split_stats(loaded.params)
        config = dict(loaded.config)
    else:
        module = iresnet.IResNet(layers=tuple(model_config.layers), widths=tuple(model_config.widths),
                                 stem_width=model_config.stem_width, embedding_size=model_config.embedding_size,
                                 input_size=tuple(image_shape[:2]), stats_collection="batch_stats",
                                 input_layout="NHWC", compute_dtype=dtype)
        dummy = jnp.zeros((1, *image_shape), jnp.float32)
        # An 'rbg' key: XLA:CPU compiles the ~60 threefry truncated-normal initialisers of an IResNet in tens of
        # seconds, RngBitGenerator in a few (the draw only has to be deterministic per seed and backend).
        variables = jax.jit(module.init)(jax.random.key(seed, impl="rbg"), dummy)
        params, batch_stats = variables["params"], variables["batch_stats"]
        config = iresnet.config_of(module)
    return Model(module=module, params=params, batch_stats=batch_stats, config=config)


def init_head(embedding_size: int, num_identities: int, seed: int) -> np.ndarray:
    """ArcFace class centres [D, C], normal(0, 0.01) as insightface initialises them (only directions matter);
    drawn by numpy, which costs no compilation."""
    rng = np.random.default_rng([seed, 1])
    return rng.normal(0.0, 0.01, (embedding_size, num_identities)).astype(np.float32)


# --- data -------------------------------------------------------------------------------------------------------


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """The identity_images dataset directory, converting or generating it first when asked to."""
    from alignax.identity import data as id_data

    if config.data.path:
        return config.data.path
    if config.data.generate:
        out = fs.join(os.fspath(workdir), "synthetic_identities")
        make = functools.partial(id_data.synthetic_identities, seed=config.seed, **config.data.synthetic.to_dict())
    else:
        out = fs.join(os.fspath(workdir), "identity_images")
        make = functools.partial(id_data.from_identity_directory, config.data.images,
                                 image_size=config.data.image_size, num_validation=config.data.num_validation,
                                 num_test=config.data.num_test, seed=config.seed)
    if jax.process_index() == 0 and not fs.exists(fs.join(out, "dataset_info.json")):
        id_data.write_identity_images(out, make())
    _sync("alignax: identity dataset written")
    return out


def count_identities(source) -> int:
    """1 + the largest label of a split (reads every record: set config.data.num_identities for big datasets)."""
    labels = [int(r["label"]) for start in range(0, len(source), 512)
              for r in source.get_many(range(start, min(start + 512, len(source))))]
    return max(labels) + 1


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# --- verification --------------------------------------------------------------------------------------------


def verification_pairs(labels: np.ndarray, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [P, 2] of indices, same [P] bool): every same-identity pair (at most `max_pairs`, drawn at random
    when there are more) and as many different-identity pairs drawn at random, so chance is 50%."""
    rng = np.random.default_rng(seed)
    i, j = np.triu_indices(len(labels), k=1)
    same = labels[i] == labels[j]
    same_pairs, diff_pairs = np.flatnonzero(same), np.flatnonzero(~same)
    if not len(same_pairs) or not len(diff_pairs):
        raise DataError(f"verification needs two images of one identity and two identities; found {len(labels)} "
                        f"images of {len(np.unique(labels))} identities")
    n = min(len(same_pairs), len(diff_pairs), max_pairs)
    chosen = np.concatenate([rng.choice(same_pairs, n, replace=False), rng.choice(diff_pairs, n, replace=False)])
    return np.stack([i[chosen], j[chosen]], axis=1), same[chosen]


def best_threshold(similarity: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the cosine threshold t maximising the accuracy of 'same identity iff sim > t'
    (t halfway between neighbouring similarities, so it generalises to unseen pairs)."""
    order = np.argsort(similarity, kind="stable")
    sims, truth = similarity[order], same[order]
    # Threshold below position k: pairs [0, k) are called different, [k, n) same.
    diff_below = np.concatenate([[0], np.cumsum(~truth)])
    same_above = np.concatenate([np.cumsum(truth[::-1])[::-1], [0]])
    correct = diff_below + same_above
    # Only cut between distinct similarities.
    valid = np.concatenate([[True], sims[1:] > sims[:-1], [True]])
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:
        t = sims[0] - 1e-6
    elif k == len(sims):
        t = sims[-1] + 1e-6
    else:
        t = 0.5 * (sims[k - 1] + sims[k])
    return float(t), float(correct[k] / len(sims))


def pair_similarity(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    return np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=-1)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    step: int
    verification_accuracy: float     # test pairs, at the validation threshold
    validation_accuracy: float       # validation pairs, at their own best threshold
    threshold: float
    same_cosine: float               # mean cosine of same-identity test pairs
    different_cosine: float          # mean cosine of different-identity test pairs
    pairs: int                       # test pairs

    @property
    def cosine_margin(self) -> float:
        return self.same_cosine - self.different_cosine

    def metrics(self) -> dict[str, float]:
        return {"eval/verification_accuracy": self.verification_accuracy,
                "eval/validation_accuracy": self.validation_accuracy, "eval/threshold": self.threshold,
                "eval/same_cosine": self.same_cosine, "eval/different_cosine": self.different_cosine,
                "eval/cosine_margin": self.cosine_margin}


def verification(validation: tuple[np.ndarray, np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray, np.ndarray], step: int) -> EvalResult:
    """Each argument: (embeddings [N, D], pairs [P, 2], same [P])."""
    val_sim = pair_similarity(validation[0], validation[1])
    threshold, val_accuracy = best_threshold(val_sim, validation[2])
    test_sim = pair_similarity(test[0], test[1])
    same = test[2]
    accuracy = float(np.mean((test_sim > threshold) == same))
    return EvalResult(step, accuracy, val_accuracy, threshold, float(test_sim[same].mean()),
                      float(test_sim[~same].mean()), len(same))


# --- the run ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    final_step: int
    evals: list[EvalResult]
    output_dir: str                  # where the embedder was exported ('' when preempted: nothing exported)
    params: PyTree                   # IResNet params with BN statistics merged in (iresnet.merge_stats), as exported
    preempted: bool = False          # SIGTERM: the last step is checkpointed, nothing exported; a rerun resumes


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Trains, evaluates and exports as described in the module docstring, inside the small trainers' run
    frame (alignax.training.small_loop: workdir lock, SIGTERM -> checkpoint and stop, status.json, resume
    from the newest readable checkpoint, metrics.jsonl cut back to it).

    `on_step(done)` is called after every finished step (and its checkpoint); tests raise from it to kill a run."""
    from alignax.training.small_loop import SmallLoop

    config = validate(ml_collections.ConfigDict(config.to_dict()), jax.device_count())
    with SmallLoop.for_config(workdir, config) as loop:
        return _run(config, Path(workdir), loop, on_step)


def _run(config: ml_collections.ConfigDict, workdir: Path, loop, on_step: Callable[[int], None] | None) -> RunResult:
    from alignax.data import Loader, open_dataset
    from alignax.models import iresnet

    dataset = prepare_data(config, workdir)
    if loop.preempted("while preparing the data"):
        return RunResult(final_step=loop.step, evals=[], output_dir="", params=None, preempted=True)
    train_source = open_dataset(dataset, config.data.split, kind=KIND)
    eval_sources = [open_dataset(dataset, split, kind=KIND)
                    for split in (config.data.validation_split, config.data.test_split)]
    image_shape = tuple(int(d) for d in train_source[0]["image"].shape)
    num_identities = config.data.num_identities or count_identities(train_source)
    model = build_model(config.model, image_shape, config.seed)
    module = model.module
    params = {"backbone": model.params,
              "head": init_head(module.embedding_size, num_identities, config.seed)}
    tx, _ = optim.make_optimizer(config.optim, params, config.total_steps)

    devices = jax.devices() if config.data_parallel else jax.devices()[:1]
    mesh = mesh_lib.make_mesh((-1, 1, 1), devices=devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def init_state(params, batch_stats):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
                "opt_state": tx.init(params)}

    state = jax.jit(init_state, out_shardings=replicated)(params, model.batch_stats)
    state_shardings = jax.tree.map(lambda _: replicated, state)
    loss_options = dict(scale=float(config.loss.scale), margin=float(config.loss.margin),
                        easy_margin=bool(config.loss.easy_margin))
    base_key = jax.random.key(config.seed)

    def train_step(state, images, labels):
        x = model.normalize(images)
        if config.augment.flip:
            rng = jax.random.fold_in(base_key, state["step"])
            flip = jax.random.bernoulli(rng, 0.5, (x.shape[0],))
            x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)

        def loss_fn(params):
            # BN normalises with this global batch's statistics (a mean over the sharded batch axis under jit)
            # and returns the updated running averages.
            embeddings, updated = module.apply({"params": params["backbone"], "batch_stats": state["batch_stats"]},
                                               x, train=True, mutable=["batch_stats"])
            loss, metrics = arcface.arcface_loss(embeddings, params["head"], labels, **loss_options)
            return loss, (metrics, updated["batch_stats"])

        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "batch_stats": batch_stats, "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    train_step = jax.jit(train_step, in_shardings=(state_shardings, rows, rows),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)

    @functools.partial(jax.jit, in_shardings=(replicated, replicated, rows), out_shardings=replicated)
    def embed(params, batch_stats, images):
        return module.apply({"params": params["backbone"], "batch_stats": batch_stats}, model.normalize(images),
                            train=False).astype(jnp.float32)

    def to_device(array: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(rows, array)

    loader = Loader(train_source, global_batch_size=config.batch_size, seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    shuffle=config.data.shuffle)
    eval_sets = []
    for index, source in enumerate(eval_sources):
        eval_loader = Loader(source, global_batch_size=config.eval_batch_size, seed=config.seed,
                             process_index=jax.process_index(), process_count=jax.process_count(), shuffle=False,
                             prefetch=0)
        batches = [eval_loader.batch_at(b) for b in range(math.ceil(len(source) / config.eval_batch_size))]
        labels = np.asarray([int(r["label"]) for r in source.get_many(range(len(source)))], np.int64)
        _check_labels(labels, num_identities, source)
        pairs, same = verification_pairs(labels, config.data.max_pairs, config.seed * 2 + index)
        eval_sets.append(([b["image"] for b in batches], len(source), pairs, same))

    def evaluate(state, step: int) -> EvalResult:
        parts = []
        for images, count, pairs, same in eval_sets:
            embeddings = np.concatenate([np.asarray(jax.device_get(
                embed(state["params"], state["batch_stats"], to_device(x)))) for x in images])[:count]
            parts.append((embeddings, pairs, same))
        return verification(parts[0], parts[1], step)

    def step_fn(state, host):
        _check_labels(host["label"], num_identities, train_source)
        return train_step(state, to_device(host["image"]), to_device(host["label"]))

    evals: list[EvalResult] = []

    def record_eval(state, step: int) -> dict[str, float]:
        result = evaluate(state, step)
        evals.append(result)
        log.info("step %d: verification accuracy %.4f (threshold %.3f from validation accuracy %.4f), "
                 "same-different cosine margin %.4f over %d pairs", step, result.verification_accuracy,
                 result.threshold, result.validation_accuracy, result.cosine_margin, result.pairs)
        return result.metrics()

    if loop.preempted("while building the model"):
        return RunResult(final_step=loop.step, evals=[], output_dir="", params=None, preempted=True)
    start_step, state = loop.restore(state, state_shardings)
    done = loop.train(state, loader.batches(start_step), step_fn, record_eval, start=start_step, on_step=on_step)
    state = done.state
    params = iresnet.merge_stats(*jax.device_get((state["params"]["backbone"], state["batch_stats"])))
    if done.preempted:
        return RunResult(final_step=done.final_step, evals=evals, output_dir="", params=params, preempted=True)
    output_dir = config.output_dir or fs.join(fs.absolute(workdir), "export")
    if jax.process_index() == 0:
        iresnet.save((model.config, params), output_dir)
        if config.export_onnx:
            from alignax.models.iresnet_onnx import export_onnx
            export_onnx((model.config, params), fs.join(output_dir, ONNX_NAME))
    _sync("alignax: identity embedder exported")
    return RunResult(final_step=done.final_step, evals=evals, output_dir=output_dir, params=params)


def _check_labels(labels: np.ndarray, num_identities: int, source) -> None:
    """One-hot of an out-of-range label is all zeros under jit: refuse it by name instead."""
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= num_identities)]
    if bad.size:
        raise DataError(f"{source.path} split {source.split!r}: label {int(bad[0])} is outside [0, {num_identities}) "
                        "(config.data.num_identities, or 1 + the train split's largest label)")


# --- CLI --------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    del argv
    config = _CONFIG.value
    if _OUT.value or _EXPORT_ONNX.value:
        config = ml_collections.ConfigDict(config.to_dict())
        config.output_dir = _OUT.value or config.output_dir
        config.export_onnx = config.export_onnx or _EXPORT_ONNX.value
    result = run(config, _WORKDIR.value)
    if result.preempted:
        print(f"preempted at step {result.final_step} (SIGTERM); nothing exported; rerun the same command to "
              f"resume from workdir {_WORKDIR.value}", file=sys.stderr)
        return 0
    first, last = result.evals[0], result.evals[-1]
    print(f"wrote the identity embedder of step {result.final_step} (held-out verification accuracy "
          f"{first.verification_accuracy:.3f} at step {first.step} -> {last.verification_accuracy:.3f}, same-minus-"
          f"different cosine margin {last.cosine_margin:.3f}) to {result.output_dir}", file=sys.stderr)
    return 0


def cli() -> None:
    """`alignax-train-id` / `python -m alignax.identity.train`: flags defined here, not at import."""
    global _CONFIG, _WORKDIR, _OUT, _EXPORT_ONNX
    from absl import flags
    from ml_collections import config_flags

    from alignax import cli as cli_lib
    from alignax.training import preemption

    preemption.install()  # SIGTERM from here on: a clean stop with exit 0 (a checkpoint once training runs)

    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/NAME.py[:ARG]", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory: metrics, checkpoints, the export")
    _OUT = flags.DEFINE_string("out", "", "export directory (default: config.output_dir or WORKDIR/export)")
    _EXPORT_ONNX = flags.DEFINE_bool("export_onnx", False, "also write EXPORT/model.onnx in insightface's layout "
                                     "(same as --config.export_onnx=True)")
    flags.mark_flags_as_required(["config", "workdir"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
