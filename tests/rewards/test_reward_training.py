"""Training a preference scorer (alignax.reward_model.train): HPSv2's loss on hand numbers, held-out accuracy
rising on the tiny world's saturation pairs, regex-frozen params, and the saved scorer read back by
load_transformers, by transformers' own CLIPModel and by the `pickscore` reward."""

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
import torch
import transformers

import alignax.rewards
from alignax.data import open_dataset
from alignax.data.pairs_tokens import tiny_world_words, word_merges, write_word_tokenizer
from alignax.errors import ConfigError
from alignax.models import clip as clip_lib
from alignax.models import init_params, load_transformers
from alignax.reward_model import loss as reward_training
from alignax.reward_model import train as train_reward
from experiments.configs import reward_model_tiny
from tests.parity import max_rel_err
from tests.run_frame import checkpoint_steps, other_run_holds, sigterm_at, status, train_rows
from tests.run_frame import clear_preemption as clear_preemption  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
TRAIN_STEPS = 60


def tiny_config(**overrides):
    """The shipped tiny config with the text embeddings frozen, shortened for CPU tests."""
    c = reward_model_tiny.get_config("frozen_text")
    c.total_steps, c.eval_every, c.log_every = TRAIN_STEPS, 30, 10
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


# ---- the pure pieces on hand numbers ------------------------------------------------------------------


def test_loss_equals_hpsv2_cross_entropy_on_hand_numbers():
    # Pair 0: cos(text, image_0) = 1, cos(text, image_1) = 0 (features deliberately not unit length).
    # Pair 1: cos 0.6 and 0.8. Scale exp(ln 10) = 10, so logits are (10, 0) and (6, 8).
    text = np.array([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], np.float32)
    image_0 = np.array([[2.0, 0.0], [5.0, 0.0], [2.0, 0.0]], np.float32)
    image_1 = np.array([[0.0, 3.0], [0.0, 0.5], [0.0, 3.0]], np.float32)
    logits = reward_training.pair_logits(text, image_0, image_1, np.float32(math.log(10.0)))
    np.testing.assert_allclose(np.asarray(logits), [[10, 0], [6, 8], [10, 0]], rtol=1e-6, atol=1e-5)

    label_0 = np.array([1.0, 1.0, 0.5], np.float32)  # image_0, image_0, a tie
    first = math.log(1 + math.exp(-10))            # -log softmax(10, 0)[0]
    second = math.log(1 + math.exp(2))             # -log softmax(6, 8)[0]
    tie = 0.5 * first + 0.5 * (10 + first)         # soft target (0.5, 0.5)
    expected = (first + second + tie) / 3
    loss = reward_training.preference_loss(logits, label_0)
    assert abs(float(loss) - expected) <= 1e-6 * expected
    flipped = reward_training.preference_loss(logits, np.array([0.0, 0.0, 0.5], np.float32))
    # -log softmax(10, 0)[1] = 10 + first; -log softmax(6, 8)[1] = log(1 + e^-2).
    assert abs(float(flipped) - (10 + first + math.log(1 + math.exp(-2)) + tie) / 3) <= 1e-6 * 10


def test_pairwise_accuracy_on_hand_numbers():
    logits = np.array([[2, 1], [1, 2], [3, 3], [0, 5], [4, 1]], np.float32)
    label_0 = np.array([1, 1, 1, 0.5, 0], np.float32)
    # right, wrong, equal scores (half credit), tie label (not counted), wrong.
    assert float(reward_training.pairwise_accuracy(logits, label_0)) == pytest.approx(1.5 / 4)


