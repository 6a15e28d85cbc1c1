"""`alignax.export --pipeline`: a run on a full SD3 pipeline root, exported as a whole pipeline that
`StableDiffusion3Pipeline.from_pretrained` loads and samples exactly as alignax does (issue 12)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import torch

from alignax import export
from alignax.errors import ConfigError, WeightsError
from alignax.models import load_diffusers
from tests.parity import max_rel_err
from tests.training.test_trainer import make_trainer

REPO = Path(__file__).resolve().parents[2]
PROMPT = "portrait of a person smiling"
SEQ_LEN = 16  # T5 tokens: short, so the pipeline's and alignax's sampling stay cheap


def _tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_world, tiny_sd3_pipeline):
    """Two full fine-tuning steps on the tiny SD3 pipeline root (text encoders and all) as
    config.model.pretrained, then `python -m alignax.export --pipeline` (bare: the run's own root)."""
    tmp = tmp_path_factory.mktemp("pipeline_export")
    trainer = make_trainer(tmp, tiny_world, name="run", total_steps=2, **{"model.pretrained": tiny_sd3_pipeline})
    result = trainer.run()
    out = tmp / "out"
    done = subprocess.run([sys.executable, "-m", "alignax.export", f"--workdir={tmp / 'run'}", f"--out={out}",
                           "--pipeline"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, trainer, result, out, done.stdout


def _embeddings(base: str, pipe) -> tuple:
    """(prompt, pooled, negative, negative pooled) for PROMPT and the empty negative prompt, as numpy:
    alignax's own text encoders when they exist, else the diffusers pipeline's encode_prompt."""
    try:
        from alignax.conditioning import TextEncoders
    except ImportError:
        print("prompt embeddings: diffusers' encode_prompt (alignax.conditioning.TextEncoders is missing)")
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=[PROMPT], prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
                max_sequence_length=SEQ_LEN)
        return tuple(t.numpy() for t in (embeds, pooled, negative, negative_pooled))
    print("prompt embeddings: alignax.conditioning.TextEncoders")
    encoders = TextEncoders.load(base)
    embeds, pooled = encoders.encode_prompt([PROMPT], max_sequence_length=SEQ_LEN)
    negative, negative_pooled = encoders.encode_prompt([""], max_sequence_length=SEQ_LEN)
    return tuple(np.asarray(a) for a in (embeds, pooled, negative, negative_pooled))


def test_exported_pipeline_samples_as_alignax_does(pipeline_run, tiny_sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    from alignax import sampling

    tmp, trainer, result, out, stdout = pipeline_run
    assert stdout.strip().splitlines()[-1] == (
        f"exported step 2 as a pipeline (transformer + vae + scheduler, text_encoder, text_encoder_2, "
        f"text_encoder_3, tokenizer, tokenizer_2, tokenizer_3 from {tiny_sd3_pipeline}) to {out}")
    pipe = StableDiffusion3Pipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    num_steps, guidance, shift = 3, 4.0, float(pipe.scheduler.config.shift)
    noise = np.random.default_rng(0).standard_normal(trainer.models.latent_shape(1)).astype(np.float32)  # NHWC
    size = noise.shape[1] * pipe.vae_scale_factor
    with torch.no_grad():
        images = pipe(PROMPT, height=size, width=size, num_inference_steps=num_steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(0), latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                      max_sequence_length=SEQ_LEN, output_type="np").images

    embeds, pooled, negative, negative_pooled = _embeddings(tiny_sd3_pipeline, pipe)
    batch = dict(encoder_hidden_states=embeds, pooled_projections=pooled,
                 negative_encoder_hidden_states=negative, negative_pooled_projections=negative_pooled)
    params = trainer.models.transformer_params(result.state["trainable"], trainer.frozen)
    generate = jax.jit(lambda p, b, x: sampling.generate_images(trainer.models, p, trainer.frozen, b, x,
                                                                num_steps=num_steps, shift=shift,
                                                                guidance_scale=guidance))
    expected = np.asarray(generate(params, batch, noise))
    err = max_rel_err(images, expected)
    print(f"from_pretrained round trip (CFG {guidance}, {num_steps} steps, through the VAE decode): "
          f"max rel err {err:.2e}")
    assert images.shape == expected.shape and float(np.std(expected)) > 1e-3  # real images, not a constant
    assert err <= 1e-4
    # The check can fail: the untrained base transformer samples measurably different images.
    untrained = np.asarray(generate(load_diffusers(Path(tiny_sd3_pipeline) / "transformer").params, batch, noise))
    assert max_rel_err(untrained, expected) > 1e-3


def test_pipeline_export_holds_the_trained_transformer_and_the_base_files(pipeline_run, tiny_sd3_pipeline):
    from alignax.models import setup as model_setup

    tmp, trainer, result, out, _ = pipeline_run
    base = Path(tiny_sd3_pipeline)
    trained = load_diffusers(out / "transformer").params
    original = load_diffusers(base / "transformer").params
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(original), strict=True))
    assert moved > 1e-5  # training changed the transformer, and the export holds the change
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"

    # Everything else is the base's, byte for byte (the run used the base's own VAE); heads never go along.
    exported, original_files = _tree_files(out), _tree_files(base)
    others = {k: v for k, v in original_files.items() if not k.startswith("transformer/")}
    assert {k: v for k, v in exported.items() if not k.startswith("transformer/") and k != export.MARKER} == others
    marker = json.loads(exported[export.MARKER])
    assert marker["pipeline"] == str(base) and sorted(marker["files"]) == sorted(set(exported) - {export.MARKER})

    # The export is itself a pipeline root for config.model.pretrained (issue 12: full roots load there).
    model = ml_collections.ConfigDict(dict(trainer.config.model.to_dict(), pretrained=str(out)))
    t_src, _, v_src, _ = model_setup.build_modules(model)
    assert (t_src.directory, v_src.directory) == (out / "transformer", out / "vae")


def test_pipeline_reexport_with_hardlinks_shares_only_weights(pipeline_run, tiny_sd3_pipeline, tmp_path):
    import stat

    tmp = pipeline_run[0]
    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(tiny_sd3_pipeline, base)
    for path in base.rglob("*.safetensors"):
        path.chmod(0o440)  # a read-only base: publishing the export must not chmod it through a link
    before = _tree_files(base)
    export.export(tmp / "run", out, pipeline=str(base))
    assert not any(p.stat().st_nlink > 1 for p in out.rglob("*") if p.is_file())  # copies by default
    export.export(tmp / "run", out, pipeline=str(base), hardlink=True)  # replaces the earlier pipeline export
    assert os.path.samefile(out / "text_encoder" / "model.safetensors", base / "text_encoder" / "model.safetensors")
    vae = Path("vae", "diffusion_pytorch_model.safetensors")  # the run's VAE: its own pipeline's, not BASE's copy
    assert os.path.samefile(out / vae, Path(tiny_sd3_pipeline) / vae)
    for name in ("text_encoder/config.json", "tokenizer/tokenizer.json", "model_index.json",
                 "scheduler/scheduler_config.json"):
        assert not os.path.samefile(out / name, base / name), name  # rewritten in place by their writers: copied
    assert {stat.S_IMODE(p.stat().st_mode) for p in base.rglob("*.safetensors")} == {0o440}
    export.export(tmp / "run", out, pipeline=str(base))  # replacing a linked export only unlinks
    assert _tree_files(base) == before and not any(p.stat().st_nlink > 1 for p in base.rglob("*") if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no scratch left


def test_pipeline_from_and_to_remote_paths(pipeline_run, tiny_sd3_pipeline):
    import fsspec

    from alignax import fs

    tmp, _, _, _, _ = pipeline_run
    memory = fsspec.filesystem("memory")
    fs.put_tree(tiny_sd3_pipeline, "memory://alignax-pipeline-test/base")
    export.export(tmp / "run", "memory://alignax-pipeline-test/out", pipeline="memory://alignax-pipeline-test/base")
    base = _tree_files(Path(tiny_sd3_pipeline))
    for name, data in base.items():
        if not name.startswith("transformer/"):
            assert memory.cat(f"/alignax-pipeline-test/out/{name}") == data, name
    memory.rm("/alignax-pipeline-test", recursive=True)


def test_pipeline_errors_come_before_the_restore(pipeline_run, tiny_sd3_pipeline, tmp_path, monkeypatch):
    tmp, _, _, _, _ = pipeline_run

    def no_restore(*args, **kwargs):
        raise AssertionError("restored a checkpoint before refusing --pipeline")

    monkeypatch.setattr(export.saved_run, "load", no_restore)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=rf"--pipeline={re.escape(str(missing))}: no such directory"):
        export.export(tmp / "run", tmp_path / "x", pipeline=str(missing))
    not_a_pipeline = tmp_path / "transformer_only"
    shutil.copytree(Path(tiny_sd3_pipeline) / "transformer", not_a_pipeline)
    with pytest.raises(ConfigError, match=r"is not a diffusers pipeline root \(no model_index.json\)"):
        export.export(tmp / "run", tmp_path / "x", pipeline=str(not_a_pipeline))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd3_pipeline, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(WeightsError, match=rf"{re.escape(str(broken / 'tokenizer_2'))}: missing"):
        export.export(tmp / "run", tmp_path / "x", pipeline=str(broken))
    shutil.copytree(Path(tiny_sd3_pipeline) / "tokenizer", broken / "tokenizer_2")
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps(dict(config, joint_attention_dim=32)))
    with pytest.raises(ConfigError, match=r"joint_attention_dim=32 but the run's has joint_attention_dim=16"):
        export.export(tmp / "run", tmp_path / "x", pipeline=str(broken))
    with pytest.raises(ConfigError, match="overlaps the base pipeline"):
        export.export(tmp / "run", Path(tiny_sd3_pipeline) / "export", pipeline=True)
    with pytest.raises(ConfigError, match="--hardlink: .* needs --pipeline"):
        export.export(tmp / "run", tmp_path / "x", hardlink=True)

    # A run whose config.model.pretrained is not a pipeline root: --pipeline alone has nothing to copy.
    workdir = tmp_path / "run"
    shutil.copytree(tmp / "run", workdir)
    saved = json.loads((workdir / "checkpoints" / "config.json").read_text())
    saved["model"]["pretrained"] = ""
    (workdir / "checkpoints" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"--pipeline: the run has no config.model.pretrained .* --pipeline=BASE"):
        export.export(workdir, tmp_path / "x", pipeline=True)
    assert not (tmp_path / "x").exists() and not (Path(tiny_sd3_pipeline) / "export").exists()
