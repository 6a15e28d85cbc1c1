"""LoRA: targets, init, merge against a hand-written LoRA Dense, sharding specs, and diffusers/PEFT export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from safetensors import safe_open

from alignax.errors import ConfigError
from alignax.models import abstract_params, load_diffusers, mmdit, save_diffusers
from alignax.models.layers import Linear
from alignax.training import lora
from tests import reference_models as ref
from tests.parity import max_rel_err

CALL_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _run(model, params, inputs):
    return np.asarray(model.module.apply({"params": params}, *(jnp.asarray(inputs[k]) for k in CALL_ARGS)))


def _perturbed(lora_params, seed, scale=0.1):
    """Non-zero A and B: a LoRA that changes the forward (by ~15% here), as after training.

    Much larger weights push the tiny random model itself (no LoRA involved) past 1e-5 parity
    with diffusers: at scale 0.3 our forward and diffusers' differ by 3.5e-5 on identical merged weights."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale, x.dtype), lora_params)


def _flat(tree):
    return {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD3 transformer saved by diffusers and loaded through our public loader."""
    path = tmp_path_factory.mktemp("sd3_lora_base")
    ref.sd3_transformer(seed=5, **ref.SD3_TINY).save_pretrained(path)
    return path, load_diffusers(path)


@pytest.fixture(scope="module")
def inputs():
    return ref.transformer_inputs(ref.SD3_TINY, height=8, width=8)


def test_default_targets_are_the_joint_attention_projections(sd3):
    _, model = sd3
    spec = lora.LoraSpec(rank=3, alpha=6.0)
    params = lora.init_lora(model.params, spec, jax.random.key(0))
    last = ref.SD3_TINY["num_layers"] - 1  # the context_pre_only block has no to_add_out
    expected = {f"transformer_blocks.{i}/attn/{name}" for i in range(last + 1) for name in ATTN
                if not (i == last and name == "to_add_out")}
    flat = _flat(params)
    assert {k.rsplit("/", 1)[0] for k in flat} == expected
    dim = ref.SD3_TINY["num_attention_heads"] * ref.SD3_TINY["attention_head_dim"]
    for name, value in flat.items():
        assert value.shape == ((dim, 3) if name.endswith("lora_A") else (3, dim)), name
        if name.endswith("lora_B"):
            assert np.all(np.asarray(value) == 0)
        else:  # PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not degenerate
            a = np.asarray(value)
            assert np.abs(a).max() <= 1 / np.sqrt(dim) and a.std() > 0.2 / np.sqrt(dim)
    a0 = flat["transformer_blocks.0/attn/to_q/lora_A"]
    assert not np.array_equal(np.asarray(a0), np.asarray(flat["transformer_blocks.0/attn/to_k/lora_A"]))


def test_init_leaves_the_forward_unchanged(sd3, inputs):
    _, model = sd3
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    merged = lora.merge(model.params, lora.init_lora(model.params, spec, jax.random.key(1)), spec)
    assert max_rel_err(_run(model, merged, inputs), _run(model, model.params, inputs)) == 0.0


def test_merged_dense_equals_base_plus_scaled_x_a_b(sd3):
    _, model = sd3
    spec = lora.LoraSpec(rank=2, alpha=5.0, targets=(r"transformer_blocks\.1/attn/to_v$",))
    adapters = _perturbed(lora.init_lora(model.params, spec, jax.random.key(2)), seed=3)
    before = jax.tree.map(np.array, model.params)  # copies
    merged = lora.merge(model.params, adapters, spec)

    base = model.params["transformer_blocks.1"]["attn"]["to_v"]
    ad = adapters["transformer_blocks.1"]["attn"]["to_v"]
    x = np.random.default_rng(4).standard_normal((5, base["kernel"].shape[0])).astype(np.float32)
    layer = Linear(base["kernel"].shape[1])
    ours = np.asarray(layer.apply({"params": merged["transformer_blocks.1"]["attn"]["to_v"]}, jnp.asarray(x)))
    x64 = x.astype(np.float64)
    w, b, a, bb = (np.asarray(t, np.float64) for t in (base["kernel"], base["bias"], ad["lora_A"], ad["lora_B"]))
    by_hand = x64 @ w + b + (5.0 / 2) * (x64 @ a) @ bb
    assert max_rel_err(ours, by_hand) <= 1e-5 and max_rel_err(x64 @ w + b, by_hand) > 1e-2

    # The base tree is untouched; only the targeted kernel differs in the merged tree.
    for name, value in _flat(model.params).items():
        np.testing.assert_array_equal(np.asarray(value), _flat(before)[name])
        same = np.array_equal(np.asarray(value), np.asarray(_flat(merged)[name]))
        assert same == (name != "transformer_blocks.1/attn/to_v/kernel"), name


def test_targets_that_match_nothing_raise(sd3):
    _, model = sd3
    with pytest.raises(ConfigError, match=r"lora\.targets\[1\]='no_such_proj'"):
        lora.init_lora(model.params, lora.LoraSpec(2, 2.0, targets=("to_q$", "no_such_proj")), jax.random.key(0))
    # The patch-embedding conv has a 4-D kernel: not a Dense module, so not a LoRA target.
    with pytest.raises(ConfigError, match="pos_embed/proj"):
        lora.init_lora(model.params, lora.LoraSpec(2, 2.0, targets=("^pos_embed/proj$",)), jax.random.key(0))
    with pytest.raises(ConfigError, match="rank"):
        lora.LoraSpec(rank=0, alpha=1.0)


def test_from_config_defaults_targets():
    spec = lora.LoraSpec.from_config({"enabled": True, "rank": 4, "alpha": 8, "targets": ()})
    assert spec.targets == lora.DEFAULT_TARGETS and spec.scale == 2.0


def test_logical_specs_follow_the_adapted_kernel():
    module = mmdit.build(ref.SD3_TINY)
    shapes, specs = abstract_params(mmdit.ARCHITECTURE, module)
    spec = lora.LoraSpec(rank=2, alpha=2.0)
    lora_shapes = jax.eval_shape(lambda: lora.init_lora(shapes, spec, jax.random.key(0)))
    lora_specs = lora.lora_logical_specs(lora_shapes, specs)
    attn = lora_specs["transformer_blocks.0"]["attn"]
    assert specs["transformer_blocks.0"]["attn"]["to_q"]["kernel"] == PartitionSpec("embed", "heads")
    assert attn["to_q"] == {"lora_A": PartitionSpec("embed", None), "lora_B": PartitionSpec(None, "heads")}
    assert attn["to_out.0"] == {"lora_A": PartitionSpec("heads", None), "lora_B": PartitionSpec(None, "embed")}
    assert jax.tree.structure(lora_specs) == jax.tree.structure(lora_shapes)


def test_gradient_reaches_lora_params_through_merge(sd3, inputs):
    _, model = sd3
    spec = lora.LoraSpec(rank=2, alpha=2.0)
    adapters = _perturbed(lora.init_lora(model.params, spec, jax.random.key(0)), seed=9)
    args = [jnp.asarray(inputs[k]) for k in CALL_ARGS]
    grads = jax.grad(lambda a: jnp.mean(model.module.apply({"params": lora.merge(model.params, a, spec)},
                                                           *args) ** 2))(adapters)
    # Every adapter gets a gradient except the last block's context queries: that block is
    # context_pre_only, so its context-stream output (the only thing add_q_proj feeds) is dropped.
    last = f"transformer_blocks.{ref.SD3_TINY['num_layers'] - 1}/attn/add_q_proj"
    zero = {name for name, g in _flat(grads).items() if not np.any(np.asarray(g) != 0)}
    assert zero == {f"{last}/lora_A", f"{last}/lora_B"}


# --- export --------------------------------------------------------------------------------------


def test_state_dict_uses_peft_names_and_torch_layouts(sd3):
    _, model = sd3
    spec = lora.LoraSpec(rank=3, alpha=1.5)
    adapters = _perturbed(lora.init_lora(model.params, spec, jax.random.key(0)), seed=1)
    state = lora.to_diffusers_state_dict(adapters, spec)
    a = adapters["transformer_blocks.0"]["attn"]["to_out.0"]
    np.testing.assert_array_equal(state["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"],
                                  np.asarray(a["lora_A"]).T)
    np.testing.assert_array_equal(state["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"],
                                  np.asarray(a["lora_B"]).T)
    assert len(state) == 2 * len(lora._lora_modules(adapters))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)


def test_saved_lora_loads_into_diffusers_with_its_alpha(sd3, inputs, tmp_path):
    from diffusers import SD3Transformer2DModel

    path, model = sd3
    spec = lora.LoraSpec(rank=2, alpha=7.0)  # alpha != rank: a lost alpha would show
    adapters = _perturbed(lora.init_lora(model.params, spec, jax.random.key(3)), seed=4)
    out = lora.save_lora(tmp_path / "lora", adapters, spec)
    assert sorted(p.name for p in out.iterdir()) == [lora.LORA_WEIGHT_NAME]  # no temp files left behind
    with safe_open(str(out / lora.LORA_WEIGHT_NAME), framework="numpy") as f:
        header = json.loads(f.metadata()[lora.METADATA_KEY])
    assert header["transformer.r"] == 2 and header["transformer.lora_alpha"] == 7.0

    ours = _run(model, lora.merge(model.params, adapters, spec), inputs)
    base = _run(model, model.params, inputs)

    torch_model = SD3Transformer2DModel.from_pretrained(path).eval()
    # load_lora_adapter looks for a .bin unless told to use safetensors (diffusers 0.42).
    torch_model.load_lora_adapter(str(out), prefix="transformer", adapter_name="alignax", use_safetensors=True)
    theirs = ref.run_torch_transformer(torch_model, inputs)
    assert max_rel_err(ours, theirs) <= 1e-5
    assert max_rel_err(base, theirs) > 1e-2  # the adapter matters, so the comparison can fail

    # Same check inside torch alone: PEFT's unfused x·W + s·B(A(x)) against torch on our merged kernels.
    merged_dir = save_diffusers(model.replace(params=lora.merge(model.params, adapters, spec)), tmp_path / "merged")
    merged_torch = ref.run_torch_transformer(SD3Transformer2DModel.from_pretrained(merged_dir).eval(), inputs)
    assert max_rel_err(theirs, merged_torch) <= 1e-5


def test_saved_lora_loads_through_the_sd3_pipeline(sd3, inputs, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path, model = sd3
    spec = lora.LoraSpec(rank=3, alpha=1.0)
    adapters = _perturbed(lora.init_lora(model.params, spec, jax.random.key(5)), seed=6)
    out = lora.save_lora(tmp_path / "lora", adapters, spec)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(path).eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.load_lora_weights(str(out))
    theirs = ref.run_torch_transformer(pipe.transformer, inputs)
    assert max_rel_err(_run(model, lora.merge(model.params, adapters, spec), inputs), theirs) <= 1e-5


def test_merged_export_loads_in_diffusers(sd3, inputs, tmp_path):
    from diffusers import SD3Transformer2DModel

    _, model = sd3
    spec = lora.LoraSpec(rank=2, alpha=4.0)
    adapters = _perturbed(lora.init_lora(model.params, spec, jax.random.key(7)), seed=8)
    merged = model.replace(params=lora.merge(model.params, adapters, spec))
    reloaded = SD3Transformer2DModel.from_pretrained(save_diffusers(merged, tmp_path / "merged")).eval()
    theirs = ref.run_torch_transformer(reloaded, inputs)
    assert max_rel_err(_run(merged, merged.params, inputs), theirs) <= 1e-5
    assert max_rel_err(_run(model, model.params, inputs), theirs) > 1e-2
