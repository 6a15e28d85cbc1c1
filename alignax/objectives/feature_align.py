"""`feature_align`: SFT plus vision-aligned feature supervision of MM-DiT hidden states.

After the Pareto-enhanced portrait paper (arXiv 2605.20640) and REPA: projector heads
(`objectives/projector.py`) read the image-stream hidden states of chosen MM-DiT blocks
during the SFT forward pass and are pulled, by cosine similarity, towards frozen SigLIP 2
features of the same example:

- `global`: mean-pooled projected tokens vs the caption's text embedding (and, with
  `global_image`, also vs the image embedding)
- `regional`: projected tokens mean-pooled over g×g regions of the token grid vs the patch
  features pooled over the same g×g regions of the patch grid, for g in `regional_grids`
- `token` (REPA): each projected token vs the patch features bilinearly resized to the token grid

    loss = sft + align_weight · mean over (blocks × granularity terms) of mean(1 − cos)

Each (block, granularity) has its own head under `trainable['heads']['block_<i>'][<granularity>]`.
The heads are a training device only: export writes `trainable['transformer']` alone.
With `align_weight = 0` the graph is exactly the `sft` graph (same rng split, no capture).

Targets (`targets`):
- `'batch'`: precomputed, in the batch as `siglip_text_embeds` [B, D], `siglip_image_embeds`
  [B, D] (only with `global_image`) and `siglip_patch_embeds` [B, N, D] with N a square grid
- `'random_projection'`: a fixed random linear map (seed `target_seed`) of the clean image's
  pixel patches (`target_grid`² patches → patch features; their mean → image embedding) and of
  `pooled_projections` (→ text embedding). A stand-in for the tiny world, which has no SigLIP.
- any other source registered in `TARGETS`, or a `targets_fn(frozen, batch) -> Targets`
  passed to `make_objective` (e.g. an in-graph SigLIP reading its params from `frozen`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections
import optax

from alignax.errors import ConfigError, DataError
from alignax.objectives import base, projector, register, sft

GRANULARITIES = ("global", "regional", "token")
DEFAULTS = dict(sft.DEFAULTS, align_weight=0.5, blocks=(0,), granularities=GRANULARITIES, regional_grids=(2, 4),
                global_image=False, head_hidden=256, target_dim=1152, targets="batch", target_grid=4,
                target_seed=0)

Targets = Mapping[str, jax.Array]  # 'text' [B, D], 'image' [B, D] (optional), 'patches' [B, N, D]
TargetsFn = Callable[[Any, Mapping[str, jax.Array]], Targets]


def batch_targets(cfg: ml_collections.ConfigDict) -> TargetsFn:
    needed = {"text": "siglip_text_embeds", "patches": "siglip_patch_embeds"}
    if cfg.global_image:
        needed["image"] = "siglip_image_embeds"

    def targets(frozen, batch):
        missing = [field for field in needed.values() if field not in batch]
        if missing:
            raise DataError(f"config.objective.targets='batch': the batch lacks {missing} (has {sorted(batch)}); "
                            "precompute SigLIP 2 features into the dataset or choose another target source")
        return {name: batch[field].astype(jnp.float32) for name, field in needed.items()}

    return targets


def random_projection_targets(cfg: ml_collections.ConfigDict) -> TargetsFn:
    """Fixed random features of the clean image and the caption: no SigLIP needed (tests, tiny world)."""
    grid, dim = int(cfg.target_grid), int(cfg.target_dim)

    def targets(frozen, batch):
        images = batch["image"].astype(jnp.float32) / 255.0
        height, width = images.shape[1:3]
        if height % grid or width % grid:
            raise ConfigError(f"config.objective.target_grid={grid} does not divide the {height}×{width} images")
        patches = einops.rearrange(images, "b (g p) (k q) c -> b (g k) (p q c)", g=grid, k=grid)
        pooled = batch["pooled_projections"].astype(jnp.float32)
        key = jax.random.key(cfg.target_seed)
        w_patch = jax.random.normal(jax.random.fold_in(key, 0), (patches.shape[-1], dim)) / patches.shape[-1] ** 0.5
        w_text = jax.random.normal(jax.random.fold_in(key, 1), (pooled.shape[-1], dim)) / pooled.shape[-1] ** 0.5
        patch_features = patches @ w_patch
        return {"text": pooled @ w_text, "image": jnp.mean(patch_features, axis=1), "patches": patch_features}

    return targets


TARGETS: dict[str, Callable[[ml_collections.ConfigDict], TargetsFn]] = {
    "batch": batch_targets, "random_projection": random_projection_targets}


def square_grid(tokens: jax.Array, what: str) -> jax.Array:
    """(B, N, D) → (B, n, n, D); the MM-DiT token grid and SigLIP's patch grid are square."""
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise DataError(f"{what}: expected a square number of tokens, found {tokens.shape[1]}")
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])


def pool_regions(grid: jax.Array, regions: int, what: str) -> jax.Array:
    """(B, h, w, D) → (B, regions², D): the mean over each cell of a regions×regions partition."""
    if grid.shape[1] % regions or grid.shape[2] % regions:
        raise ConfigError(f"config.objective.regional_grids: {regions} does not divide the {what} grid "
                          f"{grid.shape[1]}×{grid.shape[2]}")
    return einops.reduce(grid, "b (g h) (k w) d -> b (g k) d", "mean", g=regions, k=regions)


