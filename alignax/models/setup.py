"""From `config.model` to Flax modules and their params: pretrained from diffusers, or random.

`config.model.pretrained` may name a diffusers pipeline root (with `model_index.json`,
`transformer/` and `vae/`) or a transformer directory, local or remote (`gs://...`, mirrored
once by `remote_weights`); without it, the modules are built
from `config.model.transformer` / `config.model.vae` sizes and initialised from the seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from alignax import mesh as mesh_lib
from alignax.errors import ConfigError
from alignax.models import diffusers_format, init_params, mmdit, pretrained, remote_weights, vae

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where one model comes from: a diffusers directory, or a config dict to initialise randomly."""

    architecture: pretrained.Architecture
    config: dict
    directory: Path | None

    def module(self, **runtime: Any):
        return self.architecture.build(self.config, **runtime)


def _pipeline_subfolder(root: str, subfolder: str, field: str) -> Path:
    if remote_weights.is_remote(root):  # mirror only the model asked for, not the whole pipeline
        for candidate in (remote_weights.join(root, subfolder), root):  # mirrored already: no remote access
            done = remote_weights.mirrored(candidate)
            if done is not None and (done / "config.json").exists():
                return done
        pipeline = remote_weights.exists(remote_weights.join(root, "model_index.json"), field=field)
        remote = remote_weights.join(root, subfolder) if pipeline else root
        path = remote_weights.localize(remote, field=field)
        if not (path / "config.json").exists():
            raise ConfigError(f"{field}={root!r}: no diffusers config.json at {remote}")
        return path
    path = Path(root)
    if (path / "model_index.json").exists():
        path = path / subfolder
    if not (path / "config.json").exists():
        raise ConfigError(f"{field}={root!r}: no diffusers config.json at {path}")
    return path


def transformer_source(model_config: ml_collections.ConfigDict) -> ModelSource:
    if model_config.pretrained:
        directory = _pipeline_subfolder(model_config.pretrained, "transformer", "config.model.pretrained")
        from alignax.models import weights_io
        return ModelSource(mmdit.ARCHITECTURE, weights_io.read_json(directory / "config.json"), directory)
    return ModelSource(mmdit.ARCHITECTURE, dict(model_config.transformer.to_dict()), None)


def vae_source(model_config: ml_collections.ConfigDict) -> ModelSource:
    from alignax.models import weights_io
    arch = pretrained.DIFFUSERS["AutoencoderKL"]
    root = model_config.vae_pretrained or model_config.pretrained
    if root:
        field = "config.model.vae_pretrained" if model_config.vae_pretrained else "config.model.pretrained"
        directory = _pipeline_subfolder(root, "vae", field)
        config = weights_io.read_json(directory / "config.json")
        if config.get("_class_name") != arch.name and (directory / "vae" / "config.json").exists():
            directory = directory / "vae"  # an alignax export: the transformer, with the run's VAE in vae/
            config = weights_io.read_json(directory / "config.json")
        if model_config.pretrained and not model_config.vae_pretrained and config.get("_class_name") != arch.name:
            raise ConfigError(f"config.model.pretrained={root!r} is a transformer directory; set "
                              "config.model.vae_pretrained to the VAE directory")
        return ModelSource(arch, config, directory)
    return ModelSource(arch, dict(model_config.vae.to_dict()), None)


def runtime_options(model_config: ml_collections.ConfigDict) -> dict:
    if model_config.compute_dtype not in DTYPES:
        raise ConfigError(f"config.model.compute_dtype={model_config.compute_dtype!r}: choose one of {sorted(DTYPES)}")
    return dict(compute_dtype=DTYPES[model_config.compute_dtype], attention=model_config.attention,
                scan_layers=model_config.scan_layers, remat=model_config.remat)


def build_modules(model_config: ml_collections.ConfigDict) -> tuple[ModelSource, Any, ModelSource, Any]:
    """(transformer source, module, vae source, module), checking the two fit together."""
    runtime = runtime_options(model_config)
    t_src, v_src = transformer_source(model_config), vae_source(model_config)
    try:
        transformer = t_src.module(**runtime)
        vae_module = v_src.module(compute_dtype=runtime["compute_dtype"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from e
    if vae_module.config.latent_channels != transformer.config.in_channels:
        raise ConfigError(f"config.model: the VAE has latent_channels={vae_module.config.latent_channels} but the "
                          f"transformer has in_channels={transformer.config.in_channels}")
    return t_src, transformer, v_src, vae_module


def vae_scaling(vae_module: vae.AutoencoderKL) -> tuple[float, float]:
    cfg = vae_module.config
    return float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)


def run_once_compiler_options() -> dict:
    """XLA options for programs that run once (param init): on CPU, LLVM's optimisation of the
    per-param RNG kernels took ~75% of start-up (9.4 s → 2.5 s on the tiny VAE at level 0)."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def load_params_sharded(source: ModelSource, module: Any, rng: jax.Array, mesh, rules) -> tuple[Any, Any]:
    """(params placed on the mesh by their logical specs, the specs). Random params are created
    already sharded (eval_shape → jit with out_shardings), never whole on one device."""
    abstract, specs = pretrained.abstract_params(source.architecture, module)
    shardings = mesh_lib.fitted_shardings(specs, abstract, mesh, rules)
    if source.directory is None:
        init = jax.jit(lambda key: init_params(source.architecture, module, key), out_shardings=shardings)
        return init.lower(rng).compile(compiler_options=run_once_compiler_options())(rng), specs
    loaded = diffusers_format.load_diffusers(source.directory)
    return jax.device_put(loaded.params, shardings), specs
