"""Training an identity embedder (alignax.identity.train): ArcFace's loss on hand numbers, the verification
threshold, the directory-per-identity builder, a tiny run whose held-out verification accuracy and
same-vs-different cosine margin rise and whose export `iresnet.load_any` reads back, exact kill-and-resume,
and one-line CLI errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from alignax import cli
from alignax.data import open_dataset
from alignax.errors import ConfigError, DataError
from alignax.identity import data as id_data
from alignax.identity import loss as arcface
from alignax.identity import train as train_id
from experiments.configs import identity_tiny
from tests.run_frame import checkpoint_steps, other_run_holds, sigterm_at, status, train_rows
from tests.run_frame import clear_preemption as clear_preemption  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "configs" / "identity_tiny.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def tiny_config(**overrides):
    c = identity_tiny.get_config("")
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


# ---- the loss on hand numbers -----------------------------------------------------------------------------------


def _unit(degrees: float, length: float = 1.0) -> list[float]:
    r = math.radians(degrees)
    return [length * math.cos(r), length * math.sin(r)]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_loss_matches_a_hand_computed_value(easy_margin):
    # Class centres at 0°, 60° and 250° (not unit length: only directions count); embeddings at 0° (class 0,
    # θ = 0), 90° (class 2, θ = 160°: past π − m, insightface's threshold branch) and 0° (class 1, θ = 60°).
    centres = np.array([_unit(0, 2.0), _unit(60, 0.5), _unit(250, 3.0)], np.float32).T
    embeddings = np.array([_unit(0, 3.0), _unit(90, 2.0), _unit(0, 5.0)], np.float32)
    labels = np.array([0, 2, 1])
    s, m = 4.0, 0.5
    angles = np.array([[0, 60, 250], [90, 30, 160], [0, 60, 250]], np.float64)  # |embedding − centre| in degrees
    cos = np.cos(np.radians(angles))
    logits = s * cos
    logits[0, 0] = s * math.cos(0 + m)
    if easy_margin:
        logits[1, 2] = s * math.cos(math.radians(160))  # cos θ <= 0: no margin
    else:
        logits[1, 2] = s * (math.cos(math.radians(160)) - math.sin(m) * m)  # linear continuation past π − m
    logits[2, 1] = s * math.cos(math.radians(60) + m)
    expected = _cross_entropy(logits, labels)

    got = arcface.arcface_logits(embeddings, centres, labels, scale=s, margin=m, easy_margin=easy_margin)
    np.testing.assert_allclose(np.asarray(got), logits, rtol=1e-5, atol=1e-5)
    loss, metrics = arcface.arcface_loss(embeddings, centres, labels, scale=s, margin=m, easy_margin=easy_margin)
    assert abs(float(loss) - expected) <= 1e-5 * expected
    assert float(metrics["accuracy"]) == pytest.approx(1 / 3)  # only sample 0's nearest centre is its class


def test_arcface_gradient_is_finite_where_the_embedding_is_its_centre():
    """sin θ = sqrt(1 − cos²θ) has an infinite derivative at θ = 0; the loss must not turn that into NaN."""
    centres = np.eye(3, dtype=np.float32)
    embeddings = np.eye(3, dtype=np.float32) * 2.0
    grads = jax.grad(lambda e, w: arcface.arcface_loss(e, w, np.arange(3))[0], argnums=(0, 1))(embeddings, centres)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# ---- verification -----------------------------------------------------------------------------------------------


def test_threshold_is_chosen_between_the_classes():
    sims = np.array([0.9, 0.1, 0.8, 0.2, 0.35], np.float32)
    same = np.array([True, False, True, False, True])
    threshold, accuracy = train_id.best_threshold(sims, same)
    assert threshold == pytest.approx(0.275) and accuracy == 1.0  # halfway between 0.2 and 0.35
    threshold, accuracy = train_id.best_threshold(sims, ~same)     # inverted: best is "all different" (3 of 5)
    assert accuracy == pytest.approx(3 / 5) and threshold > 0.9

    labels = np.array([0, 0, 0, 1, 1, 2])
    pairs, pair_same = train_id.verification_pairs(labels, max_pairs=100, seed=0)
    assert pair_same.sum() == 4 and (~pair_same).sum() == 4       # all 4 same pairs, as many different ones
    assert all((labels[i] == labels[j]) == t for (i, j), t in zip(pairs, pair_same, strict=True))
    with pytest.raises(DataError, match="two images of one identity"):
        train_id.verification_pairs(np.array([0, 1, 2]), max_pairs=10, seed=0)


# ---- data ---------------------------------------------------------------------------------------------------------


def test_directory_per_identity_builds_held_out_splits(tmp_path):
    world = id_data.synthetic_identities(num_identities=3, images_per_identity=5, image_size=16, num_validation=1,
                                         num_test=1, seed=3)
    root = id_data.save_identity_directory(tmp_path / "faces", world)
    (root / "id001" / "notes.txt").write_text("not an image")  # skipped: no image suffix
    out = id_data.write_identity_images(tmp_path / "ds", id_data.from_identity_directory(
        root, image_size=16, num_validation=1, num_test=1))
    splits = {s: open_dataset(out, s, kind="identity_images") for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 9, "validation": 3, "test": 3}
    for source in splits.values():
        records = source.get_many(range(len(source)))
        # Labels follow the sorted directory names, the same in every split; every identity is in every split.
        assert {(int(r["label"]), r["identity"]) for r in records} == {(0, "id000"), (1, "id001"), (2, "id002")}
        assert all(r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8 for r in records)

    (root / "id003").mkdir()
    for i in range(2):
        (root / "id003" / f"{i}.png").write_bytes((root / "id000" / "train_0000.png").read_bytes())
    with pytest.raises(DataError, match=r"needs >= 3 images .*'id003' \(2\)"):
        id_data.from_identity_directory(root, image_size=16, num_validation=1, num_test=1)
    (root / "id003" / "2.png").write_bytes(b"\x89PNG truncated")
    broken = id_data.from_identity_directory(root, image_size=16, num_validation=1, num_test=1)
    with pytest.raises(DataError, match=r"id003/2\.png: cannot read the image"):
        for examples in broken.values():
            list(examples)
    with pytest.raises(DataError, match="no identity sub-directory"):
        id_data.from_identity_directory(tmp_path / "ds", image_size=16)


# ---- config errors and the CLI --------------------------------------------------------------------------------


def test_bad_config_values_are_named_before_anything_runs():
    with pytest.raises(ConfigError, match=r"config\.loss\.margin=2\.0"):
        train_id.validate(tiny_config(**{"loss.margin": 2.0}), num_devices=8)
    with pytest.raises(ConfigError, match=r"config\.batch_size=12 is not divisible by the 8 devices"):
        train_id.validate(tiny_config(batch_size=12), num_devices=8)
    with pytest.raises(ConfigError, match=r"config\.model\.widths=\(8, 16\): expected one positive width per stage"):
        train_id.validate(tiny_config(**{"model.widths": (8, 16)}), num_devices=8)
    with pytest.raises(ConfigError, match=r"exactly one of .*config\.data\.path='x' and config\.data\.generate"):
        train_id.validate(tiny_config(**{"data.path": "x"}), num_devices=8)
    c = tiny_config()
    c.data.synthetic.num_idents = 3
    with pytest.raises(ConfigError, match=r"config\.data\.synthetic\.num_idents: unknown key; did you mean "
                                          r"config\.data\.synthetic\.num_identities\?"):
        train_id.validate(c, num_devices=8)


def test_cli_mistakes_are_one_line(tmp_path):
    cases = [
        (["--config.totl_steps=3"], cli.USAGE_EXIT, ["--config.totl_steps", "--config.total_steps"]),
        (["--config.loss.margin=2.0"], cli.ERROR_EXIT, ["config.loss.margin=2.0", "[0, pi/2)"]),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "alignax.identity.train", f"--config={CONFIG}",
                               f"--workdir={tmp_path / 'w'}", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for args, _, _ in cases]
    for (args, code, expected), proc in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, (args, err[-2000:])
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, (args, err[-2000:])
        assert err.startswith("error: ") and all(e in err for e in expected), (args, err)
    assert not (tmp_path / "w").exists()  # refused before the workdir was touched


# ---- training ---------------------------------------------------------------------------------------------------


TRAINED_CONFIG = dict(total_steps=60, eval_every=0, checkpoint_every=0, log_every=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny embedder trained by `train_id` (a compile of the train step plus 60 steps), shared by the tests
    that need a trained one: (RunResult, workdir)."""
    workdir = tmp_path_factory.mktemp("identity") / "run"
    return train_id.run(tiny_config(**TRAINED_CONFIG), workdir), workdir


