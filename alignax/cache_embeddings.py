"""Prompts in, SD3 embeddings cached: a `prompts` dataset the trainer reads, written with alignax's own
text encoders (no PyTorch).

    python -m alignax.cache_embeddings --pipeline=SD3_DIR --prompts=prompts.txt --out=DATASET_DIR

`--prompts` is a text file (local or remote), one prompt per line, or a dataset directory (any alignax/TFDS
array_record dataset with a `prompt` field, split 'train'); blank prompts are skipped. Each prompt is
encoded as `TextEncoders.encode_prompt` (= diffusers' `StableDiffusion3Pipeline.encode_prompt`) and written
with `encoder_hidden_states` [77 + max_sequence_length, D] and `pooled_projections` [P] into the TFDS
array_record `prompts` dataset at `--out`. The negative prompt ('' by default) is encoded the same way
and saved as `OUT/negative.npz`, the file `config.sample.negative_embeddings` takes.

Resumable: encoded chunks are kept in `OUT.partial/` as they finish, and a rerun with the same inputs
encodes only the missing ones; the dataset appears under `--out` only once complete. All chunks have the
same batch size (the last is padded), so the encoder compiles once.

Multi-host: every process runs the same command; process i encodes the chunks c with
`c % process_count == i` (`jax.process_index()/process_count()` after `--distributed` start-up, as
`alignax.train`, or `--process_index/--process_count`) into the shared `OUT.partial/`; process 0 waits for
all chunk files and writes the dataset. `OUT.partial/` must be on a filesystem all processes see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alignax import fs
from alignax.errors import ConfigError, DataError

log = logging.getLogger("alignax")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line of a text file, or the `prompt` field of a dataset directory's 'train' split
    (blank ones skipped either way); DataError naming the path if it is missing or holds none."""
    path = os.fspath(path)
    if fs.isdir(path):
        return _dataset_prompts(path)
    if not fs.isfile(path):
        raise DataError(f"--prompts={path!r}: no such file (a text file with one prompt per line, or a "
                        "dataset directory with a 'prompt' field)")
    prompts = [line.strip() for line in fs.read_text(path).splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"--prompts={path!r}: the file holds no prompts (one prompt per line expected)")
    return prompts


def _dataset_prompts(path: str, read_size: int = 1024) -> list[str]:
    """The `prompt` field of every record of the 'train' split, in order (blank ones skipped, counted)."""
    from alignax.data import open_dataset
    try:
        source = open_dataset(path, "train")
    except DataError as err:  # an empty split or a directory that is no dataset: say which flag
        raise DataError(f"--prompts={path!r}: {err}") from err
    if "prompt" not in source.features:
        raise DataError(f"--prompts={path!r}: the {source.kind!r} dataset has no 'prompt' field")
    prompts = []
    for start in range(0, len(source), read_size):
        records = source.get_many(range(start, min(start + read_size, len(source))))
        prompts.extend(str(record["prompt"]) for record in records)
    kept = [p for p in prompts if p.strip()]  # kept verbatim: the cached dataset repeats the source's text
    if not kept:
        raise DataError(f"--prompts={path!r}: the dataset's {len(prompts)} records hold no prompts (all blank)")
    if len(kept) < len(prompts):
        log.warning("--prompts=%s: skipped %d blank prompts of %d", path, len(prompts) - len(kept), len(prompts))
    return kept


def cache_embeddings(pipeline: str | os.PathLike, prompts_file: str | os.PathLike, out: str | os.PathLike, *,
                     batch_size: int = 16, max_sequence_length: int = 256, use_t5: bool = True,
                     clip_skip: int | None = None, negative_prompt: str = "", overwrite: bool = False,
                     progress: bool = True, process_index: int | None = None, process_count: int | None = None,
                     wait_timeout: float = 24 * 3600.0, poll_seconds: float = 2.0) -> dict:
    """Writes the dataset and `negative.npz`; returns {'out', 'prompts', 'seconds', 'prompts_per_second',
    'process_index', 'process_count', 'chunks_written', 'assembled'}.

    Multi-host: process `process_index` of `process_count` (default: `jax.process_index()/process_count()`)
    encodes the chunks i with `i % process_count == process_index` into the shared `OUT.partial/`; process 0
    then waits for the others' chunk files (DataError naming the missing ones after `wait_timeout` seconds)
    and assembles the dataset, the others return after their share (`assembled=False`). No collectives:
    each process encodes on its own devices, and a rerun resumes from the chunks already written.
    """
    from alignax.conditioning import TextEncoders
    from alignax.data import write_prompts

    out = os.fspath(out)
    process_index, process_count = _process(process_index, process_count)
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
    if process_index == 0:
        _prepare_partial(partial, settings)
    else:  # process 0 alone clears a stale OUT.partial; start once it holds this run's settings
        _wait_for_settings(partial, settings, wait_timeout, poll_seconds)
    chunks = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
    mine = [i for i in range(len(chunks)) if i % process_count == process_index]
    todo = [i for i in mine if not _chunk_path(partial, i).is_file()]
    start = time.perf_counter()
    if todo:
        if len(todo) < len(mine):
            log.info("resuming: %d of %d chunks already encoded in %s", len(mine) - len(todo), len(mine), partial)
        encoders = TextEncoders.load(pipeline, use_t5=use_t5)
        from tqdm import tqdm
        total = sum(len(chunks[i]) for i in mine)
        bar = tqdm(total=total, initial=total - sum(len(chunks[i]) for i in todo), unit="prompt",
                   desc="encoding prompts" + (f" ({process_index}/{process_count})" if process_count > 1 else ""),
                   disable=not progress)
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
    encoded = sum(len(chunks[i]) for i in todo)
    result = dict(out=out, prompts=len(prompts), seconds=seconds,
                  prompts_per_second=encoded / seconds if seconds > 0 and encoded else float("nan"),
                  process_index=process_index, process_count=process_count,
                  chunks_written=[_chunk_path(partial, i).name for i in todo], assembled=False)
    if process_index != 0:
        return result
    _wait_for_chunks(partial, len(chunks), process_count, wait_timeout, poll_seconds)

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
    result["assembled"] = True
    return result


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Explicit values (flags, tests) win; otherwise JAX's, after `alignax.training.distributed.initialize`."""
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    for name, value in (("process_index", process_index), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"--{name}={value!r}: expected an int")
    if not (process_count >= 1 and 0 <= process_index < process_count):
        raise ConfigError(f"--process_index={process_index}, --process_count={process_count}: expected "
                          "0 <= process_index < process_count")
    return process_index, process_count


