"""`python -m alignax.export --workdir=DIR [--step=N] [--ema] [--lora=merge|separate] [--pipeline[=BASE]
[--hardlink]] --out=OUT`.

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
before anything is restored or written; an earlier `--pipeline` export holds the marker too, so it is
replaced. A pipeline export may not overlap its BASE. A local export is written to a sibling scratch
directory and swapped in by rename; a remote one (`gs://`, `memory://`) is written locally,
uploaded, and published by its marker, written last.

`--pipeline[=BASE]` writes a whole diffusers pipeline instead, which
`StableDiffusion3Pipeline.from_pretrained(OUT)` loads: `OUT/transformer/` is the trained MM-DiT (EMA and
LoRA options as above; `--lora=separate` puts the adapter in `OUT/lora/`), and every other component that
BASE's `model_index.json` names (text encoders, tokenizers, scheduler) plus `model_index.json` itself are
BASE's own files, byte for byte, never re-encoded. BASE defaults to the run's `config.model.pretrained`
pipeline root. `OUT/vae/` is the VAE the run trained with (alignax never trains the VAE): the files of
`config.model.vae_pretrained` or of the pipeline the run loaded (BASE's `vae/` when that is the one), or a
random-init VAE written out; so the exported transformer always decodes through the latent space it learned.
Files are copied (a reflink, copy-on-write, where the filesystem supports it: no extra space). `--hardlink`
hard-links BASE's `*.safetensors` instead: no extra space on any filesystem, but a hard link is the same
file, so a tool that rewrote such a file of OUT in place would rewrite BASE's too (safetensors and
diffusers' own saves replace the file, which is safe; configs and tokenizer files, which their writers
rewrite in place, are always copied). A linked file keeps BASE's permissions.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections

from alignax import fs, saved_run
from alignax.errors import ConfigError, WeightsError
from alignax.models import Pretrained, save_diffusers
from alignax.models import setup as model_setup

LORA_MODES = ("merge", "separate")
MARKER = ".alignax-export.json"
PIPELINE_INDEX = "model_index.json"
# Files `--hardlink` links rather than copies: weights, which their writers (safetensors, diffusers,
# transformers) replace by a new file on save. Everything else is copied.
LINKED_SUFFIXES = (".safetensors",)
_FICLONE = 0x40049409  # Linux ioctl: reflink (copy-on-write clone) of a whole file


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
    if PIPELINE_INDEX in entries and MARKER not in entries:  # an earlier `--pipeline` export has both
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


# ---- the base pipeline of `--pipeline` -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PipelineBase:
    """A diffusers pipeline root: the export takes every component but the transformer (and the VAE,
    see the module docstring) from it."""

    root: str                     # absolute local path or URL
    components: tuple[str, ...]   # the subfolders its model_index.json names, sorted


def pipeline_base(pipeline: str, model_config: ml_collections.ConfigDict) -> PipelineBase:
    """The checked base of `--pipeline=BASE` (`pipeline=''`: the run's `config.model.pretrained`).

    A ConfigError names the flag for a run without a pipeline root, a missing BASE, a directory that is
    not a pipeline root, or a BASE whose text-encoder widths do not fit the run's transformer; a
    WeightsError names a component folder its model_index.json lists but that is missing. Only reads."""
    pretrained = model_config.get("pretrained") or ""
    if pipeline:
        root = fs.absolute(pipeline)
        where = f"--pipeline={root}"
    elif pretrained:
        root = fs.absolute(pretrained)
        where = f"--pipeline (the run's config.model.pretrained={pretrained})"
    else:
        raise ConfigError("--pipeline: the run has no config.model.pretrained pipeline to take the text encoders, "
                          "tokenizers and scheduler from; pass --pipeline=BASE, a diffusers pipeline directory")
    if not fs.isdir(root):
        raise ConfigError(f"{where}: no such directory (expected a diffusers pipeline root holding {PIPELINE_INDEX})")
    index_path = fs.join(root, PIPELINE_INDEX)
    if not fs.isfile(index_path):
        raise ConfigError(f"{where}: is not a diffusers pipeline root (no {PIPELINE_INDEX})"
                          + ("" if pipeline else "; pass --pipeline=BASE, a pipeline whose text encoders fit the run"))
    try:
        index = json.loads(fs.read_text(index_path))
        components = tuple(sorted(name for name, value in index.items() if not name.startswith("_")
                                  and isinstance(value, list) and len(value) == 2 and None not in value))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: {index_path} is not a readable pipeline index ({e})") from e
    for needed in ("transformer", "vae"):
        if needed not in components:
            raise ConfigError(f"{where}: {index_path} names no {needed}; pass an SD3 pipeline as --pipeline=BASE")
    for name in components:
        if not fs.isdir(fs.join(root, name)):
            raise WeightsError(f"{fs.join(root, name)}: missing; {index_path} names the component {name!r}")
    # The base's text encoders produce what its transformer reads: the run's transformer must read the same.
    base_config_path = fs.join(root, "transformer", "config.json")
    try:
        base_config = json.loads(fs.read_text(base_config_path))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{base_config_path}: unreadable ({e})") from e
    run_config = model_setup.transformer_source(model_config).config
    for key in ("joint_attention_dim", "pooled_projection_dim"):
        if base_config.get(key) != run_config.get(key):
            raise ConfigError(f"{where}: its transformer has {key}={base_config.get(key)} but the run's has "
                              f"{key}={run_config.get(key)}, so its text encoders do not fit the trained model")
    return PipelineBase(root, components)


def _saved_model_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
    """`config.model` from the run's readable `checkpoints/config.json` (None if absent or unreadable):
    to check `--pipeline` before a checkpoint is restored."""
    try:
        saved = json.loads(fs.read_text(fs.join(fs.absolute(workdir), saved_run.CHECKPOINTS, "config.json")))
        return ml_collections.ConfigDict(saved["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_apart(out: str, base: PipelineBase) -> None:
    """--out may neither be nor hold nor sit inside the base pipeline it copies."""
    real_out, real_base = _real(out), _real(base.root)
    if _within(real_out, real_base) or _within(real_base, real_out):
        raise ConfigError(f"--out={out}: overlaps the base pipeline {base.root} it copies from; export into a "
                          "directory apart from it")


def _copy_file(src: str, dst: Path, *, link: bool) -> None:
    """Copies the local file `src` to `dst` (a new path): a hard link when `link` (same filesystem), else
    a reflink (copy-on-write, where the filesystem has them), else a plain copy. Symlinks (a hub
    cache's snapshot files) are followed: `dst` holds the bytes, never a link to a link."""
    src = os.path.realpath(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or no hard links there: copy
            pass
    try:
        import fcntl
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
    except (ImportError, OSError):  # no reflinks here (ext4, tmpfs, other OS): a plain copy
        shutil.copyfile(src, dst)


def _copy_tree(src: str, dst: Path, *, link: str) -> list[str]:
    """Copies every file under the directory `src` (local or URL) to `dst`; returns them, relative.
    `link`: 'none', 'weights' (hard-link LINKED_SUFFIXES) or 'all' (a private staging copy)."""
    from alignax.models import remote_weights
    if fs.is_remote(src):
        filesystem, root = fs.filesystem(src)
        files = _files(src)
        for rel in files:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            filesystem.get_file(root.rstrip("/") + "/" + rel, str(dst / rel))
        return files
    files = []
    for directory, _, names in os.walk(src, followlinks=True):
        for name in names:
            if name == remote_weights.COMPLETE:  # a remote model's local mirror marks itself complete
                continue
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, src).replace(os.sep, "/")
            _copy_file(path, dst / rel, link=link == "all" or (link == "weights" and name.endswith(LINKED_SUFFIXES)))
            files.append(rel)
    return sorted(files)


def _write_pipeline(directory: Path, base: PipelineBase, run: saved_run.SavedRun, v_src: model_setup.ModelSource,
                    vae_module: Any, *, dtype: Any, link: str) -> list[str]:
    """BASE's components but the transformer, its model_index.json, and the run's VAE, into `directory`."""
    copied = [name for name in base.components if name not in ("transformer", "vae")]
    for name in copied:
        _copy_tree(fs.join(base.root, name), directory / name, link=link)
    if fs.is_remote(base.root):
        filesystem, index = fs.filesystem(fs.join(base.root, PIPELINE_INDEX))
        filesystem.get_file(index, str(directory / PIPELINE_INDEX))
    else:
        _copy_file(fs.join(base.root, PIPELINE_INDEX), directory / PIPELINE_INDEX, link=False)
    if v_src.directory is not None:  # the run's VAE file as it is: BASE's vae/, the run's pipeline's, vae_pretrained
        _copy_tree(str(v_src.directory), directory / "vae", link=link)
    else:  # a random-init VAE, recreated from the run's seed
        vae = jax.device_get(saved_run.vae_params(run.config, v_src, vae_module))
        save_diffusers(Pretrained(vae_module, vae, v_src.config, v_src.architecture), directory / "vae", dtype=dtype)
    return ["vae", f"{', '.join(copied)} from {base.root}"]


# ---- writing -------------------------------------------------------------------------------------

def _write_models(directory: Path, run: saved_run.SavedRun, *, ema: bool, lora_mode: str, dtype: Any,
                  workdir: str, pipeline: PipelineBase | None = None, link: str = "none") -> list[str]:
    """Writes the transformer (and vae/ or lora/) into the empty `directory`, or with `pipeline` a whole
    pipeline (the transformer in transformer/); returns what it wrote."""
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
    # The transformer first: save_diffusers publishes its directory as a whole, replacing what is in it.
    model_dir = directory if pipeline is None else directory / "transformer"
    save_diffusers(Pretrained(transformer, params, t_src.config, t_src.architecture), model_dir, dtype=dtype)
    if adapter is not None:
        lora.save_lora(directory / "lora", adapter, spec)
        parts.append("lora")
    if pipeline is not None:
        return parts + _write_pipeline(directory, pipeline, run, v_src, vae_module, dtype=dtype, link=link)
    # The VAE goes along unless the user already has it as a file of its own (a pipeline's vae/ or
    # config.model.vae_pretrained): a random-init VAE, or the vae/ of an earlier export.
    own_vae = v_src.directory is None or (not config.model.vae_pretrained and t_src.directory is not None
                                          and v_src.directory == t_src.directory / "vae")
    if own_vae:
        vae = jax.device_get(saved_run.vae_params(config, v_src, vae_module))
        save_diffusers(Pretrained(vae_module, vae, v_src.config, v_src.architecture), directory / "vae", dtype=dtype)
        parts.append("vae")
    return parts


def _marker(run: saved_run.SavedRun, files: list[str], *, ema: bool, lora_mode: str,
            pipeline: PipelineBase | None = None) -> str:
    return json.dumps({"format": "alignax-export", "workdir": run.workdir, "step": run.step, "ema": ema,
                       "lora": lora_mode if run.config.lora.enabled else None,
                       "pipeline": pipeline.root if pipeline is not None else None,
                       "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "files": files}, indent=2) + "\n"


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, ema: bool = False,
           lora_mode: str = "merge", dtype: Any = None, pipeline: str | os.PathLike | bool | None = None,
           hardlink: bool = False) -> str:
    """Writes the chosen checkpoint as diffusers weights at `out` (local path or URL); returns `out`.

    `pipeline` (`--pipeline[=BASE]`): write a whole pipeline on the base pipeline root BASE; `True` or ''
    takes the run's `config.model.pretrained`. `hardlink`: hard-link BASE's weights instead of copying
    (see the module docstring for the risk). `workdir`, `out` and BASE are checked (see the module
    docstring) before anything is restored or written."""
    return _export(workdir, out, step=step, ema=ema, lora_mode=lora_mode, dtype=dtype, pipeline=pipeline,
                   hardlink=hardlink)[0]


def _export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None, ema: bool, lora_mode: str,
            dtype: Any, pipeline: str | os.PathLike | bool | None = None, hardlink: bool = False) -> tuple[str, str]:
    """(out, the one-line summary the CLI prints)."""
    if lora_mode not in LORA_MODES:
        raise ConfigError(f"--lora={lora_mode!r}: choose one of {list(LORA_MODES)}")
    if pipeline is False:
        pipeline = None
    pipeline = None if pipeline is None else ("" if pipeline is True else os.fspath(pipeline))
    if hardlink and pipeline is None:
        raise ConfigError("--hardlink: links a base pipeline's weights, so it needs --pipeline[=BASE]")
    out = fs.absolute(out)
    saved_run.check_workdir(workdir)
    check_out(out, workdir)
    if pipeline is not None and (saved := _saved_model_config(workdir)) is not None:
        _check_apart(out, pipeline_base(pipeline, saved))  # before the (long) restore
    run = saved_run.load(workdir, step)
    if ema and not run.config.ema.enabled:
        raise ConfigError(f"--ema: the run in {workdir} has config.ema.enabled=False, so it saved no EMA")
    base = None
    if pipeline is not None:  # again, from the restored step's own config
        base = pipeline_base(pipeline, run.config.model)
        _check_apart(out, base)
    write = dict(ema=ema, lora_mode=lora_mode, dtype=dtype, workdir=str(workdir), pipeline=base)
    if fs.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="alignax-export-") as scratch:
            local = Path(scratch) / "export"
            local.mkdir()
            # The staging copy is private and only read by the upload: link every file of BASE it can.
            parts = _write_models(local, run, **write, link="all")
            files = _files(str(local))
            replacing = check_out(out, workdir)  # again: the restore took a while
            if replacing:  # unpublish first (marker gone), then drop the old files: object stores have no rename
                filesystem, root = fs.filesystem(out)
                filesystem.rm(fs.filesystem(fs.join(out, MARKER))[1])
                filesystem.rm(root, recursive=True)
            fs.put_tree(local, out)
            fs.write_text_atomic(fs.join(out, MARKER), _marker(run, files, ema=ema, lora_mode=lora_mode,
                                                               pipeline=base))
    else:
        from alignax.models import weights_io
        with weights_io.atomic_directory(out) as tmp:
            parts = _write_models(tmp, run, **write, link="weights" if hardlink else "none")
            files = _files(str(tmp))
            check_out(out, workdir)  # again, right before the swap: the restore took a while
            (tmp / MARKER).write_text(_marker(run, files, ema=ema, lora_mode=lora_mode, pipeline=base))
    what = "as a pipeline " if base is not None else ""
    summary = f"exported step {run.step} {what}({' + '.join(parts)}) to {out}"
    logging.info("%s from %s", summary, workdir)
    return out, summary


def main(argv: list[str]) -> None:
    from absl import flags

    from alignax import cli as cli_lib
    f = flags.FLAGS
    if len(argv) > 1:  # `--pipeline BASE` would leave BASE here: the base goes in `--pipeline=BASE`
        cli_lib.usage_error(f"unexpected argument {argv[1]!r}" + (" (pass the base pipeline as --pipeline=BASE)"
                                                                   if f.pipeline is not None else ""))
    _, summary = _export(f.workdir, f.out, step=f.step, ema=f.ema, lora_mode=f.lora, dtype=None,
                         pipeline=f.pipeline, hardlink=f.hardlink)
    print(summary)  # the CLI's one stdout line: what it wrote where


def _bare_pipeline_flag(argv: list[str]) -> list[str]:
    """`--pipeline` alone means `--pipeline=` (the run's own pipeline root): absl's string flags need a value,
    and would otherwise take the next argument as it."""
    return [("--pipeline=" if arg in ("--pipeline", "-pipeline") else arg) for arg in argv]


def cli() -> None:
    """`alignax-export` / `python -m alignax.export`: flags defined here, not at import, so importing this module
    never claims `--workdir` in absl's global flags."""
    import sys

    from absl import flags

    from alignax import cli as cli_lib

    flags.DEFINE_string("workdir", None, "the run directory (holds checkpoints/)")
    flags.DEFINE_string("out", None, "where to write the diffusers transformer (or pipeline) directory: absent, "
                                     "empty, or an earlier alignax export (local path or URL)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_bool("ema", False, "export the EMA weights")
    flags.DEFINE_enum("lora", "merge", list(LORA_MODES), "with LoRA: merge into the base, or write it separately")
    flags.DEFINE_string("pipeline", None, "--pipeline[=BASE]: write a whole diffusers pipeline, the other "
                                          "components copied from the pipeline root BASE (default: the run's "
                                          "config.model.pretrained)")
    flags.DEFINE_bool("hardlink", False, "with --pipeline: hard-link the base pipeline's *.safetensors instead of "
                                         "copying them (no extra disk; the files are shared with BASE)")
    flags.mark_flags_as_required(["workdir", "out"])
    cli_lib.run_main(main, argv=_bare_pipeline_flag(sys.argv))


if __name__ == "__main__":
    cli()
