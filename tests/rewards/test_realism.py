"""`realism`: the per-image Mahalanobis judge and the set-level Fréchet distance, against independent
references (transformers' CLIP image features + numpy/scipy)."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch

import alignax.rewards as rewards
from alignax.errors import ConfigError, DataError
from alignax.rewards import realism
from tests.rewards.references import IMAGE_SIZE, clip_reference, sample_images


def _torch_features(clip, images: np.ndarray) -> np.ndarray:
    """Features of NHWC images in [0, 1] (uint8 images are scaled first)."""
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    pixels = np.stack([clip_reference(im, IMAGE_SIZE, eight_bit=False, crop_offset="floor") for im in images])
    with torch.no_grad():
        f = clip.get_image_features(pixel_values=torch.from_numpy(pixels.astype(np.float32))).pooler_output
    f = f.double().numpy()
    return f / np.linalg.norm(f, axis=-1, keepdims=True)


def _real(n: int, seed: int) -> np.ndarray:
    """'Real' images: a red blob on grey, jittered; uint8 NHWC."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    out = np.full((n, IMAGE_SIZE, IMAGE_SIZE, 3), 120, np.float64)
    for i in range(n):
        cy, cx = IMAGE_SIZE / 2 + rng.normal(0, 2, 2)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (IMAGE_SIZE / 4) ** 2
        out[i][blob] = (200 + rng.normal(0, 10), 40, 40)
    return np.clip(out + rng.normal(0, 4, out.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stats_file(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("realism") / "stats.npz"
    realism.fit_feature_stats(checkpoints["hf"], _real(48, seed=0), path, shrinkage=0.2)
    return path


def test_score_is_the_mahalanobis_distance_of_torch_features(checkpoints, references, stats_file):
    clip, _ = references
    real = _real(48, seed=0)
    f_real = _torch_features(clip, real)
    mean = f_real.mean(0)
    cov = np.cov(f_real, rowvar=False)
    cov = 0.8 * cov + 0.2 * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(mean))

    reward = rewards.get("realism", name="real", clip=str(checkpoints["hf"]), stats=str(stats_file))
    images = sample_images(IMAGE_SIZE, IMAGE_SIZE, batch=3, seed=5)
    scores, info = reward(jnp.asarray(images))
    delta = _torch_features(clip, images) - mean
    expected = -np.einsum("bi,ij,bj->b", delta, np.linalg.inv(cov), delta) / len(mean)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=2e-4)
    assert np.all(np.asarray(info["mahalanobis_per_dim"]) > 0)


def test_held_out_real_images_score_higher_than_other_images(checkpoints, stats_file):
    reward = rewards.get("realism", name="real", clip=str(checkpoints["hf"]), stats=str(stats_file))
    held_out, _ = reward(jnp.asarray(_real(16, seed=1), jnp.float32) / 255.0)
    other, _ = reward(jnp.asarray(sample_images(IMAGE_SIZE, IMAGE_SIZE, batch=16, seed=2)))
    assert float(jnp.mean(held_out)) > float(jnp.mean(other))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = realism.gaussian_stats(rng.normal(size=(40, 5)))
    b = realism.gaussian_stats(rng.normal(0.5, 2.0, size=(40, 5)))
    sa, sb = a["covariance"].astype(np.float64), b["covariance"].astype(np.float64)
    diff = a["mean"].astype(np.float64) - b["mean"]
    expected = diff @ diff + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert realism.frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)
    assert realism.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)


def test_bad_stats_are_named(checkpoints, tmp_path):
    broken = tmp_path / "broken.npz"
    np.savez(broken, mean=np.zeros(3))
    with pytest.raises(DataError, match="broken.npz.*precision"):
        rewards.get("realism", name="real", clip=str(checkpoints["hf"]), stats=str(broken))
    wrong_dim = tmp_path / "wrong.npz"
    np.savez(wrong_dim, mean=np.zeros(3), precision=np.eye(3))
    with pytest.raises(DataError, match="wrong.npz.*3"):
        rewards.get("realism", name="real", clip=str(checkpoints["hf"]), stats=str(wrong_dim))
    with pytest.raises(ConfigError, match="stats="):
        rewards.get("realism", name="real", clip=str(checkpoints["hf"]))
