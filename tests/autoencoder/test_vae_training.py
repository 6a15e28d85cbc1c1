"""alignax.autoencoder: the VAE objective against torch, a tiny run that learns, its diffusers export
(loads in diffusers and decodes as the Flax model does, latent factors measured through diffusers) and
exact resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from alignax.autoencoder import loss as vae_loss
from alignax.autoencoder import train as vae_train
from alignax.errors import ConfigError
from tests.training.conftest import tiny_world  # noqa: F401  (session fixture)


def config(dataset: str, **overrides) -> ml_collections.ConfigDict:
    c = vae_train.default_config()
    c.total_steps, c.batch_size, c.eval_batch_size, c.eval_every, c.log_every = 24, 8, 8, 0, 4
    c.checkpoint_every, c.stats_images, c.crop_size = 0, 16, 16
    c.model.init.update(block_out_channels=(8, 8), norm_num_groups=4, sample_size=32)
    c.data.path = dataset
    c.optim.learning_rate = 3e-3
    for key, value in overrides.items():
        c[key] = value
    return c


def test_kl_and_reconstruction_terms_match_torch():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 4, 4, 3)), rng.normal(0, 0.5, size=(2, 4, 4, 3))
    posterior = torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar)))
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).mean().item()
    assert float(vae_loss.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))) == pytest.approx(expected, rel=1e-5)
    x, y = rng.uniform(-1, 1, (2, 5, 6, 3)), rng.uniform(-1, 1, (2, 5, 6, 3))
    terms = vae_loss.reconstruction_terms(jnp.asarray(x), jnp.asarray(y))
    tx, ty = torch.tensor(x), torch.tensor(y)
    assert float(terms["l1"]) == pytest.approx(torch.nn.functional.l1_loss(ty, tx).item(), rel=1e-5)
    assert float(terms["l2"]) == pytest.approx(torch.nn.functional.mse_loss(ty, tx).item(), rel=1e-5)
    edge = 0.5 * (torch.nn.functional.l1_loss(torch.diff(ty, dim=1), torch.diff(tx, dim=1))
                  + torch.nn.functional.l1_loss(torch.diff(ty, dim=2), torch.diff(tx, dim=2)))
    assert float(terms["edge"]) == pytest.approx(edge.item(), rel=1e-5)


def test_a_tiny_run_learns_and_diffusers_loads_what_it_saves(tiny_world, tmp_path):  # noqa: F811
    from diffusers import AutoencoderKL

    from alignax.data import open_dataset
    result = vae_train.run(config(f"{tiny_world}/captioned_images"), tmp_path / "run")
    assert result.evals[-1].psnr > result.evals[0].psnr + 1.0, [e.psnr for e in result.evals]

    reference = AutoencoderKL.from_pretrained(result.output_dir).eval()
    assert reference.config.shift_factor == pytest.approx(result.shift_factor)
    assert reference.config.scaling_factor == pytest.approx(result.scaling_factor)
    source = open_dataset(f"{tiny_world}/captioned_images", "train")
    images = np.stack([source[i]["image"] for i in range(16)]).astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():  # the factors, measured independently through diffusers' encoder
        means = reference.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean.double().numpy()
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        decoded = reference.decode(z).sample.numpy()
    assert result.shift_factor == pytest.approx(means.mean(), rel=1e-4)
    assert result.scaling_factor == pytest.approx(1.0 / means.std(), rel=1e-4)

    model = vae_train.build_vae(ml_collections.ConfigDict(dict(pretrained=str(result.output_dir),
                                                               compute_dtype="float32", init={})), 0)
    ours = np.asarray(model.module.apply({"params": model.params}, jnp.asarray(z.numpy()), method="decode"))
    np.testing.assert_allclose(ours, decoded, rtol=1e-5, atol=2e-5)


@pytest.mark.slow  # three short runs; the SmallLoop resume machinery is covered in tests/training as well
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_world, tmp_path):  # noqa: F811
    dataset = f"{tiny_world}/captioned_images"
    straight = vae_train.run(config(dataset, total_steps=6, checkpoint_every=3), tmp_path / "straight")

    def kill(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vae_train.run(config(dataset, total_steps=6, checkpoint_every=3), tmp_path / "killed", on_step=kill)
    resumed = vae_train.run(config(dataset, total_steps=6, checkpoint_every=3), tmp_path / "killed")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params), jax.device_get(resumed.params))


def test_bad_config_is_named_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="config.loss.kl_wieght"):
        bad = config("/nowhere")
        bad.loss.kl_wieght = 1.0
        vae_train.validate(bad, 1)
    with pytest.raises(ConfigError, match="config.data.path is empty"):
        vae_train.validate(config(""), 1)
    with pytest.raises(ConfigError, match="crop_size"):
        vae_train.validate(config("/x", crop_size=-1), 1)
