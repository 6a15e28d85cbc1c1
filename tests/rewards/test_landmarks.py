"""Landmarks: the SCRFD decoding on a tiny ONNX graph with SCRFD's 9 output heads, against an independent
numpy re-implementation of insightface's `SCRFD.detect` (cv2 pre-processing on a BGR image); fixed points;
clear errors for missing, truncated and non-SCRFD files and for bad settings."""

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from alignax.errors import ConfigError, DataError, WeightsError
from alignax.rewards import landmarks
from alignax.rewards.face_align import ARCFACE_TEMPLATE_112

STRIDES = (8, 16, 32)
ANCHORS = 2


def _tiny_scrfd(path, *, static_hw=None, batched_outputs=False, heads=("score", "bbox", "kps")):
    """A 'detector' with SCRFD's output layout: per stride an s×s average pool of the image, then 1×1 convs to
    2 anchors × (1 score | 4 box | 10 keypoint distances), NCHW → rows of (location, anchor). The score looks at
    the RED channel only, so a red blob is a face, a blue one is not (an RGB/BGR mix-up would show)."""
    rng = np.random.default_rng(0)
    width = {"score": 1, "bbox": 4, "kps": 10}
    h, w = static_hw if static_hw else ("height", "width")
    nodes, inits, outputs = [], [], []
    for head in heads:
        for stride in STRIDES:
            tag = f"{head}{stride}"
            c = ANCHORS * width[head]
            if head == "score":
                weight = np.zeros((c, 3, 1, 1), np.float32)
                weight[:, 0] = np.array([8.0, 6.0])[:, None, None]
                bias = np.array([-4.0, -3.0], np.float32)
            else:
                weight = rng.normal(0, 0.5, (c, 3, 1, 1)).astype(np.float32)
                bias = rng.uniform(0.5, 2.0, c).astype(np.float32)
            inits += [numpy_helper.from_array(weight, f"w_{tag}"), numpy_helper.from_array(bias, f"b_{tag}"),
                      numpy_helper.from_array(np.array([1, -1, width[head]] if batched_outputs
                                                       else [-1, width[head]], np.int64), f"shape_{tag}")]
            nodes += [
                helper.make_node("AveragePool", ["input.1"], [f"pool_{tag}"], kernel_shape=[stride, stride],
                                 strides=[stride, stride]),
                helper.make_node("Conv", [f"pool_{tag}", f"w_{tag}", f"b_{tag}"], [f"conv_{tag}"]),
                helper.make_node({"score": "Sigmoid", "bbox": "Abs", "kps": "Identity"}[head], [f"conv_{tag}"],
                                 [f"act_{tag}"]),
                helper.make_node("Transpose", [f"act_{tag}"], [f"nhwc_{tag}"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"nhwc_{tag}", f"shape_{tag}"], [tag]),
            ]
            dims = [1, None, width[head]] if batched_outputs else [None, width[head]]
            outputs.append(helper.make_tensor_value_info(tag, TensorProto.FLOAT, dims))
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, h, w])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _reference_detect(session, image_rgb, det_size, threshold=0.5, nms_thresh=0.4):
    """insightface's SCRFD.detect, re-implemented from its description: the image is handed over as BGR (as
    cv2.imread gives it), resized with cv2 keeping the aspect, padded, blobFromImage(1/128, mean 127.5, swapRB)."""
    img = image_rgb[..., ::-1].copy()
    in_w, in_h = det_size
    if img.shape[0] / img.shape[1] > in_h / in_w:
        nh = in_h
        nw = int(nh / (img.shape[0] / img.shape[1]))
    else:
        nw = in_w
        nh = int(nw * (img.shape[0] / img.shape[1]))
    scale = nh / img.shape[0]
    det_img = np.zeros((in_h, in_w, 3), np.uint8)
    det_img[:nh, :nw] = cv2.resize(img, (nw, nh))
    blob = cv2.dnn.blobFromImage(det_img, 1.0 / 128, (in_w, in_h), (127.5, 127.5, 127.5), swapRB=True)
    names = [o.name for o in session.get_outputs()]
    outs = [np.asarray(o).reshape(-1, o.shape[-1]) for o in session.run(names, {"input.1": blob})]
    all_scores, all_boxes, all_kps = [], [], []
    for i, s in enumerate(STRIDES):
        gh, gw = in_h // s, in_w // s
        centres = np.array([[x * s, y * s] for y in range(gh) for x in range(gw) for _ in range(ANCHORS)],
                           np.float32)
        sc, bb, kp = outs[i][:, 0], outs[i + 3] * s, outs[i + 6] * s
        idx = np.nonzero(sc >= threshold)[0]
        for j in idx:
            cx, cy = centres[j]
            all_scores.append(sc[j])
            all_boxes.append([cx - bb[j, 0], cy - bb[j, 1], cx + bb[j, 2], cy + bb[j, 3]])
            all_kps.append([[cx + kp[j, 2 * k], cy + kp[j, 2 * k + 1]] for k in range(5)])
    if not all_scores:
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    scores = np.array(all_scores)
    boxes = np.array(all_boxes) / scale
    kps = np.array(all_kps) / scale
    order = scores.argsort()[::-1]
    scores, boxes, kps = scores[order], boxes[order], kps[order]
    keep, remaining = [], list(scores.argsort()[::-1])  # insightface's nms sorts again (tie order matters)
    while remaining:
        i = remaining.pop(0)
        keep.append(i)

        def iou(a, b):
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            inter = iw * ih
            area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
            return inter / (area(a) + area(b) - inter)

        remaining = [j for j in remaining if iou(boxes[i], boxes[j]) <= nms_thresh]
    return np.concatenate([boxes[keep], scores[keep, None]], 1), kps[keep]


