"""Prompts in, SD3 embeddings cached: a `prompts` dataset the trainer reads, written with alignax's own
text encoders (no PyTorch).

    python -m alignax.cache_embeddings --pipeline=SD3_DIR --prompts=prompts.txt --out=DATASET_DIR

`--prompts` is a text file (local or remote), one prompt per line; blank lines are skipped. Each prompt is
encoded as `TextEncoders.encode_prompt` (= diffusers' `StableDiffusion3Pipeline.encode_prompt`) and written
with `encoder_hidden_states` [77 + max_sequence_length, D] and `pooled_projections` [P] into the TFDS
array_record `prompts` dataset at `--out`. The negative prompt ('' by default) is encoded the same way
and saved as `OUT/negative.npz`, the file `config.sample.negative_embeddings` takes.

Resumable: encoded chunks are kept in `OUT.partial/` as they finish, and a rerun with the same inputs
encodes only the missing ones; the dataset appears under `--out` only once complete. All chunks have the
same batch size (the last is padded), so the encoder compiles once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alignax import fs
from alignax.errors import DataError

log = logging.getLogger("alignax")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (blank lines skipped); DataError naming the file if it is missing or holds none."""
    path = os.fspath(path)
    if not fs.isfile(path):
        raise DataError(f"--prompts={path!r}: no such file (a text file with one prompt per line)")
    prompts = [line.strip() for line in fs.read_text(path).splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"--prompts={path!r}: the file holds no prompts (one prompt per line expected)")
    return prompts


def cache_embeddings(pipeline: str | os.PathLike, prompts_file: str | os.PathLike, out: str | os.PathLike, *,
                     batch_size: int = 16, max_sequence_length: int = 256, use_t5: bool = True,
                     clip_skip: int | None = None, negative_prompt: str = "", overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Writes the dataset and `negative.npz`; returns {'out', 'prompts', 'seconds', 'prompts_per_second'}."""
    from alignax.conditioning import TextEncoders
    from alignax.data import write_prompts

    out = os.fspath(out)
    prompts = read_prompts(prompts_file)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DataError(f"--batch_size={batch_size!r}: expected a positive int")
    if os.path.exists(out) and not overwrite:
        raise DataError(f"--out={out!r} already exists; pass --overwrite to replace it")
    work = prompts + [negative_prompt]  # the negative rides in the last chunk: one compiled batch shape
    settings = dict(pipeline=os.path.abspath(os.fspath(pipeline)), max_sequence_length=max_sequence_length,
                    use_t5=use_t5, clip_skip=clip_skip, batch_size=batch_size,
                    prompts_sha256=hashlib.sha256("\n".join(work).encode()).hexdigest())
    partial = Path(out + ".partial")
    _prepare_partial(partial, settings)
    chunks = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
    todo = [i for i in range(len(chunks)) if not _chunk_path(partial, i).is_file()]
    start = time.perf_counter()
    if todo:
        if len(todo) < len(chunks):
            log.info("resuming: %d of %d chunks already encoded in %s", len(chunks) - len(todo), len(chunks), partial)
        encoders = TextEncoders.load(pipeline, use_t5=use_t5)
        from tqdm import tqdm
        bar = tqdm(total=len(work), initial=len(work) - sum(len(chunks[i]) for i in todo), unit="prompt",
                   desc="encoding prompts", disable=not progress)
        for i in todo:
            chunk = chunks[i]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            embeds, pooled = encoders.encode_prompt(padded, max_sequence_length=max_sequence_length,
                                                    clip_skip=clip_skip)
            _save_atomic(_chunk_path(partial, i), encoder_hidden_states=np.asarray(embeds)[:len(chunk)],
                         pooled_projections=np.asarray(pooled)[:len(chunk)])
            bar.update(len(chunk))
        bar.close()
    seconds = time.perf_counter() - start

    def examples() -> Iterator[dict]:
        index = 0
        for i in range(len(chunks)):
            with np.load(_chunk_path(partial, i)) as arrays:
                embeds, pooled = arrays["encoder_hidden_states"], arrays["pooled_projections"]
            for row in range(len(embeds)):
                if index < len(prompts):
                    yield {"prompt": prompts[index], "encoder_hidden_states": embeds[row],
                           "pooled_projections": pooled[row]}
                index += 1

    write_prompts(out, examples(), overwrite=overwrite)
    with np.load(_chunk_path(partial, len(chunks) - 1)) as arrays:  # the negative is the last row
        _save_atomic(partial / "negative.npz", encoder_hidden_states=arrays["encoder_hidden_states"][-1],
                     pooled_projections=arrays["pooled_projections"][-1])
    os.replace(partial / "negative.npz", os.path.join(out, "negative.npz"))
    shutil.rmtree(partial)
    encoded = sum(len(chunks[i]) for i in todo)
    return dict(out=out, prompts=len(prompts), seconds=seconds,
                prompts_per_second=encoded / seconds if seconds > 0 and encoded else float("nan"))


def _chunk_path(partial: Path, index: int) -> Path:
    return partial / f"chunk-{index:06d}.npz"


def _prepare_partial(partial: Path, settings: dict) -> None:
    """Keeps `partial` if it was started with the same settings; otherwise starts it afresh."""
    meta = partial / "settings.json"
    if partial.is_dir():
        try:
            same = json.loads(meta.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if same:
            return
        log.warning("%s holds chunks encoded with other settings or prompts; starting over", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    meta.write_text(json.dumps(settings, indent=1))


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    result = cache_embeddings(f.pipeline, f.prompts, f.out, batch_size=f.batch_size,
                              max_sequence_length=f.max_sequence_length, use_t5=f.use_t5,
                              clip_skip=f.clip_skip, negative_prompt=f.negative_prompt, overwrite=f.overwrite)
    print(f"wrote {result['prompts']} prompt embeddings (prompts dataset, split 'train') to {result['out']} and the "
          f"negative prompt {f.negative_prompt!r} to {os.path.join(result['out'], 'negative.npz')} "
          f"({result['prompts_per_second']:.1f} prompts/s)")


def cli() -> None:
    """`alignax-cache-embeddings` / `python -m alignax.cache_embeddings`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib
    flags.DEFINE_string("pipeline", None, "diffusers SD3 pipeline directory (tokenizers and text encoders)",
                        required=True)
    flags.DEFINE_string("prompts", None, "text file, one prompt per line", required=True)
    flags.DEFINE_string("out", None, "output prompts dataset directory", required=True)
    flags.DEFINE_integer("batch_size", 16, "prompts per encoder call (one compiled shape)")
    flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens (diffusers' max_sequence_length)")
    flags.DEFINE_bool("use_t5", True, "encode with T5 (else its part is zeros, as diffusers without text_encoder_3)")
    flags.DEFINE_integer("clip_skip", None, "CLIP layers to skip (diffusers' clip_skip)")
    flags.DEFINE_string("negative_prompt", "", "the negative prompt written to OUT/negative.npz")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset at --out")
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
