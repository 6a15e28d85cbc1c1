"""A deterministic stand-in for SD3's text encoders, for the tiny embedded world and tests.

SD3 conditions its MM-DiT on per-token embeddings (CLIP-L/G hidden states concatenated with
T5-XXL, `joint_attention_dim` wide) and a pooled vector (CLIP-L/G pooled,
`pooled_projection_dim` wide). Those encoders cannot run here, so **real runs do not use
this class: they store the SD3 pipeline's embeddings in the dataset** (fields
`encoder_hidden_states` and `pooled_projections`), and the trainer only ever reads them.

`ToyTextEncoder` keeps the one property that matters for learning conditioning: prompts
that share words share features. Each lower-cased word gets fixed random vectors drawn from
`numpy.random.default_rng([seed, *blake2b(word)])` - independent of vocabulary, call order
and Python's hash randomisation - so the same (seed, word) gives the same vector in any process.
- `encoder_hidden_states[b, i]` = the vector of the i-th word + a fixed vector for position i;
  positions past the last word hold a fixed padding vector; words past `seq_len` are cut.
- `pooled[b]` = mean of the words' pooled vectors (zeros for an empty prompt).
Entries are standard-normal scaled by 1/sqrt(2) for hidden states, so features are O(1).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


class ToyTextEncoder:
    """`encode(prompts) -> (encoder_hidden_states [B, seq_len, context_dim], pooled [B, pooled_dim])`, float32."""

    def __init__(self, seq_len: int, context_dim: int, pooled_dim: int, seed: int = 0):
        for name, value in (("seq_len", seq_len), ("context_dim", context_dim), ("pooled_dim", pooled_dim)):
            if not isinstance(value, int) or value <= 0:
                from alignax.errors import ConfigError

                raise ConfigError(f"ToyTextEncoder {name}: expected a positive int, found {value!r}")
        self.seq_len = seq_len
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.seed = seed
        positions = np.random.default_rng([seed, 0x706F73]).standard_normal((seq_len + 1, context_dim))
        self._positions = positions[:seq_len].astype(np.float32)
        self._padding = positions[seq_len].astype(np.float32)
        self._words: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def tokenize(prompt: str) -> list[str]:
        """Lower-cased alphanumeric words; punctuation separates words and is dropped."""
        return _WORD.findall(prompt.lower())

    def word_vectors(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        """(hidden vector [context_dim], pooled vector [pooled_dim]) of one word."""
        if word not in self._words:
            digest = hashlib.blake2b(word.encode("utf-8"), digest_size=16).digest()
            words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
            rng = np.random.default_rng([self.seed, *words])
            self._words[word] = (
                rng.standard_normal(self.context_dim).astype(np.float32),
                rng.standard_normal(self.pooled_dim).astype(np.float32),
            )
        return self._words[word]

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        hidden = np.empty((len(prompts), self.seq_len, self.context_dim), np.float32)
        pooled = np.zeros((len(prompts), self.pooled_dim), np.float32)
        for b, prompt in enumerate(prompts):
            words = self.tokenize(str(prompt))
            hidden[b] = self._padding
            for i, word in enumerate(words[: self.seq_len]):
                hidden[b, i] = self.word_vectors(word)[0] + self._positions[i]
            if words:
                pooled[b] = np.mean([self.word_vectors(w)[1] for w in words], axis=0)
        return hidden / np.float32(np.sqrt(2.0)), pooled

    __call__ = encode
