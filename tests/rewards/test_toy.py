"""brightness, channel_mean and channel_share: closed forms, jit-able, exact gradients, a real conflict."""

import jax
import numpy as np
import pytest

import alignax.rewards
from alignax.errors import ConfigError
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


def test_red_and_blue_means_pull_apart_on_each_others_channel():
    """The red-minus-blue gradient raises red and lowers blue (though white maximises both means)."""
    red, blue = (alignax.rewards.get("channel_mean", channel=c) for c in (0, 2))
    images = sample_images(4, 4)
    mix = lambda x: red(x)[0].sum() - blue(x)[0].sum()
    grad = np.asarray(jax.grad(mix)(images))
    assert (grad[..., 0] > 0).all() and (grad[..., 2] < 0).all() and (grad[..., 1] == 0).all()


@pytest.mark.parametrize("name, kwargs", [("brightness", {}), ("channel_mean", {"channel": 1}),
                                          ("channel_share", {"channel": 2})])
def test_gradient_matches_central_difference(name, kwargs):
    reward = alignax.rewards.get(name, **kwargs)
    grad, analytic, numeric = directional_check(reward, sample_images(8, 8), {}, eps=1e-2)
    assert np.isfinite(grad).all()
    # linear rewards: the difference is exact up to fp32 rounding of f (~1) divided by 2 eps, ~1e-5
    assert abs(analytic - numeric) <= 1e-5 + 1e-4 * abs(analytic)


def test_channel_share_closed_form():
    images = sample_images(6, 4, batch=2)
    scores, _ = jax.jit(alignax.rewards.get("channel_share", channel=0, eps=0.01).apply)({}, images, {})
    x = np.asarray(images, np.float64)
    np.testing.assert_allclose(scores, (x[..., 0] / (x.sum(-1) + 0.01)).mean(axis=(1, 2)), rtol=1e-5)


def test_red_and_blue_shares_truly_conflict():
    """Shares sum to < 1, so no image maximises both: pure red scores ~1 on red and 0 on blue, and
    on random images red + blue < 1."""
    red, blue = (alignax.rewards.get("channel_share", channel=c) for c in (0, 2))
    pure_red = np.zeros((1, 4, 4, 3), np.float32)
    pure_red[..., 0] = 1.0
    assert float(red(pure_red)[0][0]) > 0.99 and float(blue(pure_red)[0][0]) == 0.0
    images = sample_images(8, 8, batch=4)
    assert (np.asarray(red(images)[0]) + np.asarray(blue(images)[0]) < 1.0).all()
    white = np.ones((1, 4, 4, 3), np.float32)
    assert float(red(white)[0][0]) < 0.34 and float(blue(white)[0][0]) < 0.34  # white no longer wins both


def test_channel_share_refuses_bad_settings():
    with pytest.raises(ConfigError, match="channel=3"):
        alignax.rewards.get("channel_share", channel=3)
    with pytest.raises(ConfigError, match="eps=0"):
        alignax.rewards.get("channel_share", eps=0)
