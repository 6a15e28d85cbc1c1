"""IResNet (insightface ArcFace backbone) and its ONNX loader, against onnxruntime.

A miniature of insightface's `recognition/arcface_torch/backbones/iresnet.py` is written here in
PyTorch with the same module and parameter names, given random BN statistics and PReLU slopes,
exported with `torch.onnx.export` (TorchScript exporter, eval mode) as insightface exports its
models, run in onnxruntime and compared with `load_insightface(path)(x)`. With constant folding the
exporter folds every Conv→BN pair into the Conv (the layout of `w600k_r50.onnx`); without it every
BN stays a BatchNormalization node and PReLU slopes come through Constant+Unsqueeze. Both load.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from alignax.errors import ConfigError, WeightsError
from alignax.models import iresnet as iresnet_lib
from alignax.models import load_insightface
from tests.parity import max_rel_err

TOL = 1e-4


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class TorchIResNet(nn.Module):
    """insightface's IResNet with configurable widths and input size (fc_scale = (size / 16)²)."""

    def __init__(self, layers, widths=(8, 16, 16, 32), stem=8, embedding=16, size=16):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        self.stages = len(layers)
        for i, (blocks, width) in enumerate(zip(layers, widths, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(width, blocks))
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=0.0, inplace=True)
        self.fc = nn.Linear(widths[-1] * (size // 2 ** len(layers)) ** 2, embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines and PReLU slopes (some negative), so every mapping matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(-0.2, 0.5)
    return model.eval()


def export(model: nn.Module, path, size: int, *, fold: bool = True, opset: int = 13) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=fold, input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}})
    return str(path)


def onnxruntime_output(path: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def bn_after_conv(path: str) -> int:
    graph = onnx.load(path).graph
    producer = {out: node for node in graph.node for out in node.output}
    return sum(node.op_type == "BatchNormalization" and getattr(producer.get(node.input[0]), "op_type", "") == "Conv"
               for node in graph.node)


@pytest.mark.parametrize("fold,opset", [(True, 13), (False, 13), (True, 17), (False, 17)])
def test_parity_with_onnxruntime(tmp_path, fold, opset):
    model = randomised(TorchIResNet((1, 2, 1, 1)))
    path = export(model, tmp_path / "r.onnx", 16, fold=fold, opset=opset)
    # the two exports really differ: folded Conv+BN vs separate BatchNormalization nodes
    assert (bn_after_conv(path) == 0) == fold
    x = images(16)
    pretrained = load_insightface(path)
    err = max_rel_err(pretrained(x), onnxruntime_output(path, x))
    print(f"fold={fold} opset={opset}: max rel err {err:.2e}")
    assert err <= TOL
    assert pretrained.config["layers"] == [1, 2, 1, 1] and pretrained.config["widths"] == [8, 16, 16, 32]
    assert pretrained.config["embedding_size"] == 16 and pretrained.config["input_size"] == [16, 16]
    assert pretrained.params["bn1"].keys() == {"scale", "bias", "mean", "var"}


def test_parity_at_112(tmp_path):
    """The real input size (fc over 7×7), tiny widths, the r18 stage depths."""
    model = randomised(TorchIResNet((2, 2, 2, 2), widths=(4, 8, 8, 8), stem=4, embedding=32, size=112), seed=1)
    path = export(model, tmp_path / "r18.onnx", 112)
    x = images(112, seed=1)
    pretrained = load_insightface(path)
    err = max_rel_err(pretrained(x), onnxruntime_output(path, x))
    print(f"112x112 r18-depth: max rel err {err:.2e}")
    assert err <= TOL
    assert pretrained.config["input_size"] == [112, 112] and pretrained.config["layers"] == [2, 2, 2, 2]
    # embed(): [0, 1] NHWC images, normalised as insightface does, give the same as the NCHW call
    pixels = np.random.RandomState(2).uniform(0, 1, (2, 112, 112, 3)).astype(np.float32)
    expected = onnxruntime_output(path, ((pixels * 255 - 127.5) / 127.5).transpose(0, 3, 1, 2))
    assert max_rel_err(iresnet_lib.embed(pretrained, jnp.asarray(pixels)), expected) <= TOL


class _GraphNormalises(nn.Module):
    """mxnet-converted insightface files normalise inside the graph: Sub then Mul before the stem."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body((x - 127.5) * 0.0078125)


def test_in_graph_normalisation(tmp_path):
    path = export(_GraphNormalises(randomised(TorchIResNet((1, 1, 1, 1)))), tmp_path / "mx.onnx", 16)
    assert [n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant"][:2] == ["Sub", "Mul"]
    pretrained = load_insightface(path)
    assert (pretrained.config["input_mean"], pretrained.config["input_std"]) == (0.0, 1.0)
    x = np.random.RandomState(0).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32)
    assert max_rel_err(pretrained(x), onnxruntime_output(path, x)) <= TOL
    pixels = x.transpose(0, 2, 3, 1) / 255.0
    assert max_rel_err(iresnet_lib.embed(pretrained, jnp.asarray(pixels)), onnxruntime_output(path, x)) <= TOL


class _NotIResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.fc = nn.Linear(4 * 16 * 16, 8)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class _NoBlocks(nn.Module):
    """Only supported ops, but no residual block: a structural mismatch, not an unknown op."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.prelu = nn.PReLU(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16 * 16, 8)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn2(self.prelu(self.bn1(self.conv1(x)))), 1))


def test_not_an_iresnet_names_the_node(tmp_path):
    path = export(_NotIResNet().eval(), tmp_path / "cnn.onnx", 16)
    relu = next(n for n in onnx.load(path).graph.node if n.op_type == "Relu")
    with pytest.raises(WeightsError, match=rf"cnn\.onnx: node '{relu.name}' \(op_type Relu\)"):
        load_insightface(path)
    path = export(randomised(_NoBlocks()), tmp_path / "flat.onnx", 16, fold=False)
    with pytest.raises(WeightsError,
                       match=r"flat\.onnx: the stem is followed by node '.*' \(op_type BatchNormalization\)"):
        load_insightface(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.onnx: file not found"):
        load_insightface(tmp_path / "nope.onnx")
    path = export(randomised(TorchIResNet((1, 1, 1, 1))), tmp_path / "whole.onnx", 16)
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 7, 40):
        truncated = tmp_path / f"cut{cut}.onnx"
        truncated.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=rf"cut{cut}\.onnx"):
            load_insightface(truncated)


