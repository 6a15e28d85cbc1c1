"""Five face landmarks per image, on the host and outside the gradient: a fixed layout or the SCRFD detector.

The identity reward aligns each generated face from 5 points (left eye, right eye, nose, left and right
mouth corner: ArcFace's order, which is also SCRFD's native keypoint order). The points are constants of
the loss, so they come from plain numpy code:

- `Fixed`: the same 5 points for every image, given in a reference frame and scaled to the image size
  (generators whose faces are centred, the synthetic world, and any run without a detector);
- `Scrfd`: insightface's SCRFD detector (`det_10g.onnx` of buffalo_l, `scrfd_*.onnx`) through onnxruntime,
  with insightface's pre-processing and decoding (`insightface/model_zoo/scrfd.py`): resize keeping the
  aspect ratio into the detector's input, pad right/bottom, (x − 127.5)/128 on RGB (insightface reads BGR
  with cv2 and swaps to RGB in `blobFromImage`; alignax images are RGB already), per stride anchor centres
  (x·stride, y·stride, `num_anchors` copies each), box and keypoint distances times the stride, score
  threshold, NMS at IoU 0.4, then one face per image.

`detect(images_uint8_nhwc) -> (points [B, 5, 2] float32 pixel coords, found [B] bool, score [B] float32)`.
Where no face is found the points are the ArcFace template scaled to the image (a centred face), so the
alignment downstream stays finite; `found` is False and the reward scores that sample 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from alignax import fs
from alignax.errors import ConfigError, DataError, WeightsError
from alignax.rewards.face_align import ARCFACE_TEMPLATE_112

KINDS = ("detector", "fixed")
SELECT = ("largest", "score", "center")


@runtime_checkable
class Landmarks(Protocol):
    def detect(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points [B, 5, 2] float32, found [B] bool, score [B] float32) for uint8 NHWC RGB images."""
        ...


def to_uint8(images: Any) -> np.ndarray:
    """NHWC float images in [0, 1] → uint8 (round half to even), what the detectors take."""
    return np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _check_images(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"landmarks: expected uint8 NHWC RGB images [B, H, W, 3], got {images.dtype} "
                        f"{images.shape} (convert floats in [0, 1] with alignax.rewards.landmarks.to_uint8)")
    return images


def _template_points(batch: int, height: int, width: int) -> np.ndarray:
    """The ArcFace template stretched to the image: the fallback where no face is found."""
    scale = np.array([width / 112.0, height / 112.0], np.float32)
    return np.broadcast_to(ARCFACE_TEMPLATE_112 * scale, (batch, 5, 2)).astype(np.float32)


