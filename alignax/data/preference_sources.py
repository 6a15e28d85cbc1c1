"""Preference-pair examples from the two formats people have: a Pick-a-Pic v2 parquet file,
or a local directory of image files with a `pairs.jsonl` index.

Both yield dicts ready for `write_preference_pairs`: images decoded with Pillow to uint8 RGB
(optionally center-cropped and resized to a square so they batch), the prompt, `label_0`, and,
given a `text_encoder`, the prompt's conditioning.

Pick-a-Pic v2 columns used: `caption` (str), `jpg_0`, `jpg_1` (encoded image bytes, JPEG or
PNG), `label_0` (1.0, 0.0 or 0.5). Other columns are ignored.

Directory layout: `<dir>/pairs.jsonl`, one JSON object per line with keys `caption`,
`image_0`, `image_1` (paths relative to `<dir>`) and `label_0`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from alignax.errors import DataError

PICK_A_PIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PAIRS_INDEX = "pairs.jsonl"

TextEncoder = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def from_pick_a_pic_parquet(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_size: int | None = None,
    drop_ties: bool = False,
    text_encoder: TextEncoder | None = None,
    batch_rows: int = 64,
) -> Iterator[dict[str, object]]:
    """Examples from one or more Pick-a-Pic v2 parquet files, read in row batches (bounded memory)."""
    import pyarrow.parquet as pq

    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    for path in map(os.fspath, paths):
        if not os.path.isfile(path):
            raise DataError(f"Pick-a-Pic parquet file {path} does not exist")
        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:
            raise DataError(f"Pick-a-Pic parquet file {path}: cannot read: {err}") from err
        missing = [c for c in PICK_A_PIC_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise DataError(
                f"Pick-a-Pic parquet file {path}: missing columns {missing}; expected {list(PICK_A_PIC_COLUMNS)},"
                f" found {parquet.schema_arrow.names}"
            )
        row = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(PICK_A_PIC_COLUMNS)):
            for record in batch.to_pylist():
                where = f"{path} row {row}"
                row += 1
                example = _example(
                    record["caption"],
                    _decode(record["jpg_0"], f"{where} column 'jpg_0'", image_size),
                    _decode(record["jpg_1"], f"{where} column 'jpg_1'", image_size),
                    record["label_0"],
                    where,
                )
                if example is not None and not (drop_ties and example["label_0"] == 0.5):
                    yield _with_text(example, text_encoder)


def from_pairs_directory(
    directory: str | os.PathLike,
    *,
    image_size: int | None = None,
    drop_ties: bool = False,
    text_encoder: TextEncoder | None = None,
) -> Iterator[dict[str, object]]:
    """Examples from `<directory>/pairs.jsonl` and the image files it names."""
    directory = os.fspath(directory)
    index = os.path.join(directory, PAIRS_INDEX)
    if not os.path.isfile(index):
        raise DataError(f"preference-pairs directory {directory}: expected an index file {PAIRS_INDEX}, not found")
    with open(index, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{index} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON: {err}") from err
            missing = [k for k in ("caption", "image_0", "image_1", "label_0") if k not in record]
            if missing:
                raise DataError(f"{where}: missing keys {missing}; expected caption, image_0, image_1, label_0")
            images = []
            for key in ("image_0", "image_1"):
                file = os.path.join(directory, record[key])
                if not os.path.isfile(file):
                    raise DataError(f"{where}: {key} file {file} does not exist")
                with open(file, "rb") as f:
                    images.append(_decode(f.read(), f"{where} {key} {file}", image_size))
            example = _example(record["caption"], images[0], images[1], record["label_0"], where)
            if example is not None and not (drop_ties and example["label_0"] == 0.5):
                yield _with_text(example, text_encoder)


def _example(caption, image_0, image_1, label, where: str) -> dict[str, object] | None:
    if label is None:  # Pick-a-Pic keeps some unlabeled rows; they carry no preference
        return None
    label = float(label)
    if label not in (0.0, 0.5, 1.0):
        raise DataError(f"{where}: label_0 expected 1.0, 0.0 or 0.5, found {label}")
    if not isinstance(caption, str):
        raise DataError(f"{where}: caption expected str, found {type(caption).__name__}")
    return {"prompt": caption, "image_0": image_0, "image_1": image_1, "label_0": np.float32(label)}


def _decode(data, where: str, image_size: int | None) -> np.ndarray:
    if isinstance(data, dict) and "bytes" in data:  # HF datasets' Image struct
        data = data["bytes"]
    if not isinstance(data, bytes | bytearray):
        raise DataError(f"{where}: expected encoded image bytes, found {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image_size is not None:
                image = _center_square(image, image_size)
            return np.asarray(image, dtype=np.uint8)
    except Exception as err:
        raise DataError(f"{where}: cannot decode image: {err}") from err


def _center_square(image: Image.Image, size: int) -> Image.Image:
    """Crop the largest centred square, then resize it (keeps aspect; Pick-a-Pic sizes vary)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def _with_text(example: dict[str, object], text_encoder: TextEncoder | None) -> dict[str, object]:
    if text_encoder is not None:
        hidden, pooled = text_encoder([example["prompt"]])
        example["encoder_hidden_states"] = np.asarray(hidden[0], np.float32)
        example["pooled_projections"] = np.asarray(pooled[0], np.float32)
    return example
