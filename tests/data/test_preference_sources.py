"""Pick-a-Pic v2 parquet files and local pair directories become preference-pair datasets."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignax.data import (
    ToyTextEncoder,
    from_pairs_directory,
    from_pick_a_pic_parquet,
    open_dataset,
    write_preference_pairs,
)
from alignax.errors import DataError


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _pick_a_pic_fixture(path, rng):
    """A parquet file with Pick-a-Pic v2 columns (plus ones we ignore); PNG and JPEG images."""
    captions = ["a cat", "a dog", "a tie", "a bird"]
    labels = [1.0, 0.0, 0.5, 0.0]
    pixels = [
        (rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        for _ in captions
    ]
    table = pa.table(
        {
            "are_different": [True] * 4,
            "caption": captions,
            "jpg_0": [_encoded(a, "PNG") for a, _ in pixels],
            "jpg_1": [_encoded(b, "PNG" if i % 2 else "JPEG") for i, (_, b) in enumerate(pixels)],
            "label_0": labels,
            "label_1": [1.0 - x for x in labels],
            "model_0": ["m"] * 4,
        }
    )
    pq.write_table(table, path, row_group_size=2)
    return captions, labels, pixels


def test_pick_a_pic_parquet_loads_with_right_labels_and_pixels(tmp_path):
    captions, labels, pixels = _pick_a_pic_fixture(tmp_path / "train-0.parquet", np.random.default_rng(0))
    out = write_preference_pairs(
        tmp_path / "pairs", from_pick_a_pic_parquet(tmp_path / "train-0.parquet", batch_rows=3)
    )
    source = open_dataset(out)
    assert len(source) == 4
    for i in range(4):
        record = source[i]
        assert record["prompt"] == captions[i]
        assert record["label_0"].dtype == np.float32 and float(record["label_0"]) == labels[i]
        np.testing.assert_array_equal(record["image_0"], pixels[i][0])  # PNG is lossless
        if i % 2:
            np.testing.assert_array_equal(record["image_1"], pixels[i][1])
        else:  # JPEG is lossy: expect what Pillow decodes from the bytes in the file
            expected = np.asarray(Image.open(io.BytesIO(_encoded(pixels[i][1], "JPEG"))).convert("RGB"))
            np.testing.assert_array_equal(record["image_1"], expected)


def test_pick_a_pic_drop_ties_resize_and_text(tmp_path):
    captions, labels, _ = _pick_a_pic_fixture(tmp_path / "a.parquet", np.random.default_rng(1))
    encoder = ToyTextEncoder(seq_len=4, context_dim=5, pooled_dim=3, seed=0)
    examples = list(
        from_pick_a_pic_parquet([tmp_path / "a.parquet"], drop_ties=True, image_size=4, text_encoder=encoder)
    )
    assert [e["prompt"] for e in examples] == [c for c, lab in zip(captions, labels, strict=True) if lab != 0.5]
    for example in examples:
        assert example["image_0"].shape == (4, 4, 3) and example["image_1"].shape == (4, 4, 3)
        hidden, pooled = encoder.encode([example["prompt"]])
        np.testing.assert_array_equal(example["encoder_hidden_states"], hidden[0])
        np.testing.assert_array_equal(example["pooled_projections"], pooled[0])
    source = open_dataset(write_preference_pairs(tmp_path / "out", examples))
    assert "encoder_hidden_states" in source[0]


def test_pick_a_pic_missing_columns_and_bad_label_are_named(tmp_path):
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""]}), tmp_path / "short.parquet")
    with pytest.raises(DataError, match=r"short\.parquet.*missing columns \['jpg_1', 'label_0'\]"):
        list(from_pick_a_pic_parquet(tmp_path / "short.parquet"))
    png = _encoded(np.zeros((2, 2, 3), np.uint8), "PNG")
    pq.write_table(
        pa.table({"caption": ["x"], "jpg_0": [png], "jpg_1": [png], "label_0": [0.3]}), tmp_path / "lab.parquet"
    )
    with pytest.raises(DataError, match=r"lab\.parquet row 0.*label_0"):
        list(from_pick_a_pic_parquet(tmp_path / "lab.parquet"))
    pq.write_table(
        pa.table({"caption": ["x"], "jpg_0": [b"junk"], "jpg_1": [png], "label_0": [1.0]}), tmp_path / "j.parquet"
    )
    with pytest.raises(DataError, match=r"j\.parquet row 0 column 'jpg_0'"):
        list(from_pick_a_pic_parquet(tmp_path / "j.parquet"))
    with pytest.raises(DataError, match="nowhere.parquet"):
        list(from_pick_a_pic_parquet(tmp_path / "nowhere.parquet"))


def test_pairs_directory(tmp_path):
    rng = np.random.default_rng(2)
    rows, pixels = [], []
    for i, label in enumerate([0.0, 0.5, 1.0]):
        a, b = (rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(2))
        Image.fromarray(a).save(tmp_path / f"{i}_a.png")
        Image.fromarray(b).save(tmp_path / f"{i}_b.png")
        rows.append({"caption": f"row {i}", "image_0": f"{i}_a.png", "image_1": f"{i}_b.png", "label_0": label})
        pixels.append((a, b))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = open_dataset(write_preference_pairs(tmp_path / "out", from_pairs_directory(tmp_path)))
    assert [float(source[i]["label_0"]) for i in range(3)] == [0.0, 0.5, 1.0]
    for i in range(3):
        np.testing.assert_array_equal(source[i]["image_0"], pixels[i][0])
        np.testing.assert_array_equal(source[i]["image_1"], pixels[i][1])
    assert [e["label_0"] for e in from_pairs_directory(tmp_path, drop_ties=True)] == [0.0, 1.0]
    rows[2]["image_1"] = "missing.png"
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"pairs\.jsonl line 3.*missing\.png"):
        list(from_pairs_directory(tmp_path))
    with pytest.raises(DataError, match="pairs.jsonl"):
        list(from_pairs_directory(tmp_path / "out"))