@pytest.mark.slow  # ~55 s of CPU when the machine is busy: the `trained` fixture
def test_tiny_run_learns_identities_and_exports_them(trained):
    from alignax.models import iresnet

    result, workdir = trained
    tmp_path = workdir.parent
    config = tiny_config(**TRAINED_CONFIG)
    first, last = result.evals[0], result.evals[-1]
    print(f"\nverification accuracy {first.verification_accuracy:.3f} -> {last.verification_accuracy:.3f}, "
          f"same-different cosine margin {first.cosine_margin:.3f} -> {last.cosine_margin:.3f} ({last.pairs} pairs)")
    assert first.step == 0 and last.step == 60
    assert first.verification_accuracy < 0.7 < 0.85 < last.verification_accuracy  # chance is 0.5
    assert last.same_cosine - last.different_cosine > 0.4 > first.cosine_margin

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/verification_accuracy" in r] == [0, 60]

    # The export (BN running statistics included) reproduces the held-out margin through the reward's loader.
    model = iresnet.load_any(result.output_dir)
    test = open_dataset(str(tmp_path / "run" / "synthetic_identities"), "test", kind="identity_images")
    records = test.get_many(range(len(test)))
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    embeddings = np.asarray(iresnet.embed(model, images))
    labels = np.array([int(r["label"]) for r in records])
    pairs, same = train_id.verification_pairs(labels, config.data.max_pairs, config.seed * 2 + 1)
    sims = train_id.pair_similarity(embeddings, pairs)
    assert sims[same].mean() - sims[~same].mean() == pytest.approx(last.cosine_margin, abs=1e-4)


