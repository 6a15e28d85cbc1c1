"""A TPU roofline on paper: SD3.5-medium steps compiled (not run) for TPU slices on fake CPU devices.

    python -m experiments.benchmarks.roofline [--slices v5p-64,v5e-16,v6e-8] [--steps reward,sft]

For each slice, the real step is built from `experiments/configs/sd35_reward_backprop.py` (its model
runtime options, LoRA, objective, rewards, optimiser, FSDP mesh and global batch) with the published
SD3.5-medium, SD3-VAE, HPSv2.1 (open_clip ViT-H/14) and LAION-aesthetic (CLIP ViT-L/14) architectures, all
params abstract (`jax.ShapeDtypeStruct`: no weights are read or made), and compiled by XLA:CPU for as
many fake devices as the slice has chips. Steps:

- `reward`: DRaFT-1 LoRA reward backprop as the config sets it (20 sampler steps with CFG, the last one
  differentiable, VAE decode at 1024², both rewards, drift penalty, AdamW on the LoRA params).
- `sft`: full-parameter rectified-flow SFT of the same MM-DiT at 1024² on pre-encoded latents (AdamW on
  every param), with the same mesh, batch and runtime options.

From the compiled per-device program: matmul FLOPs and the collectives the sharding inserted, both parsed
from the optimised HLO with every loop trip counted (`alignax.compiled_costs`); bytes accessed from
`cost_analysis()`, which counts a loop body once, so the sampler's frozen-step loop is corrected by
compiling one guided model call on the same mesh and adding it for the uncounted iterations; and the
per-device memory (`memory_analysis()`, XLA:CPU's buffer assignment: not what TPU's scheduler would plan).
Each term, in seconds per chip:

    compute = HLO matmul flops / peak bf16 FLOP/s
    ICI     = sum over collectives of the bytes each chip sends / ICI bandwidth (bidirectional, all links)
    scores  = attention-score bytes (analytic: 12 B per score per pass, model_flops.LOGIT_BYTES) / HBM bandwidth
    XLA:CPU bytes = `cost_analysis()` bytes accessed / HBM bandwidth

and three projections, the step being the largest of its terms (perfect overlap of the rest):
`splash` (compute, ICI: the scores stay on chip and the rest of a TPU-fused program's traffic hides under
compute), `XLA attention` (compute, ICI, scores), `XLA:CPU bytes` (compute, ICI, CPU bytes: XLA:CPU fuses far
less than XLA:TPU, a pessimistic bound). MFU = model flops / (step * peak), model flops leaving out what
remat recomputes (`model_flops.py`; the HLO count includes it). Chip figures: the Cloud TPU
system-architecture pages (`CHIPS`). The MaxDiffusion comparison projects our SFT step at Flux-dev's per-chip
load (see `maxdiffusion_comparison`).

Last line: `roofline mfu_<step>_<slice>=<splash> xla_attention_mfu_<step>_<slice>=<x> ...` per step and slice.
"""

from __future__ import annotations

import os

MAX_DEVICES = 32  # the largest slice here, v5p-64, has 32 chips
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={MAX_DEVICES}"]).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from alignax import mesh as mesh_lib  # noqa: E402
from alignax import objectives  # noqa: E402
from alignax.compiled_costs import collective_bytes, cost, matmul_flops  # noqa: E402
from alignax.conditioning import guidance  # noqa: E402
from alignax.models import aesthetic as aesthetic_model  # noqa: E402
from alignax.models import clip as clip_model  # noqa: E402
from alignax.models import open_clip_format  # noqa: E402
from alignax.models import setup as model_setup  # noqa: E402
from alignax.models.pretrained import Pretrained, abstract_params  # noqa: E402
from alignax.objectives import trajectory  # noqa: E402
from alignax.rewards.aesthetic import aesthetic_reward  # noqa: E402
from alignax.rewards.hpsv2 import hpsv2_reward  # noqa: E402
from alignax.training import lora, optim, train_state  # noqa: E402
from experiments.benchmarks.model_flops import LOGIT_BYTES, attention_logits, mmdit_forward_flops  # noqa: E402
from experiments.configs import sd35_reward_backprop  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
    bf16_flops: float      # peak FLOP/s
    hbm_bandwidth: float   # bytes/s
    hbm_bytes: float
    ici_bandwidth: float   # bidirectional bytes/s per chip, all links
    source: str