def test_word_tokenizer_keeps_listed_words_whole(tmp_path):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp_path, tiny_world_words()))
    ids = tokenizer("an orange triangle on a purple background")["input_ids"]
    assert len(ids) == 7 + 2  # seven words, start and end of text
    assert tokenizer.eos_token_id == max(tokenizer.get_vocab().values())
    assert len(tokenizer("zebra")["input_ids"]) == 5 + 2  # unknown words fall back to letters
    assert word_merges(["the"]) == [("t", "h"), ("th", "e</w>")]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"config\.model\.bogus: unknown key"):
        train_reward.validate(tiny_config(**{"model.bogus": 1}), 8)
    with pytest.raises(ConfigError, match=r"config\.batch_size=12 is not divisible"):
        train_reward.validate(tiny_config(batch_size=12), 8)
    with pytest.raises(ConfigError, match=r"config\.preprocessing='nope'"):
        train_reward.validate(tiny_config(preprocessing="nope"), 8)
    with pytest.raises(ConfigError, match=r"config\.data\.path is empty"):
        train_reward.validate(tiny_config(**{"data.generate": ""}), 8)
    train_reward.validate(tiny_config(), 8)


# ---- a real (short) training run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward_run")
    return train_reward.run(tiny_config(), workdir), workdir


def test_heldout_accuracy_rises_above_90_percent(trained):
    result, workdir = trained
    assert [e.step for e in result.evals] == [0, 30, 60]
    first, last = result.evals[0], result.evals[-1]
    assert first.pairs == last.pairs == 64
    # A random scorer is not a coin: its random features lean towards one side of a systematic
    # change like desaturation, so its start may be well below 50%. It must not already be right.
    assert first.accuracy < 0.75, first
    assert last.accuracy > 0.9, last
    assert last.loss < first.loss
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line["eval/accuracy"] for line in lines if "eval/accuracy" in line}
    assert logged == {e.step: pytest.approx(e.accuracy) for e in result.evals}
    assert any("train/loss" in line for line in lines)


def test_regex_frozen_params_do_not_move(trained):
    result, workdir = trained
    config = tiny_config()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(workdir / "tokenizer")
    module = clip_lib.build(train_reward.random_clip_config(config.model.init.to_dict(), tokenizer))
    initial = init_params(clip_lib.ARCHITECTURE, module, jax.random.key(config.seed))
    saved = load_transformers(result.output_dir).params
    for name in ("token_embedding", "position_embedding"):
        np.testing.assert_array_equal(saved["text_model"]["embeddings"][name]["embedding"],
                                      initial["text_model"]["embeddings"][name]["embedding"])
    moved = saved["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    assert np.abs(moved - initial["vision_model"]["embeddings"]["patch_embedding"]["kernel"]).max() > 1e-4


def eval_pairs(workdir: Path):
    source = open_dataset(str(workdir / "tiny_world" / "preference_pairs"), "eval")
    records = source.get_many(range(len(source)))
    images = [np.stack([r[k] for r in records]).astype(np.float32) / 255 for k in ("image_0", "image_1")]
    return images, [r["prompt"] for r in records], np.array([r["label_0"] for r in records])


def test_saved_scorer_reloads_with_the_same_scores(trained):
    result, workdir = trained
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    reloaded = load_transformers(out)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reloaded.params)[0],
                            jax.tree.leaves(result.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))

    (image_0, image_1), prompts, label_0 = eval_pairs(workdir)
    # Reference: transformers' own CLIPModel and tokenizer read from the saved directory, pixels
    # normalised in numpy (the vision tower takes the dataset's 32x32 images without resizing).
    model = transformers.CLIPModel.from_pretrained(out).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(out)
    text = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        t = model.get_text_features(**text).pooler_output
        t = t / t.norm(dim=-1, keepdim=True)
        torch_scores = []
        for images in (image_0, image_1):
            pixels = torch.from_numpy(((images - OPENAI_MEAN) / OPENAI_STD).transpose(0, 3, 1, 2).copy())
            v = model.get_image_features(pixel_values=pixels).pooler_output
            torch_scores.append((model.logit_scale.exp() * (v / v.norm(dim=-1, keepdim=True) * t).sum(-1)).numpy())

    reward = alignax.rewards.get("pickscore", checkpoint=str(out))
    batch = reward.prepare(prompts)
    apply = jax.jit(reward.apply)
    scores = [np.asarray(apply(reward.params, images, batch)[0]) for images in (image_0, image_1)]
    for ours, theirs in zip(scores, torch_scores, strict=True):
        assert max_rel_err(ours, theirs) <= 1e-5

    # The in-memory params of the run score exactly as the reloaded ones.
    for images, expected in zip((image_0, image_1), scores, strict=True):
        np.testing.assert_array_equal(np.asarray(apply(result.params, images, batch)[0]), expected)

    # Held-out accuracy measured here, through the reward registry, agrees with the run's report.
    preferred_first = scores[0] > scores[1]
    accuracy = float(np.mean(preferred_first == (label_0 == 1.0)))
    assert accuracy == pytest.approx(result.evals[-1].accuracy)
    assert accuracy > 0.9


