"""insightface recognition ONNX files (`w600k_r50.onnx`, `glintr100.onnx`, ...) as a Flax `IResNet`.

The graph is read with the `onnx` package and matched BY STRUCTURE, never by initialiser names
(they differ between exports: `layer1.0.conv1.weight`, `onnx::Conv_1234`, mxnet names):

    [Sub/Mul/Div/Add by constants]   input normalisation inside the graph (mxnet conversions)
    Conv 3×3 s1 [BN] PRelu           stem
    per block, from its input x:     BN → Conv 3×3 s1 [BN] → PRelu → Conv 3×3 sS [BN]  (+)  x or Conv 1×1 sS [BN]
                                     → Add;  a block with a 1×1 shortcut starts a stage (stride 2)
    BN → Flatten|Reshape → Gemm | MatMul [+ Add] → [BN]   head ("fc", "features")

`[BN]` after a Conv is either a BatchNormalization node or already folded into the Conv's
weight and bias (torch.onnx.export folds it in eval mode with constant folding). Both load
exactly: a folded Conv becomes kernel W' with an identity BN that carries the bias
(scale 1, mean 0, var 1 − eps); an unfolded one keeps its statistics. A BN epsilon other than the
model's is absorbed exactly into the stored variance (var + eps_node − eps). Layers per stage,
widths, embedding size and input size come from the graph. Identity / Dropout nodes pass
through; constant subgraphs (Constant, Identity, Unsqueeze, ... on initialisers, as the exporter
emits for PReLU slopes) are evaluated with numpy. Anything else: WeightsError naming the node.

Licence: insightface's released models are for non-commercial research only; loading one logs
that once per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from alignax.errors import WeightsError
from alignax.models import iresnet, weights_io
from alignax.models.pretrained import Pretrained, abstract_params

log = logging.getLogger("alignax")
LICENCE_NOTE = ("insightface's pretrained recognition models are released for non-commercial research purposes "
                "only (https://github.com/deepinsight/insightface#license); check the terms before any other use")
_licence_logged = False

# Ops of the traced (data-dependent) part of the graph that an IResNet consists of.
_DYNAMIC_OPS = frozenset({"Conv", "BatchNormalization", "PRelu", "Add", "Sub", "Mul", "Div", "Flatten", "Reshape",
                          "Gemm", "MatMul", "Identity", "Dropout"})
_PASS_THROUGH = frozenset({"Identity", "Dropout"})


def _log_licence_once() -> None:
    global _licence_logged
    if not _licence_logged:
        _licence_logged = True
        log.warning("Loading an insightface model: %s.", LICENCE_NOTE)


def _node_label(node: Any) -> str:
    return f"node {node.name or '<unnamed>'!r} (op_type {node.op_type})"


def _attrs(node: Any) -> dict[str, Any]:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unsqueeze(x: np.ndarray, axes: list[int]) -> np.ndarray:
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = np.expand_dims(x, axis)
    return x


def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape.tolist())]
    return x.reshape(shape)


# Constant folding for the little constant subgraphs exporters leave (inputs all constant).
_CONSTANT_OPS: dict[str, Callable[[list[np.ndarray], dict], np.ndarray]] = {
    "Identity": lambda i, a: i[0],
    "Unsqueeze": lambda i, a: _unsqueeze(i[0], list(a["axes"]) if "axes" in a else i[1].tolist()),
    "Squeeze": lambda i, a: np.squeeze(i[0], tuple(a["axes"]) if "axes" in a else (
        tuple(i[1].tolist()) if len(i) > 1 else None)),
    "Reshape": lambda i, a: _reshape(i[0], i[1]),
    "Transpose": lambda i, a: np.transpose(i[0], a.get("perm")),
    "Cast": lambda i, a: i[0].astype(__import__("onnx").helper.tensor_dtype_to_np_dtype(a["to"])),
}


class _Graph:
    """The graph's constants (initialisers and folded constant nodes) and its traced nodes."""

    def __init__(self, model: Any, source: str):
        from onnx import numpy_helper
        self.source = source
        graph = model.graph
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise WeightsError(f"{source}: the graph has {len(inputs)} input(s) and {len(graph.output)} output(s); "
                               "an insightface recognition model has one image input and one embedding output")
        self.input = inputs[0]
        self.output = graph.output[0].name
        self.alias: dict[str, str] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self._topological(graph.node):
            if node.op_type == "Constant":
                self.constants[node.output[0]] = self._constant_node(node)
                continue
            ins = [n for n in node.input if n]
            if ins and all(n in self.constants for n in ins):
                if node.op_type not in _CONSTANT_OPS:
                    raise WeightsError(f"{source}: {_node_label(node)} computes a constant in a way an IResNet "
                                       f"export does not ({sorted(_CONSTANT_OPS)} are folded)")
                try:
                    self.constants[node.output[0]] = _CONSTANT_OPS[node.op_type](
                        [self.constants[n] for n in ins], _attrs(node))
                except (KeyError, ValueError, IndexError, TypeError) as e:
                    raise WeightsError(f"{source}: {_node_label(node)}: cannot fold its constant inputs ({e})") from e
                continue
            if node.op_type not in _DYNAMIC_OPS:
                raise WeightsError(f"{source}: {_node_label(node)} is not part of an insightface IResNet "
                                   f"(supported ops: {sorted(_DYNAMIC_OPS)})")
            if node.op_type in _PASS_THROUGH:
                self.alias[node.output[0]] = self.resolve(node.input[0])
                continue
            for name in ins:
                if name not in self.constants:
                    self.consumers.setdefault(self.resolve(name), []).append(node)
        self.used: set[int] = set()
        self.all_nodes = [n for lst in self.consumers.values() for n in lst]

    def _topological(self, nodes: Any) -> list[Any]:
        """Kahn's order over tensor dependencies; an input no node produces means a broken file."""
        known = set(self.constants) | {self.input.name}
        producers = {out: i for i, node in enumerate(nodes) for out in node.output}
        pending = {i: {n for n in node.input if n and n not in known} for i, node in enumerate(nodes)}
        for i, needs in pending.items():
            for name in needs:
                if name not in producers:
                    raise WeightsError(f"{self.source}: {_node_label(nodes[i])} reads tensor {name!r}, which is "
                                       "neither an initialiser nor produced by any node (truncated or broken file?)")
        waiting = {i: {producers[n] for n in needs} for i, needs in pending.items()}
        dependants: dict[int, list[int]] = {}
        for i, needs in waiting.items():
            for j in needs:
                dependants.setdefault(j, []).append(i)
        ready = sorted(i for i, needs in waiting.items() if not needs)
        order = []
        while ready:
            i = ready.pop(0)
            order.append(nodes[i])
            for j in dependants.get(i, ()):
                waiting[j].discard(i)
                if not waiting[j]:
                    ready.append(j)
        if len(order) != len(nodes):
            stuck = next(nodes[i] for i, needs in waiting.items() if needs)
            raise WeightsError(f"{self.source}: {_node_label(stuck)} is part of a cycle")
        return order

    def _constant_node(self, node: Any) -> np.ndarray:
        from onnx import numpy_helper
        attrs = {a.name: a for a in node.attribute}
        if "value" not in attrs:
            raise WeightsError(f"{self.source}: {_node_label(node)} has no tensor 'value' (only tensor constants are "
                               "supported)")
        return numpy_helper.to_array(attrs["value"].t)

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def fail(self, node: Any, what: str) -> WeightsError:
        return WeightsError(f"{self.source}: {_node_label(node)}: {what}; the graph is not an insightface IResNet")

    def next_nodes(self, tensor: str) -> list[Any]:
        return self.consumers.get(self.resolve(tensor), [])

    def take(self, tensor: str, *ops: str, where: str) -> Any:
        """The single node reading `tensor`, which must be one of `ops`."""
        nodes = self.next_nodes(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            found = ", ".join(_node_label(n) for n in nodes) or "no node (graph output)"
            raise WeightsError(f"{self.source}: {where}: expected one {'/'.join(ops)} node reading tensor "
                               f"{self.resolve(tensor)!r}, found {found}; the graph is not an insightface IResNet")
        return self.use(nodes[0])

    def use(self, node: Any) -> Any:
        self.used.add(id(node))
        return node

    def const(self, node: Any, index: int) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        if name not in self.constants:
            raise self.fail(node, f"input {index} ({name!r}) must be a constant (weights) but is computed")
        array = self.constants[name]
        if not np.issubdtype(array.dtype, np.floating):
            raise self.fail(node, f"weight {name!r} has dtype {array.dtype}, expected floating point")
        return weights_io.check_array(np.asarray(array, np.float32), name, self.source)

    def other_input(self, node: Any, tensor: str) -> str:
        ins = [self.resolve(n) for n in node.input]
        if len(ins) != 2 or self.resolve(tensor) not in ins:
            raise self.fail(node, "expected two inputs")
        return ins[1 - ins.index(self.resolve(tensor))]


class _Parser:
    """Walks the graph from its input, collecting a flat {param path: array} for `IResNet`."""

    def __init__(self, graph: _Graph):
        self.g = graph
        self.flat: dict[tuple[str, ...], np.ndarray] = {}
        self.bn_nodes: list[tuple[tuple[str, ...], dict]] = []

    # -- pieces ---------------------------------------------------------------------------------
    def conv(self, tensor: str, prefix: tuple[str, ...], bn_name: tuple[str, ...], kernel: int,
             strides: tuple[int, ...], where: str, node: Any = None) -> tuple[str, int, int]:
        """Conv (+ BN, folded or not) reading `tensor` (or the given `node`): (output, stride, channels)."""
        g = self.g
        node = g.use(node) if node is not None else g.take(tensor, "Conv", where=where)
        a = _attrs(node)
        weight = g.const(node, 1)
        if weight.ndim != 4 or weight.shape[2:] != (kernel, kernel):
            raise g.fail(node, f"weight shape {weight.shape}, expected a {kernel}×{kernel} kernel")
        stride = tuple(a.get("strides", (1, 1)))
        pad = kernel // 2
        if (a.get("group", 1) != 1 or tuple(a.get("dilations", (1, 1))) != (1, 1)
                or tuple(a.get("pads", (0, 0, 0, 0))) != (pad,) * 4 or len(set(stride)) != 1
                or stride[0] not in strides or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            raise g.fail(node, f"{where}: unsupported conv attributes {a} (expected kernel {kernel}, pads {pad}, "
                               f"stride in {strides}, group 1, dilation 1)")
        bias = g.const(node, 2) if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0], np.float32)
        self.flat[prefix + ("kernel",)] = weight.transpose(2, 3, 1, 0)
        out = node.output[0]
        following = g.next_nodes(out)
        if len(following) == 1 and following[0].op_type == "BatchNormalization":
            bn = g.use(following[0])
            self.batchnorm(bn, bn_name, input_bias=bias)
            out = bn.output[0]
        else:  # folded by the exporter: an identity BN carrying the bias
            self.bn_nodes.append((bn_name, {"scale": np.ones_like(bias), "bias": bias, "mean": np.zeros_like(bias),
                                            "var": None}))
        return out, stride[0], weight.shape[0]

    def batchnorm(self, node: Any, name: tuple[str, ...], input_bias: np.ndarray | None = None) -> None:
        g = self.g
        if len(node.output) > 1 and any(node.output[1:]) or _attrs(node).get("training_mode", 0):
            raise g.fail(node, "BatchNormalization in training mode (export the model in eval mode)")
        scale, bias, mean, var = (g.const(node, i) for i in range(1, 5))
        if input_bias is not None:  # BN(x + b) = BN with mean − b
            mean = mean - input_bias
        self.bn_nodes.append((name, {"scale": scale, "bias": bias, "mean": mean, "var": var,
                                     "epsilon": float(_attrs(node).get("epsilon", 1e-5))}))

    def bn(self, tensor: str, name: tuple[str, ...], where: str) -> str:
        node = self.g.take(tensor, "BatchNormalization", where=where)
        self.batchnorm(node, name)
        return node.output[0]

    def prelu(self, tensor: str, name: tuple[str, ...], channels: int, where: str) -> str:
        g = self.g
        node = g.take(tensor, "PRelu", where=where)
        if g.resolve(node.input[0]) != g.resolve(tensor):
            raise g.fail(node, "the slope must be the second input")
        slope = g.const(node, 1)
        if slope.size == 1:
            slope = np.full(channels, float(slope.reshape(())), np.float32)
        elif slope.size != channels or sum(d != 1 for d in slope.shape) != 1 or (
                slope.ndim >= 3 and slope.shape[-3] != channels):
            raise g.fail(node, f"slope of shape {slope.shape} for {channels} channels (expected [C] or [C,1,1])")
        self.flat[name + ("weight",)] = slope.reshape(channels)
        return node.output[0]

    def input_affine(self, tensor: str) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """Leading Sub/Mul/Div/Add by per-channel constants → (x − sub) · mul, or (tensor, None, None)."""
        g = self.g
        a, b = np.ones(3, np.float64), np.zeros(3, np.float64)  # value = a·x + b
        seen = False
        while True:
            nodes = g.next_nodes(tensor)
            if len(nodes) != 1 or nodes[0].op_type not in ("Sub", "Mul", "Div", "Add"):
                break
            node = g.use(nodes[0])
            other = g.other_input(node, tensor)
            if other not in g.constants:
                raise g.fail(node, "input normalisation must use a constant")
            c = np.asarray(g.constants[other], np.float64)
            if c.size != 1 and c.shape not in ((3, 1, 1), (1, 3, 1, 1)):
                raise g.fail(node, f"constant of shape {c.shape}; input normalisation must be a scalar or per "
                                   "channel in NCHW ([3,1,1] or [1,3,1,1])")
            c = np.broadcast_to(c.reshape(-1), (3,))
            first = g.resolve(node.input[0]) == g.resolve(tensor)
            if node.op_type == "Add":
                b = b + c
            elif node.op_type == "Sub":
                a, b = (a, b - c) if first else (-a, c - b)
            elif node.op_type == "Mul":
                a, b = a * c, b * c
            elif first:
                a, b = a / c, b / c
            else:
                raise g.fail(node, "dividing a constant by the image is not an input normalisation")
            if np.any(a == 0):
                raise g.fail(node, "input normalisation multiplies by zero")
            tensor, seen = node.output[0], True
        if not seen:
            return tensor, None, None
        return tensor, (-b / a).astype(np.float32), a.astype(np.float32)

    # -- the model ------------------------------------------------------------------------------
    def parse(self) -> dict:
        g = self.g
        x, sub, mul = self.input_affine(g.input.name)
        x, stride, stem_width = self.conv(x, ("conv1",), ("bn1",), 3, (1,), where="stem conv")
        x = self.prelu(x, ("prelu",), stem_width, where="stem PReLU")
        layers: list[int] = []
        widths: list[int] = []
        channels = stem_width
        while True:
            nodes = g.next_nodes(x)
            if len(nodes) == 1:
                break
            if len(nodes) != 2:
                found = ", ".join(_node_label(n) for n in nodes) or "nothing"
                raise WeightsError(f"{g.source}: tensor {g.resolve(x)!r} (a block boundary) is read by {found}; "
                                   "an IResNet block input feeds a BatchNormalization and the shortcut")
            x, channels = self.block(x, nodes, layers, widths, channels)
        if not layers:
            found = ", ".join(_node_label(n) for n in g.next_nodes(x)) or "nothing"
            raise WeightsError(f"{g.source}: the stem is followed by {found}, not by a residual block (BN and a 1×1 "
                               "conv shortcut); the graph is not an insightface IResNet")
        x = self.bn(x, ("bn2",), where="final BN after the last block")
        flat_node = g.take(x, "Flatten", "Reshape", where="head flatten")
        if flat_node.op_type == "Flatten" and _attrs(flat_node).get("axis", 1) != 1:
            raise g.fail(flat_node, "Flatten must use axis=1")
        if flat_node.op_type == "Reshape":
            shape = g.constants.get(flat_node.input[1])
            if shape is None or shape.size != 2:
                raise g.fail(flat_node, "Reshape must flatten to [batch, features] with a constant shape")
        x, embedding = self.fc(flat_node.output[0], channels)
        nodes = g.next_nodes(x)
        if nodes:
            x = self.bn(x, ("features",), where="features BN after fc")
        else:
            self.bn_nodes.append((("features",), {"scale": np.ones(embedding, np.float32),
                                                  "bias": np.zeros(embedding, np.float32),
                                                  "mean": np.zeros(embedding, np.float32), "var": None}))
        if g.resolve(x) != g.resolve(g.output):
            raise WeightsError(f"{g.source}: tensor {g.resolve(x)!r} after the head is not the graph output "
                               f"{g.output!r}; nodes follow that an IResNet does not have: "
                               + ", ".join(_node_label(n) for n in g.next_nodes(x)))
        unused = [n for n in g.all_nodes if id(n) not in g.used]
        if unused:
            raise WeightsError(f"{g.source}: {_node_label(unused[0])} is not part of the IResNet structure found "
                               f"({len(unused)} such node(s))")
        fc_in = self.flat[("fc", "kernel")].shape[0]
        input_size = self._input_size(fc_in, channels, len(layers))
        epsilons = [p["epsilon"] for _, p in self.bn_nodes if "epsilon" in p]
        epsilon = max(set(epsilons), key=epsilons.count) if epsilons else 1e-5
        for name, p in self.bn_nodes:
            var = (np.full_like(p["scale"], 1.0 - epsilon) if p["var"] is None
                   else p["var"] + (p.get("epsilon", epsilon) - epsilon))
            self.flat.update({name + ("scale",): p["scale"], name + ("bias",): p["bias"], name + ("mean",): p["mean"],
                              name + ("var",): var.astype(np.float32)})
        config = {"layers": layers, "widths": widths, "stem_width": stem_width, "embedding_size": embedding,
                  "input_size": input_size, "bn_epsilon": epsilon,
                  "input_sub": None if sub is None else sub.tolist(),
                  "input_mul": None if mul is None else mul.tolist(),
                  # what a caller feeds on the 0–255 scale (insightface's ArcFaceONNX convention)
                  "input_mean": 0.0 if sub is not None else 127.5, "input_std": 1.0 if sub is not None else 127.5}
        return config

    def block(self, x: str, nodes: list[Any], layers: list[int], widths: list[int],
              channels: int) -> tuple[str, int]:
        g = self.g
        bns = [n for n in nodes if n.op_type == "BatchNormalization"]
        if len(bns) != 1:
            raise WeightsError(f"{g.source}: block input {g.resolve(x)!r} is read by "
                               + ", ".join(_node_label(n) for n in nodes)
                               + "; expected one BatchNormalization (bn1) and the shortcut")
        shortcut = next(n for n in nodes if n is not bns[0])
        downsample = shortcut.op_type == "Conv"
        if downsample:
            layers.append(0)
        elif not layers:
            raise g.fail(shortcut, "the first block must have a 1×1 conv shortcut (downsample)")
        name = (f"layer{len(layers)}.{layers[-1]}",)
        layers[-1] += 1
        where = f"block {name[0]}"
        g.use(bns[0])
        self.batchnorm(bns[0], name + ("bn1",))
        h, _, planes = self.conv(bns[0].output[0], name + ("conv1",), name + ("bn2",), 3, (1,), where=where + " conv1")
        h = self.prelu(h, name + ("prelu",), planes, where=where + " PReLU")
        h, stride, _ = self.conv(h, name + ("conv2",), name + ("bn3",), 3, (2,) if downsample else (1,),
                                 where=where + " conv2")
        if downsample:
            if layers[-1] == 1:
                widths.append(planes)
            s, _, _ = self.conv(x, name + ("downsample.0",), name + ("downsample.1",), 1, (2,),
                                where=where + " downsample", node=shortcut)
        else:
            if planes != channels:
                raise g.fail(shortcut, f"{where}: identity shortcut with {channels} → {planes} channels")
            s = x
        add = g.take(h, "Add", where=where + " residual add")
        if g.resolve(g.other_input(add, h)) != g.resolve(s):
            raise g.fail(add, f"{where}: the residual Add does not join the block's two branches")
        if not downsample and g.use(shortcut) is not add:
            raise g.fail(shortcut, f"{where}: the shortcut is not the residual Add")
        return add.output[0], planes

    def fc(self, tensor: str, channels: int) -> tuple[str, int]:
        g = self.g
        node = g.take(tensor, "Gemm", "MatMul", where="head fc")
        weight = g.const(node, 1)
        if node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise g.fail(node, f"unsupported Gemm attributes {a}")
            kernel = weight.T if a.get("transB", 0) else weight
            bias = g.const(node, 2) if len(node.input) > 2 and node.input[2] else np.zeros(kernel.shape[1], np.float32)
            out = node.output[0]
        else:
            kernel, out = weight, node.output[0]
            after = g.next_nodes(out)
            if len(after) == 1 and after[0].op_type == "Add":
                add = g.use(after[0])
                other = g.other_input(add, out)
                if other not in g.constants:
                    raise g.fail(add, "fc bias must be a constant")
                bias, out = g.const(add, list(add.input).index(other)).reshape(-1), add.output[0]
            else:
                bias = np.zeros(kernel.shape[1], np.float32)
        if kernel.ndim != 2 or bias.shape != (kernel.shape[1],) or kernel.shape[0] % channels:
            raise g.fail(node, f"fc weight {weight.shape} / bias {bias.shape} do not fit {channels} channels")
        self.flat[("fc", "kernel")], self.flat[("fc", "bias")] = kernel, bias
        return out, kernel.shape[1]

    def _input_size(self, fc_in: int, channels: int, stages: int) -> list[int]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in self.g.input.type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] not in (None, 3):
            raise WeightsError(f"{self.g.source}: input {self.g.input.name!r} has shape {dims}; expected "
                               "[N, 3, H, W]")
        spatial = fc_in // channels
        height, width = dims[2], dims[3]
        if height is None or width is None:  # symbolic: a square input whose final map fits the fc
            side = int(round(spatial ** 0.5))
            if side * side != spatial:
                raise WeightsError(f"{self.g.source}: cannot infer the input size from fc input {fc_in}")
            height = width = side * 2 ** stages
        h, w = height, width
        for _ in range(stages):
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w * channels != fc_in:
            raise WeightsError(f"{self.g.source}: fc takes {fc_in} features but a {height}×{width} input gives "
                               f"{channels}×{h}×{w}")
        return [int(height), int(width)]


