"""ToyTextEncoder: deterministic, and prompts that share words share features."""

import numpy as np
import pytest

from alignax.data import ToyTextEncoder
from alignax.errors import ConfigError


def test_shapes_and_dtype():
    hidden, pooled = ToyTextEncoder(seq_len=6, context_dim=12, pooled_dim=10, seed=0).encode(["a red circle", ""])
    assert hidden.shape == (2, 6, 12) and hidden.dtype == np.float32
    assert pooled.shape == (2, 10) and pooled.dtype == np.float32
    np.testing.assert_array_equal(pooled[1], 0.0)  # no words, no pooled signal


def test_deterministic_across_instances_and_call_order():
    prompts = ["a red circle on a blue background", "a green square"]
    first = ToyTextEncoder(8, 16, 16, seed=3)
    first.encode(["unrelated words first"])
    second = ToyTextEncoder(8, 16, 16, seed=3)
    for a, b in zip(first.encode(prompts), second.encode(list(reversed(prompts))[::-1]), strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = ToyTextEncoder(8, 16, 16, seed=4).encode(prompts)[0]
    assert not np.allclose(first.encode(prompts)[0], other_seed)


def test_shared_words_share_features():
    encoder = ToyTextEncoder(seq_len=5, context_dim=8, pooled_dim=6, seed=0)
    hidden, pooled = encoder.encode(["red circle", "red square", "blue circle", "RED, circle!"])
    # Same word at the same position: identical token features; different words: different.
    np.testing.assert_array_equal(hidden[0, 0], hidden[1, 0])
    np.testing.assert_array_equal(hidden[0, 1], hidden[2, 1])
    assert not np.allclose(hidden[0, 1], hidden[1, 1])
    # Case and punctuation do not make new words.
    np.testing.assert_array_equal(hidden[0], hidden[3])
    # Pooled features are the mean of per-word vectors, so they are additive over words:
    # pooled(red circle) + pooled(blue square) == pooled(red square) + pooled(blue circle).
    blue_square = encoder.encode(["blue square"])[1][0]
    np.testing.assert_allclose(pooled[0] + blue_square, pooled[1] + pooled[2], rtol=1e-6, atol=1e-6)
    # Positions matter for token features: the same word at another position gives another vector.
    swapped = encoder.encode(["circle red"])[0][0]
    assert not np.allclose(swapped[0], hidden[0, 1])


def test_padding_and_truncation():
    encoder = ToyTextEncoder(seq_len=3, context_dim=4, pooled_dim=2, seed=0)
    hidden, _ = encoder.encode(["one", "one two three four five"])
    np.testing.assert_array_equal(hidden[0, 1], hidden[0, 2])  # padding rows are one fixed vector
    assert not np.allclose(hidden[0, 1], hidden[1, 1])
    np.testing.assert_array_equal(hidden[1], encoder.encode(["one two three"])[0][0])  # words past seq_len are cut


def test_bad_sizes_are_named():
    with pytest.raises(ConfigError, match="context_dim"):
        ToyTextEncoder(seq_len=4, context_dim=0, pooled_dim=2)
