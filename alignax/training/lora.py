"""LoRA on Dense layers of a plain param tree, exported in the diffusers/PEFT layout.

LoRA params are a separate plain pytree mirroring the base tree down to each adapted
module: `{'transformer_blocks.0': {'attn': {'to_q': {'lora_A': (in, r), 'lora_B': (r, out)}}}}`.
A Dense *module* is a dict holding a 2-D `kernel`; targets are regexes (`re.search`) over
its '/'-joined path ('transformer_blocks.0/attn/to_q').

The forward used in training is `module.apply` on `merge(base, lora, spec)`: each targeted
kernel becomes `kernel + (alpha / rank) * A @ B`. This is exact, needs no change to any
module and keeps every model LoRA-capable. The trade-off is memory: each targeted kernel
is materialised once more (merged copy, and in the backward pass a full-size kernel
gradient before it is projected onto A and B). For SD3-medium's attention projections that
is ~0.45 G params (1.8 GB fp32) on top of the base; a fused `x·W + s·(x·A)·B` path would
avoid it at the cost of LoRA-aware Dense layers. Under FSDP the extra copy is sharded like
the kernel (see `lora_logical_specs`).

Initialisation follows PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's
kaiming_uniform(a=sqrt(5)) on the (r, in) weight), B = 0, so training starts exactly at
the base model.

Export: PEFT stores `lora_A.weight` (r, in) and `lora_B.weight` (out, r), i.e. our A and B
transposed, under `<prefix>.<torch module path>`. diffusers (>= 0.35) reads the LoRA
config, alpha included, from the safetensors header key `lora_adapter_metadata`: a JSON
object of `LoraConfig` kwargs with the same `<prefix>.` on every key. Without it, diffusers
assumes alpha == rank, so `save_lora` always writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from safetensors.numpy import save_file

from alignax.errors import ConfigError, WeightsError
from alignax.models import torch_layout, weights_io

PyTree = Any

# flow_grpo's targets: the joint-attention projections of both streams (image `to_*`,
# context `add_*_proj` / `to_add_out`) of every MM-DiT block; not MMDiT-X's `attn2`.
DEFAULT_TARGETS: tuple[str, ...] = (
    r"(^|/)attn/(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers looks for first
METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What a LoRA adapter is: its rank, its alpha (the update is scaled by alpha / rank) and
    the regexes of the Dense module paths it adapts."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0):
            raise ConfigError(f"lora.rank={self.rank!r}: expected a positive int")
        if not (isinstance(self.alpha, int | float) and self.alpha > 0):
            raise ConfigError(f"lora.alpha={self.alpha!r}: expected a positive number")
        if isinstance(self.targets, str):
            raise ConfigError(f"lora.targets={self.targets!r}: expected a sequence of regexes, found a string")
        object.__setattr__(self, "targets", tuple(self.targets) or DEFAULT_TARGETS)
        for i, target in enumerate(self.targets):
            try:
                re.compile(target)
            except (re.error, TypeError) as e:
                raise ConfigError(f"lora.targets[{i}]={target!r}: not a valid regex ({e})") from e

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LoraSpec:
        """From `config.lora` (rank, alpha, targets; empty targets mean `DEFAULT_TARGETS`)."""
        return cls(rank=cfg["rank"], alpha=float(cfg["alpha"]), targets=tuple(cfg.get("targets", ()) or ()))

    @classmethod
    def for_run(cls, cfg: Mapping[str, Any]) -> LoraSpec | None:
        """The run's adapter spec from `config.lora`, or None when LoRA is off."""
        return cls.from_config(cfg) if cfg.get("enabled", False) else None


# --- finding Dense modules -------------------------------------------------------------------------


def _is_dense(node: Any) -> bool:
    return isinstance(node, Mapping) and "kernel" in node and getattr(node["kernel"], "ndim", None) == 2


