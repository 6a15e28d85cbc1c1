"""One reward-backprop step through sampler, VAE decode and a CLIP reward: alignax (jitted) vs PyTorch eager.

    python -m experiments.benchmarks.reward_step [--modes draft_k,full] [--repeats 5] [--steps 10]

The step users buy alignax for: N Euler steps of an MM-DiT with classifier-free guidance (scale 4.5,
one batched call per step, uncond half first), the VAE decode of the final latents, a CLIP image/text
cosine scaled by the logit scale (HPSv2 / PickScore structure), loss = -mean score, gradient w.r.t.
the MM-DiT params. Two modes: `draft_k` with K = 1 (DRaFT-1: the first N-1 steps without gradient)
and `full` (every step differentiable, each under gradient checkpointing), as AlignProp and DRaFT run them.

alignax runs the production objective (`alignax.objectives.reward_backprop.build` with the loaded
models and `alignax.rewards.clip_similarity.similarity_reward`); PyTorch runs the same step written
here with diffusers' `SD3Transformer2DModel` and `AutoencoderKL` and transformers' `CLIPModel`
(`torch.utils.checkpoint` per step, `no_grad` for the frozen steps). Both load the same saved weights and
use the same noise (drawn by alignax's objective from the same key), prompts and token ids; both losses are
printed and must agree to 5 digits.

Sizes: `experiments/benchmarks/tiny_sd3.py` (tiny, but with the real work's structure), batch 2 prompts
(4 rows with CFG).

Memory: PyTorch's figure is the peak RSS a fresh process adds over one step (after loading the models);
alignax's is XLA's compiled temp buffers plus outputs (`memory_analysis()`), i.e. what the step allocates
beyond its inputs. `memory_ratio` = PyTorch ÷ alignax for the draft_k step.

Last line: `reward_step_speedup=<x> memory_ratio=<y>` (draft_k, against torch's faster thread setting).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (why: common.py)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402

from alignax import compiled_costs, pareto, sampling  # noqa: E402
from alignax import config as config_lib  # noqa: E402
from alignax.objectives import base as objectives_base  # noqa: E402
from alignax.objectives import reward_backprop  # noqa: E402
from alignax.rewards import preprocess  # noqa: E402
from alignax.rewards.clip_similarity import load_clip, similarity_reward  # noqa: E402
from experiments.benchmarks import common, tiny_sd3  # noqa: E402

BATCH = 2
REWARD = "hps"
MODES = {"draft_k": dict(mode="draft_k", k=1), "full": dict(mode="full")}


def make_batch() -> dict[str, np.ndarray]:
    ids, mask = tiny_sd3.clip_token_ids(BATCH)
    return {**tiny_sd3.prompt_embeddings(BATCH), f"{REWARD}/input_ids": ids, f"{REWARD}/attention_mask": mask}


# ---- alignax ------------------------------------------------------------------------------------

def alignax_models(root: Path) -> tuple[objectives_base.Models, dict, dict]:
    """(Models, trainable, frozen) from the saved directories through alignax's own loaders."""
    clip = load_clip(root / "clip", source="benchmark clip", open_clip_config="ViT-B-16")
    size = clip.module.config.vision.image_size
    reward = similarity_reward(
        REWARD, clip, tokenize=lambda prompts: {},
        pixels=lambda images: preprocess.clip_pixels(images, size, crop_offset="floor"),
        to_score=lambda cosine, params: jnp.exp(params["logit_scale"].astype(jnp.float32)) * cosine,
        range="", preprocessing="")
    models, transformer, vae = tiny_sd3.load_alignax(root, rewards={REWARD: reward})
    return models, {"transformer": transformer}, {"vae": vae, "rewards": {REWARD: clip.params}}


