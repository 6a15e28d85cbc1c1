"""Each builder writes a TFDS array_record dataset that reads back exactly what was written."""

import json
import os

import numpy as np
import pytest

from alignax.data import open_dataset, write_captioned_images, write_preference_pairs, write_prompts
from alignax.errors import DataError


def _conditioning(rng, length=5, dim=7, pooled=6):
    return {
        "encoder_hidden_states": rng.standard_normal((length, dim)).astype(np.float32),
        "pooled_projections": rng.standard_normal(pooled).astype(np.float32),
    }


def _image(rng, h=9, w=11):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _assert_same(record, expected):
    assert set(record) == set(expected)
    for key, value in expected.items():
        if isinstance(value, str):
            assert isinstance(record[key], str) and record[key] == value, key
        else:
            assert record[key].dtype == np.asarray(value).dtype, key
            np.testing.assert_array_equal(record[key], value, err_msg=key)


def test_captioned_images_round_trip_with_splits_and_variable_image_sizes(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": [
            {"image": _image(rng, 8 + i, 10 - i), "prompt": f"caption {i} é", **_conditioning(rng)} for i in range(5)
        ],
        "eval": [{"image": _image(rng), "prompt": "eval one", **_conditioning(rng)}],
    }
    path = write_captioned_images(tmp_path / "ci", splits)
    for split, examples in splits.items():
        source = open_dataset(path, split)
        assert len(source) == len(examples) and source.kind == "captioned_images"
        for i, example in enumerate(examples):  # records keep the order they were written in
            _assert_same(source[i], example)
    assert source[-1]["prompt"] == "eval one"
    with pytest.raises(IndexError):
        source[1]
    # TFDS naming: <kind>-<split>.array_record-NNNNN-of-NNNNN beside dataset_info.json / features.json.
    names = sorted(os.listdir(path))
    assert "dataset_info.json" in names and "features.json" in names
    assert "captioned_images-train.array_record-00000-of-00001" in names
    assert json.load(open(os.path.join(path, "dataset_info.json")))["fileFormat"] == "array_record"


def test_captioned_images_optional_latents(tmp_path):
    rng = np.random.default_rng(1)
    examples = [
        {
            "image": _image(rng, 16, 16),
            "prompt": "p",
            "latents": rng.standard_normal((2, 2, 4)).astype(np.float32),
            **_conditioning(rng),
        }
        for _ in range(3)
    ]
    source = open_dataset(write_captioned_images(tmp_path / "lat", examples))
    for i, example in enumerate(examples):
        _assert_same(source[i], example)


def test_prompts_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    examples = [{"prompt": f"a prompt number {i}", **_conditioning(rng, 3, 4, 2)} for i in range(4)]
    source = open_dataset(write_prompts(tmp_path / "p", examples))
    assert source.kind == "prompts" and len(source) == 4
    for i, example in enumerate(examples):
        _assert_same(source[i], example)


def test_preference_pairs_round_trip_with_and_without_text(tmp_path):
    rng = np.random.default_rng(3)
    labels = [1.0, 0.0, 0.5]
    bare = [
        {"prompt": f"pair {i}", "image_0": _image(rng), "image_1": _image(rng, 5, 6), "label_0": np.float32(label)}
        for i, label in enumerate(labels)
    ]
    source = open_dataset(write_preference_pairs(tmp_path / "bare", bare))
    for i, example in enumerate(bare):
        _assert_same(source[i], example)
    with_text = [{**e, **_conditioning(rng)} for e in bare]
    source = open_dataset(write_preference_pairs(tmp_path / "text", with_text))
    for i, example in enumerate(with_text):
        _assert_same(source[i], example)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda e: e.pop("pooled_projections"), "pooled_projections"),
        (lambda e: e.update(image=e["image"].astype(np.float32)), "image"),
        (lambda e: e.update(image=e["image"][..., :1]), "image"),
        (lambda e: e.update(encoder_hidden_states=np.zeros((6, 7), np.float32)), "encoder_hidden_states"),
        (lambda e: e.update(extra=1), "extra"),
        (lambda e: e.update(prompt=3), "prompt"),
    ],
)
def test_writer_rejects_records_that_do_not_fit_naming_the_field(tmp_path, change, named):
    rng = np.random.default_rng(4)
    examples = [{"image": _image(rng), "prompt": "p", **_conditioning(rng)} for _ in range(3)]
    change(examples[2])  # the third record: the first fixes shapes, so this also checks later records
    with pytest.raises(DataError, match=named) as info:
        write_captioned_images(tmp_path / "bad", examples)
    assert "example 2" in str(info.value)
    assert not (tmp_path / "bad").exists()  # nothing half-written under the final name


def test_preference_label_out_of_range_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    examples = [{"prompt": "p", "image_0": _image(rng), "image_1": _image(rng), "label_0": np.float32(2.0)}]
    with pytest.raises(DataError, match="label_0"):
        write_preference_pairs(tmp_path / "bad", examples)


def test_existing_directory_needs_overwrite(tmp_path):
    rng = np.random.default_rng(6)
    first = [{"prompt": "old", **_conditioning(rng)}]
    path = write_prompts(tmp_path / "p", first)
    with pytest.raises(DataError, match="already exists"):
        write_prompts(path, first)
    write_prompts(path, [{"prompt": "new", **_conditioning(rng)}], overwrite=True)
    assert open_dataset(path)[0]["prompt"] == "new"
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(DataError, match="dataset_info.json"):
        write_prompts(tmp_path / "not_a_dataset", first, overwrite=True)
