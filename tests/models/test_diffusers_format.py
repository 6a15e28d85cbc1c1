"""load_diffusers / save_diffusers: round trips through diffusers, sharding, bf16, bad inputs, atomicity."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.numpy import save_file

from alignax.errors import WeightsError
from alignax.models import load_diffusers, save_diffusers, weights_io
from tests import reference_models as ref
from tests.parity import max_rel_err

CALL_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")


def _run(model, inputs):
    return np.asarray(model(*(jnp.asarray(inputs[k]) for k in CALL_ARGS)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd35_src")
    ref.sd3_transformer(seed=11, **ref.SD35_TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inputs():
    return ref.transformer_inputs(ref.SD35_TINY, height=6, width=10)


def test_round_trip_through_diffusers(saved, inputs, tmp_path):
    model = load_diffusers(saved)
    out = save_diffusers(model, tmp_path / "export")
    reloaded = SD3Transformer2DModel.from_pretrained(out).eval()
    assert tuple(reloaded.config.dual_attention_layers) == (0, 1) and reloaded.config.qk_norm == "rms_norm"
    assert max_rel_err(_run(model, inputs), ref.run_torch_transformer(reloaded, inputs)) <= 1e-5


def test_sharded_export_writes_an_index_and_reloads(saved, inputs, tmp_path):
    model = load_diffusers(saved)
    out = save_diffusers(model, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    reloaded = SD3Transformer2DModel.from_pretrained(out).eval()
    assert max_rel_err(_run(model, inputs), ref.run_torch_transformer(reloaded, inputs)) <= 1e-5
    again = load_diffusers(out)
    assert max_rel_err(_run(again, inputs), _run(model, inputs)) == 0.0


def test_loads_shards_and_fp16_that_diffusers_wrote(inputs, tmp_path):
    """diffusers' own sharded fp16 `save_pretrained` (index + shards) loads; fp32 and fp16 compute both
    match the same fp16 weights run in fp32 by torch."""
    torch_model = ref.sd3_transformer(seed=12, **ref.SD35_TINY).half()
    torch_model.save_pretrained(tmp_path / "fp16", max_shard_size="20KB")
    index = json.loads((tmp_path / "fp16" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    expected = ref.run_torch_transformer(torch_model.float().eval(), inputs)
    model = load_diffusers(tmp_path / "fp16")
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.float32)}
    assert max_rel_err(_run(model, inputs), expected) <= 1e-5
    half = load_diffusers(tmp_path / "fp16", dtype=jnp.float16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.float16)}
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(half.params)[0], np.float32),
                                  np.asarray(jax.tree.leaves(model.params)[0]))


def test_bf16_storage_round_trip(saved, inputs, tmp_path):
    model = load_diffusers(saved)
    out = save_diffusers(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    reloaded = SD3Transformer2DModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert next(reloaded.parameters()).dtype == torch.float32
    from safetensors import safe_open
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="numpy") as f:
        assert f.get_slice("proj_out.weight").get_dtype() == "BF16"
    ours = load_diffusers(out)  # bf16 on disk, fp32 params
    assert ours.params["proj_out"]["kernel"].dtype == jnp.float32
    assert max_rel_err(_run(ours, inputs), ref.run_torch_transformer(reloaded, inputs)) <= 1e-5
    in_bf16 = load_diffusers(out, dtype=jnp.bfloat16)
    assert in_bf16.params["proj_out"]["kernel"].dtype == jnp.bfloat16


def test_subfolder(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "pipeline" / "transformer")
    assert load_diffusers(tmp_path / "pipeline", subfolder="transformer").config["num_layers"] == 4


def test_failed_export_leaves_previous_directory_intact(saved, tmp_path, monkeypatch):
    model = load_diffusers(saved)
    out = save_diffusers(model, tmp_path / "export")
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights_io, "write_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind
    with pytest.raises(OSError):
        save_diffusers(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# --- bad inputs: each error names the key or file -------------------------------------------

def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "bad")


def _rewrite_weights(path, edit):
    file = path / "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_missing_key(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite_weights(path, lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"))
    with pytest.raises(WeightsError, match=r"missing key 'transformer_blocks\.1\.attn\.to_k\.weight'"):
        load_diffusers(path)


def test_unexpected_key(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite_weights(path, lambda t: t.update({"transformer_blocks.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"unexpected key 'transformer_blocks\.9\.extra\.weight'"):
        load_diffusers(path)


def test_shape_mismatch_names_both_shapes(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite_weights(path, lambda t: t.update({"proj_out.weight": np.zeros((16, 7), np.float32)}))
    with pytest.raises(WeightsError, match=r"'proj_out\.weight'.*\(16, 7\).*\(16, 16\)"):
        load_diffusers(path)


def test_truncated_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    file = path / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers(path)


def test_corrupt_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64 + b"garbage")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers(path)


def test_unknown_class_name(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="config.json.*'UNet2DConditionModel'"):
        load_diffusers(path)


def test_missing_config_and_missing_shard(saved, tmp_path):
    with pytest.raises(WeightsError, match="config.json: file not found"):
        load_diffusers(tmp_path)
    model = load_diffusers(saved)
    out = save_diffusers(model, tmp_path / "sharded", max_shard_size=20_000)
    victim = sorted(out.glob("*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError, match=victim.name):
        load_diffusers(out)


def test_unsupported_config_value(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["qk_norm"] = "l2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="qk_norm='l2'"):
        load_diffusers(path)


# --- values that used to load silently: non-float dtypes, NaN/Inf, index entries outside the directory ----

@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"proj_out.weight": t["proj_out.weight"].astype(np.int32)}),
     r"diffusion_pytorch_model\.safetensors: tensor 'proj_out\.weight' has dtype I32"),
    (lambda t: t.update({"proj_out.bias": t["proj_out.bias"] > 0}),
     r"diffusion_pytorch_model\.safetensors: tensor 'proj_out\.bias' has dtype BOOL"),
    (lambda t: t["proj_out.weight"].__setitem__((0, 1), np.nan),
     r"diffusion_pytorch_model\.safetensors: tensor 'proj_out\.weight' holds 1 NaN/Inf value"),
    (lambda t: t.update({"proj_out.bias": np.full_like(t["proj_out.bias"], np.inf, dtype=np.float16)}),
     r"tensor 'proj_out\.bias' holds 16 NaN/Inf value"),
])
def test_non_float_and_non_finite_tensors_are_refused(saved, tmp_path, edit, match):
    path = _copy(saved, tmp_path)
    _rewrite_weights(path, edit)
    with pytest.raises(WeightsError, match=match):
        load_diffusers(path)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "/abs/outside.safetensors"])
def test_index_entries_outside_the_directory_are_refused(saved, tmp_path, entry):
    out = save_diffusers(load_diffusers(saved), tmp_path / "model" / "sharded", max_shard_size=20_000)
    index_file = out / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    # The first shard moved to where the entry points: the model still loads, unless the path is refused.
    first_key = sorted(index["weight_map"])[0]
    shard = index["weight_map"][first_key]
    if entry.startswith("/"):
        entry = str(tmp_path / entry[1:])
    target = out / entry  # an absolute `entry` replaces `out`
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(out / shard, target)
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"index\.json: weight_map\['{re.escape(first_key)}'\]="
                                           rf"'{re.escape(entry)}' points outside"):
        load_diffusers(out)
