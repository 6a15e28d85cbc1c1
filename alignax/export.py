"""`python -m alignax.export --workdir=DIR [--step=N] [--ema] [--lora=merge|separate] --out=DIR`.

Writes the trained MM-DiT as a diffusers `SD3Transformer2DModel` directory at `--out`.
Objective heads (feature alignment projectors) are training-only and never exported.
With LoRA, `merge` folds the adapter into the base weights; `separate` writes the base
weights plus `--out/lora/pytorch_lora_weights.safetensors` in the diffusers/PEFT layout, which
`StableDiffusion3Pipeline.load_lora_weights` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections

from alignax import mesh as mesh_lib
from alignax.errors import ConfigError
from alignax.models import Pretrained, save_diffusers
from alignax.models import setup as model_setup
from alignax.training import checkpoint as checkpoint_lib

LORA_MODES = ("merge", "separate")


def _saved_run(workdir: Path, step: int | None) -> tuple[int, ml_collections.ConfigDict, Any]:
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1_000_000, async_save=False)
    steps = checkpointer.all_steps()
    if not steps:
        raise ConfigError(f"--workdir={workdir}: no checkpoints under {checkpointer.directory}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"--step={step}: not saved in {checkpointer.directory}; saved steps are {sorted(steps)}")
    config = ml_collections.ConfigDict(checkpointer.saved_config(step))
    return step, config, checkpointer.restore_on_one_device(step)  # exports are single-host jobs


def lora_base(config: ml_collections.ConfigDict, t_src: model_setup.ModelSource, transformer: Any) -> Any:
    """The frozen MM-DiT base a LoRA run trained on, on this process's first device: the pretrained
    weights, or the random init recreated from the seed exactly as the trainer made it."""
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    root = jax.random.key(config.seed)
    base, _ = model_setup.load_params_sharded(t_src, transformer, jax.random.fold_in(root, 1), mesh,
                                              mesh_lib.DEFAULT_RULES)  # as the trainer created it
    return base


def export(workdir: str | Path, out: str | Path, *, step: int | None = None, ema: bool = False,
           lora_mode: str = "merge", dtype: Any = None) -> Path:
    """Writes the chosen checkpoint as diffusers weights; returns `out`."""
    if lora_mode not in LORA_MODES:
        raise ConfigError(f"--lora={lora_mode!r}: choose one of {list(LORA_MODES)}")
    step, config, state = _saved_run(Path(workdir), step)
    if ema and not config.ema.enabled:
        raise ConfigError(f"--ema: the run in {workdir} has config.ema.enabled=False, so it saved no EMA")
    trainable = state["ema"] if ema else state["trainable"]
    t_src, transformer, _, _ = model_setup.build_modules(config.model)
    out = Path(out)
    if not config.lora.enabled:
        if lora_mode == "separate":
            raise ConfigError(f"--lora=separate: the run in {workdir} has config.lora.enabled=False")
        params = jax.device_get(trainable["transformer"])
        save_diffusers(Pretrained(transformer, params, t_src.config, t_src.architecture), out, dtype=dtype)
        return out

    from alignax.training import lora
    spec = lora.LoraSpec.from_config(config.lora)
    base = lora_base(config, t_src, transformer)
    adapter = trainable["transformer"]
    if lora_mode == "merge":
        params = jax.device_get(lora.merge(base, adapter, spec))
        save_diffusers(Pretrained(transformer, params, t_src.config, t_src.architecture), out, dtype=dtype)
    else:
        save_diffusers(Pretrained(transformer, jax.device_get(base), t_src.config, t_src.architecture), out,
                       dtype=dtype)
        lora.save_lora(out / "lora", jax.device_get(adapter), spec)
    logging.info("exported step %d of %s to %s", step, workdir, out)
    return out


def main(argv: list[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    export(f.workdir, f.out, step=f.step, ema=f.ema, lora_mode=f.lora)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "the run directory (holds checkpoints/)")
    flags.DEFINE_string("out", None, "where to write the diffusers transformer directory")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_bool("ema", False, "export the EMA weights")
    flags.DEFINE_enum("lora", "merge", list(LORA_MODES), "with LoRA: merge into the base, or write it separately")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