@pytest.mark.slow  # the `trained` fixture (~55 s when shared with the test above, which pays for it); ~5 s of its own
def test_identity_reward_with_a_trained_embedder_scores_the_same_identity_higher(trained, tmp_path):
    """The issue's acceptance test: the `identity` reward, built on the exported embedder with references from
    one held-out split (validation), scores unseen images (the test split) of the same identity higher than
    those of other identities."""
    import jax.numpy as jnp

    import alignax.rewards
    from alignax.rewards import face_align
    from alignax.rewards import setup as reward_setup

    result, workdir = trained
    dataset = str(workdir / "synthetic_identities")
    references = open_dataset(dataset, "validation", kind="identity_images")
    refs_root = id_data.save_identity_directory(tmp_path / "references",
                                                {"validation": references.get_many(range(len(references)))})
    test = open_dataset(dataset, "test", kind="identity_images")
    records = test.get_many(range(len(test)))
    images = jnp.asarray(np.stack([r["image"] for r in records]).astype(np.float32) / 255.0)
    truth = [r["identity"] for r in records]
    identities = sorted(set(truth))
    # The synthetic faces fill the frame: fixed landmarks at the 112 template map the 32x32 image onto the
    # embedder's 32x32 crop unchanged.
    reward = alignax.rewards.get("identity", embedder=result.output_dir, references=str(refs_root),
                                 landmarks="fixed", points=face_align.ARCFACE_TEMPLATE_112.tolist(),
                                 reference_size=(112, 112))
    score = jax.jit(reward.apply)

    def scores_against(identity: str) -> np.ndarray:
        batch = reward_setup.prepare({reward.name: reward}, {"prompt": ["p"] * len(truth),
                                                             "identity": np.array([identity] * len(truth))})
        batch = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind not in "OUS"}
        return np.asarray(score(reward.params, images, batch)[0])

    table = np.stack([scores_against(i) for i in identities])               # [reference identity, image]
    is_same = np.array(identities)[:, None] == np.array(truth)[None, :]
    same, different = table[is_same], table[~is_same]
    margin = float(same.mean() - different.mean())
    top1 = float(np.mean(table.argmax(axis=0) == np.array([identities.index(t) for t in truth])))
    print(f"\nidentity reward with the trained embedder: mean same-identity {same.mean():.3f}, mean different "
          f"{different.mean():.3f}, margin {margin:.3f}; nearest reference is the right identity for "
          f"{top1:.0%} of {len(truth)} held-out images")
    assert np.all(np.isfinite(table)) and np.all(np.abs(table) <= 1 + 1e-5)
    assert margin > 0.3, margin  # measured 0.471 (same 0.751, different 0.280)
    assert top1 > 0.7, top1      # measured 83%; chance is 1/16


class Killed(Exception):
    pass


