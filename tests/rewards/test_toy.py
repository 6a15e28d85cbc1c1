"""brightness and channel_mean: closed forms, jit-able, exact gradients, and a built-in conflict."""

import jax
import numpy as np
import pytest

import alignax.rewards
from tests.rewards.references import directional_check, sample_images


def test_brightness_is_mean_rec709_luma():
    images = sample_images(7, 5, batch=3)
    expected = (images @ np.array([0.2126, 0.7152, 0.0722])).mean(axis=(1, 2))
    reward = alignax.rewards.get("brightness")
    scores, info = jax.jit(reward.apply)(reward.params, images, reward.prepare(["a", "b", "c"]))
    assert scores.shape == (3,) and info == {}
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_channel_mean(channel):
    images = sample_images(6, 4, batch=2)
    scores, _ = jax.jit(alignax.rewards.get("channel_mean", channel=channel).apply)({}, images, {})
    np.testing.assert_allclose(scores, images[..., channel].mean(axis=(1, 2)), rtol=1e-6)


def test_red_and_blue_conflict():
    """Their image gradients point in opposite directions on the other's channel: no image maximises both."""
    red, blue = (alignax.rewards.get("channel_mean", channel=c) for c in (0, 2))
    images = sample_images(4, 4)
    mix = lambda x: red(x)[0].sum() - blue(x)[0].sum()
    grad = np.asarray(jax.grad(mix)(images))
    assert (grad[..., 0] > 0).all() and (grad[..., 2] < 0).all() and (grad[..., 1] == 0).all()


@pytest.mark.parametrize("name, kwargs", [("brightness", {}), ("channel_mean", {"channel": 1})])
def test_gradient_matches_central_difference(name, kwargs):
    reward = alignax.rewards.get(name, **kwargs)
    grad, analytic, numeric = directional_check(reward, sample_images(8, 8), {}, eps=1e-2)
    assert np.isfinite(grad).all()
    # linear rewards: the difference is exact up to fp32 rounding of f (~1) divided by 2 eps, ~1e-5
    assert abs(analytic - numeric) <= 1e-5 + 1e-4 * abs(analytic)
