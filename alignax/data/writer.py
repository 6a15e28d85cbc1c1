"""Write a dataset kind as a TFDS array_record dataset, without TensorFlow.

How it works without TensorFlow (tfds 4.9.10): a `tfds.core.GeneratorBasedBuilder` with
`file_format='array_record'` encodes examples with numpy-only feature connectors
(`tfds.features.Text`, `tfds.features.Tensor`; images use `Tensor(..., encoding='zlib')`
because `tfds.features.Image` imports TensorFlow to encode PNG) and writes the shards with
the `array_record` package. Readers use `tfds.builder_from_directory(dir).as_data_source()`
(see `source.py`), which decodes to numpy, again without TensorFlow.

The builder is generated in a scratch TFDS `data_dir` and its version directory is then
renamed to `out_dir`, so `out_dir` holds exactly what TFDS expects of a prepared dataset
(`dataset_info.json`, `features.json`, `<kind>-<split>.array_record-0000N-of-0000M`) and
a half-written dataset never appears under the final name.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from alignax.data.schemas import Field, RecordSchema
from alignax.errors import DataError

VERSION = "1.0.0"

Examples = Iterable[Mapping[str, object]]


def write_dataset(
    out_dir: str | os.PathLike,
    schema: RecordSchema,
    splits: Mapping[str, Examples] | Examples,
    *,
    overwrite: bool = False,
) -> str:
    """Write `splits` ({split: examples}, or one iterable meaning 'train') as a `schema.name` dataset.

    Every example is checked against `schema`; fixed dimensions are taken from the first
    example and must then hold for all. Returns the dataset directory.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir):
        if not overwrite:
            raise DataError(f"dataset directory {out_dir} already exists; pass overwrite=True to replace it")
        if not os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
            raise DataError(f"refusing to overwrite {out_dir}: it exists but holds no dataset_info.json")
    if not isinstance(splits, Mapping):
        splits = {"train": splits}
    if not splits:
        raise DataError(f"{out_dir}: no splits given")

    checked: dict[str, Iterator[dict[str, object]]] = {}
    first: tuple[str, dict[str, object]] | None = None
    for split, examples in splits.items():
        stream = _checked(schema, examples, f"{out_dir} split {split!r}")
        head = next(stream, None)
        if head is None:
            raise DataError(f"{out_dir}: split {split!r} has no examples")
        first = first or (split, head)
        checked[split] = itertools.chain([head], stream)
    features = _features(schema, first[1])
    fixed = {k: f.shape for k, f in features.items() if isinstance(f, tfds.features.Tensor)}
    for split in checked:
        checked[split] = _same_shapes(checked[split], fixed, features, f"{out_dir} split {split!r}", first[0])

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".tfds-", dir=parent)
    try:
        builder = _builder_class(schema)(
            features=features, splits=checked, data_dir=scratch, file_format="array_record"
        )
        with _quiet_progress():
            builder.download_and_prepare(
                download_dir=os.path.join(scratch, "downloads"),
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),  # never reach the network
            )
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(builder.data_dir, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _checked(schema: RecordSchema, examples: Examples, where: str) -> Iterator[dict[str, object]]:
    for i, example in enumerate(examples):
        yield schema.check_example(example, f"{where}, example {i}")


def _same_shapes(stream, fixed, features, where, first_split) -> Iterator[dict[str, object]]:
    present = set(features)
    for i, example in enumerate(stream):
        if set(example) != present:
            raise DataError(
                f"{where}, example {i}: fields {sorted(example)} differ from the first example's {sorted(present)}"
                f" (split {first_split!r}); optional fields must be present in all examples or none"
            )
        for key, shape in fixed.items():
            found = np.shape(example[key])
            if len(found) != len(shape) or any(d is not None and d != n for d, n in zip(shape, found, strict=True)):
                raise DataError(
                    f"{where}, example {i}, field {key!r}: shape {list(found)} differs from the dataset's"
                    f" {list(shape)} (fixed by the first example of split {first_split!r})"
                )
        yield example


def _feature(spec: Field, value: object) -> tfds.features.FeatureConnector:
    if spec.is_string:
        return tfds.features.Text()
    if spec.variable:
        # zlib lets dimensions vary per record; it is also what keeps pixels compact.
        return tfds.features.Tensor(shape=spec.shape, dtype=np.dtype(spec.dtype), encoding="zlib")
    return tfds.features.Tensor(shape=tuple(np.shape(value)), dtype=np.dtype(spec.dtype))


def _features(schema: RecordSchema, example: Mapping[str, object]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {key: _feature(spec, example[key]) for key, spec in schema.fields_of(example).items()}
    )


_BUILDERS: dict[str, type] = {}


def _builder_class(schema: RecordSchema) -> type:
    """A GeneratorBasedBuilder named after the schema (TFDS names the files after it)."""
    if schema.name in _BUILDERS:
        return _BUILDERS[schema.name]

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = schema.name
        VERSION = tfds.core.Version(VERSION)
        # No source-file "code path": TFDS would look beside it for download checksums, and resolving
        # it for a class inside a package needs `importlib_resources`, which is not installed.
        code_path = None

        def __init__(self, *, features, splits, **kwargs):
            self._record_features = features
            self._record_splits = splits
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=schema.doc,
                features=self._record_features,
                # Keep records in the order written: index i is the i-th example, so rows can be
                # traced back to their source; the Loader shuffles per epoch anyway.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(stream) for split, stream in self._record_splits.items()}

        def _generate_examples(self, stream):
            yield from enumerate(stream)

        # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared to
        # <scratch dir>" to stdout; nothing is downloaded here and the scratch dir is renamed away.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

    _Builder.__name__ = _Builder.__qualname__ = f"{schema.name}_builder"
    _BUILDERS[schema.name] = _Builder
    return _Builder


@contextlib.contextmanager
def _quiet_progress():
    """Silence TFDS progress bars for the duration of one write, then restore the user's choice."""
    from tensorflow_datasets.core.utils import tqdm_utils

    previous = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)
