"""`realism`: how typical an image's CLIP features are of a set of real images (a held-out judge).

The score is the negative Mahalanobis distance, per feature dimension, of the image's L2-normalised
CLIP image embedding from a Gaussian fitted to the real images' embeddings:

    realism(x) = -(f(x) - mu)^T Sigma^-1 (f(x) - mu) / d

Real images of the fitted distribution score about -1 on average (the mean of chi^2_d / d); images
off the distribution score lower. It is the per-image counterpart of the Fréchet distance on the
same features (`frechet_distance`, which compares whole sets): a study evaluates 8-32 images per
point, far fewer than the feature dimension, where the Fréchet distance is dominated by its
small-sample bias, while a per-image score gets the same per-prompt bootstrap interval as every
other judge. `Sigma` is shrunk towards its diagonal (`shrinkage`) so that it inverts with few real
images.

Files: `clip=` a transformers CLIP directory (only the vision tower is used) and `stats=` the `.npz`
that `fit_feature_stats` writes from real images (mean, precision, the shrinkage and the count).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax import fs
from alignax.errors import DataError
from alignax.models.clip import l2_normalize
from alignax.models.pretrained import Pretrained
from alignax.rewards import preprocess
from alignax.rewards.base import Reward, register, require_path
from alignax.rewards.clip_similarity import check_exists, image_size, load_clip

_VISION_PARAMS = ("vision_model", "visual_projection", "logit_scale")  # setup() declares logit_scale
STATS_KEYS = ("mean", "precision")


def image_features(model: Pretrained, params: Any, images: jax.Array) -> jax.Array:
    """L2-normalised CLIP image embeddings of NHWC [0, 1] images."""
    pixels = preprocess.clip_pixels(images, image_size(model), crop_offset="floor")
    return l2_normalize(model.module.apply({"params": params}, pixels, method="get_image_features"))


def gaussian_stats(features: np.ndarray, *, shrinkage: float = 0.1) -> dict[str, np.ndarray]:
    """Mean and precision of `features` [N, d], the covariance shrunk towards its diagonal by `shrinkage`."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError(f"realism stats need features [N >= 2, d], found shape {features.shape}")
    mean = features.mean(0)
    cov = np.cov(features, rowvar=False)
    cov = (1.0 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov)) + 1e-6 * np.eye(cov.shape[0])
    return {"mean": mean.astype(np.float32), "covariance": cov.astype(np.float32),
            "precision": np.linalg.inv(cov).astype(np.float32), "shrinkage": np.float32(shrinkage),
            "count": np.int64(features.shape[0])}


def fit_feature_stats(clip: str | os.PathLike, images: np.ndarray, out: str | os.PathLike, *,
                      shrinkage: float = 0.1, batch_size: int = 64) -> str:
    """Writes the `.npz` of real images' feature statistics (uint8 NHWC `images`) that `realism` reads."""
    model = load_clip(clip, source="realism stats clip=", open_clip_config="ViT-L-14")
    params = {k: model.params[k] for k in _VISION_PARAMS}
    embed = jax.jit(lambda p, x: image_features(model, p, x))
    features = np.concatenate([np.asarray(embed(params, jnp.asarray(images[i:i + batch_size], jnp.float32) / 255.0))
                               for i in range(0, len(images), batch_size)])
    buffer = io.BytesIO()
    np.savez(buffer, **gaussian_stats(features, shrinkage=shrinkage))
    fs.write_bytes_atomic(out, buffer.getvalue())
    return str(out)


def frechet_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between two `gaussian_stats`."""
    diff = np.asarray(a["mean"], np.float64) - np.asarray(b["mean"], np.float64)
    sa, sb = np.asarray(a["covariance"], np.float64), np.asarray(b["covariance"], np.float64)
    eigenvalues = np.linalg.eigvals(sa @ sb)  # tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.sum(np.sqrt(np.abs(eigenvalues))).real)


def _read_stats(path: str, name: str) -> dict[str, np.ndarray]:
    check_exists(path, f"reward {name!r} stats=")
    with np.load(Path(path)) as data:
        missing = [k for k in STATS_KEYS if k not in data]
        if missing:
            raise DataError(f"{path}: reward {name!r} stats lack {missing} (found {sorted(data)}); write them with "
                            "alignax.rewards.realism.fit_feature_stats")
        return {k: np.asarray(data[k], np.float32) for k in STATS_KEYS}


@register("realism")
def realism(name: str, *, clip: str | None = None, stats: str | None = None,
            clip_model_config: dict | str = "ViT-L-14", **options: Any) -> Reward:
    """clip: CLIP transformers directory (vision tower used). stats: `.npz` from `fit_feature_stats`."""
    clip = require_path(clip, name, "clip", "transformers CLIP directory")
    stats = require_path(stats, name, "stats", ".npz of real-image feature statistics")
    moments = _read_stats(stats, name)
    model = load_clip(clip, source=f"reward {name!r} clip=", open_clip_config=clip_model_config, **options)
    dim = model.module.config.projection_dim
    if moments["mean"].shape != (dim,):
        raise DataError(f"{stats}: reward {name!r} stats have mean of shape {moments['mean'].shape}, but the CLIP at "
                        f"{clip} embeds images in {dim} dimensions; fit them with this CLIP")
    params = {"clip": {k: model.params[k] for k in _VISION_PARAMS},
              "mean": jnp.asarray(moments["mean"]), "precision": jnp.asarray(moments["precision"])}
    specs = model.logical_specs()
    specs = {"clip": {k: specs[k] for k in _VISION_PARAMS}, "mean": jax.sharding.PartitionSpec(None),
             "precision": jax.sharding.PartitionSpec(None, None)}

    def score_fn(p: Any, images: jax.Array, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        delta = image_features(model, p["clip"], images) - p["mean"]
        distance = jnp.einsum("bi,ij,bj->b", delta, p["precision"], delta) / dim
        return -distance, {"mahalanobis_per_dim": distance}

    return Reward(name=name, score_fn=score_fn, params=params, specs=specs,
                  range="-(Mahalanobis distance)^2 / d of the CLIP image embedding from the real images' Gaussian; "
                        "real images score about -1, lower is less typical",
                  preprocessing=f"shortest side to {image_size(model)}, centre crop, OpenAI mean/std; L2-normalised "
                                "image embedding")