def alignax_step(models, trainable, frozen, batch, mode: str, num_steps: int):
    """(run once -> loss, compiled step): the objective's loss and its gradient w.r.t. the MM-DiT params."""
    pareto_config = config_lib.base_config().pareto
    pareto_config.weights = ml_collections.ConfigDict({REWARD: 1.0})
    run = objectives_base.RunSettings(num_steps=num_steps, shift=tiny_sd3.SHIFT, guidance_scale=tiny_sd3.GUIDANCE,
                                      pareto=pareto.resolve_config(pareto_config, [REWARD]), batch_size=BATCH)
    cfg = ml_collections.ConfigDict({**reward_backprop.DEFAULTS, **MODES[mode]})
    objective = reward_backprop.build(cfg, models, run)
    state = objective.init_state(trainable, frozen)
    rng = jax.random.key(7)
    args = (trainable, frozen, state, {k: jnp.asarray(v) for k, v in batch.items()}, rng)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    compiled = jax.jit(grad_fn).lower(*args).compile()

    def step() -> float:
        (loss, _), grads = compiled(*args)
        jax.block_until_ready(grads)
        return float(loss)
    return step, compiled


def objective_noise(batch_size: int) -> np.ndarray:
    """The noise the objective draws from key 7 (its first split), NHWC."""
    noise_rng, _ = jax.random.split(jax.random.key(7))
    return np.asarray(jax.random.normal(noise_rng, tiny_sd3.latent_shape(batch_size), jnp.float32))


# ---- PyTorch ------------------------------------------------------------------------------------