@pytest.mark.slow  # ~60 s when the machine is busy: three short runs sharing one compiled train step
def test_kill_and_resume_is_exact(tmp_path):
    config = tiny_config(total_steps=6, eval_every=0, checkpoint_every=2, log_every=1, **{"augment.flip": True})
    straight = train_id.run(config, tmp_path / "straight")

    def kill(done: int) -> None:
        if done == 5:
            raise Killed
    with pytest.raises(Killed):
        train_id.run(config, tmp_path / "resumed", on_step=kill)  # checkpoints at 2 and 4, killed after 5
    resumed = train_id.run(config, tmp_path / "resumed")
    assert resumed.final_step == straight.final_step == 6
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    a, b = flat(straight.params), flat(resumed.params)
    assert a.keys() == b.keys() and any(k.endswith("['mean']") for k in a)  # BN statistics are part of it
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:5]

    def losses(run: str) -> dict[int, float]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses("straight") == losses("resumed") and len(losses("resumed")) == 6


# ---- the run frame (alignax.training.small_loop): lock, SIGTERM, status.json, metrics, damaged checkpoints ------


def micro_config(**overrides):
    """The smallest run that exercises the loop: a one-stage IResNet on 8x8 images, 6 steps."""
    return tiny_config(**{"total_steps": 6, "batch_size": 8, "eval_batch_size": 8, "eval_every": 0,
                          "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "data_parallel": False,
                          "export_onnx": True, "model.layers": (1,), "model.widths": (8,), "model.stem_width": 4,
                          "model.embedding_size": 8,
                          "data.synthetic": dict(num_identities=4, images_per_identity=6, image_size=8,
                                                 num_validation=2, num_test=2), **overrides})


def test_a_second_run_on_the_workdir_is_refused_before_any_work(tmp_path):
    with other_run_holds(tmp_path / "w"), pytest.raises(
            ConfigError, match=r"another alignax run is using it \(pid 4242 on host elsewhere"):
        train_id.run(micro_config(), tmp_path / "w")
    assert not (tmp_path / "w" / "synthetic_identities").exists()  # refused before generating data
    assert not (tmp_path / "w" / "status.json").exists()           # the holder's status is not overwritten


def test_sigterm_before_the_first_step_stops_with_nothing_saved(tmp_path, clear_preemption):  # noqa: F811  (fixture)
    from alignax.training import preemption

    preemption.request()  # e.g. during the CLI's start-up
    result = train_id.run(micro_config(), tmp_path / "w")
    assert result.preempted and result.final_step == 0 and result.evals == []
    assert status(tmp_path / "w") == {"state": "preempted", "step": 0, "total_steps": 6,
                                      "reason": "SIGTERM while preparing the data, before the first step: nothing "
                                                "saved"}
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_sigterm_saves_and_stops_and_a_damaged_checkpoint_falls_back(tmp_path, clear_preemption):  # noqa: F811  (fixture)
    """SIGTERM after step 3: step 3 checkpointed, status.json 'preempted', nothing exported, the lock released.
    A rerun killed after step 5 (checkpoint 4): status 'failed'. Step 4 damaged: the next rerun falls back to 3,
    cuts metrics.jsonl back to it and finishes; every step's train row appears once."""
    from alignax.training import preemption

    workdir = tmp_path / "w"
    config = micro_config()
    result = train_id.run(config, workdir, on_step=sigterm_at(3))
    assert result.preempted and result.final_step == 3 and result.output_dir == ""
    assert status(workdir) == {"state": "preempted", "step": 3, "total_steps": 6, "reason": "SIGTERM: saved step 3"}
    assert checkpoint_steps(workdir) == [2, 3]
    assert not (workdir / "export").exists()
    with other_run_holds(workdir):  # an flock of our own succeeds: the run released the workdir
        pass

    preemption.clear()

    def kill(done: int) -> None:
        if done == 5:
            raise Killed
    with pytest.raises(Killed):
        train_id.run(config, workdir, on_step=kill)
    assert status(workdir)["state"] == "failed" and status(workdir)["step"] == 5
    assert train_rows(workdir) == [1, 2, 3, 4, 5]

    os.remove(workdir / "checkpoints" / "4" / "state" / "_METADATA")
    result = train_id.run(config, workdir)
    assert not result.preempted and result.final_step == 6
    assert (workdir / "checkpoints" / "4.unreadable").is_dir()
    assert status(workdir) == {"state": "finished", "step": 6, "total_steps": 6, "reason": ""}
    assert train_rows(workdir) == [1, 2, 3, 4, 5, 6]

    # config.export_onnx: the insightface-layout ONNX beside the safetensors export computes the same embedding.
    import onnxruntime as ort

    from alignax.models import iresnet
    exported = iresnet.load_any(result.output_dir)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(workdir / "export" / train_id.ONNX_NAME), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input.1": x})[0], np.asarray(exported(x)), rtol=1e-5, atol=1e-5)
