"""Datasets for alignax: TFDS array_record builders, random-access sources and deterministic loaders.

Datasets are TFDS array_record directories written and read without TensorFlow (see
`writer.py`). The trainer uses `open_dataset(path, split)` and `Loader(...).batch_at(step)`;
the kinds of record are defined in `schemas.py`.
"""

from alignax.data.builders import WRITERS, write_captioned_images, write_preference_pairs, write_prompts
from alignax.data.loader import Loader, stack_records
from alignax.data.preference_sources import from_pairs_directory, from_pick_a_pic_parquet
from alignax.data.schemas import CAPTIONED_IMAGES, PREFERENCE_PAIRS, PROMPTS, SCHEMAS, Field, RecordSchema, get_schema
from alignax.data.source import Source, dataset_splits, open_dataset
from alignax.data.tiny_world import TinyWorld, build_tiny_world
from alignax.data.toy_text_encoder import ToyTextEncoder
from alignax.data.writer import write_dataset

__all__ = [
    "CAPTIONED_IMAGES",
    "PREFERENCE_PAIRS",
    "PROMPTS",
    "SCHEMAS",
    "WRITERS",
    "Field",
    "Loader",
    "RecordSchema",
    "Source",
    "TinyWorld",
    "ToyTextEncoder",
    "build_tiny_world",
    "dataset_splits",
    "from_pairs_directory",
    "from_pick_a_pic_parquet",
    "get_schema",
    "open_dataset",
    "stack_records",
    "write_captioned_images",
    "write_dataset",
    "write_preference_pairs",
    "write_prompts",
]