def test_cli_runs_the_tiny_config(tmp_path):
    """The documented command, shortened: exits 0, logs held-out accuracy, writes a loadable scorer."""
    command = [sys.executable, "-m", "alignax.reward_model.train",
               "--config=experiments/configs/reward_model_tiny.py:frozen_text", f"--workdir={tmp_path}",
               "--config.total_steps=2", "--config.eval_every=0", "--config.log_every=1"]
    # Same matmul precision as this process (tests/conftest.py), so the persistent compilation cache
    # serves the programs the in-process run compiled.
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out pairwise accuracy" in done.stderr
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/accuracy" in line] == [0, 2]
    assert load_transformers(tmp_path / "scorer").architecture.name == "clip"


# ---- the run frame (alignax.training.small_loop): lock, SIGTERM, status.json, metrics, damaged checkpoints ------


class Killed(Exception):
    pass


def test_a_second_run_on_the_workdir_is_refused_before_any_work(tmp_path):
    with other_run_holds(tmp_path / "w"), pytest.raises(
            ConfigError, match=r"another alignax run is using it \(pid 4242 on host elsewhere"):
        train_reward.run(tiny_config(), tmp_path / "w")
    assert not (tmp_path / "w" / "tiny_world").exists()   # refused before generating data
    assert not (tmp_path / "w" / "status.json").exists()  # the holder's status is not overwritten


def test_damaged_checkpoint_falls_back_and_sigterm_saves_and_stops(tmp_path, clear_preemption):  # noqa: F811  (fixture)
    """A run killed after step 5 (checkpoints 2 and 4): status 'failed'. Step 4 damaged: the rerun falls back
    to 2 (4 moved aside), cuts metrics.jsonl back to it, and a SIGTERM after step 3 saves 3 and stops with
    status 'preempted', no scorer written and the workdir released; each step's train row appears once.
    Same programs as the `trained` run (same config but cadences), so they compile once per session."""
    workdir = tmp_path / "w"
    config = tiny_config(checkpoint_every=2, keep_checkpoints=3, log_every=1)

    def kill(done: int) -> None:
        if done == 5:
            raise Killed
    with pytest.raises(Killed):
        train_reward.run(config, workdir, on_step=kill)
    assert status(workdir)["state"] == "failed" and status(workdir)["step"] == 5
    assert checkpoint_steps(workdir) == [2, 4] and train_rows(workdir) == [1, 2, 3, 4, 5]

    os.remove(workdir / "checkpoints" / "4" / "state" / "_METADATA")
    result = train_reward.run(config, workdir, on_step=sigterm_at(3))
    assert result.preempted and result.final_step == 3
    assert (workdir / "checkpoints" / "4.unreadable").is_dir() and checkpoint_steps(workdir) == [2, 3]
    assert status(workdir) == {"state": "preempted", "step": 3, "total_steps": TRAIN_STEPS,
                               "reason": "SIGTERM: saved step 3"}
    assert train_rows(workdir) == [1, 2, 3]
    assert not (workdir / "scorer").exists()
    with other_run_holds(workdir):  # an flock of our own succeeds: the run released the workdir
        pass
