"""`identity` and `identity_aesthetic`: gradients through the warp (finite, zero outside its support, matching
finite differences), same- vs different-identity ordering with a random tiny IResNet, the host-side `identity`
field, no-face samples, bad inputs named before compilation, and a `reward_backprop` run on the tiny world."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import alignax.rewards
from alignax import evaluate
from alignax.data import tiny_world as world_lib
from alignax.errors import ConfigError, DataError
from alignax.models import iresnet
from alignax.models.pretrained import abstract_params
from alignax.rewards import face_align
from alignax.rewards import setup as reward_setup
from tests.training.conftest import tiny_world as tiny_world  # noqa: F401  (fixture)

CROP = 16  # the tiny embedder's input size
TEMPLATE = face_align.ARCFACE_TEMPLATE_112.tolist()
# The face fills a 112 frame: for the tiny world's 16x16 images the crop covers the whole image.
WHOLE = dict(landmarks="fixed", points=TEMPLATE, reference_size=(112, 112))
# The face in the top-left quarter of a 224 frame: most of the image lies outside the warp's support.
CORNER = dict(landmarks="fixed", points=TEMPLATE, reference_size=(224, 224))
SHAPES = world_lib.SHAPES


# Each 'person' has its own shape and colours; pictures of one person differ by position, size and noise.
LOOKS = {"circle": ((220, 60, 60), (30, 40, 60)), "square": ((60, 200, 80), (90, 30, 30)),
         "triangle": ((70, 90, 230), (200, 200, 120))}


def draw_identity(shape: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One jittered picture of the 'person' `shape`."""
    radius = rng.uniform(0.28, 0.34) * size
    centre = size / 2 + rng.uniform(-1.5, 1.5, size=2)
    image = world_lib.draw(shape, *LOOKS[shape], size, centre, radius).astype(np.float32)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def tiny_embedder_params(config: dict, seed: int = 0) -> dict:
    """Random params (BN statistics included) for the IResNet `config`, drawn in numpy: no init to compile."""
    shapes = abstract_params(iresnet.ARCHITECTURE, iresnet.build(config))[0]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(size=shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))
        if name in ("var", "scale"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "weight":  # PReLU
            return np.full(shape, 0.25, np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    """A random tiny IResNet (2 stages, 16x16 crops, 32-d) saved as `iresnet.save` writes it."""
    config = iresnet.config_of(iresnet.IResNet(layers=(1, 1), widths=(8, 16), stem_width=8, embedding_size=32,
                                               input_size=(CROP, CROP)))
    out = tmp_path_factory.mktemp("embedder") / "tiny_iresnet"
    iresnet.save((config, tiny_embedder_params(config)), out)
    return str(out)


@pytest.fixture(scope="module")
def references_dir(tmp_path_factory):
    """references/<shape>/<i>.png: three jittered pictures per identity."""
    root = tmp_path_factory.mktemp("references")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        (root / shape).mkdir()
        for i in range(3):
            Image.fromarray(draw_identity(shape, rng)).save(root / shape / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def reward(embedder_dir, references_dir):
    return alignax.rewards.get("identity", embedder=embedder_dir, references=references_dir, **WHOLE)


def batch_for(reward, identities):
    return reward_setup.prepare({reward.name: reward}, {"prompt": ["p"] * len(identities),
                                                        "identity": np.array(identities)})


def device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind not in "OUS"}


# ---- scores ---------------------------------------------------------------------------------------------


def test_same_identity_scores_higher_than_other_identities(reward):
    """Fresh jittered pictures of each identity against every identity's reference (a random embedder:
    the margin only shows that the pipeline keeps identity information)."""
    rng = np.random.default_rng(1)
    images = np.stack([draw_identity(s, rng) for s in SHAPES for _ in range(2)]).astype(np.float32) / 255
    score = jax.jit(reward.apply)
    table = np.stack([np.asarray(score(reward.params, jnp.asarray(images),
                                       device(batch_for(reward, [ref] * len(images))))[0])
                      for ref in SHAPES])  # [reference identity, image]
    truth = np.repeat(np.arange(len(SHAPES)), 2)
    same = table[truth, np.arange(len(images))]
    other = np.where(np.arange(len(SHAPES))[:, None] == truth[None], -np.inf, table).max(axis=0)
    print("same-identity cosines", same.round(3), "best other", other.round(3), "margin", (same - other).min())
    assert np.all(same > other)
    assert np.all(np.abs(table) <= 1 + 1e-5)


def test_gradient_is_finite_nonzero_in_the_face_and_exactly_zero_outside(embedder_dir, references_dir):
    reward = alignax.rewards.get("identity", embedder=embedder_dir, references=references_dir, **CORNER)
    images = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 32, 32, 3)), jnp.float32)
    batch = device(batch_for(reward, ["circle", "square"]))
    total = jax.jit(lambda x: jnp.sum(reward.apply(reward.params, x, batch)[0]))
    grad = np.asarray(jax.jit(jax.grad(total))(images))
    # The warp's support: every source pixel some output pixel samples with a non-zero weight.
    points = jnp.asarray(np.asarray(TEMPLATE, np.float32) * 32 / 224)[None].repeat(2, 0)
    support = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(face_align.align(x, points, CROP))))(images)) != 0
    assert np.all(np.isfinite(grad))
    assert 0.05 < support.mean() < 0.6  # the crop covers part of the image
    # Exactly zero one pixel beyond it (on the rim a sampling weight may be 0 in one program and ~1e-9 in another).
    padded = np.pad(support, ((0, 0), (1, 1), (1, 1), (0, 0)))
    near = np.any([padded[:, 1 + dy:33 + dy, 1 + dx:33 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert np.all(grad[~near] == 0.0) and (~near).mean() > 0.4
    assert np.mean(grad[support] != 0) > 0.5

    direction = jnp.asarray(np.random.default_rng(3).normal(size=images.shape), jnp.float32)
    h = 1e-3
    numeric = (float(total(images + h * direction)) - float(total(images - h * direction))) / (2 * h)
    analytic = float(jnp.sum(grad * direction))
    print(f"directional derivative: analytic {analytic:.6f}, central difference {numeric:.6f}")
    assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-4


def test_no_face_scores_zero_with_a_flag_and_no_nan(embedder_dir, references_dir, monkeypatch):
    """landmarks='detector' runs the detector inside jit (pure_callback); a sample without a face scores
    exactly 0, is flagged in info, counted, and gets a zero (finite) gradient."""
    from alignax.rewards import landmarks as landmarks_lib

    class HalfBlind:  # finds the face in even samples only
        def detect(self, images):
            n, h, w = images.shape[:3]
            points = np.broadcast_to(np.asarray(TEMPLATE, np.float32) * np.array([w, h]) / 112, (n, 5, 2))
            return points.copy(), np.arange(n) % 2 == 0, np.ones(n, np.float32)

    calls = []
    monkeypatch.setattr(landmarks_lib, "build", lambda kind, **kw: calls.append((kind, kw)) or HalfBlind())
    reward = alignax.rewards.get("identity", embedder=embedder_dir, references=references_dir,
                                 landmarks="detector", detector="det_10g.onnx")
    assert calls[0][0] == "detector" and calls[0][1]["detector"] == "det_10g.onnx"
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(4, 16, 16, 3)), jnp.float32)
    batch = device(batch_for(reward, ["circle"] * 4))

    def total(x):
        scores, info = reward.apply(reward.params, x, batch)
        return jnp.sum(scores), (scores, info)

    grad, (scores, info) = jax.jit(jax.grad(total, has_aux=True))(images)
    scores, grad = np.asarray(scores), np.asarray(grad)
    np.testing.assert_array_equal(np.asarray(info["face_found"]), [1, 0, 1, 0])
    assert float(info["faces_missing"]) == 2
    assert scores[1] == scores[3] == 0.0 and np.all(scores[::2] != 0)
    assert np.all(np.isfinite(grad)) and np.all(grad[1::2] == 0) and np.any(grad[::2] != 0)
    metrics = alignax.rewards.base.info_metrics("identity", info)
    assert float(metrics["reward/identity/info/face_found"]) == 0.5
    assert float(metrics["reward/identity/info/faces_missing"]) == 2


def test_npz_references_equal_the_directory_ones(reward, embedder_dir, tmp_path):
    """An .npz of [n, D] (or [D]) embeddings gives the same reference directions as embedding the images."""
    directory = batch_for(reward, list(SHAPES))["identity/reference"]
    raw = np.random.default_rng(5).normal(size=(2, 32)).astype(np.float32)
    np.savez(tmp_path / "refs.npz", circle=np.stack([directory[0] * 2.0, directory[0] * 3.0]), square=directory[1],
             triangle=raw)
    from_npz = alignax.rewards.get("identity", embedder=embedder_dir, references=str(tmp_path / "refs.npz"),
                                   **WHOLE)
    got = batch_for(from_npz, list(SHAPES))["identity/reference"]
    np.testing.assert_allclose(got[:2], directory[:2], rtol=1e-5, atol=1e-6)
    mean = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(got[2], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_identity_aesthetic_combines_preference_and_structure(monkeypatch):
    """preference (here `channel_mean`, the gradient) + structure of the landmarks (a constant): exact
    landmarks on the template score structure 1, a distorted face less, no face 0."""
    from alignax.rewards import landmarks as landmarks_lib
    template = np.asarray(TEMPLATE, np.float32)
    distorted = template.copy()
    distorted[2] += (0, 12)  # the nose 12 px lower: no similarity maps it back

    class Stub:
        def detect(self, images):
            n = images.shape[0]
            rot = np.array([[0.0, -1.0], [1.0, 0.0]], np.float32)  # a rotated, scaled, shifted template: still 1
            faces = np.stack([template, 0.5 * template @ rot.T + 7, distorted, template][:n])
            return faces, np.array([True, True, True, False][:n]), np.ones(n, np.float32)

    monkeypatch.setattr(landmarks_lib, "build", lambda kind, **kw: Stub())
    reward = alignax.rewards.get("identity_aesthetic", preference=dict(kind="channel_mean", channel=0),
                                 preference_weight=2.0, structure_weight=0.5, detector="det.onnx")
    images = jnp.asarray(np.random.default_rng(6).uniform(size=(4, 8, 8, 3)), jnp.float32)
    scores, info = reward(images)
    structure = np.asarray(info["structure"])
    np.testing.assert_allclose(structure[:2], 1.0, atol=1e-4)
    assert 0 < structure[2] < 0.5 and structure[3] == 0
    np.testing.assert_allclose(np.asarray(scores), 2.0 * np.asarray(images[..., 0].mean((1, 2))) + 0.5 * structure,
                               rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(reward(x)[0]))(images)
    np.testing.assert_allclose(np.asarray(grad[..., 0]), 2.0 / 64, rtol=1e-5)  # the preference term's only
    assert np.all(np.asarray(grad[..., 1:]) == 0)


# ---- bad inputs, before anything compiles -------------------------------------------------------------


def test_bad_inputs_are_named(embedder_dir, references_dir, reward, tmp_path):
    get = alignax.rewards.get
    with pytest.raises(ConfigError, match="missing.onnx"):
        get("identity", embedder=str(tmp_path / "missing.onnx"), references=references_dir, **WHOLE)
    with pytest.raises(ConfigError, match="needs embedder="):
        get("identity", references=references_dir, **WHOLE)
    with pytest.raises(ConfigError, match="size=112"):
        get("identity", embedder=embedder_dir, references=references_dir, size=112, **WHOLE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no identity sub-directories"):
        get("identity", embedder=embedder_dir, references=str(tmp_path / "empty"), **WHOLE)
    (tmp_path / "refs" / "alice").mkdir(parents=True)
    (tmp_path / "refs" / "alice" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"alice/broken\.png: cannot read it as an image"):
        get("identity", embedder=embedder_dir, references=str(tmp_path / "refs"), **WHOLE)
    np.savez(tmp_path / "wide.npz", alice=np.ones((2, 7), np.float32))
    with pytest.raises(DataError, match=r"wide\.npz, identity 'alice': expected \[n, 32\]"):
        get("identity", embedder=embedder_dir, references=str(tmp_path / "wide.npz"), **WHOLE)
    with pytest.raises(ConfigError, match="landmarks='nose'"):
        get("identity", embedder=embedder_dir, references=references_dir, landmarks="nose")
    with pytest.raises(ConfigError, match="needs detector="):
        get("identity", embedder=embedder_dir, references=references_dir)
    with pytest.raises(DataError, match=rf"identities \['bob'\], which have no reference in {references_dir}"):
        batch_for(reward, ["circle", "bob"])
    with pytest.raises(DataError, match=r"reads the batch fields \['identity'\]"):
        reward_setup.prepare({"identity": reward}, {"prompt": ["a"]})
    with pytest.raises(DataError, match=r"prompts: config\.rewards\.face \(kind 'identity'\) reads the record fields "
                                        r"\['identity'\]"):
        reward_setup.check_fields({"face": reward}, {"prompt": "str"}, "dataset /d/prompts")
    reward_setup.check_fields({"face": reward}, {"prompt": "str", "identity": "str"}, "dataset /d/prompts")
    with pytest.raises(ConfigError, match="preference=dict"):
        get("identity_aesthetic", **WHOLE)
    with pytest.raises(ConfigError, match="structure_weight=-1"):
        get("identity_aesthetic", preference=dict(kind="brightness"), structure_weight=-1, **WHOLE)


# ---- evaluate and the trainer ---------------------------------------------------------------------------


def test_evaluate_scores_with_the_identity_field(reward, references_dir):
    """`evaluate.score` hands the eval prompts' `identity` to the reward's host hook."""
    ckpt = types.SimpleNamespace(models=types.SimpleNamespace(rewards={"identity": reward}),
                                 frozen={"rewards": {"identity": reward.params}})
    rng = np.random.default_rng(7)
    images = np.stack([draw_identity("circle", rng), draw_identity("square", rng)]).astype(np.float32) / 255
    ids = ["circle", "square"]
    got = evaluate.score(ckpt, images, ["a", "b"], {"identity": ids})["identity"]
    expected = jax.jit(reward.apply)(reward.params, jnp.asarray(images), device(batch_for(reward, ids)))[0]
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6)
    swapped = evaluate.score(ckpt, images, ["a", "b"], {"identity": ids[::-1]})["identity"]
    assert np.all(swapped != got)
    with pytest.raises(DataError, match="reads the batch fields"):
        evaluate.score(ckpt, images, ["a", "b"])


def test_tiny_world_prompts_name_an_identity_that_evaluate_carries(tiny_world):  # noqa: F811
    from tests.training.conftest import tiny_config
    c = tiny_config()
    c.data.path = tiny_world
    prompts = evaluate.eval_prompts(c, 3)
    assert len(prompts["identity"]) == 3
    assert all(shape in prompt for shape, prompt in zip(prompts["identity"], prompts["prompt"], strict=True))


@pytest.mark.slow  # ~60 s of CPU: compiles the tiny world's full train step
def test_reward_backprop_trains_with_identity_as_one_of_two_rewards(tmp_path, tiny_world, embedder_dir):  # noqa: F811
    """The tiny world's prompts name an identity (their shape); `identity` with fixed landmarks beside
    `channel_share`: a few steps train, both rewards and the identity reward's info are logged."""
    from alignax.data import open_dataset
    from tests.objectives.test_reward_backprop import trainer_for
    prompts = open_dataset(f"{tiny_world}/prompts", "train")
    assert prompts.features["identity"] == "str"
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "refs.npz", **{s: rng.normal(size=(2, 32)).astype(np.float32) for s in SHAPES})
    c_rewards = ml_collections.ConfigDict(dict(
        red=dict(kind="channel_share", channel=0),
        face=dict(kind="identity", embedder=embedder_dir, references=str(tmp_path / "refs.npz"), **WHOLE)))
    trainer = trainer_for(tmp_path, tiny_world, "identity_run", arg="draft_k", total_steps=3,
                          **{"rewards": c_rewards, "pareto.weights": ml_collections.ConfigDict(dict(red=0.5, face=0.5)),
                             "checkpoint_every": 100, "objective.k": 1, "sample.num_steps": 2})
    result = trainer.run()
    assert result.final_step == 3
    rows = [json.loads(line) for line in (tmp_path / "identity_run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "reward/face/raw" in r and "reward/red/raw" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(r["reward/face/info/face_found"] == 1.0 and r["reward/face/info/faces_missing"] == 0 for r in logged)
    assert all(np.isfinite(r["loss"]) and -1 <= r["reward/face/raw"] <= 1 for r in logged)