class TorchStep:
    """The same step in PyTorch eager, written AlignProp/DRaFT-style with diffusers' and transformers' modules."""

    def __init__(self, root: Path, batch: dict[str, np.ndarray], noise_nhwc: np.ndarray, num_steps: int):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPModel

        self.transformer = SD3Transformer2DModel.from_pretrained(root / "transformer").train()
        self.vae = AutoencoderKL.from_pretrained(root / "vae").eval().requires_grad_(False)
        self.clip = CLIPModel.from_pretrained(root / "clip").eval().requires_grad_(False)
        t = {k: torch.from_numpy(v) for k, v in batch.items()}
        self.context = torch.cat([t["negative_encoder_hidden_states"], t["encoder_hidden_states"]])
        self.pooled = torch.cat([t["negative_pooled_projections"], t["pooled_projections"]])
        self.ids, self.mask = t[f"{REWARD}/input_ids"].long(), t[f"{REWARD}/attention_mask"].long()
        self.noise = torch.from_numpy(np.ascontiguousarray(noise_nhwc.transpose(0, 3, 1, 2)))
        self.sigmas = sampling.flow_match_sigmas(num_steps, tiny_sd3.SHIFT)[1].tolist()
        self.mean = torch.tensor(preprocess.OPENAI_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.OPENAI_STD).view(1, 3, 1, 1)

    def euler_step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        timestep = torch.full((2 * x.shape[0],), sigma * sampling.NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
        v = self.transformer(hidden_states=torch.cat([x, x]), timestep=timestep, encoder_hidden_states=self.context,
                             pooled_projections=self.pooled).sample
        v_uncond, v_cond = v.chunk(2)
        return x + (sigma_next - sigma) * (v_uncond + tiny_sd3.GUIDANCE * (v_cond - v_uncond))

    def score(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / tiny_sd3.VAE["scaling_factor"] + tiny_sd3.VAE["shift_factor"]
        images = torch.clamp((self.vae.decode(z).sample + 1.0) / 2.0, 0.0, 1.0)
        image = self.clip.get_image_features(pixel_values=(images - self.mean) / self.std)
        text = self.clip.get_text_features(input_ids=self.ids, attention_mask=self.mask)
        image, text = (getattr(f, "pooler_output", f) for f in (image, text))
        cosine = torch.sum(torch.nn.functional.normalize(image, dim=-1)
                           * torch.nn.functional.normalize(text, dim=-1), dim=-1)
        return self.clip.logit_scale.exp() * cosine

    def __call__(self, mode: str, threads: int) -> float:
        torch.set_num_threads(threads)
        self.transformer.zero_grad(set_to_none=True)
        first_live = len(self.sigmas) - 2 if mode == "draft_k" else 0  # DRaFT-1: only the last step
        x = self.noise
        for i, (sigma, sigma_next) in enumerate(zip(self.sigmas[:-1], self.sigmas[1:], strict=True)):
            if i < first_live:
                with torch.no_grad():
                    x = self.euler_step(x, sigma, sigma_next)
            else:
                x = torch.utils.checkpoint.checkpoint(self.euler_step, x, sigma, sigma_next, use_reentrant=False)
        loss = -torch.mean(self.score(x))
        loss.backward()
        return float(loss.detach())


def torch_memory_child(root: str, mode: str, num_steps: int) -> None:
    """Run in a fresh process: the bytes one torch step adds to the resident set, as JSON on stdout."""
    torch.set_num_threads(1)
    batch = make_batch()
    step = TorchStep(Path(root), batch, np.load(Path(root) / "noise.npy"), num_steps)
    before = common.current_rss_bytes()
    step(mode, threads=1)
    print(json.dumps({"bytes": common.peak_rss_bytes() - before}))


def torch_step_bytes(root: Path, mode: str, num_steps: int) -> int:
    module = __spec__.name if __spec__ else "experiments.benchmarks.reward_step"
    return int(common.run_child(module, ["--torch-memory-child", str(root), "--modes", mode,
                                         "--steps", str(num_steps)])["bytes"])


# ---- main ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="draft_k,full", help=f"comma-separated, of {sorted(MODES)}")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-memory-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; expected some of {sorted(MODES)}")
    if args.torch_memory_child:
        torch_memory_child(args.torch_memory_child, modes[0], args.steps)
        return
    print(common.machine_line())
    batch = make_batch()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        tiny_sd3.save_transformer_and_vae(root)
        tiny_sd3.save_clip(root)
        models, trainable, frozen = alignax_models(root)
        noise = objective_noise(BATCH)
        np.save(root / "noise.npy", noise)
        torch_step = TorchStep(root, batch, noise, args.steps)
        n_params = sum(p.numel() for p in torch_step.transformer.parameters())
        print(f"models: tiny_sd3 (MM-DiT {n_params / 1e6:.1f}M params); batch {BATCH} (x2 CFG), "
              f"{args.steps} steps, fp32")
        steps: dict[str, Callable[[], object]] = {}
        compiled = {}
        torch_threads = sorted({torch.get_num_threads(), 1}, reverse=True)
        for mode in modes:
            steps[f"alignax[{mode}]"], compiled[mode] = alignax_step(models, trainable, frozen, batch, mode,
                                                                     args.steps)
            for threads in torch_threads:
                steps[f"torch[{mode},{threads}t]"] = (lambda m=mode, n=threads: torch_step(m, n))
        for mode in modes:
            ours, theirs = steps[f"alignax[{mode}]"](), steps[f"torch[{mode},{torch_threads[0]}t]"]()
            agree = abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))
            print(f"loss {mode}: alignax={ours:.7f} torch={theirs:.7f} agree_to_5_digits={agree}")
            if not agree:
                raise SystemExit(f"reward_step: the two {mode} steps disagree ({ours} vs {theirs}): not the same step")
        memory = {mode: (torch_step_bytes(root, mode, args.steps), common.compiled_bytes(compiled[mode]))
                  for mode in modes}

    median = common.report_times(common.interleaved(steps, args.warmup, args.repeats))
    speedups = {}
    for mode in modes:
        torch_best = min((f"torch[{mode},{n}t]" for n in torch_threads), key=median.__getitem__)
        speedups[mode] = median[torch_best] / median[f"alignax[{mode}]"]
        flops = compiled_costs.cost(compiled[mode])["flops"]
        torch_bytes, xla_bytes = memory[mode]
        ours = median[f"alignax[{mode}]"]
        print(f"{mode}: speedup {median[torch_best] * 1e3:.0f} ms ({torch_best}) / {ours * 1e3:.0f} ms = "
              f"{speedups[mode]:.3f}; memory torch {torch_bytes / 2**20:.1f} MiB / XLA {xla_bytes / 2**20:.1f} MiB = "
              f"{torch_bytes / xla_bytes:.2f}; XLA flops {flops / 1e9:.2f} G (loop bodies once)")
    print(f"load after: {os.getloadavg()}")
    head = modes[0]
    print(f"reward_step_speedup={speedups[head]:.3f} memory_ratio={memory[head][0] / memory[head][1]:.3f}")


if __name__ == "__main__":
    main()
