"""IResNet, the insightface ArcFace recognition backbone (`iresnet18/34/50/100/200`), in Flax.

The layout follows insightface's `recognition/arcface_torch/backbones/iresnet.py`:

    stem:   conv1 (3×3, stride 1, no bias) → bn1 → prelu
    stages: `layerN.M` IBasicBlocks, the first of each stage with stride 2 and a `downsample`
            (1×1 conv stride 2 → BN); a block is bn1 → conv1 3×3 → bn2 → prelu → conv2 3×3 (stride)
            → bn3, plus the shortcut
    head:   bn2 → flatten in NCHW order (C, H, W) → dropout → fc → features (BatchNorm1d)

Submodules carry the torch names (`layer2.0.downsample.0`), so a param path joined with dots is
the insightface state-dict key; `save` writes that state dict (BN statistics as `running_mean` /
`running_var`), which insightface's torch `IResNet` loads with `strict=False` (no
`num_batches_tracked`).

BN statistics. Training (`alignax.identity`) uses the Flax convention: `scale`/`bias` in
`params`, `mean`/`var` in `batch_stats`, updated when `train=True`. A `Pretrained` holds ONE plain
tree, so loaded models are built with `stats_collection="params"`: the statistics live beside
`scale`/`bias` in the params tree (`params["bn1"] == {"scale", "bias", "mean", "var"}`), nothing is
folded, and `merge_stats` / `split_stats` convert between the two forms. The statistics are never
trained: a model built that way refuses `train=True`.

Input: NHWC float RGB, normalised as (pixel − 127.5) / 127.5 on the 0–255 scale (`embed` does it,
reading the normalisation from the config, since mxnet-converted insightface ONNX files normalise
inside the graph and take raw pixels). `input_layout="NCHW"` takes what the ONNX takes; loaders
build that, so `pretrained(x_nchw)` is a drop-in for onnxruntime. Output: the UN-normalised
embedding [B, embedding_size].
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from alignax.errors import ConfigError, WeightsError
from alignax.models import torch_layout, weights_io
from alignax.models.pretrained import Architecture, Pretrained, abstract_params

PyTree = Any
Dtype = Any

# insightface's `iresnetNN` stage depths.
LAYERS: dict[str, tuple[int, ...]] = {
    "r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
FORMAT = "alignax-iresnet"
WEIGHTS_STEM = "model"
_STATS = ("mean", "var")
_TORCH_STATS = {"mean": "running_mean", "var": "running_var"}


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with torch's semantics (biased batch variance, running averages
    with torch momentum 0.1 = Flax momentum 0.9); statistics live in `stats_collection`."""

    epsilon: float = 1e-5
    momentum: float = 0.9
    stats_collection: str = "batch_stats"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        mean = self.variable(self.stats_collection, "mean", jnp.zeros, (features,), jnp.float32)
        var = self.variable(self.stats_collection, "var", jnp.ones, (features,), jnp.float32)
        if train:
            if self.stats_collection == "params":
                raise ConfigError("IResNet built with stats_collection='params' (a loaded model) cannot run with "
                                  "train=True: its BN statistics are not trainable; build it with 'batch_stats'")
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            use_mean, use_var = jnp.mean(x32, axes), jnp.var(x32, axes)
            if not self.is_initializing():
                mean.value = self.momentum * mean.value + (1 - self.momentum) * use_mean
                var.value = self.momentum * var.value + (1 - self.momentum) * use_var
        else:
            use_mean, use_var = mean.value, var.value
        multiplier = scale * jax.lax.rsqrt(use_var.astype(jnp.float32) + self.epsilon)
        shift = bias - use_mean * multiplier
        return x * multiplier.astype(x.dtype) + shift.astype(x.dtype)


