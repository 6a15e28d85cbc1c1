"""ID-consistency rewards: `identity` (ArcFace cosine to a reference identity) and `identity_aesthetic`
(ID-Aligner's preference + face-structure term).

`identity`: locate 5 face landmarks (a detector on the host, or fixed points), warp the face to the
ArcFace crop with the differentiable bilinear sampler (`face_align.align`), embed it with an IResNet
(an insightface recognition ONNX such as buffalo_l's `w600k_r50.onnx`, or a directory written by
`alignax.models.iresnet.save`, e.g. by `alignax.identity.train`), and score the cosine between the
L2-normalised embedding and the sample's reference: the normalised mean of the normalised embeddings
of that identity's reference images, computed once at build time with the same pipeline (or read
from an `.npz` of embeddings). The gradient reaches the generated pixels through the warp only; the
landmarks are constants (`stop_gradient`), so pixels outside the warp's support get exactly 0.

Which identity a sample wants is the batch's string field `identity`. Strings never reach the
device: the reward's host hook (`Reward.host_fn`, run by `alignax.rewards.setup.prepare` in the data
pipeline) turns them into the per-sample reference embeddings `<name>/reference` [B, D].

Landmarks of the generated images exist only after sampling, i.e. inside the jitted loss:
`landmarks='detector'` runs the detector there through `jax.pure_callback` on the stop_gradient'ed
images (a host round trip per step, outside the gradient); `landmarks='fixed'` (5 `points` in a
`reference_size` frame, scaled to the image) needs no callback. A sample with no face found scores
0 and gets no gradient; `info['face_found']` flags it per sample and `info['faces_missing']` counts
them (logged as `reward/<name>/info/...`).

insightface's pretrained models are licensed for non-commercial research only.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from alignax import fs
from alignax.errors import ConfigError, DataError
from alignax.models import iresnet
from alignax.rewards import face_align
from alignax.rewards import landmarks as landmarks_lib
from alignax.rewards.base import Reward, batch_key, get, register, require_path, take

log = logging.getLogger(__name__)

EPS = 1e-12  # inside every sqrt of a squared norm: a zero embedding scores 0, never NaN
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FIELD = "identity"  # the batch field naming each sample's identity


# ---- landmarks: host detector or fixed points, usable inside jit ---------------------------------------------


class Faces:
    """Where the 5 ArcFace points are in a batch of images, inside or outside jit.

    `locate(images)` under jit: fixed points are constants computed at trace time from the static image
    size; a detector runs on the host through `jax.pure_callback` on `stop_gradient(images)`.
    """

    def __init__(self, reward_name: str, landmarks: str, detector: str | None, points: Any, reference_size: Any,
                 detector_options: Mapping[str, Any] | None = None) -> None:
        if landmarks not in landmarks_lib.KINDS:
            raise ConfigError(f"reward {reward_name!r}: landmarks={landmarks!r}, expected one of {landmarks_lib.KINDS}")
        if landmarks == "detector":
            require_path(detector, reward_name, "detector", "SCRFD .onnx such as det_10g.onnx")
        options = dict(detector_options or {})
        settings = {"detector": detector, "points": points, "reference_size": reference_size, **options}
        self.fixed = landmarks == "fixed"
        self.detector = landmarks_lib.build(landmarks, where=f"reward {reward_name!r}",
                                            **{k: v for k, v in settings.items() if v is not None})

    def detect_host(self, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points [B,5,2] f32, found [B] bool, score [B] f32) of uint8 NHWC images, in numpy."""
        points, found, score = self.detector.detect(np.ascontiguousarray(images_uint8))
        return (np.asarray(points, np.float32), np.asarray(found, bool), np.asarray(score, np.float32))

    def locate(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(points [B,5,2], found [B] bool, score [B]) of NHWC images in [0, 1]; constants for the gradient."""
        batch, height, width = images.shape[:3]
        if self.fixed:  # the size is static: the points are trace-time constants
            points, found, score = self.detect_host(np.zeros((1, height, width, 3), np.uint8))
            return (jnp.broadcast_to(points, (batch, 5, 2)), jnp.broadcast_to(found, (batch,)),
                    jnp.broadcast_to(score, (batch,)))

        def host(x: np.ndarray):
            return self.detect_host(landmarks_lib.to_uint8(x))

        shapes = (jax.ShapeDtypeStruct((batch, 5, 2), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.bool_),
                  jax.ShapeDtypeStruct((batch,), jnp.float32))
        return jax.pure_callback(host, shapes, jax.lax.stop_gradient(images.astype(jnp.float32)),
                                 vmap_method="sequential")


# ---- the embedder ----------------------------------------------------------------------------------------------


class Embedder:
    """An IResNet and its params: aligned crops in [0, 1] → L2-normalised embeddings."""

    def __init__(self, reward_name: str, path: str, size: int | None) -> None:
        source = f"reward {reward_name!r} embedder={path!r}"
        if not fs.exists(path):
            raise ConfigError(f"{source}: no such file or directory (an insightface recognition .onnx such as "
                              "w600k_r50.onnx, or a directory saved by alignax.models.iresnet.save)")
        self.model = iresnet.load_any(path)
        self.params = self.model.params
        height, width = self.model.module.input_size
        if height != width or size not in (None, height):
            raise ConfigError(f"{source}: size={size!r}, but the embedder takes {height}x{width} crops "
                              f"(its fc layer fits only that); set size={height} or leave it unset")
        self.size = height
        self.dim = int(self.model.module.embedding_size)

    def embed(self, params: Any, images: jax.Array, points: jax.Array) -> jax.Array:
        """Unit embeddings of the faces at `points` in NHWC images in [0, 1] (gradient through the warp)."""
        crops = face_align.align(images.astype(jnp.float32), points, self.size)
        return normalize(iresnet.embed(self.model.replace(params=params), crops))


def normalize(x: jax.Array) -> jax.Array:
    """x / |x| along the last axis; finite (0) for a zero vector, and so is its gradient."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + EPS)


def _replicated(params: Any) -> Any:
    return jax.tree.map(lambda _: PartitionSpec(), params)


# ---- references ------------------------------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
    """uint8 RGB HWC pixels of an image file; DataError naming the file if it cannot be decoded."""
    from PIL import Image
    try:
        with fs.open_file(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError)
        raise DataError(f"reference image {path}: cannot read it as an image ({type(e).__name__}: {e})") from e


def reference_files(root: str) -> dict[str, list[str]]:
    """{identity: image paths} of a directory with one sub-directory of images per identity."""
    entries = fs.listdir(root)
    files = {}
    for identity in entries:
        sub = fs.join(root, identity)
        if not fs.isdir(sub):
            continue
        images = [fs.join(sub, f) for f in fs.listdir(sub) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise DataError(f"references {root}: identity directory {sub} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        files[identity] = images
    if not files:
        raise DataError(f"references {root}: no identity sub-directories with images (expected "
                        f"{posixpath.join(root, '<identity>', '<image>.png')}, ...); found {entries}")
    return files


def mean_direction(embeddings: np.ndarray, where: str) -> np.ndarray:
    """The normalised mean of the normalised rows of [n, D] embeddings."""
    e = np.asarray(embeddings, np.float64)
    if not np.all(np.isfinite(e)):
        raise DataError(f"{where}: contains NaN or inf")
    e = e / np.sqrt(np.sum(e * e, axis=-1, keepdims=True) + EPS)
    mean = e.mean(axis=0)
    norm = math.sqrt(float(mean @ mean))
    if norm < 1e-6:
        raise DataError(f"{where}: the embeddings are zero or cancel out; no direction to compare against")
    return (mean / norm).astype(np.float32)


def load_npz_references(path: str, dim: int) -> dict[str, np.ndarray]:
    """{identity: unit reference [D]} from an `.npz` of {identity: [n, D] or [D]} embeddings."""
    try:
        with fs.open_file(path, "rb") as f:
            arrays = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
    except Exception as e:
        raise DataError(f"references {path}: cannot read it as an .npz of embeddings: {e}") from e
    if not arrays:
        raise DataError(f"references {path}: holds no embeddings")
    out = {}
    for identity, value in arrays.items():
        value = np.asarray(value)
        rows = value[None] if value.ndim == 1 else value
        if rows.ndim != 2 or rows.shape[-1] != dim or rows.shape[0] == 0 or value.dtype.kind not in "fiu":
            raise DataError(f"references {path}, identity {identity!r}: expected [n, {dim}] or [{dim}] numbers "
                            f"(the embedder's width), found {value.dtype}{list(value.shape)}")
        out[identity] = mean_direction(rows, f"references {path}, identity {identity!r}")
    return out


def embed_references(root: str, faces: Faces, embedder: Embedder) -> dict[str, np.ndarray]:
    """{identity: unit reference [D]} from a directory of reference images per identity, aligned and
    embedded like the generated images. A reference image without a face found is a DataError."""
    files = reference_files(root)
    embed = jax.jit(embedder.embed)
    out = {}
    for identity, paths in files.items():
        rows = []
        for path in paths:
            pixels = read_image(path)[None]
            points, found, _ = faces.detect_host(pixels)
            if not found[0]:
                raise DataError(f"reference image {path}: no face found; replace it or use landmarks='fixed'")
            rows.append(np.asarray(embed(embedder.params, jnp.asarray(pixels, jnp.float32) / 255.0, points))[0])
        out[identity] = mean_direction(np.stack(rows), f"references {fs.join(root, identity)}")
    log.info("identity references: %d identities from %s", len(out), root)
    return out


def load_references(path: str, faces: Faces, embedder: Embedder, reward_name: str) -> dict[str, np.ndarray]:
    if not fs.exists(path):
        raise ConfigError(f"reward {reward_name!r}: references={path!r} does not exist (a directory with one "
                          "sub-directory of images per identity, or an .npz of embeddings)")
    if fs.isdir(path):
        return embed_references(path, faces, embedder)
    if path.endswith(".npz"):
        return load_npz_references(path, embedder.dim)
    raise ConfigError(f"reward {reward_name!r}: references={path!r} is a file but not an .npz of embeddings")


def reference_host_fn(reward_name: str, references: Mapping[str, np.ndarray], where: str):
    """The host hook: the batch's `identity` strings → `<name>/reference` [B, D] float32."""
    known = sorted(references)

    def host_fn(host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(host_batch[FIELD]).reshape(-1)]
        missing = sorted(set(ids) - set(references))
        if missing:
            shown = known if len(known) <= 20 else known[:20] + ["..."]
            raise DataError(f"reward {reward_name!r}: the batch asks for identities {missing}, which have no "
                            f"reference in {where} (it has {shown})")
        return {batch_key(reward_name, "reference"): np.stack([references[i] for i in ids]).astype(np.float32)}

    return host_fn


# ---- the rewards -----------------------------------------------------------------------------------------------


@register("identity")
def identity(name: str, *, embedder: str | None = None, references: str | None = None,
             landmarks: str = "detector", detector: str | None = None, points: Any = None,
             reference_size: Any = None, detector_options: Mapping[str, Any] | None = None,
             size: int | None = None) -> Reward:
    """embedder: insightface recognition .onnx (w600k_r50.onnx, glintr100.onnx) or an iresnet.save directory.
    references: directory <identity>/<images> or .npz {identity: [n, D] | [D]}.
    landmarks: 'detector' (detector=SCRFD .onnx, e.g. det_10g.onnx) or 'fixed' (points=[[x, y]] * 5 in a
    reference_size=(H, W) frame); detector_options: det_threshold, nms_threshold, det_size, select (see
    alignax.rewards.landmarks.Scrfd). size: the crop size; default and only valid value: the embedder's input
    size (112 for insightface models)."""
    embedder_path = require_path(embedder, name, "embedder", "insightface .onnx or iresnet directory")
    references_path = require_path(references, name, "references", "directory of images per identity or .npz")
    faces = Faces(name, landmarks, detector, points, reference_size, detector_options)
    model = Embedder(name, embedder_path, size)
    refs = load_references(references_path, faces, model, name)

    def score_fn(params: Any, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        reference = jnp.asarray(take(batch, name, "reference"), jnp.float32)
        points, found, _ = faces.locate(images)
        cosine = jnp.sum(model.embed(params, images, points) * reference, axis=-1)
        flag = found.astype(jnp.float32)
        return jnp.where(found, cosine, 0.0), {"face_found": flag, "faces_missing": jnp.sum(1.0 - flag)}

    return Reward(name=name, score_fn=score_fn, params=model.params, specs=_replicated(model.params),
                  host_fields=(FIELD,), host_fn=reference_host_fn(name, refs, references_path),
                  range="cosine similarity in [-1, 1]; 0 where no face is found; the same person typically "
                        "scores above ~0.3 with insightface models",
                  preprocessing=f"5 landmarks ({landmarks}), similarity to the ArcFace template, bilinear warp to "
                                f"{model.size}x{model.size}, (x*255-127.5)/127.5")


def structure_plausibility(points: jax.Array, found: jax.Array, scale: float) -> jax.Array:
    """How face-like 5 landmarks are: exp(-(r/scale)²/2), r = RMS residual of the best similarity fit of
    the points to the ArcFace template, in units of the template's eye distance; 0 where no face is found."""
    template = jnp.asarray(face_align.ARCFACE_TEMPLATE_112)
    matrices = face_align.umeyama(points, template)
    fitted = jnp.einsum("bij,bkj->bki", matrices[..., :2], points) + matrices[:, None, :, 2]
    eye_distance = float(np.linalg.norm(face_align.ARCFACE_TEMPLATE_112[1] - face_align.ARCFACE_TEMPLATE_112[0]))
    residual = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(fitted - template), axis=-1), axis=-1) + EPS) / eye_distance
    return jnp.where(found, jnp.exp(-0.5 * jnp.square(residual / scale)), 0.0)


@register("identity_aesthetic")
def identity_aesthetic(name: str, *, preference: Mapping[str, Any] | None = None, preference_weight: float = 1.0,
                       structure_weight: float = 1.0, structure_scale: float = 0.1, landmarks: str = "detector",
                       detector: str | None = None, points: Any = None, reference_size: Any = None,
                       detector_options: Mapping[str, Any] | None = None) -> Reward:
    """ID-Aligner's aesthetic reward: preference_weight · preference + structure_weight · structure.

    preference: settings of any alignax reward, `dict(kind='hpsv2', checkpoint=..., tokenizer=...)`; it
    carries the gradient. structure: `structure_plausibility` of the detected landmarks (a constant for the
    gradient: the detector is outside it), structure_scale the residual (in eye distances) at which it has
    fallen to exp(-1/2). landmarks / detector / points / reference_size / detector_options as for `identity`."""
    if preference is None:
        raise ConfigError(f"reward {name!r} needs preference=dict(kind=<a reward kind>, ...) (e.g. hpsv2)")
    settings = preference.to_dict() if hasattr(preference, "to_dict") else dict(preference)
    kind = settings.pop("kind", None)
    if kind is None:
        raise ConfigError(f"reward {name!r}: preference={settings!r} has no 'kind' (e.g. 'hpsv2', 'aesthetic')")
    for key, value in (("preference_weight", preference_weight), ("structure_weight", structure_weight)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"reward {name!r}: {key}={value!r}, expected a finite number >= 0")
    if isinstance(structure_scale, bool) or not isinstance(structure_scale, int | float) or not structure_scale > 0:
        raise ConfigError(f"reward {name!r}: structure_scale={structure_scale!r}, expected a number > 0")
    inner = get(kind, name=f"{name}.preference", **settings)
    faces = Faces(name, landmarks, detector, points, reference_size, detector_options)

    def score_fn(params: Any, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        pref, pref_info = inner.apply(params["preference"], images, batch)
        points, found, _ = faces.locate(images)
        structure = structure_plausibility(jax.lax.stop_gradient(points), found, float(structure_scale))
        flag = found.astype(jnp.float32)
        info = {"preference": pref, "structure": structure, "face_found": flag,
                "faces_missing": jnp.sum(1.0 - flag), **{f"preference/{k}": v for k, v in pref_info.items()}}
        return preference_weight * pref + structure_weight * structure, info

    return Reward(name=name, score_fn=score_fn, params={"preference": inner.params},
                  specs={"preference": inner.logical_specs()}, tokenize=inner.tokenize,
                  host_fields=inner.host_fields, host_fn=inner.host_fn, differentiable=inner.differentiable,
                  range=f"{preference_weight} x ({inner.range}) + {structure_weight} x structure in [0, 1]",
                  preprocessing=f"preference: {inner.preprocessing}; structure: 5 landmarks ({landmarks})")