class Fixed:
    """The same 5 points for every image: `points` [5, 2] (x, y) in a `reference_size` (H, W) frame.

    Points scale with the image (x·W/W_ref, y·H/H_ref, insightface's plain-ratio rule); without a
    `reference_size` they are the images' own pixel coordinates.
    """

    def __init__(self, points: Any, reference_size: int | Sequence[int] | None = None):
        self.points = np.asarray(points, np.float32)
        if self.points.shape != (5, 2) or not np.isfinite(self.points).all():
            raise ConfigError(f"landmarks.points: expected 5 finite [x, y] pairs, got shape {self.points.shape}")
        self.reference_size = None if reference_size is None else _size_pair(reference_size, "reference_size")

    def detect(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = _check_images(images)
        batch, height, width = images.shape[:3]
        points = self.points
        if self.reference_size is not None:
            ref_h, ref_w = self.reference_size
            points = points * np.array([width / ref_w, height / ref_h], np.float32)
        return (np.broadcast_to(points, (batch, 5, 2)).astype(np.float32), np.ones(batch, bool),
                np.ones(batch, np.float32))


def _size_pair(value: Any, field: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in pair):
        raise ConfigError(f"landmarks.{field}: expected a positive int or two positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(image, (width, height))` (INTER_LINEAR, half-pixel centres, edge clamp) for uint8 HWC,
    rounded back to uint8; differs from OpenCV's fixed-point arithmetic by at most one level."""

    def axis(src_len, dst_len):
        scale = src_len / dst_len
        pos = (np.arange(dst_len) + 0.5) * scale - 0.5
        lo = np.floor(pos)
        frac = pos - lo
        lo = lo.astype(np.int64)
        frac = np.where(lo < 0, 0.0, frac)
        lo = np.clip(lo, 0, src_len - 1)
        frac = np.where(lo >= src_len - 1, 0.0, frac)
        hi = np.minimum(lo + 1, src_len - 1)
        return lo, hi, frac

    y0, y1, fy = axis(image.shape[0], height)
    x0, x1, fx = axis(image.shape[1], width)
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS as insightface's SCRFD does it (areas with the +1 pixel convention); kept indices."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]  # insightface's order, ties included (numpy's default sort, reversed)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


class Scrfd:
    """SCRFD through onnxruntime, decoded as insightface does; one face per image.

    threshold: score threshold (insightface's `det_thresh`, 0.5); nms_threshold: IoU (0.4);
    det_size: (width, height) of the detector input when the ONNX input is dynamic (insightface's
    `det_size`, 640×640); a static input size in the ONNX wins. select: which face to keep per image:
    'largest' box (the portrait's subject, what InstantID/PhotoMaker take), 'score' (most confident) or
    'center' (insightface's `max_num` rule: area − 2·squared offset from the image centre).
    """

    def __init__(self, onnx_path: str, *, threshold: float = 0.5, nms_threshold: float = 0.4,
                 det_size: int | Sequence[int] = (640, 640), select: str = "largest"):
        if select not in SELECT:
            raise ConfigError(f"landmarks.select: {select!r} is not one of {SELECT}")
        if not 0.0 <= float(threshold) <= 1.0 or not 0.0 <= float(nms_threshold) <= 1.0:
            raise ConfigError(f"landmarks: det_threshold={threshold!r} and nms_threshold={nms_threshold!r} "
                              "must lie in [0, 1]")
        self.path = str(onnx_path)
        self.threshold, self.nms_threshold, self.select = float(threshold), float(nms_threshold), select
        self.session = _open_session(self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise WeightsError(f"SCRFD detector {self.path}: expected one NCHW image input, found "
                               f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in outputs]
        found = [(o.name, o.shape) for o in outputs]
        heads = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}
        if len(outputs) in (6, 10):
            raise WeightsError(f"SCRFD detector {self.path}: this SCRFD has no keypoint heads ({len(outputs)} "
                               f"outputs: scores and boxes only); the identity reward needs a *kps model such "
                               f"as det_10g.onnx")
        if len(outputs) not in heads:
            raise WeightsError(f"SCRFD detector {self.path}: outputs do not look like SCRFD's (expected 9 or 15: "
                               f"scores, boxes, keypoints per stride), found {len(outputs)}: {found}")
        self.strides, self.num_anchors = heads[len(outputs)]
        n = len(self.strides)
        for k, (name, shape) in enumerate(found):
            want = (1, 4, 10)[k // n]
            last = shape[-1] if shape else None
            if isinstance(last, int) and last != want:
                raise WeightsError(f"SCRFD detector {self.path}: output {k} {name!r} has shape {shape}, expected "
                                   f"last dim {want} (outputs in insightface's order: {n} score, {n} box, {n} "
                                   f"keypoint heads); found {found}")
        h, w = inputs[0].shape[2:4]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            self.input_hw = (h, w)
        else:
            det_w, det_h = _size_pair(det_size, "det_size")
            self.input_hw = (det_h, det_w)
        if any(d % max(self.strides) for d in self.input_hw):
            raise ConfigError(f"landmarks.det_size: the detector input {self.input_hw[::-1]} (W, H) must be a "
                              f"multiple of the largest stride {max(self.strides)}")

    # -- insightface's pipeline, one image at a time (the released detectors have batch size 1) --
    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        in_h, in_w = self.input_hw
        im_ratio = image.shape[0] / image.shape[1]
        if im_ratio > in_h / in_w:
            new_h = in_h
            new_w = int(new_h / im_ratio)
        else:
            new_w = in_w
            new_h = int(new_w * im_ratio)
        det_scale = new_h / image.shape[0]
        canvas = np.zeros((in_h, in_w, 3), np.uint8)
        canvas[:new_h, :new_w] = resize_bilinear(image, new_w, new_h)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        return blob, det_scale

    def _head(self, outputs: list[np.ndarray], k: int, rows: int, cols: int) -> np.ndarray:
        out = np.asarray(outputs[k], np.float32)
        if out.ndim == 3 and out.shape[0] == 1:
            out = out[0]
        if out.shape != (rows, cols):
            raise WeightsError(f"SCRFD detector {self.path}: output {k} {self.output_names[k]!r} has shape "
                               f"{np.shape(outputs[k])}, expected ({rows}, {cols}) for an input of "
                               f"{self.input_hw} (H, W)")
        return out

    def detect_all(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All faces of one uint8 HWC RGB image after NMS: ([N, 5] x1, y1, x2, y2, score; [N, 5, 2] keypoints)
        in the image's pixel coordinates, by descending score."""
        blob, det_scale = self._prepare(image)
        outputs = self.session.run(self.output_names, {self.input_name: blob})
        n = len(self.strides)
        scores, boxes, kps = [], [], []
        for i, stride in enumerate(self.strides):
            rows_, cols_ = self.input_hw[0] // stride, self.input_hw[1] // stride
            count = rows_ * cols_ * self.num_anchors
            score = self._head(outputs, i, count, 1)[:, 0]
            dist = self._head(outputs, i + n, count, 4) * stride
            kdist = self._head(outputs, i + 2 * n, count, 10) * stride
            ys, xs = np.mgrid[:rows_, :cols_]
            centres = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
            centres = np.repeat(centres, self.num_anchors, axis=0)
            keep = score >= self.threshold
            c = centres[keep]
            d = dist[keep]
            scores.append(score[keep])
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            kps.append(c[:, None, :] + kdist[keep].reshape(-1, 5, 2))
        score = np.concatenate(scores)
        box = np.concatenate(boxes) / det_scale
        points = np.concatenate(kps) / det_scale
        order = score.argsort()[::-1]  # as insightface: sorted here, and sorted again inside nms
        score, box, points = score[order], box[order], points[order]
        keep = nms(box, score, self.nms_threshold)
        return (np.concatenate([box[keep], score[keep, None]], 1).astype(np.float32),
                points[keep].astype(np.float32))

    def _choose(self, dets: np.ndarray, height: int, width: int) -> int:
        if self.select == "score":
            return 0
        area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
        if self.select == "largest":
            return int(np.argmax(area))
        offset = ((dets[:, 0] + dets[:, 2]) / 2 - width // 2) ** 2 + ((dets[:, 1] + dets[:, 3]) / 2 - height // 2) ** 2
        return int(np.argmax(area - 2.0 * offset))

    def detect(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = _check_images(images)
        batch, height, width = images.shape[:3]
        points = _template_points(batch, height, width).copy()
        found = np.zeros(batch, bool)
        score = np.zeros(batch, np.float32)
        for b in range(batch):
            dets, kps = self.detect_all(images[b])
            if len(dets):
                best = self._choose(dets, height, width)
                points[b], found[b], score[b] = kps[best], True, dets[best, 4]
        return points, found, score


def _open_session(path: str) -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is in requirements.txt
        raise ConfigError(f"landmarks='detector' runs {path} with onnxruntime: pip install onnxruntime") from e
    if not fs.isfile(path):
        raise WeightsError(f"SCRFD detector {path}: no such file (landmarks='detector' needs insightface's "
                           f"det_10g.onnx or another SCRFD *kps ONNX; or use landmarks='fixed')")
    with fs.open_file(path, "rb") as f:
        data = f.read()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own (Fail, InvalidProtobuf, ...) types
        raise WeightsError(f"SCRFD detector {path}: not a readable ONNX model ({len(data)} bytes; truncated or "
                           f"corrupt?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


_KEYS = ("detector", "points", "reference_size", "det_threshold", "nms_threshold", "det_size", "select")


def build(spec: str | Mapping[str, Any] | Landmarks = "detector", *, where: str = "landmarks",
          **settings: Any) -> Landmarks:
    """A landmark source from a reward's settings.

    `build('detector', detector='det_10g.onnx', det_threshold=0.5, nms_threshold=0.4, det_size=640,
    select='largest')` or `build('fixed', points=[[x, y]] * 5, reference_size=(H, W))`; a Mapping (the
    reward's whole config, other keys ignored) gives the kind under `landmarks` and the same keys; a
    `Landmarks` object is returned as is. `where` prefixes error messages (e.g. 'config.rewards.identity').
    """
    if isinstance(spec, Landmarks) and not isinstance(spec, str | Mapping):
        return spec
    if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
        mapping = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        kind = mapping.get("landmarks", "detector")
        settings = {**{k: mapping[k] for k in _KEYS if mapping.get(k) is not None}, **settings}
    else:
        kind = spec
    unknown = sorted(set(settings) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown landmark setting(s) {unknown}; known: {list(_KEYS)}")
    if kind not in KINDS:
        raise ConfigError(f"{where}: landmarks={kind!r} is not one of {KINDS}")
    try:
        if kind == "fixed":
            if settings.get("points") is None:
                raise ConfigError("landmarks.points: landmarks='fixed' needs 5 [x, y] points (left eye, right eye, "
                                  "nose, left mouth, right mouth)")
            return Fixed(settings["points"], settings.get("reference_size"))
        if not settings.get("detector"):
            raise ConfigError("landmarks.detector: landmarks='detector' needs the path of a SCRFD ONNX (e.g. "
                              "insightface's det_10g.onnx), or set landmarks='fixed' with points")
        options = {k: settings[k] for k in ("nms_threshold", "det_size", "select") if settings.get(k) is not None}
        if settings.get("det_threshold") is not None:
            options["threshold"] = settings["det_threshold"]
        return Scrfd(str(settings["detector"]), **options)
    except ConfigError as e:
        if where == "landmarks":
            raise
        raise ConfigError(f"{where}: {e}") from e
