"""The `Reward` object and the registry `alignax.rewards.get` dispatches through.

A reward is a pure function of (params, images, batch) plus the params themselves, kept
apart so that a 1B-param scorer enters `jax.jit` as an argument (sharded by its logical
axis names) instead of being baked into the executable as constants. Tokenisation is host
work: `prepare(prompts)` runs in the data pipeline and returns numpy arrays for the batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.errors import ConfigError, DataError
from alignax.registry import Registry

PyTree = Any
Batch = Mapping[str, Any]
ScoreFn = Callable[[PyTree, jax.Array, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def _no_text(prompts: list[str]) -> dict[str, np.ndarray]:
    return {}


@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
    """A differentiable (unless flagged) scorer of NHWC images in [0, 1]; higher is better.

    name: the instance name (`config.rewards.<name>`); the prefix of every batch key the reward reads
      and writes, so two instances of one kind (say two `clip_score` with different tokenizers) keep
      their token ids apart.
    score_fn: pure and jit-able `(params, images, batch) -> (scores[B], info)`.
    params: plain pytree of weights (empty for toy rewards).
    specs: logical PartitionSpecs with the structure of `params`.
    tokenize: host-side `prompts -> {batch key: np.ndarray}`.
    host_fields: host batch fields beyond `prompt` the reward reads (e.g. `identity`, a string per
      sample); the data pipeline checks they are present and hands the host batch to `host_fn`.
    host_fn: host-side `host batch -> {batch key: np.ndarray}`, for inputs that must be computed
      from non-array fields (strings never reach the device), e.g. per-sample reference embeddings.
    range: what values the scores take, in words.
    preprocessing: how images are brought to the scorer's input, in words.
    """

    name: str
    score_fn: ScoreFn
    params: PyTree = dataclasses.field(default_factory=dict)
    specs: PyTree = dataclasses.field(default_factory=dict)
    tokenize: Callable[[list[str]], dict[str, np.ndarray]] = _no_text
    host_fields: tuple[str, ...] = ()
    host_fn: Callable[[Batch], dict[str, np.ndarray]] | None = None
    differentiable: bool = True
    higher_is_better: bool = True
    range: str = ""
    preprocessing: str = ""
    kind: str = ""  # the registry name it was built from; `get` fills it in (defaults to `name`)

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", self.name)

    def apply(self, params: PyTree, images: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure: scores[B] and an info dict of per-image diagnostics."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"reward {self.name!r}: images must be NHWC with 3 channels, found shape {images.shape}")
        return self.score_fn(params, images, batch)

    def __call__(self, images: jax.Array, batch: Batch | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """DESIGN.md's `reward(images, batch)`; under jit prefer `apply` so params stay arguments."""
        return self.apply(self.params, images, batch or {})

    def prepare(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Host-side inputs (token ids) for `batch`, under keys prefixed by `name + '/'`."""
        return self.tokenize(list(prompts))

    def prepare_batch(self, host_batch: Batch) -> dict[str, np.ndarray]:
        """All host-side inputs for `batch`: token ids of `host_batch['prompt']` and `host_fn`'s arrays.
        A missing `host_fields` entry is a DataError naming the field."""
        extra = self.prepare([str(p) for p in host_batch["prompt"]]) if "prompt" in host_batch else {}
        missing = [f for f in self.host_fields if f not in host_batch]
        if missing:
            raise DataError(f"reward {self.name!r} reads the batch fields {missing}, which the batch lacks (it has "
                            f"{sorted(host_batch)}); add them to the prompts dataset")
        if self.host_fn is not None:
            extra.update(self.host_fn(host_batch))
        return extra

    def logical_specs(self) -> PyTree:
        """Logical axis names ('embed', 'heads', 'mlp', ...) of every param, for sharding over the mesh."""
        return self.specs


def batch_key(reward_name: str, field: str) -> str:
    """Batch keys are namespaced per reward: two scorers may tokenise the same prompt differently."""
    return f"{reward_name}/{field}"


def take(batch: Batch, reward_name: str, field: str) -> Any:
    key = batch_key(reward_name, field)
    if key not in batch:
        raise DataError(f"reward {reward_name!r}: batch has no {key!r} (found {sorted(batch)}); "
                        f"fill it with reward.prepare_batch(host_batch) (or reward.prepare(prompts))")
    return batch[key]


def info_metrics(reward_name: str, info: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A reward's `info` as scalar metrics `reward/<name>/info/<key>`: per-sample [B] entries by
    their batch mean (a 0/1 flag becomes a fraction), scalars as they are (counts); others skipped.
    Under gradient accumulation the trainer averages metrics over micro-batches."""
    out = {}
    for key, value in info.items():
        value = jnp.asarray(value)
        if value.ndim <= 1 and value.size:
            out[f"reward/{reward_name}/info/{key}"] = jnp.mean(value.astype(jnp.float32))
    return out


REGISTRY: Registry[Callable[..., Reward]] = Registry("reward kind")


def register(*names: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Registers a factory `(name, **kwargs) -> Reward` under one or more reward kinds.

    `name` is the instance name (the batch-key prefix); a factory registered under several kinds
    declares a keyword `kind` and is told which one was asked for."""
    return REGISTRY.decorator(*names)


# Factory parameters that `get` fills in itself: never reward settings.
RESERVED = ("name", "kind")


def get(kind: str, *, name: str | None = None, **kwargs: Any) -> Reward:
    """Builds a reward of the registered `kind`; kwargs are its checkpoint paths and options.

    `name` is the instance name (`config.rewards.<name>`, default: the kind): it prefixes the batch
    keys the reward writes in `prepare` and reads in `apply`."""
    factory = REGISTRY.lookup(kind)
    name = kind if name is None else name
    parameters = inspect.signature(factory).parameters
    if "kind" in parameters:
        kwargs = {**kwargs, "kind": kind}
    try:
        inspect.signature(factory).bind(name, **kwargs)
    except TypeError as e:
        accepted = [p for p in parameters if p not in RESERVED]
        raise ConfigError(f"reward {name!r}: {e}; it accepts {accepted}") from e
    reward = factory(name, **kwargs)
    return dataclasses.replace(reward, name=name, kind=kind)


def require_path(value: Any, reward_name: str, kwarg: str, expected: str) -> str:
    """A path kwarg must be given; whether it exists is checked by the loader, which names it."""
    if value is None:
        raise ConfigError(f"reward {reward_name!r} needs {kwarg}=<{expected}>")
    return str(value)