def cosine_distance(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean of 1 − cos over all leading axes, in fp32."""
    return jnp.mean(optax.losses.cosine_distance(prediction.astype(jnp.float32), target.astype(jnp.float32),
                                                 epsilon=1e-8))


def alignment_terms(cfg: ml_collections.ConfigDict, heads: Any, captured: Mapping[int, jax.Array],
                    targets: Targets) -> dict[str, jax.Array]:
    """{'<block>/<term>': mean(1 − cos)} for every configured block and granularity term."""
    terms: dict[str, jax.Array] = {}
    patch_grid = square_grid(targets["patches"], "siglip_patch_embeds") if "patches" in targets else None
    for block in cfg.blocks:
        hidden = captured[block]
        group = heads[f"block_{block}"]
        for granularity in cfg.granularities:
            projected = projector.apply_head(group[granularity], hidden)  # (B, T, D_target)
            name = f"block_{block}/{granularity}"
            if granularity == "global":
                pooled = jnp.mean(projected, axis=1)
                terms[f"{name}_text"] = cosine_distance(pooled, targets["text"])
                if cfg.global_image:
                    terms[f"{name}_image"] = cosine_distance(pooled, targets["image"])
            elif granularity == "regional":
                token_grid = square_grid(projected, "MM-DiT image tokens")
                for regions in cfg.regional_grids:
                    terms[f"{name}_{regions}x{regions}"] = cosine_distance(
                        pool_regions(token_grid, regions, "token"), pool_regions(patch_grid, regions, "patch"))
            else:
                token_grid = square_grid(projected, "MM-DiT image tokens")
                resized = jax.image.resize(patch_grid, token_grid.shape, method="bilinear")
                terms[name] = cosine_distance(token_grid, resized)
    return terms


def check_config(cfg: ml_collections.ConfigDict, num_layers: int) -> None:
    unknown = sorted(set(cfg.granularities) - set(GRANULARITIES))
    if unknown or not cfg.granularities:
        raise ConfigError(f"config.objective.granularities={tuple(cfg.granularities)}: expected a non-empty subset "
                          f"of {GRANULARITIES}")
    bad = [b for b in cfg.blocks if not 0 <= b < num_layers]
    if bad or not cfg.blocks:
        raise ConfigError(f"config.objective.blocks={tuple(cfg.blocks)}: expected block indices in "
                          f"[0, {num_layers}) of the MM-DiT")
    if cfg.align_weight < 0:
        raise ConfigError(f"config.objective.align_weight={cfg.align_weight}: expected ≥ 0")
    if cfg.targets not in TARGETS:
        raise ConfigError(f"config.objective.targets={cfg.targets!r}: choose one of {sorted(TARGETS)}")


def make_objective(cfg: ml_collections.ConfigDict, models: base.Models,
                   targets_fn: TargetsFn | None = None) -> base.Objective:
    """The objective with targets from `config.objective.targets`, or from `targets_fn` when given."""
    transformer_cfg = models.transformer.config
    check_config(cfg, transformer_cfg.num_layers)
    targets_fn = targets_fn or TARGETS[cfg.targets](cfg)
    blocks = tuple(int(b) for b in cfg.blocks)
    weight = float(cfg.align_weight)

    def loss(trainable, frozen, state, batch, rng):
        encode_rng, flow_rng = jax.random.split(rng)  # exactly as `sft`
        x0 = sft.clean_latents(models, frozen, batch, encode_rng if cfg.sample_posterior else None)
        params = models.transformer_params(trainable, frozen)
        if weight == 0.0:  # the sft graph itself: no capture, heads untouched (zero gradients)
            error, t, _ = sft.flow_error(models, cfg, params, x0, batch, flow_rng)
            value = jnp.mean(error)
            return value, ({"loss": value, "sft_loss": value, "mean_t": jnp.mean(t)}, state)
        error, t, captured = sft.flow_error(models, cfg, params, x0, batch, flow_rng, capture_layers=blocks)
        sft_value = jnp.mean(error)
        terms = alignment_terms(cfg, trainable["heads"], captured, targets_fn(frozen, batch))
        align = jnp.mean(jnp.stack(list(terms.values())))
        value = sft_value + weight * align
        metrics = {"loss": value, "sft_loss": sft_value, "align_loss": align, "mean_t": jnp.mean(t),
                   **{f"align/{k}": v for k, v in terms.items()}}
        return value, (metrics, state)

    def init_heads(rng):
        names = {f"block_{b}": tuple(cfg.granularities) for b in blocks}
        return projector.init_heads(rng, names, transformer_cfg.inner_dim, int(cfg.head_hidden), int(cfg.target_dim))

    return base.Objective(loss=loss, data="captioned_images", init_heads=init_heads)


def build(cfg: ml_collections.ConfigDict, models: base.Models, run: base.RunSettings) -> base.Objective:
    return make_objective(cfg, models)


SPEC = register(base.ObjectiveSpec(name="feature_align", defaults=DEFAULTS, build=build))
