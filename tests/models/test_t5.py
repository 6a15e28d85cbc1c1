"""T5 encoder parity against transformers' T5EncoderModel, loaded through `load_transformers`."""

import copy
import json
import re
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers.models.t5.modeling_t5 import T5Attention

from alignax import mesh as mesh_lib
from alignax.errors import WeightsError
from alignax.models import load_transformers, t5
from tests.parity import max_rel_err, to_numpy

BASE = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0)
LENGTH = 13
CASES = {
    # T5 v1.1 / T5-XXL layout with transformers' default bucketing; 13 tokens reach the log-spaced buckets.
    "gated-gelu": (dict(feed_forward_proj="gated-gelu"), LENGTH),
    # Original T5's relu FF, 10 buckets up to distance 12 (20 tokens reach the clamped last bucket),
    # 3 heads x 6 != d_model: one case for the three, each compiled case costs seconds.
    "relu-buckets-narrow_heads": (dict(feed_forward_proj="relu", relative_attention_num_buckets=10,
                                       relative_attention_max_distance=12, d_kv=6, num_heads=3, num_layers=3), 20),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded noise on every param (norm scales around 1, the position bias large enough to matter),
    so a mis-mapped or transposed weight cannot hide behind an init of ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "relative_attention_bias" in name:
                param.copy_(noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def padded(ids_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ids, the second right-padded with T5's pad id 0 after 5 tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (2, ids_length), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    return ids, mask


def run_both(pretrained, ids, mask):
    """last_hidden_state without a mask (as SD3 calls T5) and with the padding mask, in one compiled call."""
    def both(params, ids, mask):
        apply = lambda *a: pretrained.module.apply({"params": params}, *a)
        return dict(no_mask=apply(ids), padding_mask=apply(ids, mask))
    return jax.jit(both)(pretrained.params, ids.numpy().astype(np.int32), mask.numpy().astype(np.int32))


@pytest.fixture(scope="module")
def build_case(tmp_path_factory):
    built = {}

    def build(name):
        if name not in built:
            settings, length = CASES[name]
            model = randomize(transformers.T5EncoderModel(transformers.T5Config(**{**BASE, **settings})), seed=0)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            ids, mask = padded(length)
            with torch.no_grad():
                expected = dict(no_mask=model(input_ids=ids).last_hidden_state,
                                padding_mask=model(input_ids=ids, attention_mask=mask).last_hidden_state)
            pretrained = load_transformers(directory)
            built[name] = SimpleNamespace(name=name, model=model, directory=directory, ids=ids, mask=mask,
                                          pretrained=pretrained, expected={k: to_numpy(v) for k, v in expected.items()},
                                          actual=run_both(pretrained, ids, mask))
        return built[name]
    return build


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, build_case):
    return build_case(request.param)


@pytest.mark.parametrize("output", ["no_mask", "padding_mask"])
def test_matches_transformers(case, output):
    err = max_rel_err(case.actual[output], case.expected[output])
    print(f"t5 {case.name} {output}: max_rel_err={err:.2e}")
    assert err <= 1e-5


def test_the_padding_mask_matters(build_case):
    """Guards the masked case above: without a mask the padded row's valid tokens see the padding."""
    case = build_case("gated-gelu")
    assert max_rel_err(case.expected["no_mask"][1, :5], case.expected["padding_mask"][1, :5]) > 1e-2


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (10, 12), (64, 256), (12, 40)])
def test_buckets_equal_transformers(num_buckets, max_distance):
    """Bucket ids are exact integers: every distance up to SD3's 512 tokens lands where torch puts it."""
    length = 512
    positions = torch.arange(length)
    expected = T5Attention._relative_position_bucket(positions[None, :] - positions[:, None], bidirectional=True,
                                                     num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(t5.relative_position_buckets(length, num_buckets, max_distance), expected.numpy())


def test_params_carry_logical_axes(build_case):
    specs = build_case("gated-gelu").pretrained.logical_specs()
    block = specs["encoder"]["block.0"]
    attention = block["layer.0"]["SelfAttention"]
    assert specs["shared"]["embedding"] == PartitionSpec("vocab", "embed")
    assert attention["q"]["kernel"] == PartitionSpec("embed", "heads")
    assert attention["o"]["kernel"] == PartitionSpec("heads", "embed")
    assert attention["relative_attention_bias"]["embedding"] == PartitionSpec(None, "heads")
    assert block["layer.1"]["DenseReluDense"]["wi_0"]["kernel"] == PartitionSpec("embed", "mlp")
    assert block["layer.1"]["DenseReluDense"]["wo"]["kernel"] == PartitionSpec("mlp", "embed")
    assert specs["encoder"]["final_layer_norm"]["scale"] == PartitionSpec("norm")


def test_sharded_over_a_mesh_with_remat_matches(build_case):
    """fsdp × tensor placement by the logical axes, remat per block: same output as one device."""
    case = build_case("gated-gelu")
    pretrained = load_transformers(case.directory, remat="full")
    mesh = mesh_lib.make_mesh((1, 2, 4))  # the batch of 2 over data x fsdp; 4 heads over tensor
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pretrained.params)
    shardings = mesh_lib.fitted_shardings(pretrained.logical_specs(), abstract, mesh)
    assert shardings["encoder"]["block.1"]["layer.0"]["SelfAttention"]["q"]["kernel"].spec == \
        PartitionSpec("fsdp", "tensor")
    with mesh_lib.use_mesh(mesh):
        params = jax.device_put(pretrained.params, shardings)
        out = jax.jit(lambda p, ids: pretrained.module.apply({"params": p}, ids))(
            params, case.ids.numpy().astype(np.int32))
    err = max_rel_err(out, case.expected["no_mask"])
    print(f"t5 sharded (1,2,4) remat=full: max_rel_err={err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_sharded_half_precision_save_loads(build_case, tmp_path, torch_dtype):
    """transformers' sharded bf16/fp16 `save_pretrained` (index + shards) loads. Loaded into fp32 it equals the
    torch model with the same rounded weights run in fp32 (≤ 1e-5); bf16 compute vs torch's own bf16 forward
    differs by bf16 rounding only (≤ 2e-2)."""
    case = build_case("gated-gelu")
    half = copy.deepcopy(case.model).to(getattr(torch, torch_dtype))
    directory = tmp_path / torch_dtype
    half.save_pretrained(directory, max_shard_size="10KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    rounded = copy.deepcopy(half).float()
    with torch.no_grad():
        expected = rounded(input_ids=case.ids, attention_mask=case.mask).last_hidden_state
    actual = run_both(load_transformers(directory), case.ids, case.mask)["padding_mask"]  # compiled already
    err = max_rel_err(actual, to_numpy(expected))
    print(f"t5 sharded {torch_dtype} save, fp32 compute: max_rel_err={err:.2e}")
    assert err <= 1e-5
    if torch_dtype == "bfloat16":
        low = load_transformers(directory, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
        ids, mask = case.ids.numpy().astype(np.int32), case.mask.numpy().astype(np.int32)
        ours = max_rel_err(jax.jit(low.module.apply)({"params": low.params}, ids, mask), to_numpy(expected))
        with torch.no_grad():
            theirs = max_rel_err(to_numpy(half(input_ids=case.ids, attention_mask=case.mask).last_hidden_state),
                                 to_numpy(expected))
        print(f"t5 sharded bf16 save, bf16 compute vs fp32: max_rel_err={ours:.2e} (torch's bf16: {theirs:.2e})")
        assert ours <= max(2 * theirs, 1e-2)


def copy_model(case, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(case.directory, target)
    return target


@pytest.mark.parametrize("keep", ["alias_only", "both"])
def test_tied_embedding_under_either_name(build_case, tmp_path, keep):
    """Older transformers wrote the tied `encoder.embed_tokens.weight` (alone or beside `shared.weight`)."""
    case = build_case("gated-gelu")
    directory = copy_model(case, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    if keep == "alias_only":
        del tensors["shared.weight"]
    save_file(tensors, directory / "model.safetensors")
    loaded = load_transformers(directory)
    np.testing.assert_array_equal(loaded.params["shared"]["embedding"], case.pretrained.params["shared"]["embedding"])


def test_full_t5_checkpoint_loads_its_encoder(tmp_path):
    """A T5ForConditionalGeneration directory loads as transformers' T5EncoderModel does: decoder keys skipped."""
    model = randomize(transformers.T5ForConditionalGeneration(transformers.T5Config(**BASE,
                                                                                    feed_forward_proj="gated-gelu")), 3)
    model.save_pretrained(tmp_path / "full")
    ids, mask = padded(LENGTH)
    with torch.no_grad():
        expected = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    err = max_rel_err(run_both(load_transformers(tmp_path / "full"), ids, mask)["padding_mask"], to_numpy(expected))
    assert err <= 1e-5


def test_missing_shard_names_index_and_file(build_case, tmp_path):
    case = build_case("gated-gelu")
    case.model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["encoder.final_layer_norm.weight"]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(WeightsError, match=rf"model\.safetensors\.index\.json: names shard {re.escape(shard)}, "
                                           "which does not exist"):
        load_transformers(tmp_path / "sharded")


def test_missing_weights_file(build_case, tmp_path):
    directory = copy_model(build_case("gated-gelu"), tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no \*\.safetensors weights found"):
        load_transformers(directory)


def test_missing_key_names_file_and_key(build_case, tmp_path):
    directory = copy_model(build_case("gated-gelu"), tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model: missing key 'encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        load_transformers(directory)


@pytest.mark.parametrize("change,message", [
    (dict(feed_forward_proj="gated-swiglu"), r"feed_forward_proj='gated-swiglu': activation 'swiglu'"),
    (dict(relative_attention_num_buckets=2), r"relative_attention_num_buckets=2"),
    (dict(d_kv="64"), r"d_kv='64': expected int"),
])
def test_bad_config_names_the_field(build_case, tmp_path, change, message):
    directory = copy_model(build_case("gated-gelu"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(WeightsError, match=message):
        load_transformers(directory)
