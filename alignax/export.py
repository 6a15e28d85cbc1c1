"""`python -m alignax.export --workdir=DIR [--step=N] [--ema] [--lora=merge|separate] --out=OUT`.

Writes the trained MM-DiT as a diffusers `SD3Transformer2DModel` directory at `--out`.
Objective heads (feature alignment projectors) are training-only and never exported.
With LoRA, `merge` folds the adapter into the base weights; `separate` writes the base
weights plus `--out/lora/pytorch_lora_weights.safetensors` in the diffusers/PEFT layout, which
`StableDiffusion3Pipeline.load_lora_weights` reads. When the run's VAE was not loaded from a
pipeline or `config.model.vae_pretrained` (a random-init VAE, or the `vae/` of an earlier
export), it is written to `--out/vae/` (diffusers `AutoencoderKL`), so `config.model.pretrained=OUT`
reloads both models.

An export never deletes a user's files. `--out` must be absent, an empty directory, or a
directory holding only an earlier alignax export, recognised by its marker `.alignax-export.json`
(written last; it lists the export's files). Anything else (a workdir, anything inside a
workdir's `checkpoints/`, a pipeline root, any other non-empty directory, a file) is refused
before anything is restored or written. A local export is written to a sibling scratch
directory and swapped in by rename; a remote one (`gs://`, `memory://`) is written locally,
uploaded, and published by its marker, written last.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import jax

from alignax import fs, saved_run
from alignax.errors import ConfigError
from alignax.models import Pretrained, save_diffusers
from alignax.models import setup as model_setup

LORA_MODES = ("merge", "separate")
MARKER = ".alignax-export.json"


# ---- where an export may go ---------------------------------------------------------------------

def _real(path: str) -> str:
    return path if fs.is_remote(path) else os.path.realpath(path)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _ancestors(path: str) -> list[str]:
    """`path` and every directory above it (URLs keep their `protocol://bucket`)."""
    out = [path]
    while True:
        parent = posixpath.dirname(path) if fs.is_remote(path) else os.path.dirname(path)
        if parent == path or not parent or (fs.is_remote(path) and not fs.is_remote(parent)):
            return out
        out.append(parent)
        path = parent


def _is_checkpoints_dir(path: str) -> bool:
    """A workdir's `checkpoints/`: named so, and holding orbax step directories or beside a run's files."""
    if posixpath.basename(path.rstrip("/")) != "checkpoints" or not fs.isdir(path):
        return False
    entries = fs.listdir(path)
    if any(e.isdigit() or "orbax-checkpoint" in e for e in entries):
        return True
    parent = posixpath.dirname(path) if fs.is_remote(path) else os.path.dirname(path)
    return any(name in fs.listdir(parent) for name in ("metrics.jsonl", "tensorboard", "samples"))


def _files(directory: str) -> list[str]:
    """Every file under `directory`, as '/'-joined paths relative to it."""
    filesystem, root = fs.filesystem(directory)
    prefix = root.rstrip("/") + "/"
    return sorted(f[len(prefix):] if f.startswith(prefix) else posixpath.basename(f)
                  for f in filesystem.find(root))


def check_out(out: str | os.PathLike, workdir: str | os.PathLike) -> bool:
    """Whether `out` holds an earlier alignax export that this export replaces (False: absent or
    empty). A ConfigError naming --out and why, for anything an export must not overwrite.
    Only reads."""
    out, workdir = fs.absolute(out), fs.absolute(workdir)
    where = f"--out={out}"
    if not fs.is_remote(out) and os.path.islink(out):
        raise ConfigError(f"{where}: is a symlink; pass the directory itself")
    real, run = _real(out), _real(workdir)
    if real == run:
        raise ConfigError(f"{where}: is the --workdir itself; export into a new directory")
    if _within(real, fs.join(run, "checkpoints")):
        raise ConfigError(f"{where}: is inside the run's checkpoints/ ({fs.join(run, 'checkpoints')}); "
                          "export into a directory outside it")
    for ancestor in _ancestors(real):
        if _is_checkpoints_dir(ancestor):
            raise ConfigError(f"{where}: is inside {ancestor}, a training workdir's checkpoints/; "
                              "export into a directory outside it")
    if _within(run, real):
        raise ConfigError(f"{where}: contains the --workdir {workdir}; export into a new directory")
    if not fs.exists(out):
        return False
    if not fs.isdir(out):
        raise ConfigError(f"{where}: is a file; an export writes a directory (pass an absent or empty one)")
    entries = fs.listdir(out)
    if not entries:
        return False
    if "checkpoints" in entries:
        raise ConfigError(f"{where}: is a training workdir (it holds checkpoints/); export into a new directory")
    if "model_index.json" in entries:
        raise ConfigError(f"{where}: is a diffusers pipeline root (it holds model_index.json); export into a "
                          "new directory")
    if MARKER not in entries:
        raise ConfigError(f"{where}: is a non-empty directory that is not an alignax export (no {MARKER}); "
                          f"pass an absent or empty directory (it holds {entries[:5]}"
                          f"{' ...' if len(entries) > 5 else ''})")
    try:
        listed = set(json.loads(fs.read_text(fs.join(out, MARKER)))["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: {MARKER} is unreadable ({e}); remove the directory by hand if it is "
                          "an old export") from e
    extra = sorted(set(_files(out)) - listed - {MARKER})
    if extra:
        raise ConfigError(f"{where}: holds files the earlier alignax export did not write: {extra[:5]}"
                          f"{' ...' if len(extra) > 5 else ''}; move them away or pass another --out")
    return True


# ---- writing -------------------------------------------------------------------------------------

def _write_models(directory: Path, run: saved_run.SavedRun, *, ema: bool, lora_mode: str, dtype: Any,
                  workdir: str) -> list[str]:
    """Writes the transformer (and vae/ or lora/) into the empty `directory`; returns what it wrote."""
    config = run.config
    trainable = run.state["ema"] if ema else run.state["trainable"]
    t_src, transformer, v_src, vae_module = model_setup.build_modules(config.model)
    parts = ["EMA transformer" if ema else "transformer"]
    adapter = None
    if not config.lora.enabled:
        if lora_mode == "separate":
            raise ConfigError(f"--lora=separate: the run in {workdir} has config.lora.enabled=False")
        params = jax.device_get(trainable["transformer"])
    else:
        from alignax.training import lora
        spec = lora.LoraSpec.from_config(config.lora)
        base = saved_run.lora_base(config, t_src, transformer)
        if lora_mode == "merge":
            params = jax.device_get(lora.merge(base, trainable["transformer"], spec))
        else:
            params, adapter = jax.device_get(base), jax.device_get(trainable["transformer"])
    # The transformer first: save_diffusers publishes `directory` as a whole, replacing what is in it.
    save_diffusers(Pretrained(transformer, params, t_src.config, t_src.architecture), directory, dtype=dtype)
    if adapter is not None:
        lora.save_lora(directory / "lora", adapter, spec)
        parts.append("lora")
    # The VAE goes along unless the user already has it as a file of its own (a pipeline's vae/ or
    # config.model.vae_pretrained): a random-init VAE, or the vae/ of an earlier export.
    own_vae = v_src.directory is None or (not config.model.vae_pretrained and t_src.directory is not None
                                          and v_src.directory == t_src.directory / "vae")
    if own_vae:
        vae = jax.device_get(saved_run.vae_params(config, v_src, vae_module))
        save_diffusers(Pretrained(vae_module, vae, v_src.config, v_src.architecture), directory / "vae", dtype=dtype)
        parts.append("vae")
    return parts


def _marker(run: saved_run.SavedRun, files: list[str], *, ema: bool, lora_mode: str) -> str:
    return json.dumps({"format": "alignax-export", "workdir": run.workdir, "step": run.step, "ema": ema,
                       "lora": lora_mode if run.config.lora.enabled else None,
                       "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "files": files}, indent=2) + "\n"


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, ema: bool = False,
           lora_mode: str = "merge", dtype: Any = None) -> str:
    """Writes the chosen checkpoint as diffusers weights at `out` (local path or URL); returns `out`.

    `workdir` and `out` are checked (see the module docstring) before anything is restored or written."""
    return _export(workdir, out, step=step, ema=ema, lora_mode=lora_mode, dtype=dtype)[0]


def _export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None, ema: bool, lora_mode: str,
            dtype: Any) -> tuple[str, str]:
    """(out, the one-line summary the CLI prints)."""
    if lora_mode not in LORA_MODES:
        raise ConfigError(f"--lora={lora_mode!r}: choose one of {list(LORA_MODES)}")
    out = fs.absolute(out)
    saved_run.check_workdir(workdir)
    check_out(out, workdir)
    run = saved_run.load(workdir, step)
    if ema and not run.config.ema.enabled:
        raise ConfigError(f"--ema: the run in {workdir} has config.ema.enabled=False, so it saved no EMA")
    if fs.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="alignax-export-") as scratch:
            local = Path(scratch) / "export"
            local.mkdir()
            parts = _write_models(local, run, ema=ema, lora_mode=lora_mode, dtype=dtype, workdir=str(workdir))
            files = _files(str(local))
            replacing = check_out(out, workdir)  # again: the restore took a while
            if replacing:  # unpublish first (marker gone), then drop the old files: object stores have no rename
                filesystem, root = fs.filesystem(out)
                filesystem.rm(fs.filesystem(fs.join(out, MARKER))[1])
                filesystem.rm(root, recursive=True)
            fs.put_tree(local, out)
            fs.write_text_atomic(fs.join(out, MARKER), _marker(run, files, ema=ema, lora_mode=lora_mode))
    else:
        from alignax.models import weights_io
        with weights_io.atomic_directory(out) as tmp:
            parts = _write_models(tmp, run, ema=ema, lora_mode=lora_mode, dtype=dtype, workdir=str(workdir))
            files = _files(str(tmp))
            check_out(out, workdir)  # again, right before the swap: the restore took a while
            (tmp / MARKER).write_text(_marker(run, files, ema=ema, lora_mode=lora_mode))
    summary = f"exported step {run.step} ({' + '.join(parts)}) to {out}"
    logging.info("%s from %s", summary, workdir)
    return out, summary


def main(argv: list[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    _, summary = _export(f.workdir, f.out, step=f.step, ema=f.ema, lora_mode=f.lora, dtype=None)
    print(summary)  # the CLI's one stdout line: what it wrote where


def cli() -> None:
    """`alignax-export` / `python -m alignax.export`: flags defined here, not at import, so importing this module
    never claims `--workdir` in absl's global flags."""
    from absl import flags

    from alignax import cli as cli_lib

    flags.DEFINE_string("workdir", None, "the run directory (holds checkpoints/)")
    flags.DEFINE_string("out", None, "where to write the diffusers transformer directory: absent, empty, or an "
                                     "earlier alignax export (local path or URL)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_bool("ema", False, "export the EMA weights")
    flags.DEFINE_enum("lora", "merge", list(LORA_MODES), "with LoRA: merge into the base, or write it separately")
    flags.mark_flags_as_required(["workdir", "out"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