# The Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/<version>), read 2026-12-03.
CHIPS = {
    "v5p": Chip(459e12, 2765e9, 95 * 2**30, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip(197e12, 819e9, 16 * 2**30, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip(918e12, 1638e9, 32e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# Accelerator type -> (chip, chips). v5p counts TensorCores in the name (2 per chip); v5e/v6e count chips.
SLICES = {"v5p-64": ("v5p", 32), "v5e-16": ("v5e", 16), "v6e-8": ("v6e", 8), "v5p-8": ("v5p", 4)}

# The published architectures (diffusers config.json of stabilityai/stable-diffusion-3.5-medium).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False, act_fn="silu")
TEXT_TOKENS = 77 + 256  # CLIP-L/G tokens + T5 tokens, as the SD3 pipeline concatenates them

# MaxDiffusion's published Flux-dev training figure (README, v5p-8): 1.769 s/step, global batch 8, 1024².
FLUX_DEV = dict(slice="v5p-8", seconds=1.769, global_batch=8, params=11.9e9, image_tokens=4096, text_tokens=512,
                double_blocks=19, single_blocks=38, width=3072)


# ---- abstract models ----------------------------------------------------------------------------

def abstract_pretrained(architecture, module) -> Pretrained:
    shapes, _ = abstract_params(architecture, module)
    return Pretrained(module=module, params=shapes, config={}, architecture=architecture)


def abstract_clip(open_clip_name: str, **runtime: Any) -> Pretrained:
    config = open_clip_format.transformers_config(open_clip_format.MODEL_CONFIGS[open_clip_name])
    return abstract_pretrained(clip_model.ARCHITECTURE, clip_model.ARCHITECTURE.build(config, **runtime))


def abstract_rewards(runtime: dict) -> dict:
    """HPSv2.1 and the LAION aesthetic score, shaped as the config's file paths would load them."""
    clip_runtime = dict(compute_dtype=runtime["compute_dtype"])
    hps = hpsv2_reward("hps", abstract_clip("ViT-H-14", **clip_runtime), tokenize=lambda prompts: {})
    backbone = abstract_clip("ViT-L-14", **clip_runtime)
    mlp_module = aesthetic_model.ARCHITECTURE.build({"input_size": backbone.module.config.projection_dim})
    mlp = abstract_pretrained(aesthetic_model.ARCHITECTURE, mlp_module)
    return {"hps": hps, "aesthetic": aesthetic_reward("aesthetic", backbone, mlp)}


def sd35_config() -> ml_collections.ConfigDict:
    """The full-size config with the published architectures in place of the checkpoint paths."""
    c = sd35_reward_backprop.get_config("")
    c.model.pretrained = ""
    c.model.vae_pretrained = ""
    c.model.transformer = ml_collections.ConfigDict(SD35_MEDIUM)
    c.model.vae = ml_collections.ConfigDict(SD3_VAE)
    # XLA's attention: off TPU the splash kernel the config asks for compiles as its interpreter, which says
    # nothing about TPU; the `splash` projection stands for it (the scores' HBM traffic left out).
    c.model.attention = "xla"
    return c


# ---- the steps ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
    """A step's function and abstract (sharded) arguments, plus what the projection needs to know."""

    fn: Callable
    args: tuple
    model_flops: float         # per device, without remat recompute
    logit_bytes: float         # per device: HBM traffic of materialised attention scores (estimate)
    loop_call: Callable | None = None  # one uncounted loop iteration's function and args
    loop_args: tuple = ()
    uncounted_iterations: int = 0


def shaped(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


class StepBuilder:
    """Builds the config's models once; `reward` / `sft` give a step on a mesh of `chips` devices."""

    def __init__(self):
        self.config = sd35_config()
        runtime = model_setup.runtime_options(self.config.model)
        t_src, self.transformer, v_src, self.vae = model_setup.build_modules(self.config.model)
        self.rewards = abstract_rewards(runtime)
        self.lora = lora.LoraSpec.for_run(self.config.lora)
        self.base_shapes, self.base_specs = abstract_params(t_src.architecture, self.transformer)
        self.vae_shapes, self.vae_specs = abstract_params(v_src.architecture, self.vae)
        self.rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in self.config.mesh.rules)

    def mesh(self, chips: int):
        return mesh_lib.make_mesh(self.config.mesh.shape, self.config.mesh.axes, devices=jax.devices()[:chips])

    def batch_shapes(self, mesh, arrays: dict[str, tuple[tuple, Any]]) -> dict:
        def sharding(ndim: int) -> NamedSharding:
            return mesh_lib.logical_sharding(("activation_batch",) + (None,) * (ndim - 1), mesh, self.rules)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(len(shape)))
                for k, (shape, dtype) in arrays.items()}

    def optimizer_state(self, trainable, trainable_specs, mesh):
        tx, _ = optim.make_optimizer(self.config.optim, trainable, self.config.total_steps)
        opt_shapes = jax.eval_shape(tx.init, trainable)
        opt_specs = train_state.specs_by_suffix(opt_shapes, trainable, trainable_specs)
        return tx, shaped(opt_shapes, train_state.to_shardings(opt_specs, opt_shapes, mesh, self.rules))

    def _step(self, objective, tx):
        def step(trainable, opt_state, frozen, objective_state, batch, rng):
            grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
            (loss, (metrics, objective_state)), grads = grad_fn(trainable, frozen, objective_state, batch, rng)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return jax.tree.map(lambda p, u: p + u, trainable, updates), opt_state, loss
        return step

    def reward(self, chips: int) -> Built:
        c, mesh = self.config, self.mesh(chips)
        models = objectives.Models(self.transformer, self.vae, *model_setup.vae_scaling(self.vae), lora=self.lora,
                                   rewards=self.rewards)
        objective = objectives.build(c.objective, models, objectives.RunSettings.from_config(c))
        lora_shapes = jax.eval_shape(lambda b: lora.init_lora(b, spec=self.lora, rng=jax.random.key(0)),
                                     self.base_shapes)
        lora_specs = lora.lora_logical_specs(lora_shapes, self.base_specs)
        trainable = shaped({"transformer": lora_shapes}, train_state.to_shardings(
            {"transformer": lora_specs}, {"transformer": lora_shapes}, mesh, self.rules))
        frozen_tree = {"vae": self.vae_shapes, "transformer_base": self.base_shapes,
                       "rewards": {n: r.params for n, r in self.rewards.items()}}
        frozen_specs = {"vae": self.vae_specs, "transformer_base": self.base_specs,
                        "rewards": {n: r.logical_specs() for n, r in self.rewards.items()}}
        frozen = shaped(frozen_tree, mesh_lib.fitted_shardings(frozen_specs, frozen_tree, mesh, self.rules))
        tx, opt_state = self.optimizer_state(trainable, {"transformer": lora_specs}, mesh)
        objective_state = jax.eval_shape(lambda: objective.init_state(trainable, frozen))
        objective_state = shaped(objective_state, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()),
                                                               objective_state))
        b, cfg = c.batch_size, self.transformer.config
        width, pooled = cfg.joint_attention_dim, cfg.pooled_projection_dim
        arrays = {"encoder_hidden_states": ((b, TEXT_TOKENS, width), jnp.float32),
                  "pooled_projections": ((b, pooled), jnp.float32),
                  "negative_encoder_hidden_states": ((b, TEXT_TOKENS, width), jnp.float32),
                  "negative_pooled_projections": ((b, pooled), jnp.float32),
                  "hps/input_ids": ((b, 77), jnp.int32), "hps/attention_mask": ((b, 77), jnp.int32)}
        batch = self.batch_shapes(mesh, arrays)
        rng = jax.random.key(0)
        step = self._step(objective, tx)
        num_steps, k = c.sample.num_steps, c.objective.k
        per_device = b / chips
        # Model flops: every sampler step's guided call forward (2 rows per prompt), the last k backward too
        # (2x forward), the drift's reference call on the k steps; rewards and VAE are not counted.
        call = mmdit_forward_flops(SD35_MEDIUM, 2 * per_device, TEXT_TOKENS)
        model_flops = call * (num_steps + 2 * k + (k if c.objective.kl_weight > 0 else 0))
        passes = (num_steps - k) + 4 * k + (k if c.objective.kl_weight > 0 else 0)
        logit_bytes = LOGIT_BYTES * passes * attention_logits(SD35_MEDIUM, 2 * per_device, TEXT_TOKENS)

        def guided_call(trainable, frozen, batch):
            params = models.transformer_params(trainable, frozen)
            x = jnp.zeros(models.latent_shape(batch["pooled_projections"].shape[0]), jnp.float32)
            cond = guidance.conditioning(batch, c.sample.guidance_scale)
            return trajectory.guided_velocity(models.velocity, params, x, jnp.float32(0.5), cond)

        frozen_steps = num_steps - k
        return Built(step, (trainable, opt_state, frozen, objective_state, batch, rng), model_flops, logit_bytes,
                     loop_call=guided_call, loop_args=(trainable, frozen, batch),
                     uncounted_iterations=max(frozen_steps - 1, 0))

    def sft(self, chips: int) -> Built:
        c, mesh = self.config, self.mesh(chips)
        sft_config = ml_collections.ConfigDict({"name": "sft"})
        models = objectives.Models(self.transformer, self.vae, *model_setup.vae_scaling(self.vae))
        objective = objectives.build(sft_config, models, objectives.RunSettings.from_config(c))
        trainable = shaped({"transformer": self.base_shapes}, train_state.to_shardings(
            {"transformer": self.base_specs}, {"transformer": self.base_shapes}, mesh, self.rules))
        tx, opt_state = self.optimizer_state(trainable, {"transformer": self.base_specs}, mesh)
        frozen = shaped({"vae": self.vae_shapes}, mesh_lib.fitted_shardings({"vae": self.vae_specs},
                                                                           {"vae": self.vae_shapes}, mesh, self.rules))
        b, cfg = c.batch_size, self.transformer.config
        side = cfg.sample_size
        arrays = {"latents": ((b, side, side, cfg.in_channels), jnp.float32),
                  "encoder_hidden_states": ((b, TEXT_TOKENS, cfg.joint_attention_dim), jnp.float32),
                  "pooled_projections": ((b, cfg.pooled_projection_dim), jnp.float32)}
        batch = self.batch_shapes(mesh, arrays)
        model_flops = 3 * mmdit_forward_flops(SD35_MEDIUM, b / chips, TEXT_TOKENS)  # forward + 2x backward
        logit_bytes = LOGIT_BYTES * 4 * attention_logits(SD35_MEDIUM, b / chips, TEXT_TOKENS)
        return Built(self._step(objective, tx), (trainable, opt_state, frozen, {}, batch, jax.random.key(0)),
                     model_flops, logit_bytes)