def _wait_for_settings(partial: Path, settings: dict, timeout: float, poll_seconds: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if json.loads((partial / "settings.json").read_text()) == settings:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise DataError(f"{partial}: timed out after {timeout:g}s waiting for process 0 to start it with this "
                            "run's settings (settings.json); is process 0 running with the same flags and prompts?")
        time.sleep(poll_seconds)


def _wait_for_chunks(partial: Path, count: int, process_count: int, timeout: float, poll_seconds: float) -> None:
    """Process 0: polls for the other processes' chunk files; DataError naming the missing ones at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [i for i in range(count) if not _chunk_path(partial, i).is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            names = ", ".join(_chunk_path(partial, i).name for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            owners = sorted({i % process_count for i in missing})
            raise DataError(f"{partial}: timed out after {timeout:g}s waiting for {len(missing)} of {count} chunks: "
                            f"{names}{more} (to be written by processes {owners} of {process_count}); rerun all "
                            "processes with the same flags to resume")
        time.sleep(poll_seconds)


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
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")  # unique across hosts sharing the dir
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    if f.process_index is None and f.process_count is None:  # explicit values need no coordinator
        from alignax.training import distributed
        distributed.initialize(f.distributed, coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id)
    result = cache_embeddings(f.pipeline, f.prompts, f.out, batch_size=f.batch_size,
                              max_sequence_length=f.max_sequence_length, use_t5=f.use_t5,
                              clip_skip=f.clip_skip, negative_prompt=f.negative_prompt, overwrite=f.overwrite,
                              process_index=f.process_index, process_count=f.process_count,
                              wait_timeout=f.wait_timeout)
    if not result["assembled"]:
        print(f"process {result['process_index']} of {result['process_count']}: wrote {len(result['chunks_written'])} "
              f"chunk files ({', '.join(result['chunks_written']) or 'none new'}) to {result['out']}.partial; "
              "process 0 assembles the dataset")
        return
    print(f"wrote {result['prompts']} prompt embeddings (prompts dataset, split 'train') to {result['out']} and the "
          f"negative prompt {f.negative_prompt!r} to {os.path.join(result['out'], 'negative.npz')} "
          f"({result['prompts_per_second']:.1f} prompts/s)")


def cli() -> None:
    """`alignax-cache-embeddings` / `python -m alignax.cache_embeddings`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib
    flags.DEFINE_string("pipeline", None, "diffusers SD3 pipeline directory (tokenizers and text encoders)",
                        required=True)
    flags.DEFINE_string("prompts", None, "text file, one prompt per line, or a dataset directory with a 'prompt' "
                        "field", required=True)
    flags.DEFINE_string("out", None, "output prompts dataset directory", required=True)
    flags.DEFINE_integer("batch_size", 16, "prompts per encoder call (one compiled shape)")
    flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens (diffusers' max_sequence_length)")
    flags.DEFINE_bool("use_t5", True, "encode with T5 (else its part is zeros, as diffusers without text_encoder_3)")
    flags.DEFINE_integer("clip_skip", None, "CLIP layers to skip (diffusers' clip_skip)")
    flags.DEFINE_string("negative_prompt", "", "the negative prompt written to OUT/negative.npz")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset at --out")
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "jax.distributed.initialize(): auto = on TPU VMs / when coordinator env is set")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process CPU/GPU runs)")
    flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
    flags.DEFINE_integer("process_index", None, "override jax.process_index(): this process encodes the chunks "
                         "i % process_count == process_index (no jax.distributed needed)")
    flags.DEFINE_integer("process_count", None, "override jax.process_count() (with --process_index)")
    flags.DEFINE_float("wait_timeout", 24 * 3600.0, "seconds process 0 waits for the other processes' chunks")
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
