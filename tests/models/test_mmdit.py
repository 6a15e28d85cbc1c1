"""MM-DiT parity with diffusers' SD3Transformer2DModel (fp32, max relative error <= 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.models import load_diffusers
from alignax.models.mmdit import MMDiTConfig
from tests import reference_models as ref
from tests.parity import max_rel_err

TOL = 1e-5


def _load(tmp_path_factory, name, config, **runtime):
    path = tmp_path_factory.mktemp(name)
    model = ref.sd3_transformer(seed=len(name), **config)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _load(tmp_path_factory, "sd3", ref.SD3_TINY)


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    return _load(tmp_path_factory, "sd35", ref.SD35_TINY)


def _alignax(model, inputs):
    return np.asarray(model(*(jnp.asarray(inputs[k]) for k in
                              ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"))))


@pytest.mark.parametrize("height,width", [(8, 8), (6, 12), (16, 4)])
def test_sd3_parity(sd3, height, width):
    torch_model, path = sd3
    inputs = ref.transformer_inputs(ref.SD3_TINY, height=height, width=width)
    err = max_rel_err(_alignax(load_diffusers(path), inputs), ref.run_torch_transformer(torch_model, inputs))
    assert err <= TOL, err


@pytest.mark.parametrize("attention", ["xla", "einsum", "splash"])
def test_sd35_dual_attention_rms_qk_norm_parity(sd35, attention):
    torch_model, path = sd35
    inputs = ref.transformer_inputs(ref.SD35_TINY, height=10, width=6, batch=3)
    out = _alignax(load_diffusers(path, attention=attention), inputs)
    assert max_rel_err(out, ref.run_torch_transformer(torch_model, inputs)) <= TOL


def test_layer_norm_qk_norm_parity(tmp_path):
    config = dict(ref.SD3_TINY, qk_norm="layer_norm", dual_attention_layers=(1,))
    torch_model = ref.sd3_transformer(seed=7, **config)
    torch_model.save_pretrained(tmp_path)
    inputs = ref.transformer_inputs(config)
    expected = ref.run_torch_transformer(torch_model, inputs)
    assert max_rel_err(_alignax(load_diffusers(tmp_path), inputs), expected) <= TOL


def test_each_sample_uses_its_own_timestep(sd3):
    """A batch with different timesteps equals each sample run alone."""
    torch_model, path = sd3
    model = load_diffusers(path)
    inputs = ref.transformer_inputs(ref.SD3_TINY, batch=3)
    inputs["timestep"] = np.array([0.0, 500.0, 999.0], np.float32)
    batched = _alignax(model, inputs)
    assert max_rel_err(batched, ref.run_torch_transformer(torch_model, inputs)) <= TOL
    for i in range(3):
        alone = _alignax(model, {k: v[i:i + 1] for k, v in inputs.items()})
        np.testing.assert_allclose(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0], batched[2])


@pytest.mark.parametrize("runtime", [dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")])
def test_scan_and_remat_do_not_change_outputs(sd35, runtime):
    torch_model, path = sd35
    inputs = ref.transformer_inputs(ref.SD35_TINY)
    expected = ref.run_torch_transformer(torch_model, inputs)
    model = load_diffusers(path, **runtime)
    assert max_rel_err(_alignax(model, inputs), expected) <= TOL
    # ... and they really are in the program, not silently skipped.
    args = [jnp.asarray(inputs[k]) for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                             "pooled_projections")]
    primitives = _primitives(jax.make_jaxpr(lambda p, *a: model.replace(params=p)(*a))(model.params, *args).jaxpr)
    assert ("scan" in primitives) == bool(runtime.get("scan_layers"))
    assert ("remat2" in primitives or "checkpoint" in primitives) == bool(runtime.get("remat"))


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                names |= _primitives(inner)
    return names


def test_pos_embed_matches_diffusers_buffer(sd3):
    """Random init computes the same fixed sin-cos table diffusers registers as a buffer."""
    from alignax.models.mmdit import sincos_pos_embed
    torch_model, _ = sd3
    from diffusers import SD3Transformer2DModel
    fresh = SD3Transformer2DModel(**ref.SD3_TINY)
    cfg = MMDiTConfig.from_dict(ref.SD3_TINY)
    table = sincos_pos_embed(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
    assert max_rel_err(table, fresh.pos_embed.pos_embed.numpy()) <= 1e-6


def test_latent_larger_than_pos_embed_is_refused(sd3):
    _, path = sd3
    inputs = ref.transformer_inputs(ref.SD3_TINY, height=18, width=8)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        _alignax(load_diffusers(path), inputs)