def _faces():
    """Three RGB images: two red 'faces' of different sizes (+ a blue non-face), nothing, a non-square one
    (resized and padded: the two pre-processings may then differ by one uint8 level)."""
    a = np.full((96, 96, 3), 10, np.uint8)  # the detector's size: no resize, bit-identical inputs
    a[15:55, 8:45] = (250, 40, 30)
    a[62:86, 58:86] = (240, 60, 20)
    a[4:24, 60:90] = (20, 30, 250)
    b = np.full((96, 96, 3), 10, np.uint8)
    b[30:60, 30:60] = (20, 30, 250)
    c = np.full((70, 150, 3), 5, np.uint8)
    c[10:60, 80:130] = (255, 20, 20)
    return [a, b, c]


@pytest.fixture(scope="module")
def tiny_scrfd(tmp_path_factory):
    return _tiny_scrfd(tmp_path_factory.mktemp("scrfd") / "tiny_scrfd.onnx")


def test_resize_matches_cv2_within_one_level():
    image = np.random.default_rng(3).integers(0, 256, (37, 53, 3), np.uint8)
    for size in ((96, 67), (20, 14), (53, 37)):
        diff = np.abs(landmarks.resize_bilinear(image, *size).astype(int) - cv2.resize(image, size).astype(int))
        assert diff.max() <= 1, (size, diff.max())


def test_scrfd_decoding_matches_insightface_reference(tiny_scrfd):
    detector = landmarks.Scrfd(tiny_scrfd, det_size=(96, 96))
    reference = onnxruntime.InferenceSession(tiny_scrfd, providers=["CPUExecutionProvider"])
    images = _faces()
    counts = []
    for image in images:
        dets, kps = detector.detect_all(image)
        ref_dets, ref_kps = _reference_detect(reference, image, (96, 96))
        counts.append(len(dets))
        assert dets.shape == ref_dets.shape and kps.shape == ref_kps.shape
        # the two pre-processings differ by ≤ 1 uint8 level (cv2's fixed-point resize): sub-0.05 px effects
        np.testing.assert_allclose(dets, ref_dets, atol=0.05)
        np.testing.assert_allclose(kps, ref_kps, atol=0.05)
    assert counts[0] >= 2 and counts[1] == 0 and counts[2] >= 1, counts  # NMS kept several faces in image 0

    points, found, score = detector.detect(np.stack(images[:2]))
    assert found.tolist() == [True, False] and points.shape == (2, 5, 2) and points.dtype == np.float32
    ref_dets, ref_kps = _reference_detect(reference, images[0], (96, 96))
    largest = np.argmax((ref_dets[:, 2] - ref_dets[:, 0]) * (ref_dets[:, 3] - ref_dets[:, 1]))
    np.testing.assert_allclose(points[0], ref_kps[largest], atol=0.05)
    assert score[0] == pytest.approx(ref_dets[largest, 4], abs=1e-3) and score[1] == 0.0
    # no face: finite fallback (the template stretched to the 96×96 image), flagged not found
    np.testing.assert_allclose(points[1], ARCFACE_TEMPLATE_112 * np.array([96 / 112, 96 / 112]), rtol=1e-6)
    by_score = landmarks.Scrfd(tiny_scrfd, det_size=(96, 96), select="score").detect(images[:1])[0]
    np.testing.assert_allclose(by_score[0], ref_kps[0], atol=0.05)