def read_onnx(path: str | os.PathLike) -> Any:
    """`onnx.load` with every failure a WeightsError naming the file."""
    import onnx
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found (expected an insightface recognition .onnx file)")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError, OSError, external-data errors, ...)
        raise WeightsError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e}); the file may be truncated "
                           "or not ONNX") from e
    if not model.graph.node:
        raise WeightsError(f"{path}: the ONNX graph has no nodes (truncated or not a model file)")
    return model


def load_insightface(path: str | os.PathLike, *, dtype: Any = jnp.float32, **options: Any) -> Pretrained:
    """Loads an insightface recognition ONNX file (IResNet) into a Flax `IResNet`.

    `pretrained(x)` takes what the ONNX takes: NCHW float, RGB, normalised as the file expects
    (config `input_mean`/`input_std` on the 0–255 scale, (x − 127.5)/127.5 for arcface_torch exports),
    and returns the un-normalised [B, embedding_size] embedding. `iresnet.embed` does the
    normalisation from [0, 1] NHWC images. `options`: compute_dtype.
    """
    file = Path(path)
    model = read_onnx(file)
    parser = _Parser(_Graph(model, str(file)))
    config = parser.parse()
    config = iresnet.config_of(iresnet.build(config), input_mean=config["input_mean"],
                               input_std=config["input_std"], source=file.name)
    module = iresnet.build(config, **options)
    template = traverse_util.flatten_dict(abstract_params(iresnet.ARCHITECTURE, module)[0])
    for key, leaf in template.items():
        if key not in parser.flat or parser.flat[key].shape != tuple(leaf.shape):
            found = parser.flat[key].shape if key in parser.flat else "nothing"
            raise WeightsError(f"{file}: parameter {'.'.join(key)} has shape {found}, the inferred IResNet expects "
                               f"{tuple(leaf.shape)}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(parser.flat[k], dtype) for k in template})
    _log_licence_once()
    return Pretrained(module=module, params=params, config=config, architecture=iresnet.ARCHITECTURE)
