"""What an objective is, and the models it may call.

An objective is a pure loss function of explicit pytrees,
`loss(trainable, frozen, state, batch, rng) -> (loss, (metrics, new_state))`, so the
trainer can jit, shard, differentiate and checkpoint every objective the same way:

- `trainable`: {'transformer': MM-DiT params or LoRA params, plus any objective heads}
- `frozen`: params that are inputs but never updated: the LoRA base, the reference
  model, the VAE and reward models
- `state`: objective state that is not trained but must survive a resume (running
  reward statistics, an online reference)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, tuple[dict, PyTree]]]


@dataclasses.dataclass(frozen=True)
class Models:
    """The networks of a run as pure functions of explicit params; built once from the config.

    transformer: the MM-DiT Flax module. vae: the AutoencoderKL module. lora: an
    `alignax.training.lora.LoraSpec` when LoRA is on. rewards: configured rewards by name.
    """

    transformer: Any
    vae: Any
    vae_scaling_factor: float
    vae_shift_factor: float
    lora: Any = None
    rewards: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def transformer_params(self, trainable: PyTree, frozen: PyTree) -> PyTree:
        """The MM-DiT params the forward pass uses: LoRA folded into the frozen base when on."""
        if self.lora is None:
            return trainable["transformer"]
        from alignax.training import lora
        return lora.merge(frozen["transformer_base"], trainable["transformer"], self.lora)

    def reference_params(self, trainable: PyTree, frozen: PyTree) -> PyTree:
        """The frozen starting model: with LoRA it is the base with LoRA switched off (no extra copy)."""
        if self.lora is not None:
            return frozen["transformer_base"]
        return frozen["reference"]

    def velocity(self, params: PyTree, x: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array,
                 **kwargs: Any) -> Any:
        """MM-DiT velocity, NHWC; `timestep` in [0, 1000] like diffusers."""
        return self.transformer.apply({"params": params}, x, timestep, context, pooled, method="forward_nhwc",
                                      **kwargs)

    def velocity_fn(self, params: PyTree) -> Callable:
        return lambda x, t, c, p: self.velocity(params, x, t, c, p)

    def encode(self, frozen: PyTree, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Images NHWC in [0, 1] → scaled latents NHWC; a posterior sample when `rng` is given."""
        x = images.astype(jnp.float32) * 2.0 - 1.0
        mean, logvar = self.vae.apply({"params": frozen["vae"]}, x, method="latent_dist_nhwc")
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return (z - self.vae_shift_factor) * self.vae_scaling_factor

    def decode(self, frozen: PyTree, latents: jax.Array) -> jax.Array:
        """Scaled latents NHWC → images NHWC in [0, 1] (clipped softly by the caller if needed)."""
        z = latents / self.vae_scaling_factor + self.vae_shift_factor
        x = self.vae.apply({"params": frozen["vae"]}, z, method="decode_nhwc")
        return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        cfg = self.transformer.config
        return batch, cfg.sample_size, cfg.sample_size, cfg.in_channels


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What an objective may read of the run besides its own `config.objective` fields: the sampler
    settings (`config.sample`) and the reward trade-off, `config.pareto` resolved once into the
    keyword arguments of `alignax.pareto.multi_reward_loss` (None when the run has no rewards)."""

    num_steps: int = 10
    shift: float = 3.0
    guidance_scale: float = 1.0
    pareto: Mapping[str, Any] | None = None
    batch_size: int = 0  # the global batch of one step (`config.batch_size`)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RunSettings:
        from alignax import pareto
        names = list(config.rewards.keys())
        resolved = pareto.resolve_config(config.pareto, names) if names else None
        sample = config.sample
        return cls(int(sample.num_steps), float(sample.shift), float(sample.guidance_scale), resolved,
                   int(config.batch_size))


@dataclasses.dataclass(frozen=True)
class Objective:
    """A built objective. `data` names the dataset kind it trains on; `heads` (optional) creates
    extra trainable params with their logical specs; `init_state` creates objective state;
    `batch_period` steps in a row get the same data batch (`batch_at(step // batch_period)`): an objective
    that updates several times on one sampled batch (grpo's `inner_epochs`)."""

    loss: LossFn
    data: str = "captioned_images"
    needs_reference: bool = False
    init_heads: Callable[[jax.Array], tuple[PyTree, PyTree]] | None = None
    init_state: Callable[[PyTree, PyTree], PyTree] = lambda trainable, frozen: {}
    batch_period: int = 1


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """A registry entry: config defaults (merged under `config.objective`) and a builder
    `build(objective config with defaults, models, run settings)`."""

    name: str
    defaults: Mapping[str, Any]
    build: Callable[[ml_collections.ConfigDict, Models, RunSettings], Objective]
    # Optional: checks of the objective's fields that need the run config (e.g. sample.num_steps)
    # but no model, run by `config.validate`: `check(objective config with defaults, run config)`.
    check: Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict], None] | None = None
