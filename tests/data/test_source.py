"""open_dataset refuses missing, corrupt and wrongly-shaped datasets with errors naming the path and field."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alignax.data import open_dataset, write_prompts
from alignax.errors import DataError


def _prompts(path, n=3):
    rng = np.random.default_rng(0)
    examples = [
        {
            "prompt": f"p{i}",
            "encoder_hidden_states": rng.standard_normal((2, 3)).astype(np.float32),
            "pooled_projections": rng.standard_normal(4).astype(np.float32),
        }
        for i in range(n)
    ]
    return write_prompts(path, examples)


def _foreign_tfds_dataset(data_dir, name, features, example):
    """A dataset written by a plain TFDS builder (not our writer), to test what open_dataset accepts."""

    class Foreign(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, example

    Foreign.name = name
    builder = Foreign(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.data_dir


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope does not exist"):
        open_dataset(str(tmp_path / "nope"))


def test_directory_without_dataset_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: expected a TFDS dataset"):
        open_dataset(str(tmp_path / "empty"))


def test_missing_split_lists_the_splits(tmp_path):
    path = _prompts(tmp_path / "p")
    with pytest.raises(DataError, match=r"no split 'eval'; it has \['train'\]"):
        open_dataset(path, "eval")


def test_expected_kind_is_checked(tmp_path):
    path = _prompts(tmp_path / "p")
    with pytest.raises(DataError, match=r"expected a 'captioned_images' dataset, found kind 'prompts'"):
        open_dataset(path, kind="captioned_images")
    assert open_dataset(path, kind="prompts").kind == "prompts"


def test_corrupt_metadata_and_shards_name_the_path(tmp_path):
    path = _prompts(tmp_path / "p")
    shard = os.path.join(path, "prompts-train.array_record-00000-of-00001")
    data = bytearray(open(shard, "rb").read())
    with open(shard, "wb") as f:
        f.write(bytes(data[: len(data) // 3]))
    with pytest.raises(DataError, match=f"{path} split 'train'"):
        open_dataset(path)
    with open(os.path.join(path, "dataset_info.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match=f"dataset {path}: cannot read its TFDS metadata"):
        open_dataset(path)


def test_foreign_tfds_dataset_with_wrong_features_is_refused(tmp_path):
    # captioned_images: its text embeddings are required (a prompts dataset's are optional: on-the-fly encoding)
    builder_dir = _foreign_tfds_dataset(
        tmp_path / "tfds",
        "captioned_images",
        {"prompt": tfds.features.Text(), "pooled_projections": tfds.features.Tensor(shape=(4,), dtype=np.int32)},
        {"prompt": "x", "pooled_projections": np.arange(4, dtype=np.int32)},
    )
    with pytest.raises(DataError) as info:
        open_dataset(str(builder_dir))
    message = str(info.value)
    assert str(builder_dir) in message
    assert "missing 'encoder_hidden_states'" in message
    assert "field 'pooled_projections': expected float32[?], found int32[4]" in message


def test_foreign_tfds_dataset_of_unknown_kind_is_refused(tmp_path):
    builder_dir = _foreign_tfds_dataset(
        tmp_path / "tfds", "mnist_like", {"x": tfds.features.Tensor(shape=(), dtype=np.float32)}, {"x": 1.0}
    )
    with pytest.raises(DataError, match="unknown dataset kind 'mnist_like'"):
        open_dataset(str(builder_dir))


def test_foreign_tfds_dataset_that_fits_opens_from_its_data_dir(tmp_path):
    """A TFDS data_dir (<name>/<version>/ below) is accepted when it holds exactly one dataset."""
    hidden = np.ones((2, 3), np.float32)
    _foreign_tfds_dataset(
        tmp_path / "tfds",
        "prompts",
        {
            "prompt": tfds.features.Text(),
            "encoder_hidden_states": tfds.features.Tensor(shape=(2, 3), dtype=np.float32),
            "pooled_projections": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        },
        {"prompt": "hello", "encoder_hidden_states": hidden, "pooled_projections": np.zeros(4, np.float32)},
    )
    source = open_dataset(str(tmp_path / "tfds"))
    assert source.path.endswith(os.path.join("prompts", "2.0.0"))
    assert source[0]["prompt"] == "hello"
    np.testing.assert_array_equal(source[0]["encoder_hidden_states"], hidden)
