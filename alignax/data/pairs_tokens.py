"""Prompt tokens for preference pairs: a host batch of pairs made ready for a CLIP scorer, and a tiny
word-level CLIP tokenizer for synthetic worlds (real runs use the scorer's own tokenizer directory).

The tiny tokenizer is a genuine CLIP BPE tokenizer (transformers' CLIPTokenizer, saved to a
directory): its vocabulary is the letters a-z, each also as a word end (`x</w>`), plus one
merge chain per listed word, so every listed word is a single token and any other lowercase
word falls back to letters. `<|endoftext|>` gets the highest id, as in CLIP.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from alignax.errors import DataError

IMAGE_KEYS = ("image_0", "image_1")


def _bpe(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """The BPE segmentation: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def word_merges(words: Iterable[str], alphabet: str = string.ascii_lowercase) -> list[tuple[str, str]]:
    """BPE merges that make each word one `word</w>` token. Each word's merges chain the pieces that the
    merges before it already make of the word, so a later word's merges (of higher rank) never split an
    earlier one, whatever letters they share."""
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if len(word) < 2 or not set(word) <= set(alphabet):
            continue
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return list(ranks)


def write_word_tokenizer(directory: str | os.PathLike, words: Iterable[str], *,
                         alphabet: str = string.ascii_lowercase, model_max_length: int = 77) -> Path:
    """Saves a CLIPTokenizer (vocab.json, merges.txt, tokenizer.json) knowing `words` as whole tokens; any
    other word of `alphabet` characters falls back to characters (each also a word end, `x</w>`)."""
    import transformers

    merges = word_merges(words, alphabet)
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(alphabet)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory = Path(directory)
    transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length
                               ).save_pretrained(directory)
    return directory


def tiny_world_words() -> list[str]:
    """Every word the tiny world's captions use ('a red circle on a blue background')."""
    from alignax.data.tiny_world import PALETTE, SHAPES

    return ["a", "an", "on", "background", *PALETTE, *SHAPES]


def pairs_for_scorer(batch: Mapping[str, np.ndarray],
                     tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """A host batch of preference pairs (uint8 images, prompts, label_0) → what a CLIP scorer step takes:
    `image_0`, `image_1` float32 NHWC in [0, 1], `input_ids`, `attention_mask` int32, `label_0` float32."""
    missing = [k for k in (*IMAGE_KEYS, "prompt", "label_0") if k not in batch]
    if missing:
        raise DataError(f"preference-pairs batch: missing fields {missing}; found {sorted(batch)}")
    if batch["image_0"].shape != batch["image_1"].shape:
        raise DataError(f"preference-pairs batch: image_0 has shape {batch['image_0'].shape} but image_1 "
                        f"{batch['image_1'].shape}; resize both to one size when building the dataset")
    ids, mask = tokenize([str(p) for p in batch["prompt"]])
    out = {key: np.asarray(batch[key], np.float32) / 255.0 for key in IMAGE_KEYS}
    out.update(input_ids=np.asarray(ids, np.int32), attention_mask=np.asarray(mask, np.int32),
               label_0=np.asarray(batch["label_0"], np.float32))
    return out
