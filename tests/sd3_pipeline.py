"""A tiny random SD3 pipeline saved by diffusers: every component of `StableDiffusion3Pipeline`
(two CLIP text towers with projection, T5, their tokenizers, the MM-DiT, the VAE, the scheduler).

Sizes follow the tiny world (`alignax.config.TINY_TRANSFORMER` / `TINY_VAE`), so a trainer config
can point `model.pretrained` at the result. The CLIP widths (6 + 8) are below the joint width (16)
so the zero padding of the CLIP part is exercised, and the two towers differ as CLIP-L and
OpenCLIP bigG do (quick_gelu vs gelu). Tokenizers are real transformers tokenizers built from
small vocabularies here: no hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignax import config as config_lib
from tests.reference_models import randomize_

CLIP_MAX_LENGTH = 77
CLIP_L = dict(hidden_size=6, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2, projection_dim=8,
              hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, projection_dim=8,
              hidden_act="gelu")
T5 = dict(d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
          relative_attention_max_distance=20, feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies are made of)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    symbols = {}
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with a few merges, so words span one or several tokens."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    merges = [("p", "o"), ("r", "t</w>"), ("po", "rt</w>"), ("a", "i"), ("e", "s</w>"), ("o", "n</w>")]
    vocab = {}
    for token in symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] \
            + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A sentencepiece-unigram T5 tokenizer over lowercase letters, digits and a few words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in ("portrait", "of", "a", "person", "red", "blue", "smiling", "the")]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,."] + [("▁", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build(root: str | Path, *, seed: int = 0, with_t5: bool = True) -> Path:
    """Saves the pipeline under `root` with `save_pretrained` and returns `root`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_common = dict(vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    text_encoder = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **text_common)), seed + 1)
    text_encoder_2 = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **text_common)), seed + 2)
    components = dict(
        transformer=randomize_(SD3Transformer2DModel(**config_lib.TINY_TRANSFORMER), seed + 3),
        vae=randomize_(AutoencoderKL(**config_lib.TINY_VAE), seed + 4, scale=0.1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    if with_t5:
        t5_tok = t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **T5))
        components.update(text_encoder_3=randomize_(t5, seed + 5), tokenizer_3=t5_tok)
    StableDiffusion3Pipeline(**components).save_pretrained(root)
    return root


def load(root: str | Path):
    """The saved pipeline in PyTorch, fp32, eval mode."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(root, torch_dtype=torch.float32)


if __name__ == "__main__":  # a quick look: python -m tests.sd3_pipeline /tmp/tiny_sd3
    import sys

    out = build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_sd3")
    print(json.dumps(json.loads((out / "model_index.json").read_text()), indent=1))