# The costs are read from the optimised HLO; LLVM's optimisation of the CPU code only costs compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass
class Projection:
    slice: str
    step: str
    flops: float
    model_flops: float
    bytes: float
    logit_bytes: float
    ici_bytes: dict
    memory: float
    compile_seconds: float
    per_chip_batch: float

    @property
    def chip(self) -> Chip:
        return CHIPS[SLICES[self.slice][0]]

    def times(self) -> dict[str, float]:
        """Seconds per chip for each term of the roofline."""
        return {"compute": self.flops / self.chip.bf16_flops,
                "ICI": sum(self.ici_bytes.values()) / self.chip.ici_bandwidth,
                "scores": self.logit_bytes / self.chip.hbm_bandwidth,
                "XLA:CPU bytes": self.bytes / self.chip.hbm_bandwidth}

    # Three projections, by which terms bound the step (perfect overlap of the rest):
    SCENARIOS = {
        "splash": ("compute", "ICI"),                 # scores stay on chip; fused TPU traffic hides under compute
        "XLA attention": ("compute", "ICI", "scores"),  # every score written to HBM and read back
        "XLA:CPU bytes": ("compute", "ICI", "XLA:CPU bytes"),  # CPU fusion's traffic: a pessimistic bound
    }

    def step_seconds(self, scenario: str = "splash") -> float:
        t = self.times()
        return max(t[term] for term in self.SCENARIOS[scenario])

    def bound(self, scenario: str = "splash") -> str:
        t = self.times()
        return max(self.SCENARIOS[scenario], key=t.get)

    def mfu(self, scenario: str = "splash") -> float:
        return self.model_flops / (self.step_seconds(scenario) * self.chip.bf16_flops)

    def line(self) -> str:
        t = self.times()
        cells = [self.slice, self.step, f"{self.per_chip_batch:g}", f"{self.flops / 1e12:.1f}",
                 f"{self.model_flops / 1e12:.1f}", f"{t['compute']:.3f}", f"{t['ICI']:.3f}", f"{t['scores']:.3f}",
                 f"{t['XLA:CPU bytes']:.3f}"]
        for scenario in self.SCENARIOS:
            cells.append(f"{self.step_seconds(scenario):.3f} s, {self.bound(scenario)}, "
                         f"**{self.mfu(scenario):.0%}**")
        cells.append(f"{self.memory / 2**30:.0f}")
        return "| " + " | ".join(cells) + " |"


