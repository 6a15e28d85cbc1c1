"""Differentiable ArcFace face alignment: a closed-form similarity from 5 landmarks and a bilinear warp.

The identity reward embeds the generated face after aligning it the way insightface aligns its training
and reference crops (`insightface.utils.face_align.norm_crop`): a least-squares similarity (rotation,
uniform scale, translation) from the 5 detected points to the ArcFace template, then `cv2.warpAffine`
to 112×112, bilinear, zero border. Here the warp is a JAX gather, so the embedding's gradient flows back
to the generated pixels; the landmarks (and so the matrix) are constants under `stop_gradient`.

Conventions are OpenCV's, so the same matrix means the same crop:
- a matrix maps SOURCE pixel coordinates to OUTPUT coordinates ([x, y, 1] → [x', y']), x to the right,
  y down, a pixel's centre at integer coordinates;
- output pixel (x', y') samples the source at the inverse-mapped point, bilinearly between the four
  surrounding pixels; a neighbour outside the image counts as 0 (`BORDER_CONSTANT`, value 0).
cv2 rounds the sampling position to 1/32 pixel (fixed point); this warp does not, which is the only
difference (tests/rewards/test_face_align.py measures it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# insightface's `arcface_dst`: left eye, right eye, nose tip, left mouth corner, right mouth corner
# (left/right as seen in the image) in a 112×112 crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """The 5-point template for a `size`×`size` crop, as insightface's `estimate_norm` scales it.

    Multiples of 112 scale the 112 template; other sizes scale it as a 128 crop and shift x by 8·ratio
    (insightface's rule for its 128-pixel models).
    """
    if size % 112 == 0:
        ratio, diff_x = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        diff_x = 8.0 * ratio
    template = ARCFACE_TEMPLATE_112 * ratio
    template[:, 0] += diff_x
    return template.astype(np.float32)


def umeyama(src: jax.Array | np.ndarray, dst: jax.Array | np.ndarray) -> jax.Array:
    """Least-squares similarity transform mapping `src` points onto `dst` (Umeyama 1991, no reflection).

    src: [..., N, 2] (batched over leading axes); dst: [N, 2] or broadcastable to src. Returns [..., 2, 3]
    matrices M with dst ≈ M @ [x, y, 1]. In 2D the optimum has a closed form without an SVD: with
    centred points, a = c·cos θ = Σ x·y / Σ|x|², b = c·sin θ = Σ (x₁y₂ − x₂y₁) / Σ|x|², which is exactly
    Umeyama's solution with its reflection correction (det > 0). Degenerate input (all points equal)
    gives the pure translation instead of NaN.
    """
    src = jnp.asarray(src, jnp.float32)
    dst = jnp.broadcast_to(jnp.asarray(dst, jnp.float32), src.shape)
    mu_src = src.mean(axis=-2, keepdims=True)
    mu_dst = dst.mean(axis=-2, keepdims=True)
    xs, ys = src - mu_src, dst - mu_dst
    var = jnp.sum(xs * xs, axis=(-2, -1))
    denom = jnp.where(var > 0, var, 1.0)
    a = jnp.sum(xs * ys, axis=(-2, -1)) / denom
    b = jnp.sum(xs[..., 0] * ys[..., 1] - xs[..., 1] * ys[..., 0], axis=-1) / denom
    a = jnp.where(var > 0, a, 1.0)
    b = jnp.where(var > 0, b, 0.0)
    rot = jnp.stack([jnp.stack([a, -b], -1), jnp.stack([b, a], -1)], -2)  # [..., 2, 2]
    t = mu_dst[..., 0, :] - jnp.einsum("...ij,...j->...i", rot, mu_src[..., 0, :])
    return jnp.concatenate([rot, t[..., None]], axis=-1)


def invert_affine(matrices: jax.Array) -> jax.Array:
    """Inverse of [..., 2, 3] affine matrices (output → source coordinates)."""
    lin, t = matrices[..., :2], matrices[..., 2]
    inv = jnp.linalg.inv(lin)
    return jnp.concatenate([inv, -jnp.einsum("...ij,...j->...i", inv, t)[..., None]], axis=-1)


def _sample(image: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Bilinear sample of one HWC image at float positions x, y ([...]), zero outside."""
    height, width = image.shape[:2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    out = 0.0
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            # A neighbour outside the image reads a valid pixel with weight exactly 0, so its gradient is 0.
            pixel = image[jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1)]
            out = out + pixel * jnp.where(inside, wx * wy, 0.0)[..., None]
    return out


def warp_affine(images: jax.Array, matrices: jax.Array, out_size: tuple[int, int] = (112, 112)) -> jax.Array:
    """`cv2.warpAffine(image, M, (W, H), flags=INTER_LINEAR, borderMode=BORDER_CONSTANT)` for a batch.

    images: NHWC float [B, H, W, C]; matrices: [B, 2, 3] (or [2, 3] for all), source → output coordinates;
    out_size: (height, width). Differentiable w.r.t. `images`; source pixels outside the warp's support
    get an exactly zero gradient.
    """
    images = jnp.asarray(images)
    matrices = jnp.broadcast_to(jnp.asarray(matrices, jnp.float32), (images.shape[0], 2, 3))
    out_h, out_w = out_size
    yy, xx = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32), jnp.arange(out_w, dtype=jnp.float32),
                          indexing="ij")
    inverse = invert_affine(matrices)

    def one(image, inv):
        sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
        sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
        return _sample(image, sx, sy)

    return jax.vmap(one)(images, inverse).astype(images.dtype)


def align(images: jax.Array, landmarks: jax.Array | np.ndarray, size: int = 112) -> jax.Array:
    """ArcFace crops of NHWC images (any range, e.g. [0, 1]) from [B, 5, 2] landmarks in their pixel coordinates.

    The landmarks go through `stop_gradient`: the gradient reaches the pixels only through the warp.
    Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner (SCRFD's and ArcFace's).
    """
    points = jax.lax.stop_gradient(jnp.asarray(landmarks, jnp.float32))
    matrices = umeyama(points, arcface_template(size))
    return warp_affine(images, matrices, (size, size))
