"""`python -m alignax.world.build --preset=smoke`: every stage of the world build for a few steps (so the
build path never rots), the result's layout, and its pipeline sampled by diffusers exactly as alignax
samples it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignax.world import build, paths
from alignax.world.pipeline import MAX_SEQUENCE_LENGTH

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    lines: list[str] = []
    out = build.build(root / "world", preset="smoke", seed=0, progress=lines.append)
    return paths.WorldPaths(out), lines


def test_the_smoke_build_writes_a_complete_world(smoke_world):
    world, lines = smoke_world
    assert [line.split(" ")[1].rstrip(":") for line in lines if line.endswith("...")] == list(build.STAGES)
    manifest = world.read_manifest()
    assert manifest["preset"] == "smoke" and manifest["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    for folder in (world.pipeline / "transformer", world.pipeline / "vae", world.pipeline / "text_encoder_2",
                   world.clip, world.aesthetic, world.identity):
        assert (folder / "config.json").is_file(), folder
    assert world.realism_stats.is_file()
    names = manifest["identities"]
    assert sorted(p.name for p in world.references.iterdir()) == sorted(names)
    quality = manifest["quality"]
    assert set(quality["bars"]) == {"identity_top1", "clip_retrieval", "scorer_accuracy"}
    assert all(0.0 <= quality[k] <= 1.0 for k in quality["bars"])
    from safetensors import safe_open
    with safe_open(str(world.pipeline / "transformer" / "diffusion_pytorch_model.safetensors"), "numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16"}  # shipped in fp16


def test_diffusers_samples_the_world_as_alignax_does(smoke_world):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from alignax.world.quality import WorldSampler
    world, _ = smoke_world
    prompts = ["portrait of person 01, smiling, short hair, light from left, red background"] * 2
    ours_sampler = WorldSampler(str(world.pipeline), num_steps=3, batch_size=2)
    ours = ours_sampler(prompts, seed=0)
    import jax
    noise = np.asarray(jax.random.normal(jax.random.key(0), ours_sampler.latent_shape(2)))  # NHWC, as ours draws it
    pipe = StableDiffusion3Pipeline.from_pretrained(world.pipeline, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)
    size = ours.shape[1]
    theirs = pipe(prompts, num_inference_steps=3, guidance_scale=1.0, height=size, width=size,
                  max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np",
                  latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_a_rerun_is_a_no_op_and_a_foreign_out_is_refused(smoke_world, tmp_path):
    world, _ = smoke_world
    lines: list[str] = []
    scratch = world.root.parent / f".{world.root.name}.build-smoke-0"
    build.build(world.root, preset="smoke", seed=0, scratch=scratch, progress=lines.append)
    assert lines and all(line.endswith("done earlier") for line in lines), lines
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "alignax.world.build", f"--out={foreign}", "--preset=smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "holds no built world" in done.stderr, done.stderr[-2000:]
    assert (foreign / "notes.txt").read_text() == "keep me"
    done = subprocess.run([sys.executable, "-m", "alignax.world.build", f"--out={foreign}", "--preset=smoek"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "smoek" in done.stderr and len(done.stderr.strip().splitlines()) <= 3
    assert json.loads((world.manifest).read_text())["preset"] == "smoke"