HEADER = ("| slice | step | images/chip | HLO matmul TFLOP/chip | model TFLOP/chip | compute s | ICI s | scores s | "
          "XLA:CPU bytes s | splash: step, bound, MFU | XLA attention: step, bound, MFU | "
          "XLA:CPU bytes: step, bound, MFU | XLA:CPU GiB/chip |")


def compile_built(built: Built, mesh, rules) -> tuple[Any, float]:
    start = time.perf_counter()
    with mesh_lib.use_mesh(mesh, rules):
        compiled = jax.jit(built.fn).lower(*built.args).compile(compiler_options=FAST_COMPILE)
    return compiled, time.perf_counter() - start


def project(builder: StepBuilder, slice_name: str, step: str) -> Projection:
    chips = SLICES[slice_name][1]
    built = getattr(builder, step)(chips)
    mesh = builder.mesh(chips)
    compiled, seconds = compile_built(built, mesh, builder.rules)
    hlo = compiled.as_text()
    costs = {"flops": matmul_flops(hlo), "bytes": cost(compiled)["bytes"]}
    ici = collective_bytes(hlo, chips)
    if built.loop_call is not None and built.uncounted_iterations:  # bytes accessed counts a loop body once
        with mesh_lib.use_mesh(mesh, builder.rules):
            call = jax.jit(built.loop_call).lower(*built.loop_args).compile(compiler_options=FAST_COMPILE)
        costs["bytes"] += built.uncounted_iterations * cost(call)["bytes"]
    memory = compiled.memory_analysis()
    per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                  - memory.alias_size_in_bytes)
    return Projection(slice_name, step, costs["flops"], built.model_flops, costs["bytes"], built.logit_bytes, ici,
                      per_device, seconds, builder.config.batch_size / chips)


