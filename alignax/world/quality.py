"""The portrait world's quality bars, measured on a built world (what is shipped, in fp16):

- `identity_top1`: the world's ArcFace embedder, through the `identity` reward with fixed landmarks,
  names the identity each eval prompt asks for on the base pipeline's samples (top-1 over all the world's
  identities; chance is 1 / identities). Bar: >= 0.60.
- `clip_retrieval`: for each real eval portrait, the world CLIP ranks its own caption first among all
  distinct eval captions. Bar: >= 0.70.
- `scorer_accuracy`: the preference scorer prefers the preferred image of held-out pairs. Bar: >= 0.85.

Also reported: the chance level, and the `realism` judge on the samples and on real eval images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax.world.paths import WorldPaths
from alignax.world.pipeline import MAX_SEQUENCE_LENGTH, SCHEDULER_SHIFT

BARS = {"identity_top1": 0.60, "clip_retrieval": 0.70, "scorer_accuracy": 0.85}


class WorldSampler:
    """The world pipeline's transformer + VAE + text towers in JAX: prompts and a seed → images NHWC in [0, 1]."""

    def __init__(self, pipeline_dir: str, *, num_steps: int, batch_size: int = 32) -> None:
        from alignax.models import load_diffusers
        from alignax.world.conditioning import pipeline_encoder
        self.transformer = load_diffusers(f"{pipeline_dir}/transformer")
        self.vae = load_diffusers(f"{pipeline_dir}/vae")
        self.encode = pipeline_encoder(pipeline_dir)
        self.num_steps, self.batch_size = num_steps, batch_size
        cfg = self.vae.module.config
        scale, shift = float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)
        transformer, vae = self.transformer.module, self.vae.module

        @jax.jit
        def run(t_params, v_params, noise, context, pooled):
            from alignax import sampling
            velocity = lambda x, t, c, p: transformer.apply({"params": t_params}, x, t, c, p,  # noqa: E731
                                                            method="forward_nhwc")
            _, sigmas = sampling.flow_match_sigmas(num_steps, SCHEDULER_SHIFT)
            latents = sampling.denoise(velocity, noise, sigmas, context, pooled)
            x = vae.apply({"params": v_params}, latents / scale + shift, method="decode_nhwc")
            return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)

        self._run = run

    def latent_shape(self, count: int) -> tuple[int, int, int, int]:
        cfg = self.transformer.module.config
        return count, cfg.sample_size, cfg.sample_size, cfg.in_channels

    def __call__(self, prompts: Sequence[str], seed: int) -> np.ndarray:
        context, pooled = self.encode(list(prompts))
        noise = jax.random.normal(jax.random.key(seed), self.latent_shape(len(prompts)))
        out = []
        for start in range(0, len(prompts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            count = len(prompts[rows])
            missing = self.batch_size - count
            pad = lambda a, missing=missing: np.concatenate([a, np.repeat(a[-1:], missing, 0)])  # noqa: E731
            images = self._run(self.transformer.params, self.vae.params, pad(np.asarray(noise[rows])),
                               pad(context[rows]), pad(pooled[rows]))
            out.append(np.asarray(images)[:count])
        return np.concatenate(out)


def identity_top1(world: WorldPaths, images: np.ndarray, identities: Sequence[str], known: Sequence[str],
                  points: np.ndarray, size: int) -> float:
    """Fraction of `images` whose best-matching identity among `known` is the requested one."""
    from alignax import rewards
    reward = rewards.get("identity", name="identity", embedder=str(world.identity), references=str(world.references),
                         landmarks="fixed", points=np.asarray(points).tolist(), reference_size=[size, size])
    apply = jax.jit(reward.apply)
    x = jnp.asarray(images, jnp.float32)
    scores = np.stack([np.asarray(apply(reward.params, x, {k: jnp.asarray(v) for k, v in reward.prepare_batch(
        {"identity": [name] * len(images)}).items()})[0]) for name in known], axis=1)
    predicted = np.asarray(known)[np.argmax(scores, axis=1)]
    return float(np.mean(predicted == np.asarray(identities)))


def clip_retrieval(world: WorldPaths, images: np.ndarray, captions: Sequence[str]) -> float:
    """Fraction of real images whose own caption the world CLIP ranks first among the distinct captions."""
    from alignax.models import load_transformers
    from alignax.models.clip import l2_normalize
    from alignax.rewards import preprocess
    from alignax.rewards.tokenize import clip_tokenize_fn, load_clip_tokenizer
    model = load_transformers(world.clip)
    tokenizer = load_clip_tokenizer(world.pipeline / "tokenizer", source="world tokenizer")
    distinct = sorted(set(captions))
    tokens = clip_tokenize_fn(tokenizer, "clip", model.module.config.text.max_position_embeddings)(distinct)
    size = model.module.config.vision.image_size
    text = model.module.apply({"params": model.params}, jnp.asarray(tokens["clip/input_ids"]),
                              jnp.asarray(tokens["clip/attention_mask"]), method="get_text_features")
    pixels = preprocess.clip_pixels(jnp.asarray(images, jnp.float32) / 255.0, size, crop_offset="floor")
    image = model.module.apply({"params": model.params}, pixels, method="get_image_features")
    best = np.argmax(np.asarray(l2_normalize(image) @ l2_normalize(text).T), axis=1)
    return float(np.mean(np.asarray(distinct)[best] == np.asarray(captions)))


def scorer_accuracy(world: WorldPaths, pairs: Any) -> float:
    """Held-out pairwise accuracy of the preference scorer (as the `pickscore` reward scores)."""
    from alignax import rewards
    reward = rewards.get("pickscore", name="aesthetic", checkpoint=str(world.aesthetic))
    apply = jax.jit(reward.apply)
    batch = {k: jnp.asarray(v) for k, v in reward.prepare(list(pairs.prompts)).items()}
    s0 = np.asarray(apply(reward.params, jnp.asarray(pairs.image_0, jnp.float32) / 255.0, batch)[0])
    s1 = np.asarray(apply(reward.params, jnp.asarray(pairs.image_1, jnp.float32) / 255.0, batch)[0])
    return float(np.mean((s0 > s1) == (np.asarray(pairs.label_0) > 0.5)))


def measure(world: WorldPaths, data: Any, *, num_samples: int, seed: int, sample_steps: int) -> dict:
    """Every bar on `world` with the eval split of `data` (alignax.world.data.WorldData); returns the numbers,
    the bars and whether each is met."""
    from alignax.world import portraits
    eval_split = data.eval
    n = min(num_samples, len(eval_split.captions))
    sampler = WorldSampler(str(world.pipeline), num_steps=sample_steps)
    samples = sampler(list(eval_split.captions[:n]), seed)
    size = samples.shape[1]
    names = [i.name for i in data.identities]
    measured = {
        "identity_top1": identity_top1(world, samples, [names[k] for k in eval_split.identity[:n]], names,
                                       portraits.canonical_landmarks(size), size),
        "clip_retrieval": clip_retrieval(world, eval_split.images, list(eval_split.captions)),
        "scorer_accuracy": scorer_accuracy(world, data.eval_pairs),
    }
    return {**measured, "identity_chance": 1.0 / len(names), "samples": n, "sample_steps": sample_steps,
            "bars": BARS, "met": {k: bool(measured[k] >= v) for k, v in BARS.items()},
            "max_sequence_length": MAX_SEQUENCE_LENGTH}
