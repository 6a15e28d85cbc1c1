"""Training a preference scorer the HPSv2 way: the pure pieces (pair logits, loss, accuracy, jit'd steps).

For one prompt and two images, the scorer's logits are `exp(logit_scale) * cos(text, image_k)`
for k = 0, 1, and the loss is the cross-entropy of those two logits against the human choice
(HPSv2 / PickScore). Pick-a-Pic's ties (label_0 = 0.5) become the soft target (0.5, 0.5),
as PickScore trains on them. `logit_scale` is clamped to [0, ln 100] after every update, the
rule open_clip (which HPSv2 trains with) applies.

A batch here is host data already tokenised: `image_0`, `image_1` (NHWC float in [0, 1]),
`input_ids`, `attention_mask` (int32 [B, L]) and `label_0` (float32 [B]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from alignax.models.clip import l2_normalize

PyTree = Any
Batch = Mapping[str, jax.Array]
PixelFn = Callable[[jax.Array], jax.Array]

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the (log) logit scale to [0, ln 100]


def pair_logits(text_features: jax.Array, image_features_0: jax.Array, image_features_1: jax.Array,
                logit_scale: jax.Array) -> jax.Array:
    """[B, 2] logits `exp(logit_scale) * cos(text, image_k)`; features need not be normalised."""
    text = l2_normalize(text_features)
    cosines = jnp.stack([jnp.sum(text * l2_normalize(image_features_0), axis=-1),
                         jnp.sum(text * l2_normalize(image_features_1), axis=-1)], axis=-1)
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * cosines


def preference_targets(label_0: jax.Array) -> jax.Array:
    """[B, 2] target distribution (label_0, 1 - label_0): one-hot for a choice, (0.5, 0.5) for a tie."""
    label_0 = jnp.asarray(label_0, jnp.float32)
    return jnp.stack([label_0, 1.0 - label_0], axis=-1)


def preference_loss(logits: jax.Array, label_0: jax.Array) -> jax.Array:
    """HPSv2's loss: mean over pairs of the cross-entropy of the two logits against the choice."""
    return jnp.mean(optax.softmax_cross_entropy(logits, preference_targets(label_0)))


def pairwise_correct(logits: jax.Array, label_0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-pair credit, per-pair weight): credit 1 when the preferred image scores higher, 0.5 when
    the scores are equal, 0 otherwise; ties in the label carry weight 0 (no preferred image)."""
    label_0 = jnp.asarray(label_0, jnp.float32)
    margin = (logits[:, 0] - logits[:, 1]) * jnp.sign(label_0 - 0.5)
    credit = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    weight = (label_0 != 0.5).astype(jnp.float32)
    return credit * weight, weight


def pairwise_accuracy(logits: jax.Array, label_0: jax.Array) -> jax.Array:
    """Fraction of non-tie pairs whose preferred image the scorer ranks first (NaN with no such pair)."""
    credit, weight = pairwise_correct(logits, label_0)
    return jnp.sum(credit) / jnp.sum(weight)


def scorer_logits(module: nn.Module, params: PyTree, batch: Batch, pixels: PixelFn) -> jax.Array:
    """[B, 2] pair logits of a CLIP (alignax.models.clip.CLIPModel); both images go through one vision call."""
    variables = {"params": params}
    images = jnp.concatenate([batch["image_0"], batch["image_1"]], axis=0)
    image_features = module.apply(variables, pixels(images), method="get_image_features")
    text_features = module.apply(variables, batch["input_ids"], batch["attention_mask"], method="get_text_features")
    image_0, image_1 = jnp.split(image_features, 2, axis=0)
    return pair_logits(text_features, image_0, image_1, params["logit_scale"])


def clamp_logit_scale(params: PyTree) -> PyTree:
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}


def init_state(params: PyTree, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The train state: a plain dict, so checkpoints and shardings treat it as any pytree."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_train_step(module: nn.Module, tx: optax.GradientTransformation, pixels: PixelFn,
                    ) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, pure; the caller jits it (with donation and shardings)."""
    def loss_fn(params: PyTree, batch: Batch) -> tuple[jax.Array, jax.Array]:
        logits = scorer_logits(module, params, batch, pixels)
        return preference_loss(logits, batch["label_0"]), logits

    def step(state: dict[str, Any], batch: Batch) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = clamp_logit_scale(optax.apply_updates(state["params"], updates))
        metrics = {"loss": loss, "train_accuracy": pairwise_accuracy(logits, batch["label_0"]),
                   "grad_norm": optax.tree.norm(grads), "logit_scale": jnp.exp(params["logit_scale"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics
    return step


def make_eval_step(module: nn.Module, pixels: PixelFn
                   ) -> Callable[[PyTree, Batch, jax.Array], dict[str, jax.Array]]:
    """`eval_step(params, batch, valid) -> sums` of credit, weight and loss over rows where `valid` is 1
    (padding rows of a last, partial batch have valid = 0)."""
    def eval_step(params: PyTree, batch: Batch, valid: jax.Array) -> dict[str, jax.Array]:
        logits = scorer_logits(module, params, batch, pixels)
        credit, weight = pairwise_correct(logits, batch["label_0"])
        losses = optax.softmax_cross_entropy(logits, preference_targets(batch["label_0"]))
        return {"correct": jnp.sum(credit * valid), "counted": jnp.sum(weight * valid),
                "loss_sum": jnp.sum(losses * valid), "pairs": jnp.sum(valid)}
    return eval_step
