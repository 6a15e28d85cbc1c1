"""The optimiser: AdamW with a learning-rate schedule, global-norm clipping and regex parameter groups.

Parameter groups follow big_vision: a param is named by its '/'-joined path
('transformer_blocks.0/attn/to_q/kernel') and config regexes pick groups by name.
Regexes use `re.search`, so anchor them ('^', '$', '(^|/)') when a prefix or suffix matters.

- `frozen`: params that get exactly zero updates and carry no optimiser state (no Adam
  moments), so freezing half a model also halves the optimiser memory.
- `lr_mults`: (regex, multiplier) pairs; the first matching pair scales that param's
  whole update (Adam step and decoupled weight decay alike).

The MM-DiT sin-cos position table is a fixed buffer in diffusers, stored as a param here;
`DEFAULT_FROZEN` freezes it always, so weight decay can never drift it.

Gradient clipping measures the global norm over trainable params only: gradients of
frozen params are discarded and must not shrink the step of the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax

from alignax.errors import ConfigError

PyTree = Any
FROZEN = "frozen"
TRAINABLE = "trainable"

# Fixed buffers stored as params: never trained. Exempt from the "regex matches nothing"
# check, so they also apply to trees without them (LoRA params).
DEFAULT_FROZEN: tuple[str, ...] = (r"(^|/)pos_embed/pos_embed$",)


def param_path(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a `jax.tree_util` key path: the name regexes are matched against."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _map_with_names(fn: Callable[[str], Any], params: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(param_path(path)), params)


# --- schedules -----------------------------------------------------------------------------------


def _required(cfg: Mapping[str, Any], name: str, field_prefix: str) -> Any:
    if name not in cfg or cfg[name] is None:
        raise ConfigError(f"{field_prefix}.{name}: missing; the optimiser needs it")
    return cfg[name]


def _constant(lr: float, warmup: int, total_steps: int | None, end_fraction: float) -> optax.Schedule:
    del total_steps, end_fraction
    return optax.warmup_constant_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)


def _cosine(lr: float, warmup: int, total_steps: int | None, end_fraction: float) -> optax.Schedule:
    if total_steps is None or total_steps <= warmup:
        raise ConfigError(f"total_steps={total_steps}: the cosine schedule needs total_steps > "
                          f"optim.warmup_steps={warmup}")
    # optax counts decay_steps from step 0, warmup included: the cosine ends at total_steps.
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=total_steps, end_value=lr * end_fraction)


# name -> (learning_rate, warmup_steps, total_steps, end_lr_fraction) -> schedule
SCHEDULES: dict[str, Callable[[float, int, int | None, float], optax.Schedule]] = {
    "constant": _constant,
    "cosine": _cosine,
}


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int | None = None, *,
                  field_prefix: str = "config.optim") -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then `cfg.schedule` ('constant' | 'cosine').

    `total_steps` is the run length (top-level `config.total_steps`); when not given,
    `cfg.total_steps` is used. The cosine decays to `learning_rate * end_lr_fraction` at `total_steps`.
    """
    lr = float(_required(cfg, "learning_rate", field_prefix))
    warmup = int(cfg.get("warmup_steps", 0) or 0)
    name = cfg.get("schedule", "constant")
    end_fraction = float(cfg.get("end_lr_fraction", 0.0) or 0.0)
    total_steps = total_steps if total_steps is not None else cfg.get("total_steps")
    if name not in SCHEDULES:
        raise ConfigError(f"{field_prefix}.schedule={name!r}: expected one of {sorted(SCHEDULES)}")
    if not lr > 0:
        raise ConfigError(f"{field_prefix}.learning_rate={lr}: expected a positive number")
    if warmup < 0:
        raise ConfigError(f"{field_prefix}.warmup_steps={warmup}: expected >= 0")
    if not 0.0 <= end_fraction <= 1.0:
        raise ConfigError(f"{field_prefix}.end_lr_fraction={end_fraction}: expected a value in [0, 1]")
    return SCHEDULES[name](lr, warmup, total_steps, end_fraction)


# --- parameter groups ----------------------------------------------------------------------------


def _compile(pattern: str, field: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"{field}: expected a regex string, found {type(pattern).__name__} {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field}: {pattern!r} is not a valid regex ({e})") from e


