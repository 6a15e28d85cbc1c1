"""Face alignment against OpenCV: the similarity estimate and the bilinear warp, and the warp's gradient."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.rewards import face_align


def _numpy_umeyama(src, dst):
    """Umeyama (1991) with the SVD and the reflection correction, written independently of face_align."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, yd = src - mu_s, dst - mu_d
    cov = yd.T @ xs / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / xs.var(0).sum()
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], 1)


def test_umeyama_matches_cv2_and_svd_on_noisy_points():
    rng = np.random.default_rng(0)
    template = face_align.ARCFACE_TEMPLATE_112.astype(np.float64)
    srcs, expected_cv2, expected_svd = [], [], []
    for _ in range(6):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(1.5, 4.0)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        # landmarks in a generated image: template pushed through an inverse similarity, plus noise
        src = (template - template.mean(0)) @ rot.T + rng.uniform(100, 400, 2)
        src = src + rng.normal(0, 3.0, src.shape)
        m_cv2, inliers = cv2.estimateAffinePartial2D(src, template, method=cv2.LMEDS, refineIters=100)
        srcs.append(src)
        expected_cv2.append(m_cv2)
        expected_svd.append(_numpy_umeyama(src, template))
    got = np.asarray(face_align.umeyama(np.stack(srcs).astype(np.float32), template))
    assert got.shape == (6, 2, 3)
    np.testing.assert_allclose(got, np.stack(expected_svd), rtol=1e-5, atol=1e-5)
    # cv2 (LMEDS + Levenberg-Marquardt refinement on all inliers) converges to the same least-squares optimum
    err = np.abs(got - np.stack(expected_cv2))
    print("umeyama vs cv2: linear", err[..., :2].max(), "translation", err[..., 2].max(),
          "vs svd", np.abs(got - np.stack(expected_svd)).max())
    assert err[..., :2].max() < 1e-4 and err[..., 2].max() < 2e-3, err.max()
    # unbatched and degenerate input
    single = np.asarray(face_align.umeyama(srcs[0].astype(np.float32), template))
    np.testing.assert_allclose(single, got[0], atol=1e-5)
    degenerate = np.asarray(face_align.umeyama(np.full((5, 2), 7.0, np.float32), template))
    assert np.isfinite(degenerate).all()