def test_scrfd_static_input_and_batched_outputs(tmp_path):
    path = _tiny_scrfd(tmp_path / "static.onnx", static_hw=(64, 96), batched_outputs=True)
    detector = landmarks.Scrfd(path, det_size=(640, 640))  # the ONNX's static size wins
    assert detector.input_hw == (64, 96)
    reference = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    image = _faces()[2]
    dets, kps = detector.detect_all(image)
    ref_dets, ref_kps = _reference_detect(reference, image, (96, 64))
    assert len(dets) >= 1
    np.testing.assert_allclose(dets, ref_dets, atol=0.05)
    np.testing.assert_allclose(kps, ref_kps, atol=0.05)


def test_scrfd_bad_files_name_the_file_and_what_was_found(tmp_path, tiny_scrfd):
    missing = tmp_path / "det_10g.onnx"
    with pytest.raises(WeightsError, match=r"det_10g\.onnx: no such file"):
        landmarks.Scrfd(str(missing))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(open(tiny_scrfd, "rb").read()[:700])
    with pytest.raises(WeightsError, match=r"truncated\.onnx: not a readable ONNX model"):
        landmarks.Scrfd(str(truncated))
    two_heads = _tiny_scrfd(tmp_path / "two_heads.onnx", heads=("score",))
    with pytest.raises(WeightsError, match=r"two_heads\.onnx: outputs do not look like SCRFD's .* found 3: "
                                           r"\[\('score8'"):
        landmarks.Scrfd(two_heads)
    no_kps = _tiny_scrfd(tmp_path / "no_kps.onnx", heads=("score", "bbox"))
    with pytest.raises(WeightsError, match=r"no_kps\.onnx: this SCRFD has no keypoint heads"):
        landmarks.Scrfd(no_kps)
    wrong_order = _tiny_scrfd(tmp_path / "wrong_order.onnx", heads=("bbox", "score", "kps"))
    with pytest.raises(WeightsError, match=r"wrong_order\.onnx: output 0 'bbox8' has shape .* expected last dim 1"):
        landmarks.Scrfd(wrong_order)


def test_fixed_and_build():
    images = np.zeros((2, 224, 160, 3), np.uint8)
    fixed = landmarks.build("fixed", points=ARCFACE_TEMPLATE_112.tolist(), reference_size=112)
    points, found, score = fixed.detect(images)
    np.testing.assert_allclose(points[1], ARCFACE_TEMPLATE_112 * np.array([160 / 112, 224 / 112]), rtol=1e-6)
    assert found.all() and (score == 1).all()
    own = landmarks.build({"landmarks": "fixed", "points": ARCFACE_TEMPLATE_112, "weight": 1.0, "model": "x"})
    np.testing.assert_allclose(own.detect(images)[0][0], ARCFACE_TEMPLATE_112)
    assert landmarks.build(fixed) is fixed
    with pytest.raises(DataError, match="uint8 NHWC"):
        fixed.detect(images.astype(np.float32))
    with pytest.raises(ConfigError, match=r"config\.rewards\.identity: landmarks='nope' is not one of"):
        landmarks.build("nope", where="config.rewards.identity")
    with pytest.raises(ConfigError, match=r"config\.rewards\.identity: landmarks\.detector: .*det_10g"):
        landmarks.build({"landmarks": "detector"}, where="config.rewards.identity")
    with pytest.raises(ConfigError, match=r"landmarks\.points: expected 5 finite"):
        landmarks.build("fixed", points=[[1, 2]] * 4)
    with pytest.raises(ConfigError, match=r"unknown landmark setting\(s\) \['threshold'\]"):
        landmarks.build("detector", detector="x.onnx", threshold=0.3)
    with pytest.raises(WeightsError, match=r"nowhere\.onnx: no such file"):
        landmarks.build({"landmarks": "detector", "detector": "/nowhere.onnx", "det_threshold": 0.3})