def dense_modules(params: PyTree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Path → kernel of every Dense module (a dict holding a 2-D 'kernel'), in tree order."""
    found = {}
    if _is_dense(params):
        found[prefix] = params["kernel"]
    if isinstance(params, Mapping):
        for key, child in params.items():
            if isinstance(child, Mapping):
                found.update(dense_modules(child, prefix + (key,)))
    return found


def target_modules(base_params: PyTree, spec: LoraSpec) -> dict[tuple[str, ...], Any]:
    """The Dense modules `spec.targets` selects; ConfigError for a regex that selects none."""
    modules = dense_modules(base_params)
    names = {path: "/".join(path) for path in modules}
    for i, target in enumerate(spec.targets):
        if not any(re.search(target, name) for name in names.values()):
            example = next(iter(names.values()), "<no Dense modules>")
            raise ConfigError(f"lora.targets[{i}]={target!r} matches no Dense module path "
                              f"(paths look like {example!r}; a Dense module is a dict with a 2-D 'kernel')")
    return {path: kernel for path, kernel in modules.items()
            if any(re.search(t, names[path]) for t in spec.targets)}


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _lora_modules(lora_params: PyTree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Mapping]:
    if isinstance(lora_params, Mapping) and "lora_A" in lora_params:
        return {prefix: lora_params}
    found = {}
    if isinstance(lora_params, Mapping):
        for key, child in lora_params.items():
            found.update(_lora_modules(child, prefix + (key,)))
    return found


# --- init and merge --------------------------------------------------------------------------------


def init_lora(base_params: PyTree, spec: LoraSpec, rng: jax.Array) -> PyTree:
    """LoRA params for every targeted Dense module: A PEFT-uniform, B zero (forward unchanged).

    Works on real arrays or `jax.ShapeDtypeStruct`s (e.g. under `jax.eval_shape`).
    """
    modules = target_modules(base_params, spec)
    flat = {}
    for i, (path, kernel) in enumerate(modules.items()):
        fan_in, fan_out = kernel.shape
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, spec.rank), kernel.dtype, -bound, bound)
        flat[path] = {"lora_A": a, "lora_B": jnp.zeros((spec.rank, fan_out), kernel.dtype)}
    return _nest(flat)


def delta(module_lora: Mapping[str, jax.Array], spec: LoraSpec) -> jax.Array:
    """(alpha / rank) · A @ B, the (in, out) kernel update of one module, in full fp32 precision."""
    a, b = module_lora["lora_A"], module_lora["lora_B"]
    return spec.scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST)


def merge(base_params: PyTree, lora_params: PyTree, spec: LoraSpec) -> PyTree:
    """Base params with every adapted kernel replaced by `kernel + delta`; a new tree, base untouched.

    Jit-able and differentiable in `lora_params`; untouched subtrees are shared, not copied.
    """
    def walk(base: Any, lora: Any, path: tuple[str, ...]) -> Any:
        if "lora_A" in lora:
            if not _is_dense(base):
                raise WeightsError(f"lora params at {'/'.join(path)!r} have no Dense 'kernel' in the base params")
            kernel = base["kernel"]
            if kernel.shape != (lora["lora_A"].shape[0], lora["lora_B"].shape[1]):
                raise WeightsError(f"lora params at {'/'.join(path)!r}: A {lora['lora_A'].shape} @ B "
                                   f"{lora['lora_B'].shape} does not fit kernel {kernel.shape}")
            return {**base, "kernel": (kernel.astype(jnp.float32) + delta(lora, spec)).astype(kernel.dtype)}
        missing = sorted(set(lora) - set(base))
        if missing:
            raise WeightsError(f"lora params name {'/'.join(path + (missing[0],))!r}, which the base params lack")
        return {k: walk(v, lora[k], path + (k,)) if k in lora else v for k, v in base.items()}

    return walk(base_params, lora_params, ())


def lora_logical_specs(lora_params: PyTree, base_specs: PyTree) -> PyTree:
    """Logical PartitionSpecs for LoRA params: A (kernel's input axis, None), B (None, kernel's output axis),
    so A and B shard over the same mesh axes as the kernel they adapt."""
    def walk(lora: Any, specs: Any) -> Any:
        if "lora_A" in lora:
            kernel_spec = tuple(specs["kernel"]) + (None,) * (2 - len(tuple(specs["kernel"])))
            return {"lora_A": PartitionSpec(kernel_spec[0], None), "lora_B": PartitionSpec(None, kernel_spec[1])}
        return {k: walk(v, specs[k]) for k, v in lora.items()}

    return walk(lora_params, base_specs)


# --- export to diffusers / PEFT ----------------------------------------------------------------------


def to_diffusers_state_dict(lora_params: PyTree, spec: LoraSpec, prefix: str = "transformer") -> dict[str, np.ndarray]:
    """PEFT-named numpy arrays: '<prefix>.<module>.lora_A.weight' (r, in) and '...lora_B.weight' (out, r)."""
    del spec  # the weights are layout-only; alpha travels in `lora_adapter_metadata`
    as_linears = {path: {"lora_A": {"kernel": m["lora_A"]}, "lora_B": {"kernel": m["lora_B"]}}
                  for path, m in _lora_modules(lora_params).items()}
    state = torch_layout.params_to_state_dict(_nest(as_linears))
    lead = f"{prefix}." if prefix else ""
    return {lead + key: np.ascontiguousarray(value) for key, value in state.items()}


def lora_adapter_metadata(lora_params: PyTree, spec: LoraSpec, prefix: str = "transformer") -> dict[str, Any]:
    """PEFT `LoraConfig` kwargs with the `<prefix>.` diffusers expects; pass as `metadata=` when loading
    `to_diffusers_state_dict` from memory, since only files carry their header."""
    modules = sorted(".".join(path) for path in _lora_modules(lora_params))
    config = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": modules, "lora_dropout": 0.0,
              "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True}
    lead = f"{prefix}." if prefix else ""
    return {lead + key: value for key, value in config.items()}


def save_lora(path_dir: str | os.PathLike, lora_params: PyTree, spec: LoraSpec, *,
              prefix: str = "transformer") -> Path:
    """Writes `<path_dir>/pytorch_lora_weights.safetensors` atomically (temp dir + rename).

    `StableDiffusion3Pipeline.load_lora_weights(path_dir)` and
    `SD3Transformer2DModel.load_lora_adapter(path_dir, use_safetensors=True)` load it with the
    right alpha (without `use_safetensors=True` or `weight_name=LORA_WEIGHT_NAME`, diffusers
    0.42's `load_lora_adapter` looks only for `pytorch_lora_weights.bin` in a directory).
    """
    tensors = to_diffusers_state_dict(lora_params, spec, prefix)
    if not tensors:
        raise WeightsError(f"{path_dir}: refusing to write a LoRA export with no adapted modules")
    header = {"format": "pt",
              METADATA_KEY: json.dumps(lora_adapter_metadata(lora_params, spec, prefix), indent=2, sort_keys=True)}
    with weights_io.atomic_directory(path_dir) as tmp:
        save_file(tensors, str(tmp / LORA_WEIGHT_NAME), metadata=header)
    return Path(path_dir)
