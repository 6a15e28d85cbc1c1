"""Loader.batch_at is a pure function of (seed, step), covers each epoch exactly once and splits across processes."""

import numpy as np
import pytest

from alignax.data import Loader, open_dataset, write_captioned_images
from alignax.errors import ConfigError, DataError

NUM_RECORDS = 10


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Record i carries i in its prompt, pixels and embeddings, so a batch says which records it holds."""
    examples = [
        {
            "image": np.full((2, 2, 3), i, np.uint8),
            "prompt": f"record {i}",
            "encoder_hidden_states": np.full((3, 2), i, np.float32),
            "pooled_projections": np.full(4, i, np.float32),
        }
        for i in range(NUM_RECORDS)
    ]
    return open_dataset(write_captioned_images(tmp_path_factory.mktemp("loader") / "ci", examples))


def _ids(batch):
    ids = [int(p.split()[1]) for p in batch["prompt"]]
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], ids)  # all fields come from the same records
    np.testing.assert_array_equal(batch["pooled_projections"][:, 0], ids)
    return ids


def test_batch_layout(source):
    batch = Loader(source, global_batch_size=4, seed=0).batch_at(0)
    assert batch["image"].shape == (4, 2, 2, 3) and batch["image"].dtype == np.uint8
    assert batch["encoder_hidden_states"].shape == (4, 3, 2) and batch["encoder_hidden_states"].dtype == np.float32
    assert batch["prompt"].dtype == object and all(isinstance(p, str) for p in batch["prompt"])


def test_same_seed_and_step_give_the_same_batch_in_a_fresh_loader(source):
    first = Loader(source, global_batch_size=4, seed=7)
    for _ in range(5):
        first.batch_at(_)  # history must not matter
    again = Loader(source, global_batch_size=4, seed=7)
    for step in (3, 0, 11):
        a, b = first.batch_at(step), again.batch_at(step)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_different_steps_and_seeds_differ(source):
    loader = Loader(source, global_batch_size=4, seed=0)
    assert _ids(loader.batch_at(0)) != _ids(loader.batch_at(1))
    orders = {tuple(Loader(source, global_batch_size=NUM_RECORDS, seed=s).indices_at(0)) for s in range(5)}
    assert len(orders) == 5
    assert len({tuple(loader.epoch_order(e)) for e in range(5)}) == 5  # reshuffled every epoch


def test_each_epoch_visits_every_record_once_even_when_batches_straddle_epochs(source):
    loader = Loader(source, global_batch_size=4, seed=3)  # 10 records, batches of 4: steps 2, 4, 7 straddle
    stream = [i for step in range(10) for i in _ids(loader.batch_at(step))]  # 40 rows = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * NUM_RECORDS : (epoch + 1) * NUM_RECORDS]) == list(range(NUM_RECORDS))
    assert stream[:NUM_RECORDS] != list(range(NUM_RECORDS))  # shuffled
    # The order is numpy's Generator seeded with (seed, epoch), nothing else.
    np.testing.assert_array_equal(stream[10:20], np.random.default_rng([3, 1]).permutation(NUM_RECORDS))


def test_no_shuffle_reads_in_order(source):
    loader = Loader(source, global_batch_size=4, seed=0, shuffle=False)
    assert _ids(loader.batch_at(0)) + _ids(loader.batch_at(1)) + _ids(loader.batch_at(2)) == [
        *range(10),
        0,
        1,
    ]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(source, process_count):
    whole = Loader(source, global_batch_size=8, seed=5)
    parts = [
        Loader(source, global_batch_size=8, seed=5, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for step in range(4):
        expected = whole.batch_at(step)
        slices = [part.batch_at(step) for part in parts]
        assert all(len(s["prompt"]) == 8 // process_count for s in slices)
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), expected[key])


def test_configuration_errors_name_the_setting(source):
    with pytest.raises(ConfigError, match=r"global_batch_size=6 is not divisible by process_count=4"):
        Loader(source, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ConfigError, match="process_index"):
        Loader(source, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ConfigError, match="global_batch_size"):
        Loader(source, global_batch_size=0, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        Loader(source, global_batch_size=2, seed=-1)


def test_records_that_do_not_stack_name_the_field(tmp_path):
    examples = [
        {
            "image": np.zeros((2 + i, 2, 3), np.uint8),
            "prompt": "p",
            "encoder_hidden_states": np.zeros((1, 1), np.float32),
            "pooled_projections": np.zeros(1, np.float32),
        }
        for i in range(2)
    ]
    loader = Loader(open_dataset(write_captioned_images(tmp_path / "ragged", examples)), global_batch_size=2, seed=0)
    with pytest.raises(DataError, match="field 'image' has differing shapes"):
        loader.batch_at(0)


def test_prefetching_iterator_matches_batch_at(source):
    loader = Loader(source, global_batch_size=4, seed=1, prefetch=2)
    iterator = loader.batches(start_step=5)
    for expected_step in range(5, 9):
        step, batch = next(iterator)
        assert step == expected_step
        assert _ids(batch) == _ids(loader.batch_at(step))
    iterator.close()  # stops the background thread
    unbuffered = Loader(source, global_batch_size=4, seed=1, prefetch=0).batches(2)
    assert _ids(next(unbuffered)[1]) == _ids(loader.batch_at(2))
