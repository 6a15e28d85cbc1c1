"""Random-access reading of a dataset directory: `open_dataset(path, split) -> Source`.

Reading goes through `tfds.builder_from_directory(path).as_data_source(split)`, an
`ArrayRecordDataSource` that decodes records to numpy with no TensorFlow. `Source` adds
what the trainer needs on top: the dataset kind checked against its schema at open time,
text returned as `str` (TFDS returns bytes), and errors that name the path.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from alignax.data.schemas import RecordSchema, get_schema
from alignax.errors import DataError


class Source:
    """A split of a dataset: `len(source)` records, `source[i]` is a dict of numpy arrays and str."""

    def __init__(self, path: str, split: str, schema: RecordSchema, data_source, features: dict[str, str]):
        self.path = path
        self.split = split
        self.schema = schema
        self.features = features  # field -> "str" or "dtype[shape]", as stored on disk
        self._data = data_source
        self._strings = [k for k in features if features[k] == "str"]
        # TFDS hands scalars back as Python floats; restore the stored dtype so batches stack as float32.
        self._dtypes = {k: np.dtype(f.split("[", 1)[0]) for k, f in features.items() if "[" in f}
        self._length = len(data_source)

    @property
    def kind(self) -> str:
        return self.schema.name

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"{self.path} split {self.split!r}: index {index} out of range [0, {self._length})")
        return self.get_many([index])[0]

    def get_many(self, indices: Sequence[int]) -> list[dict[str, np.ndarray | str]]:
        """Records at `indices` (any order, repeats allowed), read in one call to the array_record reader."""
        try:
            records = self._data.__getitems__([int(i) for i in indices])
        except Exception as err:  # the reader's own errors do not name the dataset
            raise DataError(
                f"{self.path} split {self.split!r}: cannot read records {list(indices)[:8]}: {err}"
            ) from err
        for record in records:
            for key in self._strings:
                if isinstance(record[key], bytes):
                    record[key] = record[key].decode("utf-8")
            for key, dtype in self._dtypes.items():
                record[key] = np.asarray(record[key], dtype=dtype)
        return records

    def __repr__(self) -> str:
        return f"Source(path={self.path!r}, split={self.split!r}, kind={self.kind!r}, len={self._length})"


def open_dataset(path: str, split: str = "train", *, kind: str | None = None) -> Source:
    """Open `split` of the dataset directory `path` (written by alignax.data builders, or any TFDS
    array_record dataset whose builder name is a known kind and whose features fit its schema).

    `path` is the directory holding `dataset_info.json`; a TFDS `data_dir` or builder directory
    holding exactly one such directory below it (`<name>/<version>/`) is accepted too. Pass `kind`
    to insist on a dataset kind. Raises DataError naming the path on any mismatch.
    """
    builder_dir, builder = _builder(path)
    schema = _schema_of(builder, builder_dir, kind)
    features = _stored_features(builder, builder_dir)
    _check_features(schema, features, builder_dir)

    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise DataError(f"dataset {builder_dir}: no split {split!r}; it has {splits}")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise DataError(
            f"dataset {builder_dir}: expected file_format 'array_record' (random access), found {file_format!r}"
        )
    try:
        data = builder.as_data_source(split=split)
        source = Source(builder_dir, split, schema, data, features)
        if len(source) == 0:
            raise DataError(f"dataset {builder_dir} split {split!r} has no records")
        source.get_many([0, len(source) - 1])  # fail now, not mid-training, on a truncated shard
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"dataset {builder_dir} split {split!r}: cannot open its array_record shards: {err}") from err
    return source


def dataset_splits(path: str) -> list[str]:
    """The split names of the dataset directory `path` (as `open_dataset` resolves it), sorted."""
    return sorted(_builder(path)[1].info.splits.keys())


def _builder(path: str) -> tuple[str, tfds.core.DatasetBuilder]:
    builder_dir = _builder_dir(os.fspath(path))
    try:
        return builder_dir, tfds.builder_from_directory(builder_dir)
    except Exception as err:
        raise DataError(
            f"dataset {builder_dir}: cannot read its TFDS metadata (dataset_info.json, features.json): {err}"
        ) from err


def _builder_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"dataset directory {path} does not exist")
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    below = sorted(
        glob.glob(os.path.join(path, "*", "dataset_info.json"))
        + glob.glob(os.path.join(path, "*", "*", "dataset_info.json"))
    )
    if len(below) == 1:
        return os.path.dirname(below[0])
    found = sorted(os.listdir(path))[:10]
    raise DataError(
        f"dataset directory {path}: expected a TFDS dataset (dataset_info.json here, or in exactly one"
        f" <name>/<version>/ below), found {len(below)} candidates; entries {found}"
    )


def _schema_of(builder, builder_dir: str, kind: str | None) -> RecordSchema:
    name = builder.name
    if kind is not None and name != kind:
        raise DataError(f"dataset {builder_dir}: expected a {kind!r} dataset, found kind {name!r}")
    try:
        return get_schema(name)
    except DataError as err:
        raise DataError(f"dataset {builder_dir}: {err}") from err


def _stored_features(builder, builder_dir: str) -> dict[str, str]:
    """field -> "str" or "dtype[shape]" from the stored FeaturesDict (shape None dims as '?')."""
    features = builder.info.features
    if not isinstance(features, tfds.features.FeaturesDict):
        raise DataError(
            f"dataset {builder_dir}: expected a FeaturesDict of named fields, found {type(features).__name__}"
        )
    out = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Text):
            out[key] = "str"
        elif isinstance(feature, tfds.features.Tensor):
            dims = ",".join("?" if d is None else str(d) for d in feature.shape)
            out[key] = f"{np.dtype(feature.np_dtype).name}[{dims}]"
        else:
            out[key] = type(feature).__name__
    return out


def _check_features(schema: RecordSchema, stored: dict[str, str], builder_dir: str) -> None:
    problems = [f"missing {k!r} ({f.describe()})" for k, f in schema.required.items() if k not in stored]
    for key, found in stored.items():
        if key not in schema.required and key not in schema.optional:
            problems.append(f"unknown field {key!r}")
            continue
        spec = schema.field(key)
        if not _fits(spec, found):
            problems.append(f"field {key!r}: expected {spec.describe()}, found {found}")
    if problems:
        raise DataError(
            f"dataset {builder_dir}: features do not fit the {schema.name!r} schema: " + "; ".join(problems)
        )


def _fits(spec, found: str) -> bool:
    if spec.is_string:
        return found == "str"
    if "[" not in found:
        return False
    dtype, dims = found[:-1].split("[", 1)
    dims = [d for d in dims.split(",") if d]
    if dtype != spec.dtype or len(dims) != len(spec.shape):
        return False
    return all(want is None or d == str(want) for want, d in zip(spec.shape, dims, strict=True))
