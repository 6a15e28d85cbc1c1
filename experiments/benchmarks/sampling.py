"""Images per second of sampling with guidance and VAE decode: alignax (jitted) vs diffusers' SD3 pipeline.

    python -m experiments.benchmarks.sampling [--steps 28] [--batch 4] [--repeats 5]

alignax: `alignax.sampling.generate_images` (the trainer's and `alignax.evaluate`'s one sampling entry
point: Euler steps in a `lax.scan`, CFG in one batched call, VAE decode), jitted and compiled ahead.
diffusers: `StableDiffusion3Pipeline.__call__` on the same saved MM-DiT and VAE, with the prompt
embeddings passed in (so neither side runs text encoders), the same initial latents, `output_type="np"`.
Both sample `--batch` images with `--steps` steps at guidance 4.5; the largest pixel difference between
the two sides' images is printed. Sizes: `experiments/benchmarks/tiny_sd3.py`.

Last line: `sampling_speedup=<x>` (images/s alignax ÷ diffusers at torch's faster thread setting).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (why: common.py)

import argparse  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from alignax import compiled_costs, sampling  # noqa: E402
from experiments.benchmarks import common, tiny_sd3  # noqa: E402


def alignax_sampler(root: Path, batch: dict[str, np.ndarray], noise: np.ndarray, num_steps: int):
    """(run once -> images, compiled): the jitted sampler on the saved weights."""
    models, transformer, vae = tiny_sd3.load_alignax(root)

    def generate(params, frozen, batch, noise):
        return sampling.generate_images(models, params, frozen, batch, noise, num_steps=num_steps,
                                        shift=tiny_sd3.SHIFT, guidance_scale=tiny_sd3.GUIDANCE)

    args = (transformer, {"vae": vae}, {k: jnp.asarray(v) for k, v in batch.items()},
            jnp.asarray(noise))
    compiled = jax.jit(generate).lower(*args).compile()

    def run() -> np.ndarray:
        return np.asarray(jax.block_until_ready(compiled(*args)))
    return run, compiled


def diffusers_sampler(root: Path, batch: dict[str, np.ndarray], noise: np.ndarray, num_steps: int):
    """run(threads) -> images: the pipeline's own `__call__`, without text encoders (embeddings given)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(root / "transformer"),
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=tiny_sd3.SHIFT),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    side = tiny_sd3.VAE["sample_size"]

    def run(threads: int) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.no_grad():
            return pipe(prompt_embeds=t["encoder_hidden_states"], pooled_prompt_embeds=t["pooled_projections"],
                        negative_prompt_embeds=t["negative_encoder_hidden_states"],
                        negative_pooled_prompt_embeds=t["negative_pooled_projections"], latents=latents,
                        num_inference_steps=num_steps, guidance_scale=tiny_sd3.GUIDANCE, height=side, width=side,
                        output_type="np").images
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28, help="sampler steps")
    parser.add_argument("--batch", type=int, default=4, help="images per call")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error(f"--steps={args.steps} --batch={args.batch}: both must be >= 1")
    print(common.machine_line())
    batch = tiny_sd3.prompt_embeddings(args.batch)
    noise = np.random.default_rng(3).standard_normal(tiny_sd3.latent_shape(args.batch)).astype(np.float32)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        tiny_sd3.save_transformer_and_vae(root)
        ours, compiled = alignax_sampler(root, batch, noise, args.steps)
        theirs = diffusers_sampler(root, batch, noise, args.steps)
    print(f"sampling: tiny_sd3, {args.batch} images of {tiny_sd3.VAE['sample_size']}^2, {args.steps} steps, "
          f"guidance {tiny_sd3.GUIDANCE}, fp32")
    torch_threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    difference = float(np.max(np.abs(ours() - theirs(torch_threads[0]))))
    print(f"images: max |alignax - diffusers| = {difference:.2e} (pixels in [0, 1])")

    steps: dict[str, Callable[[], object]] = {"alignax": ours}
    for threads in torch_threads:
        steps[f"diffusers[{threads}t]"] = (lambda n=threads: theirs(n))
    median = common.report_times(common.interleaved(steps, args.warmup, args.repeats))
    torch_best = min((f"diffusers[{n}t]" for n in torch_threads), key=median.__getitem__)
    speedup = median[torch_best] / median["alignax"]
    print(f"images/s: alignax {args.batch / median['alignax']:.2f}, {torch_best} {args.batch / median[torch_best]:.2f};"
          f" XLA flops {compiled_costs.cost(compiled)['flops'] / 1e9:.1f} G (the scan body counted once)")
    print(f"load after: {os.getloadavg()}")
    print(f"sampling_speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