def maxdiffusion_comparison(sft_v5p: Projection) -> str:
    """Our SFT step at Flux-dev's per-chip load on v5p, next to MaxDiffusion's 1.769 s/step on v5p-8.

    Flux-dev's FLOPs: 6 * params * tokens (forward + backward) plus attention (3 * 2 * 2 * tokens² * width
    per block), per image; our step is rescaled linearly from its own per-chip batch (both are per-chip
    compute- or memory-bound programs, so time scales with the images each chip processes)."""
    chip = CHIPS["v5p"]
    chips = SLICES[FLUX_DEV["slice"]][1]
    per_chip = FLUX_DEV["global_batch"] / chips
    tokens = FLUX_DEV["image_tokens"] + FLUX_DEV["text_tokens"]
    flux_flops = per_chip * (6 * FLUX_DEV["params"] * tokens + 3 * 2 * 2 * tokens ** 2 * FLUX_DEV["width"]
                             * (FLUX_DEV["double_blocks"] + FLUX_DEV["single_blocks"]))
    flux_mfu = flux_flops / (FLUX_DEV["seconds"] * chip.bf16_flops)
    scale = per_chip / sft_v5p.per_chip_batch
    our_flops = sft_v5p.model_flops * scale
    our_step = sft_v5p.step_seconds() * scale
    return (f"MaxDiffusion Flux-dev, v5p-8 ({chips} chips, {per_chip:.0f} images/chip): {FLUX_DEV['seconds']} s/step, "
            f"{flux_flops / 1e15:.2f} PFLOP/chip/step = {flux_mfu:.0%} MFU. alignax SD3.5-medium SFT at "
            f"{per_chip:.0f} images/chip: {our_flops / 1e15:.3f} PFLOP/chip/step, projected {our_step:.3f} s/step "
            f"({sft_v5p.mfu():.0%} MFU) with splash, {sft_v5p.step_seconds('XLA attention') * scale:.3f} s/step "
            f"({sft_v5p.mfu('XLA attention'):.0%}) with XLA attention; Flux-dev does {flux_flops / our_flops:.1f}x "
            "the work per image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="v5p-64,v5e-16,v6e-8", help=f"comma-separated, of {sorted(SLICES)}")
    parser.add_argument("--steps", default="sft,reward", help="comma-separated, of reward,sft")
    args = parser.parse_args()
    slices, steps = args.slices.split(","), args.steps.split(",")
    bad = [s for s in slices if s not in SLICES] + [s for s in steps if s not in ("reward", "sft")]
    if bad:
        parser.error(f"unknown {bad}: --slices takes {sorted(SLICES)}, --steps takes reward,sft")
    print(f"jax {jax.__version__}, {jax.device_count()} fake CPU devices; chips: "
          + "; ".join(f"{n} {c.bf16_flops / 1e12:.0f} TFLOP/s, HBM {c.hbm_bandwidth / 1e9:.0f} GB/s, "
                      f"ICI {c.ici_bandwidth / 1e9:.0f} GB/s ({c.source})" for n, c in CHIPS.items()))
    builder = StepBuilder()
    c = builder.config
    print(f"config: {sd35_reward_backprop.__name__}, global batch {c.batch_size}, compute {c.model.compute_dtype}, "
          f"remat {c.model.remat}, {c.sample.num_steps} sampler steps, DRaFT-{c.objective.k}, LoRA rank {c.lora.rank}")
    rows = []
    for slice_name in slices:
        for step in steps:
            p = project(builder, slice_name, step)
            rows.append(p)
            print(f"compiled {step} for {slice_name} in {p.compile_seconds:.0f} s; collectives "
                  + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(p.ici_bytes.items())))
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for p in rows:
        print(p.line())
    sft_v5p = next((p for p in rows if p.step == "sft" and SLICES[p.slice][0] == "v5p"), None)
    if sft_v5p is not None:
        print(maxdiffusion_comparison(sft_v5p))
    print("roofline " + " ".join(f"mfu_{p.step}_{p.slice.replace('-', '')}={p.mfu():.3f} "
                                 f"xla_attention_mfu_{p.step}_{p.slice.replace('-', '')}={p.mfu('XLA attention'):.3f}"
                                 for p in rows))


if __name__ == "__main__":
    main()