class PReLU(nn.Module):
    """Per-channel PReLU (torch `nn.PReLU(C)`: param `weight`, init 0.25)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        return jnp.where(x >= 0, x, weight.astype(x.dtype) * x)


# insightface's init: conv weights N(0, 0.1); fc keeps torch's Linear default U(±1/sqrt(fan_in)). Plain
# normal/uniform also compile in a fraction of the time of Flax's truncated-normal default on CPU.
_CONV_INIT = nn.initializers.normal(0.1)
_FC_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
    # Explicit symmetric padding: torch's padding=1; Flax 'SAME' pads stride-2 convs asymmetrically.
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, kernel_init=_CONV_INIT, name=name)


class IBasicBlock(nn.Module):
    planes: int
    stride: int
    downsample: bool
    bn_epsilon: float = 1e-5
    stats_collection: str = "batch_stats"
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = lambda name: BatchNorm(self.bn_epsilon, stats_collection=self.stats_collection, name=name)  # noqa: E731
        out = bn("bn1")(x, train)
        out = _conv(self.planes, 3, 1, "conv1", self.dtype)(out)
        out = PReLU(name="prelu")(bn("bn2")(out, train))
        out = bn("bn3")(_conv(self.planes, 3, self.stride, "conv2", self.dtype)(out), train)
        if self.downsample:
            x = bn("downsample.1")(_conv(self.planes, 1, self.stride, "downsample.0", self.dtype)(x), train)
        return out + x


class IResNet(nn.Module):
    """insightface IResNet. `layers`: blocks per stage (see LAYERS); every stage halves H and W.

    input_size: (H, W) the fc was built for (112×112 for the released models), used to create params.
    input_sub / input_mul: per-channel (x − sub) · mul applied first; only for ONNX files whose graph
      normalises its own input (mxnet conversions), so the module takes what the file takes.
    """

    layers: tuple[int, ...] = LAYERS["r50"]
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    embedding_size: int = 512
    input_size: tuple[int, int] = (112, 112)
    bn_epsilon: float = 1e-5
    dropout: float = 0.0
    input_layout: str = "NHWC"
    input_sub: tuple[float, ...] | None = None
    input_mul: tuple[float, ...] | None = None
    stats_collection: str = "batch_stats"
    compute_dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.input_layout == "NCHW":
            x = jnp.transpose(x, (0, 2, 3, 1))
        elif self.input_layout != "NHWC":
            raise ConfigError(f"IResNet input_layout={self.input_layout!r}: expected 'NHWC' or 'NCHW'")
        if self.input_sub is not None:
            x = x - jnp.asarray(self.input_sub, jnp.float32)
        if self.input_mul is not None:
            x = x * jnp.asarray(self.input_mul, jnp.float32)
        dtype = self.compute_dtype
        if dtype is not None:
            x = x.astype(dtype)
        bn = lambda name: BatchNorm(self.bn_epsilon, stats_collection=self.stats_collection, name=name)  # noqa: E731
        x = PReLU(name="prelu")(bn("bn1")(_conv(self.stem_width, 3, 1, "conv1", dtype)(x), train))
        for stage, (blocks, width) in enumerate(zip(self.layers, self.widths, strict=True)):
            for index in range(blocks):
                x = IBasicBlock(width, 2 if index == 0 else 1, downsample=index == 0, bn_epsilon=self.bn_epsilon,
                                stats_collection=self.stats_collection, dtype=dtype,
                                name=f"layer{stage + 1}.{index}")(x, train)
        x = bn("bn2")(x, train)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten order, so fc.weight fits as is
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
        x = nn.Dense(self.embedding_size, dtype=dtype, kernel_init=_FC_INIT, name="fc")(x)
        return bn("features")(x, train).astype(jnp.float32)


def config_of(module: IResNet, **extra: Any) -> dict:
    """The JSON config that rebuilds `module` (runtime options excluded)."""
    config = {"format": FORMAT, "layers": list(module.layers), "widths": list(module.widths),
              "stem_width": module.stem_width, "embedding_size": module.embedding_size,
              "input_size": list(module.input_size), "bn_epsilon": module.bn_epsilon,
              "input_sub": None if module.input_sub is None else list(module.input_sub),
              "input_mul": None if module.input_mul is None else list(module.input_mul),
              "input_mean": 127.5, "input_std": 127.5}
    config.update(extra)
    return config


def build(config: Mapping, *, compute_dtype: Dtype = None, stats_collection: str = "params",
          input_layout: str = "NCHW") -> IResNet:
    """Module from a config; defaults fit a loaded (inference) model taking NCHW, as the ONNX does."""
    layers, widths = tuple(int(n) for n in config["layers"]), tuple(int(w) for w in config["widths"])
    if len(layers) != len(widths) or not layers or min(layers) < 1 or min(widths) < 1:
        raise ValueError(f"layers={list(layers)} and widths={list(widths)} must be equally long positive lists")
    optional = lambda v: None if v is None else tuple(float(a) for a in v)  # noqa: E731
    return IResNet(layers=layers, widths=widths, stem_width=int(config["stem_width"]),
                   embedding_size=int(config["embedding_size"]),
                   input_size=tuple(int(s) for s in config.get("input_size", (112, 112))),
                   bn_epsilon=float(config.get("bn_epsilon", 1e-5)), input_layout=input_layout,
                   input_sub=optional(config.get("input_sub")), input_mul=optional(config.get("input_mul")),
                   stats_collection=stats_collection, compute_dtype=compute_dtype)


def dummy_inputs(module: IResNet) -> tuple[tuple, dict]:
    height, width = module.input_size
    shape = (1, 3, height, width) if module.input_layout == "NCHW" else (1, height, width, 3)
    return (jnp.zeros(shape, jnp.float32),), {}


ARCHITECTURE = Architecture(name="iresnet", build=build, dummy_inputs=dummy_inputs, weights_stem=WEIGHTS_STEM)


def merge_stats(params: PyTree, batch_stats: PyTree) -> dict:
    """Flax `params` + `batch_stats` → one plain tree with `mean`/`var` beside each BN's `scale`/`bias`."""
    flat = dict(traverse_util.flatten_dict(params))
    flat.update(traverse_util.flatten_dict(batch_stats))
    return traverse_util.unflatten_dict(flat)


