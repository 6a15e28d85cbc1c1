"""CLIP tokenisation on the host: transformers' CLIPTokenizer from a local directory, fixed length.

Prompts are padded to the model's full context (77 for real CLIPs) so every batch has one
static shape. With the causal text tower and pooling at the end-of-text token, padding
after it changes nothing, so this equals both open_clip's `tokenize` (context 77, zeros
after EOT, truncation keeping EOT last) and the processors' `padding=True`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from alignax.errors import WeightsError
from alignax.rewards.base import batch_key

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def load_clip_tokenizer(path: str | os.PathLike, *, source: str):
    """CLIPTokenizer from a local directory (tokenizer.json, or vocab.json + merges.txt); never the hub."""
    directory = Path(path)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: tokenizer directory not found ({source})")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise WeightsError(f"{directory}: no CLIP tokenizer files (expected one of {list(_TOKENIZER_FILES)}) "
                           f"({source})")
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{directory}: not a readable CLIP tokenizer ({e})") from e
    return tokenizer


def check_vocab(tokenizer, vocab_size: int, source: str) -> None:
    """Every token id must index the text tower's embedding table."""
    directory = tokenizer.name_or_path
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise WeightsError(f"{directory}: tokenizer ids go up to {largest} but the text tower has {vocab_size} "
                           f"token embeddings; tokenizer and checkpoint do not belong together ({source})")


def clip_tokenize_fn(tokenizer, reward_name: str, length: int,
                     pad_id: int | None = None) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """`prompts -> {name/input_ids, name/attention_mask}` int32 [B, length]; `pad_id` overrides the pad token
    (open_clip pads with 0)."""
    def tokenize(prompts: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        ids = encoded["input_ids"].astype(np.int32)
        mask = encoded["attention_mask"].astype(np.int32)
        if pad_id is not None:
            ids = np.where(mask == 1, ids, np.int32(pad_id))
        return {batch_key(reward_name, "input_ids"): ids, batch_key(reward_name, "attention_mask"): mask}
    return tokenize
