"""Sampler parity with diffusers' scheduler and pipeline loop, and gradients through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from alignax.models import load_diffusers
from alignax.sampling import flow_match_sigmas, sample
from tests import reference_models as ref
from tests.parity import max_rel_err


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (10, 3.0), (28, 3.0), (7, 1.5)])
def test_schedule_equals_diffusers(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    timesteps, sigmas = flow_match_sigmas(num_steps, shift)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampler_model")
    model = ref.sd3_transformer(seed=3, **ref.SD3_TINY)
    model.save_pretrained(path)
    return model, load_diffusers(path)


def _diffusers_loop(model, noise, context, pooled, neg_context, neg_pooled, num_steps, shift, guidance):
    """The SD3 pipeline's denoising loop, with its CFG convention (uncond first)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    latents = torch.from_numpy(noise)
    embeds = torch.cat([torch.from_numpy(neg_context), torch.from_numpy(context)])
    pooled_all = torch.cat([torch.from_numpy(neg_pooled), torch.from_numpy(pooled)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent_in = torch.cat([latents] * 2)
            v = model(hidden_states=latent_in, timestep=t.expand(latent_in.shape[0]),
                      encoder_hidden_states=embeds, pooled_projections=pooled_all).sample
            v_uncond, v_text = v.chunk(2)
            latents = scheduler.step(v_uncond + guidance * (v_text - v_uncond), t, latents).prev_sample
    return latents.numpy()


def test_ten_step_cfg_sample_equals_diffusers_loop(tiny):
    torch_model, model = tiny
    a = ref.transformer_inputs(ref.SD3_TINY, seed=1)
    b = ref.transformer_inputs(ref.SD3_TINY, seed=2)
    args = (a["hidden_states"], a["encoder_hidden_states"], a["pooled_projections"],
            b["encoder_hidden_states"], b["pooled_projections"])
    expected = _diffusers_loop(torch_model, *args, num_steps=10, shift=3.0, guidance=4.5)
    ours = jax.jit(lambda *xs: sample(model, xs[0], xs[1], xs[2], num_steps=10, shift=3.0, guidance_scale=4.5,
                                      negative_encoder_hidden_states=xs[3], negative_pooled_projections=xs[4]))(
        *map(jnp.asarray, args))
    err = max_rel_err(ours, expected)
    assert err <= 1e-5, err


def test_gradient_through_sampler_matches_finite_difference(tiny):
    _, model = tiny
    inputs = ref.transformer_inputs(ref.SD3_TINY, batch=1, seed=4)
    noise, context, pooled = (jnp.asarray(inputs[k]) for k in
                              ("hidden_states", "encoder_hidden_states", "pooled_projections"))

    def loss(params):
        latents = sample(model.replace(params=params), noise, context, pooled, num_steps=3, shift=3.0, remat="full")
        return jnp.mean(latents ** 2)

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(model.params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0

    keys = jax.random.split(jax.random.key(0), len(leaves))
    direction = jax.tree.unflatten(jax.tree.structure(grads),
                                   [jax.random.normal(k, g.shape) for k, g in zip(keys, leaves, strict=False)])
    # The sin-cos position table is a fixed buffer (stop_gradient), so it is not a direction to probe.
    direction["pos_embed"]["pos_embed"] = jnp.zeros_like(direction["pos_embed"]["pos_embed"])
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(leaves, jax.tree.leaves(direction), strict=False))
    eps = 1e-4  # three Euler steps of a random net are strongly curved; 1e-3 leaves O(eps^2) error of ~4%
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, model.params, direction)
    numeric = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
    assert abs(analytic - numeric) <= 5e-3 * abs(numeric), (analytic, numeric)
