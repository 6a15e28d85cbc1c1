"""Precomputing the frozen SigLIP 2 targets of `feature_align` into a captioned-images dataset.

    python -m alignax.data.siglip_targets --dataset=DIR --siglip=SIGLIP_DIR --out=OUT_DIR

`--siglip` may also be a transformers CLIP directory (model_type 'clip', e.g. the portrait world's CLIP):
its projected image and text embeddings are the pooled targets, and its patch tokens (class token
dropped, after the post-layernorm) are brought into the same joint space by the visual projection, so all
three targets share one width, as SigLIP's do.

The targets are fixed for a dataset, so computing them once offline (here, with alignax's
own Flax SigLIP loaded by `load_transformers`) keeps the SigLIP tower out of every training
step. Token ids come from the tokenizer saved with the checkpoint (transformers'
`AutoTokenizer` on the same directory, never the hub), padded to the text tower's
`max_position_embeddings` as SigLIP was trained. Every split is copied with the three
`siglip_*` fields added; train with `config.objective.targets='batch'` and
`config.objective.target_dim` set to the SigLIP projection width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from alignax.errors import WeightsError
from alignax.rewards import preprocess

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP's image processor normalisation


def siglip_pixels(images_uint8: np.ndarray, size: int) -> jax.Array:
    """uint8 NHWC → NCHW resized to the SigLIP input size and normalised to [-1, 1]."""
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    x = preprocess.resize(x, size, size)
    return preprocess.normalize_to_nchw(x, SIGLIP_MEAN, SIGLIP_STD)


def _siglip_features(module, params, images_uint8: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, ...]:
    apply = lambda method, *args: module.apply({"params": params}, *args, method=method)  # noqa: E731
    pixels = siglip_pixels(images_uint8, module.config.vision.image_size)
    patches, pooled = apply(lambda m, x: m.vision_model(x), pixels)
    return apply(lambda m, ids: m.get_text_features(ids), input_ids), pooled, patches


def _clip_features(module, params, images_uint8: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, ...]:
    from alignax.models.layers import LayerNorm
    apply = lambda method, *args: module.apply({"params": params}, *args, method=method)  # noqa: E731
    size = module.config.vision.image_size
    x = preprocess.resize(jnp.asarray(images_uint8, jnp.float32) / 255.0, size, size)
    hidden, pooled = apply(lambda m, pixels: m.vision_model(pixels), preprocess.normalize_to_nchw(x))
    norm = LayerNorm(epsilon=module.config.vision.layer_norm_eps)
    tokens = norm.apply({"params": params["vision_model"]["post_layernorm"]}, hidden[:, 1:])
    project = lambda v: apply(lambda m, y: m.visual_projection(y), v)  # noqa: E731
    return apply(lambda m, ids: m.get_text_features(ids), input_ids), project(pooled), project(tokens)


# model_type -> (module, params, images uint8 NHWC, input_ids) -> (text, image, patches), in one joint width
FEATURES: dict[str, Callable[..., tuple[jax.Array, ...]]] = {"siglip": _siglip_features, "clip": _clip_features}


def targets_fn(siglip) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """`(images uint8 NHWC, input_ids) -> targets`, one compiled program with one vision pass for both the
    pooled and the patch features."""
    features = FEATURES[siglip.architecture.name]

    @jax.jit
    def targets(params, images_uint8, input_ids):
        text, pooled, patches = features(siglip.module, params, images_uint8, input_ids)
        return {"siglip_text_embeds": text, "siglip_image_embeds": pooled, "siglip_patch_embeds": patches}

    return lambda images, ids: jax.device_get(targets(siglip.params, jnp.asarray(images), jnp.asarray(ids)))


def compute_targets(siglip, images_uint8: np.ndarray, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """{'siglip_text_embeds' [B, D], 'siglip_image_embeds' [B, D], 'siglip_patch_embeds' [B, N, D]}."""
    return targets_fn(siglip)(images_uint8, input_ids)


def with_targets(examples: Iterable[dict], siglip, tokenize, batch_size: int = 32) -> Iterator[dict]:
    """Adds the three target fields to each captioned-image example; `tokenize(prompts) -> ids`."""
    chunk: list[dict] = []
    compute = targets_fn(siglip)  # compiled once per chunk shape, not per call

    def flush():
        images = np.stack([e["image"] for e in chunk])
        targets = compute(images, tokenize([e["prompt"] for e in chunk]))
        for i, example in enumerate(chunk):
            yield {**example, **{k: v[i] for k, v in targets.items()}}

    for example in examples:
        chunk.append(example)
        if len(chunk) == batch_size:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def load_siglip_and_tokenizer(directory: str | os.PathLike) -> tuple[object, Callable[[list[str]], np.ndarray]]:
    """alignax's SigLIP and a `prompts -> input_ids [B, max_position_embeddings]` tokenizer, both from one
    local transformers directory."""
    from alignax.models import load_transformers
    model = load_transformers(directory)
    if model.architecture.name not in FEATURES:
        raise WeightsError(f"{directory}/config.json: model_type {model.architecture.name!r}; feature targets need "
                           f"one of {sorted(FEATURES)}")
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{directory}: no readable tokenizer saved beside the SigLIP weights ({e})") from e
    length = model.module.config.text.max_position_embeddings
    vocab = model.module.config.text.vocab_size
    if max(tokenizer.get_vocab().values()) >= vocab:
        raise WeightsError(f"{directory}: tokenizer ids exceed the text tower's {vocab} token embeddings")

    def tokenize(prompts: list[str]) -> np.ndarray:
        return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="np")["input_ids"].astype(np.int32)

    return model, tokenize


def add_targets(dataset: str | os.PathLike, siglip_dir: str | os.PathLike, out: str | os.PathLike, *,
                batch_size: int = 32, overwrite: bool = False) -> str:
    """Copies every split of the captioned-images `dataset` to `out` with the SigLIP targets added."""
    from alignax.data import CAPTIONED_IMAGES, dataset_splits, open_dataset, write_captioned_images
    splits = {name: open_dataset(os.fspath(dataset), name, kind=CAPTIONED_IMAGES.name)
              for name in dataset_splits(os.fspath(dataset))}  # every split checked before any work
    siglip, tokenize = load_siglip_and_tokenizer(siglip_dir)

    def examples(source) -> Iterator[dict]:
        return (source[i] for i in range(len(source)))

    return write_captioned_images(out, {name: with_targets(examples(source), siglip, tokenize, batch_size)
                                        for name, source in splits.items()}, overwrite=overwrite)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    path = add_targets(f.dataset, f.siglip, f.out, batch_size=f.batch_size, overwrite=f.overwrite)
    print(f"wrote {f.dataset} with SigLIP targets added to {path}")


def cli() -> None:
    """`alignax-siglip-targets` / `python -m alignax.data.siglip_targets`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib
    flags.DEFINE_string("dataset", None, "captioned-images dataset directory", required=True)
    flags.DEFINE_string("siglip", None, "transformers SigLIP / SigLIP 2 or CLIP directory (config, weights, tokenizer)",
                        required=True)
    flags.DEFINE_string("out", None, "output dataset directory", required=True)
    flags.DEFINE_integer("batch_size", 32, "images per SigLIP forward pass")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset at --out")
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
