"""ONNX export of an IResNet (alignax.models.iresnet_onnx, written with the onnx helper API, no torch):
onnxruntime runs the file and agrees with the Flax embedding, and `load_insightface` reads the params back."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from alignax.errors import ConfigError
from alignax.models import iresnet
from alignax.models.insightface_format import load_insightface
from alignax.models.iresnet_onnx import INPUT, export_onnx
from alignax.models.pretrained import Pretrained
from tests.parity import max_rel_err
from tests.rewards.test_identity import tiny_embedder_params


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("graph_normalises", [False, True])
def test_exported_onnx_runs_in_onnxruntime_and_loads_back(tmp_path, graph_normalises):
    extra = dict(input_sub=(127.5, 120.0, 110.0), input_mul=(1 / 127.5, 1 / 60.0, 1 / 64.0)) if graph_normalises else {}
    module = iresnet.IResNet(layers=(1, 2), widths=(8, 16), stem_width=8, embedding_size=16, input_size=(16, 16),
                             **extra)
    config = iresnet.config_of(module)
    # Random params with non-trivial BN statistics and PReLU slopes, float32 as a trained model's.
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), tiny_embedder_params(config, seed=3))
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: np.linspace(0.05, 0.4, a.size, dtype=np.float32) if p[-1].key == "weight" else a, params)
    path = export_onnx((config, params), tmp_path / "model.onnx")

    # insightface's layout: unfolded BN nodes, PReLU slopes [C, 1, 1], torch state-dict names, NCHW input.
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("BatchNormalization") == 1 + 1 + 3 * 3 + 2 + 1 and "Gemm" in ops and "PRelu" in ops
    names = {i.name for i in graph.initializer}
    assert {"conv1.weight", "layer2.0.downsample.1.running_var", "fc.weight", "features.running_mean"} <= names
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 16, 16]

    x = np.random.RandomState(0).uniform(0 if graph_normalises else -1, 255 if graph_normalises else 1,
                                         (3, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {INPUT: x})[0]
    flax_model = Pretrained(module=iresnet.build(config), params=params, config=config,
                            architecture=iresnet.ARCHITECTURE)  # NCHW input, as the ONNX takes
    ours = np.asarray(flax_model(x))
    err = max_rel_err(ours, theirs)
    print(f"graph_normalises={graph_normalises}: onnxruntime vs Flax max rel err {err:.2e}")
    assert err <= 1e-5

    loaded = load_insightface(path)
    a, b = flat(loaded.params), flat(params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:5]
    assert loaded.config["layers"] == [1, 2] and loaded.config["input_size"] == [16, 16]
    assert loaded.config["input_sub"] == (list(extra["input_sub"]) if graph_normalises else None)
    assert max_rel_err(np.asarray(loaded(x)), theirs) <= 1e-5


def test_params_that_do_not_fit_the_config_are_named(tmp_path):
    config = iresnet.config_of(iresnet.IResNet(layers=(1,), widths=(8,), stem_width=8, embedding_size=8,
                                               input_size=(8, 8)))
    params = tiny_embedder_params(config)
    del params["fc"]
    with pytest.raises(ConfigError, match=r"params have no 'fc.weight'"):
        export_onnx((config, params), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
