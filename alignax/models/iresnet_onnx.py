"""An IResNet as an ONNX file in insightface's layout, written with the `onnx` package's helper API.

The graph is what insightface's arcface_torch `torch.onnx.export` (eval mode, no constant folding)
produces, so insightface's own tools (`ArcFaceONNX`, onnxruntime) and `load_insightface` read it:

    input.1 [N, 3, H, W] (normalised)  [Sub → Mul: only for a model whose graph normalises its input]
    stem:  Conv 3×3 → BatchNormalization → PRelu
    block: BN → Conv 3×3 → BN → PRelu → Conv 3×3 (stride) → BN, + x or Conv 1×1 (stride) → BN; Add
    head:  BN → Flatten → Gemm (fc) → BatchNormalization (features)  → embedding [N, D]

Initialisers carry the insightface state-dict names (`layer2.0.conv1.weight`, `bn1.running_mean`),
BN layers keep their running statistics unfolded, PReLU slopes are [C, 1, 1]. torch is not needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alignax import fs
from alignax.errors import ConfigError
from alignax.models import iresnet
from alignax.models.pretrained import Pretrained

INPUT = "input.1"
OUTPUT = "embedding"


def to_onnx(model: Pretrained | tuple[Mapping, Any], *, opset: int = 17) -> Any:
    """The `onnx.ModelProto` of `model` (a Pretrained, or (config, params) as `iresnet.save` takes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if isinstance(model, Pretrained):
        config, params = dict(model.config), model.params
    else:
        config, params = dict(model[0]), model[1]
        if isinstance(params, Mapping) and set(params) == {"params", "batch_stats"}:
            params = iresnet.merge_stats(params["params"], params["batch_stats"])
    try:
        module = iresnet.build(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"iresnet ONNX export: config does not describe an IResNet ({e!r}): {config}") from e
    weights = iresnet._state_dict(params)  # insightface torch names and layouts (OIHW convs, fc [out, in])
    eps = float(module.bn_epsilon)
    nodes: list[Any] = []
    initializers: dict[str, np.ndarray] = {}

    def const(name: str, value: np.ndarray) -> str:
        initializers[name] = np.asarray(value, np.float32)
        return name

    def weight(name: str) -> str:
        if name not in weights:
            raise ConfigError(f"iresnet ONNX export: params have no {name!r} (do they fit the config?)")
        return const(name, weights[name])

    def bn(x: str, name: str) -> str:
        out = f"{name}.out"
        nodes.append(helper.make_node("BatchNormalization", [x, weight(f"{name}.weight"), weight(f"{name}.bias"),
                                                             weight(f"{name}.running_mean"),
                                                             weight(f"{name}.running_var")],
                                      [out], name=name, epsilon=eps, momentum=0.9))
        return out

    def conv(x: str, name: str, stride: int) -> str:
        w = weights[f"{name}.weight"]
        pad = w.shape[-1] // 2
        nodes.append(helper.make_node("Conv", [x, weight(f"{name}.weight")], [f"{name}.out"], name=name,
                                      kernel_shape=list(w.shape[-2:]), strides=[stride, stride],
                                      pads=[pad, pad, pad, pad], dilations=[1, 1], group=1))
        return f"{name}.out"

    def prelu(x: str, name: str) -> str:
        slope = weights[f"{name}.weight"].reshape(-1, 1, 1)  # [C, 1, 1]: broadcasts over H, W of NCHW
        nodes.append(helper.make_node("PRelu", [x, const(f"{name}.weight", slope)], [f"{name}.out"], name=name))
        return f"{name}.out"

    height, width = module.input_size
    x = INPUT
    if module.input_sub is not None:
        sub = const("input_sub", np.asarray(module.input_sub).reshape(1, 3, 1, 1))
        nodes.append(helper.make_node("Sub", [x, sub], ["input_sub.out"], name="input_sub"))
        x = "input_sub.out"
    if module.input_mul is not None:
        mul = const("input_mul", np.asarray(module.input_mul).reshape(1, 3, 1, 1))
        nodes.append(helper.make_node("Mul", [x, mul], ["input_mul.out"], name="input_mul"))
        x = "input_mul.out"
    x = prelu(bn(conv(x, "conv1", 1), "bn1"), "prelu")
    for stage, blocks in enumerate(module.layers):
        for index in range(blocks):
            name = f"layer{stage + 1}.{index}"
            stride = 2 if index == 0 else 1
            out = bn(conv(prelu(bn(conv(bn(x, f"{name}.bn1"), f"{name}.conv1", 1), f"{name}.bn2"),
                                f"{name}.prelu"), f"{name}.conv2", stride), f"{name}.bn3")
            shortcut = bn(conv(x, f"{name}.downsample.0", stride), f"{name}.downsample.1") if index == 0 else x
            nodes.append(helper.make_node("Add", [out, shortcut], [f"{name}.add"], name=f"{name}.add"))
            x = f"{name}.add"
    x = bn(x, "bn2")
    nodes.append(helper.make_node("Flatten", [x], ["flatten.out"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["flatten.out", weight("fc.weight"), weight("fc.bias")], ["fc.out"],
                                  name="fc", alpha=1.0, beta=1.0, transB=1))
    out = bn("fc.out", "features")
    nodes.append(helper.make_node("Identity", [out], [OUTPUT], name="output"))

    graph = helper.make_graph(
        nodes, "iresnet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", module.embedding_size])],
        initializer=[numpy_helper.from_array(v, name) for name, v in initializers.items()])
    proto = helper.make_model(graph, producer_name="alignax", opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = min(proto.ir_version, 8)  # readable by older onnxruntime releases too
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: Pretrained | tuple[Mapping, Any], path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Writes `model` as an insightface-layout ONNX file (atomically; local or a URL) and returns `path`.
    Inputs of the file: NCHW float RGB normalised as (pixel − 127.5) / 127.5, as insightface's torch exports."""
    proto = to_onnx(model, opset=opset)
    fs.write_bytes_atomic(os.fspath(path), proto.SerializeToString())
    return Path(path)
