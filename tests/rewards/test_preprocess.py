"""JAX preprocessing against PIL + numpy references, and against transformers' own CLIPImageProcessor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from alignax.rewards import preprocess
from tests.rewards.references import clip_reference, hpsv2_reference, pil_resize, sample_images

SIZE = 30
# (input height, width): downsampling (both aspect ratios, odd padding, banker's rounding of 22.5),
# upsampling, and the already-right size where no resampling happens.
SHAPES = [(64, 48), (45, 60), (90, 90), (224, 160), (20, 26), (30, 30)]
# One 8-bit rounding after each of PIL's two passes, each 0.5/255, the first carried through the second
# pass's kernel (sum |w| <= 1.25 for Keys' a=-0.5 cubic): 0.5 * 1.25 + 0.5 = 1.125/255.
EIGHT_BIT_BOUND = 1.125 / 255
FLOAT_BOUND = 1e-5


def normalized_bound(bound: float) -> float:
    return bound / float(np.min(preprocess.OPENAI_STD))


@pytest.mark.parametrize("shape", SHAPES)
def test_resize_is_pils_bicubic(shape):
    """Same filter as PIL: float mode agrees to fp32 rounding; 8-bit PIL differs only by its rounding."""
    images = sample_images(*shape)
    target = (17, 23) if shape != (30, 30) else (30, 30)
    ours = np.asarray(jax.jit(preprocess.resize, static_argnums=(1, 2))(images, *target))
    float_err = max(np.abs(ours[i] - pil_resize(images[i], *target, eight_bit=False)).max() for i in range(2))
    u8_err = max(np.abs(ours[i] - pil_resize(images[i], *target, eight_bit=True)).max() for i in range(2))
    no_aa = np.asarray(jax.image.resize(images, (2, *target, 3), "bicubic", antialias=False))
    no_aa_err = max(np.abs(no_aa[i] - pil_resize(images[i], *target, eight_bit=False)).max() for i in range(2))
    print(f"resize {shape}->{target}: vs PIL float {float_err:.2e}, vs PIL 8-bit {u8_err * 255:.3f}/255, "
          f"(jax without antialias vs PIL float: {no_aa_err:.2e})")
    assert float_err <= FLOAT_BOUND
    assert u8_err <= EIGHT_BIT_BOUND


@pytest.mark.parametrize("shape", SHAPES)
def test_hpsv2_preprocessing(shape):
    images = sample_images(*shape)
    ours = np.asarray(jax.jit(preprocess.hpsv2_pixels, static_argnums=1)(images, SIZE))
    assert ours.shape == (2, 3, SIZE, SIZE)
    for eight_bit, bound in ((False, FLOAT_BOUND), (True, EIGHT_BIT_BOUND)):
        err = max(np.abs(ours[i] - hpsv2_reference(images[i], SIZE, eight_bit)).max() for i in range(2))
        print(f"hpsv2 {shape} {'8-bit' if eight_bit else 'float'} PIL: max abs err {err:.2e} (normalised units)")
        assert err <= normalized_bound(bound)


def test_hpsv2_padding_is_zero_before_normalisation():
    """45x60 → 22.5 rounds (half to even) to 22 rows, padded 4 top and 4 bottom with black."""
    padded = np.asarray(preprocess.resize_longest_side_and_pad(jnp.full((1, 45, 60, 3), 0.7), SIZE))
    assert np.all(padded[0, :4] == 0) and np.all(padded[0, -4:] == 0)
    np.testing.assert_allclose(padded[0, 4:-4], 0.7, atol=1e-6)


@pytest.mark.parametrize("crop_offset", ["floor", "round"])
@pytest.mark.parametrize("shape", SHAPES)
def test_clip_preprocessing(shape, crop_offset):
    images = sample_images(*shape)
    ours = np.asarray(jax.jit(preprocess.clip_pixels, static_argnums=(1, 2))(images, SIZE, crop_offset))
    for eight_bit, bound in ((False, FLOAT_BOUND), (True, EIGHT_BIT_BOUND)):
        err = max(np.abs(ours[i] - clip_reference(images[i], SIZE, eight_bit, crop_offset)).max() for i in range(2))
        assert err <= normalized_bound(bound), (eight_bit, err)


def test_crop_offsets_differ_where_the_references_do():
    """An odd excess (33 - 30 = 3): transformers takes offset 1, torchvision round(1.5) = 2."""
    assert preprocess.CROP_OFFSETS["floor"](3) == 1 and preprocess.CROP_OFFSETS["round"](3) == 2


@pytest.mark.parametrize("shape", SHAPES)
def test_pickscore_preprocessing_matches_clip_image_processor(shape):
    """transformers' own processor (its PIL backend; 8-bit images) is the reference PickScore uses."""
    images = sample_images(*shape)
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    expected = processor([np.round(im * 255).astype(np.uint8) for im in images], return_tensors="np")["pixel_values"]
    ours = np.asarray(preprocess.clip_pixels(jnp.asarray(images), SIZE, "floor"))
    err = np.abs(ours - expected).max()
    print(f"CLIPImageProcessor {shape}: max abs err {err:.2e} (normalised units; 1/255 = {1 / 255 / 0.2613:.2e})")
    assert err <= normalized_bound(EIGHT_BIT_BOUND)


def test_no_resampling_is_exact():
    """At the model's size both pipelines only normalise: agreement to fp32 rounding."""
    images = sample_images(SIZE, SIZE)
    for ours, ref in ((preprocess.hpsv2_pixels(images, SIZE), lambda im: hpsv2_reference(im, SIZE, True)),
                      (preprocess.clip_pixels(images, SIZE, "floor"),
                       lambda im: clip_reference(im, SIZE, True, "floor"))):
        err = max(np.abs(np.asarray(ours)[i] - ref(images[i])).max() for i in range(2))
        assert err <= 1e-6
