"""build_tiny_world: fast, laid out as documented, captions describe the pictures, preferences follow saturation."""

import json
import os
import time

import numpy as np
import pytest

from alignax.data import Loader, build_tiny_world, open_dataset
from alignax.data.tiny_world import PALETTE, SHAPES
from alignax.errors import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    start = time.perf_counter()
    world = build_tiny_world(
        tmp_path_factory.mktemp("world") / "w", image_size=16, num_train=12, num_eval=4, context_dim=12, pooled_dim=10
    )
    return world, time.perf_counter() - start


def test_fast_and_laid_out_as_documented(world):
    world, seconds = world
    assert seconds < 5.0
    assert sorted(os.listdir(world.root)) == ["captioned_images", "preference_pairs", "prompts", "world.json"]
    assert json.load(open(os.path.join(world.root, "world.json")))["context_dim"] == 12
    for path, kind in [
        (world.captioned_images, "captioned_images"),
        (world.prompts, "prompts"),
        (world.preference_pairs, "preference_pairs"),
    ]:
        for split, size in (("train", 12), ("eval", 4)):
            source = open_dataset(path, split, kind=kind)
            assert len(source) == size
            assert source[0]["encoder_hidden_states"].shape == (8, 12)
            assert source[0]["pooled_projections"].shape == (10,)


def test_captions_describe_the_images(world):
    world, _ = world
    source = open_dataset(world.captioned_images)
    for i in range(len(source)):
        record = source[i]
        words = record["prompt"].split()  # "a|an <colour> <shape> on a|an <colour> background"
        colour, shape, background = words[1], words[2], words[5]
        assert shape in SHAPES and colour != background
        image = record["image"]
        assert image.shape == (16, 16, 3)
        np.testing.assert_array_equal(image[0, 0], PALETTE[background])  # the top-left corner is never covered
        assert (image == PALETTE[colour]).all(-1).sum() > 10  # the shape is drawn in its colour


def test_conditioning_is_the_toy_encoders(world):
    world, _ = world
    record = open_dataset(world.prompts, "eval")[2]
    hidden, pooled = world.text_encoder.encode([record["prompt"]])
    np.testing.assert_array_equal(record["encoder_hidden_states"], hidden[0])
    np.testing.assert_array_equal(record["pooled_projections"], pooled[0])


def _saturation(image):
    rgb = image.astype(np.float64) / 255.0
    return np.mean(rgb.max(-1) - rgb.min(-1))


def test_preferred_image_is_more_saturated_and_sides_are_mixed(world):
    world, _ = world
    batch = Loader(open_dataset(world.preference_pairs), global_batch_size=12, seed=0).batch_at(0)
    labels = batch["label_0"]
    assert set(labels.tolist()) == {0.0, 1.0}  # the preferred image is not always on one side
    for image_0, image_1, label in zip(batch["image_0"], batch["image_1"], labels, strict=True):
        preferred, other = (image_0, image_1) if label == 1.0 else (image_1, image_0)
        assert _saturation(preferred) > _saturation(other) + 0.05


def test_deterministic_in_seed(tmp_path):
    a = build_tiny_world(tmp_path / "a", image_size=8, num_train=3, num_eval=1, seed=1)
    b = build_tiny_world(tmp_path / "b", image_size=8, num_train=3, num_eval=1, seed=1)
    c = build_tiny_world(tmp_path / "c", image_size=8, num_train=3, num_eval=1, seed=2)
    ra, rb, rc = (open_dataset(w.captioned_images)[1] for w in (a, b, c))
    np.testing.assert_array_equal(ra["image"], rb["image"])
    assert ra["prompt"] == rb["prompt"]
    assert ra["prompt"] != rc["prompt"] or not np.array_equal(ra["image"], rc["image"])


def test_interrupted_build_is_redone_and_a_complete_one_is_kept(tmp_path):
    root = tmp_path / "w"
    build_tiny_world(root, image_size=8, num_train=2, num_eval=1, seed=1)
    os.remove(root / "world.json")  # as if the build had died before finishing
    build_tiny_world(root, image_size=8, num_train=3, num_eval=1, seed=1)
    assert len(open_dataset(str(root / "prompts"))) == 3
    with pytest.raises(DataError, match="already built"):
        build_tiny_world(root, image_size=8, num_train=3, num_eval=1, seed=1)