def split_stats(tree: PyTree) -> tuple[dict, dict]:
    """The inverse of `merge_stats`: (params, batch_stats) for a module built with 'batch_stats'."""
    flat = traverse_util.flatten_dict(tree)
    stats = {k: v for k, v in flat.items() if k[-1] in _STATS}
    params = {k: v for k, v in flat.items() if k[-1] not in _STATS}
    return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(stats)


def embed(model: Pretrained, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] RGB in [0, 1] (already aligned to the model's input size) → un-normalised embeddings.

    Applies the file's own input convention (config `input_mean`/`input_std`, as insightface's
    `ArcFaceONNX` does) and layout, so a caller never needs to know which kind of file it loaded.
    """
    x = (images.astype(jnp.float32) * 255.0 - model.config.get("input_mean", 127.5)) / model.config.get(
        "input_std", 127.5)
    if model.module.input_layout == "NCHW":
        x = jnp.transpose(x, (0, 3, 1, 2))
    return model(x)


def _state_dict(params: PyTree) -> dict[str, np.ndarray]:
    tensors = torch_layout.params_to_state_dict(params)
    out = {}
    for key, value in tensors.items():
        head, _, leaf = key.rpartition(".")
        out[f"{head}.{_TORCH_STATS.get(leaf, leaf)}"] = np.asarray(value, np.float32)
    return out


def save(model: Pretrained | tuple[Mapping, PyTree], out_dir: str | os.PathLike) -> Path:
    """Writes `config.json` + `model.safetensors` (insightface torch key names) atomically.

    `model`: a Pretrained, or (config, params) where config is `config_of(module)` or the kwargs
    of `build`, and params is one merged tree (`merge_stats`) or Flax variables
    `{"params": ..., "batch_stats": ...}` straight from training.
    """
    if isinstance(model, Pretrained):
        config, params = dict(model.config), model.params
    else:
        config, params = dict(model[0]), model[1]
        if isinstance(params, Mapping) and set(params) == {"params", "batch_stats"}:
            params = merge_stats(params["params"], params["batch_stats"])
    try:
        module = build(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"iresnet.save: config does not describe an IResNet ({e!r}): {config}") from e
    config = config_of(module, **{k: config[k] for k in ("input_mean", "input_std") if k in config})
    template = traverse_util.flatten_dict(abstract_params(ARCHITECTURE, module)[0])
    flat = traverse_util.flatten_dict(jax.device_get(params))
    if set(flat) != set(template):
        missing, extra = sorted(set(template) - set(flat)), sorted(set(flat) - set(template))
        raise ConfigError(f"iresnet.save: params do not fit the config: missing {['.'.join(k) for k in missing[:5]]}, "
                          f"unexpected {['.'.join(k) for k in extra[:5]]}")
    with weights_io.atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        weights_io.write_tensors(_state_dict(params), tmp, WEIGHTS_STEM)
    return Path(out_dir)


def load(directory: str | os.PathLike, *, dtype: Dtype = jnp.float32, **options: Any) -> Pretrained:
    """Loads what `save` wrote: every key and shape is checked from the headers before data is read."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a directory (expected an IResNet export with config.json)")
    config = weights_io.read_json(directory / "config.json")
    if config.get("format") != FORMAT:
        raise WeightsError(f"{directory / 'config.json'}: format={config.get('format')!r}, expected {FORMAT!r} "
                           "(written by alignax.models.iresnet.save)")
    try:
        module = build(config, **options)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{directory / 'config.json'}: does not describe an IResNet: {e!r}") from e
    infos = weights_io.read_header(directory, WEIGHTS_STEM)
    renamed = {}
    for key in infos:
        head, _, leaf = key.rpartition(".")
        leaf = {v: k for k, v in _TORCH_STATS.items()}.get(leaf, leaf)
        renamed[f"{head}.{leaf}"] = key
    template, _ = abstract_params(ARCHITECTURE, module)
    key_to_path = torch_layout.check_state_dict(template, {k: infos[v].shape for k, v in renamed.items()},
                                                source=str(directory))
    ours = {stored: key for key, stored in renamed.items()}
    arrays = ((ours[k], a) for k, a in weights_io.load_tensors(infos, [renamed[k] for k in key_to_path]))
    params = torch_layout.state_dict_to_params(arrays, key_to_path, lambda a: jnp.asarray(a, dtype=dtype))
    return Pretrained(module=module, params=params, config=config, architecture=ARCHITECTURE)


def load_any(path: str | os.PathLike, **options: Any) -> Pretrained:
    """An insightface `.onnx` file or a `save` directory, by what `path` is. The identity reward's entry."""
    path = Path(path)
    if path.is_dir():
        return load(path, **options)
    if path.suffix.lower() == ".onnx" or path.is_file():
        from alignax.models.insightface_format import load_insightface
        return load_insightface(path, **options)
    raise WeightsError(f"{path}: not found (expected an insightface .onnx file or a directory written by "
                       "alignax.models.iresnet.save)")
