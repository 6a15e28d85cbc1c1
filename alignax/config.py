"""The config schema: every key a run may set, its default and its type, plus validation.

Experiment configs (`experiments/configs/*.py`) start from `base_config()` and override
fields, big_vision style. `validate` runs before anything is compiled or loaded and raises
`ConfigError` naming the field: a typo in a config file must fail in a second, not after
an hour of compilation. Objective-specific fields live in `config.objective` and their
defaults come from the objective registry, so each objective owns its own knobs.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from alignax import mesh as mesh_lib
from alignax import objectives, pareto
from alignax.conditioning import on_the_fly
from alignax.errors import ConfigError
from alignax.rewards import setup as reward_setup
from alignax.schema import check_against

# A tiny MM-DiT and VAE: the defaults used when no pretrained weights are given.
TINY_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                        dual_attention_layers=(), qk_norm=None)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)

# Fields whose value may legitimately be any mapping (reward settings, model config dicts).
FREE_FORM = ("rewards", "objective", "model.transformer", "model.vae", "pareto.weights", "pareto.normalization",
             "pareto.ideal")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8                 # global, over all processes
    c.grad_accum_steps = 1           # micro-batches per step, accumulated inside the compiled step
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.checkpoint_on_damage = "fallback"  # an unreadable newest step: 'fallback' to an older one, or 'stop'
    c.eval_every = -1                # sample-grid cadence: -1 = about 4 grids per run (follows total_steps); 0 disables
    c.max_nonfinite_steps = 5        # consecutive skipped (NaN/Inf) steps before halting
    # Halts a finite divergence (alignax/training/divergence.py): |loss| or the param norm above `*_factor` × its
    # running median over `window` steps, or the param norm above `param_norm_max` (0: no bound).
    c.divergence = ml_collections.ConfigDict(dict(enabled=False, window=20, loss_factor=100.0, param_norm_factor=10.0,
                                                  param_norm_max=0.0))

    # Multislice: the devices of several TPU slices form one mesh; `dcn_axis` is the axis that spans the
    # slices (over the data-center network), every other axis stays inside a slice (alignax.mesh.device_grid).
    c.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1), axes=mesh_lib.DEFAULT_AXES, dcn_axis="data",
        rules=tuple((name, axes) for name, axes in mesh_lib.DEFAULT_RULES)))

    c.model = ml_collections.ConfigDict(dict(
        pretrained="",               # diffusers pipeline root (transformer/, vae/) or transformer directory
        transformer=dict(TINY_TRANSFORMER),
        vae_pretrained="",           # overrides the pipeline's vae/ when set
        vae=dict(TINY_VAE),
        compute_dtype="float32",
        attention="xla",
        scan_layers=False,
        remat="none",
    ))

    c.data = ml_collections.ConfigDict(dict(path="", generate="", split="train", eval_split="eval", shuffle=True))

    # Text conditioning: 'dataset' reads precomputed embeddings from the records; 'on_the_fly' encodes each
    # batch's `prompt` inside the train step with the text encoders of the pipeline at config.model.pretrained
    # (alignax/conditioning/on_the_fly.py). use_t5=False: zeros for the T5 part; max_sequence_length: T5 tokens.
    c.text = ml_collections.ConfigDict(dict(encode="dataset", use_t5=True, max_sequence_length=256))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=0, schedule="constant", end_lr_fraction=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, frozen=(), lr_mults=()))

    c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=8, alpha=8.0, targets=()))
    c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.999, every=1))

    c.objective = ml_collections.ConfigDict(dict(name="sft"))
    c.rewards = ml_collections.ConfigDict()
    # weights: {reward instance: w} (or a sequence in sorted-name order); normalization: {instance: spec};
    # ideal: {instance: z*} for Chebyshev (empty: a running ideal). See alignax/pareto.
    c.pareto = ml_collections.ConfigDict(dict(weights=None, scalarization="weighted_sum", normalization=None,
                                              ideal=None))

    # negative_embeddings: an .npz of the encoded negative prompt (alignax/conditioning/negative_prompt.py);
    # negative_prompt: the text encoded at start-up instead, with config.text.encode='on_the_fly' and no .npz.
    c.sample = ml_collections.ConfigDict(dict(num_steps=10, shift=3.0, guidance_scale=1.0, num_images=4,
                                              negative_embeddings="", negative_prompt=""))
    return c


def _positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"config.{field}={value!r}: expected a positive number")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _number(config: ml_collections.ConfigDict, field: str, expected: str, ok, *, integer: bool = False) -> None:
    """ConfigError naming `config.<field>` unless it is a finite (integer, if asked) number with `ok(value)`."""
    value = _get(config, field)
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"config.{field}={value!r}: expected {expected}")


def _check_values(config: ml_collections.ConfigDict) -> None:
    """Values that type-check but run silently wrong (NaN guidance, negative sigmas, an EMA that never moves)."""
    _number(config, "seed", f"an integer in [0, {2**32 - 1}]", lambda v: 0 <= v <= 2**32 - 1, integer=True)
    _number(config, "sample.guidance_scale", "a finite number (1.0: no guidance)", lambda v: True)
    _number(config, "sample.shift", "a finite number > 0 (the SD3 sigma shift; 1.0: none)", lambda v: v > 0)
    _number(config, "ema.decay", "a number in [0, 1)", lambda v: 0 <= v < 1)
    _number(config, "ema.every", "an integer >= 1 (update the EMA every N steps)", lambda v: v >= 1, integer=True)
    for beta in ("optim.b1", "optim.b2"):
        _number(config, beta, "a number in [0, 1) (Adam moment decay)", lambda v: 0 <= v < 1)
    _number(config, "eval_every", "an integer >= -1 (-1: about 4 grids per run; 0 disables sample grids)",
            lambda v: v >= -1, integer=True)
    _number(config, "divergence.window", "an integer >= 1 (steps in the running median)", lambda v: v >= 1,
            integer=True)
    for factor in ("divergence.loss_factor", "divergence.param_norm_factor"):
        _number(config, factor, "a number > 1 (how many times its running median is divergence)", lambda v: v > 1)
    _number(config, "divergence.param_norm_max", "a number >= 0 (0: no bound)", lambda v: v >= 0)
    _number(config, "max_nonfinite_steps", "an integer >= 1 (consecutive NaN/Inf steps before halting)",
            lambda v: v >= 1, integer=True)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first bad field; returns the config for chaining."""
    check_against(base_config().to_dict(), config.to_dict(), free_form=FREE_FORM)
    _positive(config, "total_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
              "keep_checkpoints", "optim.learning_rate", "sample.num_steps")
    _check_values(config)
    if config.checkpoint_on_damage not in ("fallback", "stop"):
        raise ConfigError(f"config.checkpoint_on_damage={config.checkpoint_on_damage!r}: expected 'fallback' "
                          "(resume from the newest readable step) or 'stop'")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                          f"config.grad_accum_steps={config.grad_accum_steps}")
    if len(config.mesh.shape) != len(config.mesh.axes):
        raise ConfigError(f"config.mesh.shape={tuple(config.mesh.shape)} and config.mesh.axes="
                          f"{tuple(config.mesh.axes)} differ in length")
    if config.mesh.get("dcn_axis") and config.mesh.dcn_axis not in config.mesh.axes:
        raise ConfigError(f"config.mesh.dcn_axis={config.mesh.dcn_axis!r} is not one of config.mesh.axes="
                          f"{tuple(config.mesh.axes)}")
    if num_devices is not None:
        shape = mesh_lib.resolve_shape(config.mesh.shape, num_devices)
        batch_shards = math.prod(s for s, a in zip(shape, config.mesh.axes, strict=True) if a in ("data", "fsdp"))
        if (config.batch_size // config.grad_accum_steps) % batch_shards:
            raise ConfigError(f"config.batch_size={config.batch_size} (per micro-batch "
                              f"{config.batch_size // config.grad_accum_steps}) does not divide over the "
                              f"{batch_shards} data×fsdp shards of config.mesh.shape={shape}")
    objectives.validate_config(config.objective, config)
    on_the_fly.check_config(config)
    reward_setup.validate_config(config.rewards)
    if config.rewards or config.pareto.weights:  # the one check of config.pareto (RunSettings resolves it again)
        pareto.resolve_config(config.pareto, list(config.rewards.keys()))
    return config