def _check_all_match(patterns: Sequence[tuple[str, re.Pattern]], names: Sequence[str], field: str) -> None:
    for text, pattern in patterns:
        if not any(pattern.search(name) for name in names):
            example = names[0] if names else "<no params>"
            raise ConfigError(f"{field}: regex {text!r} matches no parameter (paths look like {example!r})")


def _frozen_patterns(params: PyTree, cfg: Mapping[str, Any], field_prefix: str) -> list[re.Pattern]:
    names = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    user = [(text, _compile(text, f"{field_prefix}.frozen[{i}]"))
            for i, text in enumerate(cfg.get("frozen", ()) or ())]
    _check_all_match(user, names, f"{field_prefix}.frozen")
    return [re.compile(p) for p in DEFAULT_FROZEN] + [p for _, p in user]


def param_labels(params: PyTree, cfg: Mapping[str, Any], *, field_prefix: str = "config.optim") -> PyTree:
    """'frozen' or 'trainable' per param, same tree structure as `params`."""
    frozen = _frozen_patterns(params, cfg, field_prefix)
    return _map_with_names(lambda name: FROZEN if any(p.search(name) for p in frozen) else TRAINABLE, params)


def trainable_mask(params: PyTree, cfg: Mapping[str, Any], *, field_prefix: str = "config.optim") -> PyTree:
    """True where a param is trained."""
    return jax.tree.map(lambda label: label == TRAINABLE, param_labels(params, cfg, field_prefix=field_prefix))


def lr_multipliers(params: PyTree, cfg: Mapping[str, Any], *, field_prefix: str = "config.optim") -> PyTree:
    """The update multiplier of every param: the first matching `lr_mults` pair, else 1.0."""
    names = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    pairs = []
    for i, pair in enumerate(cfg.get("lr_mults", ()) or ()):
        field = f"{field_prefix}.lr_mults[{i}]"
        if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
            raise ConfigError(f"{field}: expected a (regex, multiplier) pair, found {pair!r}")
        text, mult = pair
        if not isinstance(mult, int | float) or isinstance(mult, bool) or mult < 0:
            raise ConfigError(f"{field}: multiplier must be a non-negative number, found {mult!r}")
        pairs.append((text, _compile(text, field), float(mult)))
    _check_all_match([(t, p) for t, p, _ in pairs], names, f"{field_prefix}.lr_mults")

    def mult_of(name: str) -> float:
        return next((m for _, p, m in pairs if p.search(name)), 1.0)

    return _map_with_names(mult_of, params)


def scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
    """Multiplies each update by a per-param constant (leaves equal to 1.0 cost nothing)."""
    def scale(updates: PyTree, params: PyTree = None) -> PyTree:
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers)
    return optax.stateless(scale)


# --- the optimiser -------------------------------------------------------------------------------


def make_optimizer(cfg: ml_collections.ConfigDict, params: PyTree, total_steps: int | None = None, *,
                   field_prefix: str = "config.optim") -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + schedule + global-norm clipping + frozen / lr-multiplier groups, from `config.optim`.

    `params` may be real arrays or `jax.ShapeDtypeStruct`s: only the tree and names are used.
    Decoupled weight decay (scaled by the learning rate, as in torch AdamW) applies to every
    trainable param. `grad_clip_norm` of 0 or None disables clipping.
    """
    schedule = make_schedule(cfg, total_steps, field_prefix=field_prefix)
    labels = param_labels(params, cfg, field_prefix=field_prefix)
    multipliers = lr_multipliers(params, cfg, field_prefix=field_prefix)
    clip = cfg.get("grad_clip_norm", None)
    if clip is not None and not clip >= 0:
        raise ConfigError(f"{field_prefix}.grad_clip_norm={clip}: expected >= 0 (0 or None disables clipping)")
    weight_decay = float(cfg.get("weight_decay", 0.0) or 0.0)
    if weight_decay < 0:
        raise ConfigError(f"{field_prefix}.weight_decay={weight_decay}: expected >= 0")

    trainable = optax.chain(
        optax.clip_by_global_norm(float(clip)) if clip else optax.identity(),
        optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                    eps=float(cfg.get("eps", 1e-8)), weight_decay=weight_decay),
    )
    # multi_transform hands each branch only its own params: the frozen branch keeps no state
    # and the clip norm sees trainable gradients only.
    tx = optax.chain(
        optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels),
        scale_by_tree(multipliers),
    )
    return tx, schedule