def _smooth_image(rng, h, w, c):
    """A low-frequency image on [0, 1] (a sum of a few sinusoids): cv2's 1/32-pixel rounding stays tiny."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    out = np.zeros((h, w, c))
    for ch in range(c):
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.0, 0.03, 2).tolist() + [rng.uniform(0, 6.28)]
            out[..., ch] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
    return ((out - out.min()) / (out.max() - out.min())).astype(np.float32)


def _interior(matrix, in_hw, out_hw, margin=1.0):
    """Output pixels whose inverse-mapped source point lies `margin` inside the source image."""
    inv = cv2.invertAffineTransform(matrix)
    yy, xx = np.mgrid[: out_hw[0], : out_hw[1]]
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    return (sx >= margin) & (sx <= in_hw[1] - 1 - margin) & (sy >= margin) & (sy <= in_hw[0] - 1 - margin)


def test_warp_affine_matches_cv2_inside_the_border():
    """cv2 rounds each sampling position to 1/32 px. Where that rounding is exact (the inverse matrix on a
    1/32 grid) the warps must agree to float precision on a random image, for a scale and for a rotation;
    for an arbitrary ArcFace-like matrix the difference must stay within what the rounding explains."""
    rng = np.random.default_rng(1)
    h, w = 96, 80
    noise = rng.uniform(0, 1, (h, w, 3)).astype(np.float32)
    scale = np.array([[2.0, 0.0, 5.25], [0.0, 2.0, -3.5]])
    # inverse = rotation 20.6° × scale 0.80 with entries on the 1/32 grid; forward matrix = its inverse
    rotation = cv2.invertAffineTransform(np.array([[24, -9, 400], [9, 24, 96]], np.float64) / 32)
    angle = 0.3
    arbitrary = np.array([[1.3 * np.cos(angle), -1.3 * np.sin(angle), 11.37],
                          [1.3 * np.sin(angle), 1.3 * np.cos(angle), -20.81]])
    smooth = _smooth_image(rng, h, w, 3)
    images = np.stack([noise, noise, smooth])
    matrices = np.stack([scale, rotation, arbitrary])
    got = np.asarray(jax.jit(face_align.warp_affine, static_argnums=2)(images, matrices.astype(np.float32),
                                                                        (112, 112)))
    assert got.shape == (3, 112, 112, 3)
    errors = []
    for i in range(3):
        ref = cv2.warpAffine(images[i], matrices[i], (112, 112), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        mask = _interior(matrices[i], (h, w), (112, 112))
        assert mask.sum() > 2000
        errors.append(float(np.abs(got[i] - ref)[mask].max()))
        # outside the image entirely: zero, as cv2
        outside = ~_interior(matrices[i], (h, w), (112, 112), margin=-1.0)
        assert outside.any() and np.abs(got[i][outside]).max() == 0.0
    print("warp errors vs cv2:", errors)
    assert errors[0] <= 1e-4 and errors[1] <= 1e-4, errors
    # arbitrary matrix: bounded by the 1/32-px rounding (≤ 1/64 px in x and in y) times the image's slope
    slope = max(np.abs(np.diff(smooth, axis=0)).max(), np.abs(np.diff(smooth, axis=1)).max())
    assert errors[2] <= 2 * slope / 64 + 1e-5, (errors, slope)


def test_warp_gradient_zero_outside_support_and_matches_finite_difference():
    rng = np.random.default_rng(2)
    image = jnp.asarray(rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32))
    # shrink a 20-px window in the middle-left onto the 16×16 output: everything else is outside the support
    matrix = jnp.asarray([[[0.8, 0.0, -8.0], [0.0, 0.8, -16.0]]], jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(1, 16, 16, 3)).astype(np.float32))

    @jax.jit
    def loss(img):
        return jnp.sum(face_align.warp_affine(img, matrix, (16, 16)) * cotangent)

    grad = np.asarray(jax.jit(jax.grad(loss))(image))[0]
    assert np.isfinite(grad).all()
    # support: source x in [10, 10 + 15/0.8], y in [20, 20 + 15/0.8] (+1 px for the bilinear neighbour)
    support = np.zeros((64, 64), bool)
    support[20:20 + 20, 10:10 + 20] = True
    assert np.abs(grad[~support]).max() == 0.0
    assert (np.abs(grad[support]).sum(-1) > 0).mean() > 0.9
    # finite difference in one random direction (the warp is linear in the image: exact up to float error)
    direction = jnp.asarray(rng.normal(size=image.shape).astype(np.float32))
    eps = 1e-2
    fd = (loss(image + eps * direction) - loss(image - eps * direction)) / (2 * eps)
    assert float(fd) == pytest.approx(float(jnp.sum(grad * direction[0])), rel=1e-3)


def test_align_maps_landmarks_onto_the_template_and_stops_their_gradient():
    template = face_align.ARCFACE_TEMPLATE_112
    # a 224 image whose face is the template scaled by 2: align must be a pure 2× downsampling
    image = np.zeros((1, 224, 224, 1), np.float32)
    for x, y in template * 2:
        image[0, int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 1.0
    landmarks = jnp.asarray(template[None] * 2)

    @jax.jit
    def aligned_and_landmark_grad(pts):
        return face_align.align(image, pts), jax.grad(lambda p: face_align.align(image, p).sum())(pts)

    out, g = aligned_and_landmark_grad(landmarks)
    out = np.asarray(out)
    assert out.shape == (1, 112, 112, 1)
    for x, y in template:
        assert out[0, int(round(y)), int(round(x)), 0] > 0.5
    assert np.all(np.asarray(g) == 0.0)
    # insightface's rule for non-multiples of 112 (128-pixel crops shift x by 8·ratio)
    np.testing.assert_allclose(face_align.arcface_template(128), template + np.array([8.0, 0.0]), atol=1e-5)
