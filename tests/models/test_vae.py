"""AutoencoderKL parity with diffusers (fp32, max relative error <= 1e-5) and diffusers round trips."""

import functools
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alignax.errors import WeightsError
from alignax.models import load_diffusers, save_diffusers
from alignax.models.vae import VAEConfig
from tests.parity import max_rel_err, to_numpy

TOL = 1e-5
BLOCKS = dict(norm_num_groups=4, in_channels=3, out_channels=3)
CONFIGS = {
    # SD3 layout: 16 latent channels, no quant convs, scaling and shift; 32x24 images.
    "sd3": dict(BLOCKS, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, latent_channels=16,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
                image_size=(32, 24)),
    # SD1/SDXL quant_conv and post_quant_conv with 4 latent channels; also no mid-block attention and a
    # non-SiLU resnet activation (diffusers keeps the output head SiLU), 16x8 images.
    "quant_convs_no_attention_mish": dict(
        BLOCKS, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, use_quant_conv=True,
        use_post_quant_conv=True, mid_block_add_attention=False, act_fn="mish", image_size=(16, 8)),
}


def _randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraws every param from a seeded generator, norm scales and biases included, so a wrong
    transpose, pad side or missing bias cannot hide behind default inits (ones, zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / np.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def _reference(name: str) -> tuple[diffusers.AutoencoderKL, dict]:
    config = dict(CONFIGS[name])
    image_size = config.pop("image_size")
    return _randomize_(diffusers.AutoencoderKL(**config), seed=len(name)), dict(image_size=image_size)


def _public(config) -> dict:
    """A diffusers config without its `_` metadata, tuples and lists alike (as JSON stores them)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def _images(model, image_size, batch=2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, model.config.in_channels, *image_size)).astype(np.float32)


def _latents(model, image_size, batch=2, seed=1) -> np.ndarray:
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    shape = (batch, model.config.latent_channels, image_size[0] // factor, image_size[1] // factor)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(torch reference, alignax model loaded from its diffusers directory, image size)."""
    ref, extra = _reference(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_diffusers(path), extra["image_size"]


@pytest.fixture(scope="module")
def sd3_pair(tmp_path_factory):
    """The SD3 pair again, with the other attention kernel, so that both kernels meet diffusers."""
    ref, extra = _reference("sd3")
    path = tmp_path_factory.mktemp("sd3_einsum")
    ref.save_pretrained(path)
    return ref, load_diffusers(path, attention="einsum"), extra["image_size"]


def test_encode_matches_diffusers_mean(pair):
    ref, model, size = pair
    x = _images(ref, size)
    with torch.no_grad():
        expected = ref.encode(torch.from_numpy(x)).latent_dist.mean
    err = max_rel_err(model.encode(jnp.asarray(x)), to_numpy(expected))
    print(f"encode max_rel_err={err:.2e}")
    assert err <= TOL


def test_decode_matches_diffusers(pair):
    ref, model, size = pair
    z = _latents(ref, size)
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(z)).sample
    err = max_rel_err(model.decode(jnp.asarray(z)), to_numpy(expected))
    print(f"decode max_rel_err={err:.2e}")
    assert err <= TOL


def test_latent_dist_and_reconstruction_match_diffusers(sd3_pair):
    ref, model, size = sd3_pair
    x = _images(ref, size, seed=2)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(x)).latent_dist
        reconstruction = ref(torch.from_numpy(x)).sample
    mean, logvar = model.latent_dist(jnp.asarray(x))
    errs = (max_rel_err(mean, to_numpy(posterior.mean)), max_rel_err(logvar, to_numpy(posterior.logvar)),
            max_rel_err(model(jnp.asarray(x)), to_numpy(reconstruction)))
    print("mean, logvar, reconstruction max_rel_err=" + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= TOL


def test_config_exposes_scaling_and_shift(sd3_pair):
    _, model, _ = sd3_pair
    assert (model.module.config.scaling_factor, model.module.config.shift_factor) == (1.5305, 0.0609)
    assert model.module.config.downsample_factor == 2


def test_save_diffusers_round_trip_is_identical(sd3_pair, tmp_path):
    ref, model, size = sd3_pair
    save_diffusers(model, tmp_path / "out")
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    x, z = torch.from_numpy(_images(ref, size)), torch.from_numpy(_latents(ref, size))
    with torch.no_grad():
        assert torch.equal(reloaded.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean)
        assert torch.equal(reloaded.decode(z).sample, ref.decode(z).sample)
    assert _public(reloaded.config) == _public(ref.config)


def test_sharded_save_writes_index_and_reloads(sd3_pair, tmp_path):
    ref, model, size = sd3_pair
    out = save_diffusers(model, tmp_path / "sharded", max_shard_size=20000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_diffusers(out)
    jax.tree.map(np.testing.assert_array_equal, reloaded.params, model.params)
    torch_reloaded = diffusers.AutoencoderKL.from_pretrained(out).eval()
    z = torch.from_numpy(_latents(ref, size))
    with torch.no_grad():
        assert torch.equal(torch_reloaded.decode(z).sample, ref.decode(z).sample)


def test_remat_wraps_blocks_without_renaming_params(sd3_pair):
    """Traced, not run: remat cannot change values, only whether blocks are recomputed. Tracing
    with the loaded params also proves the remat-wrapped blocks keep their param names."""
    ref, model, size = sd3_pair
    z = jnp.asarray(_latents(ref, size, batch=1))

    def primitives(module):
        jaxpr = jax.make_jaxpr(functools.partial(module.apply, method="decode"))({"params": model.params}, z)
        return {eqn.primitive.name for eqn in jaxpr.eqns}

    remat_primitives = {"checkpoint", "remat", "remat2"}  # jax.checkpoint's primitive, named per JAX version
    assert primitives(model.module.clone(remat="full")) & remat_primitives
    assert not primitives(model.module) & remat_primitives


def test_logical_axis_names_on_params(sd3_pair):
    specs = sd3_pair[1].logical_specs()
    assert tuple(specs["encoder"]["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    attention = specs["decoder"]["mid_block"]["attentions.0"]
    assert tuple(attention["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(attention["to_out.0"]["kernel"]) == ("heads", "embed")
    assert tuple(attention["group_norm"]["scale"]) == ("norm",)


def test_compute_dtype_option_reaches_the_module(sd3_pair, tmp_path):
    ref, model, size = sd3_pair
    save_diffusers(model, tmp_path / "m")
    bf16 = load_diffusers(tmp_path / "m", compute_dtype=jnp.bfloat16)
    z = jnp.asarray(_latents(ref, size, batch=1))
    out = jax.eval_shape(functools.partial(bf16.module.apply, method="decode"), {"params": bf16.params}, z)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 3, *size)
    assert jax.tree.leaves(bf16.params)[0].dtype == jnp.float32  # params stay fp32 masters


def test_config_from_dict_keeps_architecture_fields_only():
    config = VAEConfig.from_dict({"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
                                  "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                  "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4,
                                  "force_upcast": True, "latents_mean": None, "some_future_key": 1})
    assert config.block_out_channels == (8, 16) and hash(config)
    assert not hasattr(config, "force_upcast") and not hasattr(config, "some_future_key")


@pytest.mark.parametrize("change,message", [
    (dict(down_block_types=["AttnDownEncoderBlock2D"]), "AttnDownEncoderBlock2D"),
    (dict(up_block_types=["AttnUpDecoderBlock2D"]), "AttnUpDecoderBlock2D"),
    (dict(act_fn="tanh"), "tanh"),
    (dict(block_out_channels=[64, 128]), "same non-zero length"),
    (dict(norm_num_groups=5), "norm_num_groups=5"),
])
def test_config_refuses_unsupported_values(change, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict({"block_out_channels": [64], **change})


def test_load_names_the_file_for_an_unsupported_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "act_fn": "tanh"}))
    with pytest.raises(WeightsError, match="config.json.*tanh"):
        load_diffusers(tmp_path)
