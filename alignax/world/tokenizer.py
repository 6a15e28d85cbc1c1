"""The world's CLIP tokenizer: a real CLIP BPE tokenizer in which every caption word, person number and
the comma is one token (alignax.data.pairs_tokens.write_word_tokenizer), with a short context."""

from __future__ import annotations

import os
import string
from pathlib import Path

from alignax.data.pairs_tokens import write_word_tokenizer
from alignax.world import portraits

ALPHABET = string.ascii_lowercase + string.digits + ","


def build_tokenizer(out_dir: str | os.PathLike, *, max_length: int = 32, num_identities: int = 100) -> Path:
    """Saves the tokenizer to `out_dir` (CLIPTokenizer files) and returns the directory."""
    words = [*portraits.VOCABULARY, *portraits.identity_words(num_identities)]
    return write_word_tokenizer(out_dir, words, alphabet=ALPHABET, model_max_length=max_length)