def test_save_load_roundtrip_and_torch_keys(tmp_path):
    torch_model = randomised(TorchIResNet((1, 2, 1, 1)))
    path = export(torch_model, tmp_path / "r.onnx", 16)
    pretrained = load_insightface(path)
    out = iresnet_lib.save(pretrained, tmp_path / "export")
    reloaded = iresnet_lib.load_any(out)
    x = images(16)
    np.testing.assert_array_equal(np.asarray(reloaded(x)), np.asarray(pretrained(x)))
    # the file is insightface's torch state dict: it loads into the torch IResNet (no num_batches_tracked)
    state = {k: torch.from_numpy(v) for k, v in load_file(str(out / "model.safetensors")).items()}
    fresh = TorchIResNet((1, 2, 1, 1)).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    with torch.no_grad():
        assert max_rel_err(fresh(torch.from_numpy(x)).numpy(), torch_model(torch.from_numpy(x)).numpy()) <= TOL
    assert iresnet_lib.load_any(path).config == pretrained.config


def test_trained_variables_save_and_load(tmp_path):
    """The training form (NHWC, params + batch_stats updated by train=True) saves and reloads exactly."""
    module = iresnet_lib.IResNet(layers=(1, 1), widths=(4, 8), stem_width=4, embedding_size=6, input_size=(8, 8))
    x = jnp.asarray(np.random.RandomState(0).randn(3, 8, 8, 3), jnp.float32)
    # random values on eval_shape'd variables: module.init's RNG program takes a minute to compile on a busy CPU
    rng = np.random.RandomState(1)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.0, s.shape), s.dtype),
                             jax.eval_shape(module.init, jax.random.key(0), x))
    assert variables["batch_stats"]["bn1"].keys() == {"mean", "var"}
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], 0.0)
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    directory = iresnet_lib.save((iresnet_lib.config_of(module), variables), tmp_path / "trained")
    loaded = iresnet_lib.load_any(directory)
    expected = module.apply(variables, x)
    np.testing.assert_allclose(np.asarray(loaded(jnp.transpose(x, (0, 3, 1, 2)))), np.asarray(expected),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="train=True"):
        loaded.module.apply({"params": loaded.params}, jnp.transpose(x, (0, 3, 1, 2)), train=True)
    with pytest.raises(WeightsError, match="not found"):
        iresnet_lib.load_any(tmp_path / "absent")
