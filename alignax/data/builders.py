"""One writer per dataset kind: `write_<kind>(out_dir, examples)`.

`examples` is an iterable of dicts with the fields of the kind's schema (see
`alignax.data.schemas`), or a mapping {split: iterable}. The result is a TFDS
array_record dataset directory that `open_dataset` reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np

from alignax.data.schemas import CAPTIONED_IMAGES, PREFERENCE_PAIRS, PROMPTS
from alignax.data.writer import Examples, write_dataset
from alignax.errors import DataError


def write_captioned_images(
    out_dir: str | os.PathLike, examples: Mapping[str, Examples] | Examples, *, overwrite: bool = False
) -> str:
    """Records: image uint8 [H,W,3], prompt str, encoder_hidden_states f32 [L,D], pooled_projections f32 [P],
    optionally latents f32 [h,w,C] (NHWC) when images are pre-encoded by the VAE."""
    return write_dataset(out_dir, CAPTIONED_IMAGES, examples, overwrite=overwrite)


def write_prompts(
    out_dir: str | os.PathLike, examples: Mapping[str, Examples] | Examples, *, overwrite: bool = False
) -> str:
    """Records: prompt str, encoder_hidden_states f32 [L,D], pooled_projections f32 [P] (the two embeddings may be
    left out: prompts only, for config.text.encode='on_the_fly')."""
    return write_dataset(out_dir, PROMPTS, examples, overwrite=overwrite)


def write_preference_pairs(
    out_dir: str | os.PathLike, examples: Mapping[str, Examples] | Examples, *, overwrite: bool = False
) -> str:
    """Records: prompt str, image_0/image_1 uint8 [H,W,3], label_0 f32 in [0, 1] (1: image_0 preferred,
    0: image_1, 0.5: tie), optionally encoder_hidden_states/pooled_projections."""
    if isinstance(examples, Mapping):
        examples = {split: _labels_checked(stream, f"{out_dir} split {split!r}") for split, stream in examples.items()}
    else:
        examples = _labels_checked(examples, f"{out_dir} split 'train'")
    return write_dataset(out_dir, PREFERENCE_PAIRS, examples, overwrite=overwrite)


def _labels_checked(examples: Examples, where: str) -> Iterator[Mapping[str, object]]:
    for i, example in enumerate(examples):
        label = example.get("label_0") if isinstance(example, Mapping) else None
        if label is not None and np.ndim(label) == 0 and not 0.0 <= float(label) <= 1.0:
            raise DataError(f"{where}, example {i}, field 'label_0': expected a value in [0, 1], found {float(label)}")
        yield example


WRITERS = {
    CAPTIONED_IMAGES.name: write_captioned_images,
    PROMPTS.name: write_prompts,
    PREFERENCE_PAIRS.name: write_preference_pairs,
}
