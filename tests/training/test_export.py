"""`alignax.export`: checkpoints → diffusers directories that diffusers loads, with equal outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from alignax import export
from alignax.errors import ConfigError
from alignax.models import load_diffusers
from tests.parity import max_rel_err
from tests.reference_models import run_torch_transformer, transformer_inputs
from tests.training.test_trainer import make_trainer

REPO = Path(__file__).resolve().parents[2]


def alignax_forward(trainer, params, inputs):
    x = jax.numpy.asarray(inputs["hidden_states"]).transpose(0, 2, 3, 1)
    v = trainer.models.velocity(params, x, inputs["timestep"], inputs["encoder_hidden_states"],
                                inputs["pooled_projections"])
    return np.asarray(v).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_world, pretrained_root):
    """LoRA on a pretrained (random, non-trivial) base loaded from a diffusers pipeline root."""
    tmp = tmp_path_factory.mktemp("lora_export")
    trainer = make_trainer(tmp, tiny_world, name="run", **{"lora.enabled": True, "lora.rank": 2, "lora.alpha": 4.0,
                                                            "ema.enabled": True, "ema.decay": 0.5,
                                                            "model.pretrained": pretrained_root})
    result = trainer.run(stop_after=3)
    return tmp, trainer, result


def test_lora_merge_and_separate_load_in_diffusers(lora_run):
    from diffusers import SD3Transformer2DModel
    tmp, trainer, result = lora_run
    merged = trainer.models.transformer_params(result.state["trainable"], trainer.frozen)
    inputs = transformer_inputs(trainer.models.transformer.config.to_dict(), seed=3)
    expected = alignax_forward(trainer, merged, inputs)
    base_only = alignax_forward(trainer, trainer.frozen["transformer_base"], inputs)
    assert max_rel_err(base_only, expected) > 1e-4  # the adapter changes the model: the test can fail

    export.export(tmp / "run", tmp / "merged", lora_mode="merge")
    torch_merged = SD3Transformer2DModel.from_pretrained(tmp / "merged").eval()
    err_merged = max_rel_err(run_torch_transformer(torch_merged, inputs), expected)

    export.export(tmp / "run", tmp / "separate", lora_mode="separate")
    torch_lora = SD3Transformer2DModel.from_pretrained(tmp / "separate").eval()
    torch_lora.load_lora_adapter(str(tmp / "separate" / "lora"), use_safetensors=True)
    err_separate = max_rel_err(run_torch_transformer(torch_lora, inputs), expected)
    print(f"export parity: merged {err_merged:.2e}, separate {err_separate:.2e}")
    assert err_merged <= 1e-5 and err_separate <= 1e-5


def test_ema_export_and_no_heads(lora_run, tmp_path):
    tmp, trainer, result = lora_run
    out = export.export(tmp / "run", tmp_path / "ema", ema=True)
    loaded = load_diffusers(out)
    expected = jax.device_get(trainer.models.transformer_params(result.state["ema"], trainer.frozen))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_export_errors_name_the_flag(lora_run, tmp_path):
    tmp, _, _ = lora_run
    with pytest.raises(ConfigError, match="--step=99"):
        export.export(tmp / "run", tmp_path / "x", step=99)
    with pytest.raises(ConfigError, match="--workdir"):
        export.export(tmp_path / "empty", tmp_path / "x")
    with pytest.raises(ConfigError, match="--lora"):
        export.export(tmp / "run", tmp_path / "x", lora_mode="fold")
    assert not (tmp_path / "x").exists()
    torch.manual_seed(0)


# ---- where an export may go; a random-init VAE goes along; remote --out (issues 9.1, 10.3-5) ----------

@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tiny_world):
    """A run with a random-init MM-DiT and VAE, checkpointed once (no train step compiled). The saved
    transformer is moved off its init, so a reload that re-drew from a seed could not match it."""
    tmp = tmp_path_factory.mktemp("random_export")
    trainer = make_trainer(tmp, tiny_world, name="run")
    state = trainer.initial_state()
    state = {**state, "trainable": jax.tree.map(lambda a: a + 0.01, state["trainable"])}
    trainer.save(state)
    trainer.checkpointer.wait()
    return tmp, trainer, state


def _snapshot(path):
    """Every file and directory under `path` (or the file itself) with its bytes: to prove nothing changed."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_export_refuses_to_overwrite_what_is_not_an_earlier_export(random_run, tmp_path, monkeypatch):
    tmp, _, _ = random_run
    workdir, other = tmp / "run", tmp_path / "other_run"  # another run's workdir, as a run leaves it
    (other / "checkpoints" / "3").mkdir(parents=True)
    (other / "checkpoints" / "3" / "state").write_bytes(b"precious")
    (other / "metrics.jsonl").write_text("{}\n")
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "vae" / "config.json").write_text("{}")
    (pipeline / "model_index.json").write_text("{}")
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"precious")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    cases = {  # --out: what the message says
        workdir: "is the --workdir itself",
        workdir / "checkpoints": "inside the run's checkpoints/",
        workdir / "checkpoints" / "new": "inside the run's checkpoints/",
        other: r"is a training workdir \(it holds checkpoints/\)",
        other / "checkpoints" / "new": "a training workdir's checkpoints/",
        pipeline: "diffusers pipeline root",
        a_file: "is a file",
        foreign: "not an alignax export",
        tmp: "contains the --workdir",
    }
    before = {out: _snapshot(out) for out in (workdir, other, pipeline, a_file, foreign)}

    def no_restore(*args, **kwargs):
        raise AssertionError("restored a checkpoint before refusing --out")

    monkeypatch.setattr(export.saved_run, "load", no_restore)
    for out, reason in cases.items():
        with pytest.raises(ConfigError, match=rf"--out={re.escape(str(out))}: .*{reason}"):
            export.export(workdir, out)
    for out, snapshot in before.items():
        assert _snapshot(out) == snapshot, out
    assert not (workdir / "checkpoints" / "new").exists() and not (other / "checkpoints" / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other_run", "pipeline",
                                                          "weights.safetensors"]  # no scratch left


def test_reexport_replaces_only_an_earlier_export_with_normal_permissions(random_run, tmp_path):
    tmp, _, _ = random_run
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    old_umask = os.umask(0o022)
    try:
        export.export(tmp / "run", out)
    finally:
        os.umask(old_umask)
    marker = json.loads((out / export.MARKER).read_text())
    assert marker["step"] == 0 and marker["workdir"] == str(tmp / "run")
    assert sorted(marker["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                             if p.is_file() and p.name != export.MARKER)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {k: 0o755 if (out / k).is_dir() else 0o644 for k in modes}, modes  # mkdtemp gave 0700/0600

    # An earlier export (say a --lora=separate one: it had lora/) is replaced whole, not merged into.
    (out / "lora").mkdir()
    (out / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"old")
    marker["files"].append("lora/pytorch_lora_weights.safetensors")
    (out / export.MARKER).write_text(json.dumps(marker))
    export.export(tmp / "run", out)
    assert not (out / "lora").exists() and (out / "vae" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the scratch copy and the old one are gone

    # ...but not when the user put a file of their own into it.
    (out / "README.md").write_text("my notes")
    with pytest.raises(ConfigError, match=r"did not write: \['README.md'\]"):
        export.export(tmp / "run", out)
    assert (out / "README.md").read_text() == "my notes"


def test_export_and_evaluate_on_a_wrong_workdir_only_read(tmp_path):
    from alignax import evaluate
    empty = tmp_path / "empty"
    empty.mkdir()
    for workdir, reason in ((tmp_path / "missing", "no such directory"), (empty, "has no checkpoints/")):
        with pytest.raises(ConfigError, match=rf"--workdir={re.escape(str(workdir))}: {reason}"):
            export.export(workdir, tmp_path / "out")
        with pytest.raises(ConfigError, match=rf"--workdir={re.escape(str(workdir))}: {reason}"):
            evaluate.evaluate(workdir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(empty.iterdir())


def test_random_init_vae_is_exported_and_the_export_reloads_as_pretrained(random_run, tmp_path):
    from diffusers import AutoencoderKL

    from alignax import saved_run
    from alignax.models import setup as model_setup
    from tests.training.conftest import assert_trees_equal

    tmp, trainer, state = random_run
    out = tmp_path / "out"
    export.export(tmp / "run", out)
    torch_vae = AutoencoderKL.from_pretrained(out / "vae")
    assert torch_vae.config.latent_channels == trainer.models.vae.config.latent_channels

    # A new run from the export alone: another seed, so nothing can be re-drawn to look equal.
    reloaded = make_trainer(tmp_path, trainer.config.data.path, name="reloaded", seed=trainer.config.seed + 1,
                            **{"model.pretrained": str(out)})
    assert_trees_equal(reloaded.initial_state()["trainable"]["transformer"], state["trainable"]["transformer"])
    assert_trees_equal(reloaded.frozen["vae"], trainer.frozen["vae"])
    _, _, v_src, vae_module = model_setup.build_modules(trainer.config.model)
    assert_trees_equal(saved_run.vae_params(trainer.config, v_src, vae_module), trainer.frozen["vae"])


def test_export_to_a_remote_out_uploads_and_publishes_the_marker_last(random_run, tmp_path):
    import fsspec

    tmp, trainer, state = random_run
    memory = fsspec.filesystem("memory")
    out = "memory://alignax-export-test/out"
    export.export(tmp / "run", out)
    files = sorted(p.removeprefix("/alignax-export-test/out/") for p in memory.find("/alignax-export-test/out"))
    marker = json.loads(memory.cat(f"/alignax-export-test/out/{export.MARKER}"))
    assert files == sorted([*marker["files"], export.MARKER]) and "vae/config.json" in files
    with memory.open("/alignax-export-test/out/config.json") as f:
        assert json.load(f)["_class_name"] == "SD3Transformer2DModel"
    export.export(tmp / "run", out)  # an earlier export is replaced
    memory.pipe("/alignax-export-test/out/notes.txt", b"mine")
    with pytest.raises(ConfigError, match="did not write"):
        export.export(tmp / "run", out)
    memory.pipe("/alignax-export-test/foreign/notes.txt", b"mine")
    with pytest.raises(ConfigError, match="not an alignax export"):
        export.export(tmp / "run", "memory://alignax-export-test/foreign")
    assert memory.cat("/alignax-export-test/foreign/notes.txt") == b"mine"
    assert not (Path.cwd() / "memory:").exists()  # no local `memory:/...` tree


def test_export_cli_ends_with_what_it_wrote_where(random_run, tmp_path):
    tmp, _, _ = random_run
    done = subprocess.run([sys.executable, "-m", "alignax.export", f"--workdir={tmp / 'run'}",
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"exported step 0 (transformer + vae) to {tmp_path / 'out'}"


def test_export_names_an_unreadable_step_and_the_readable_ones(random_run, tmp_path):
    tmp, _, _ = random_run
    workdir = tmp_path / "run"
    shutil.copytree(tmp / "run", workdir)
    (workdir / "checkpoints" / "9").mkdir()  # a stray empty step directory, newer than the real one
    with pytest.raises(ConfigError, match=r"checkpoint step 9 is unreadable .*other saved steps \[0\]"):
        export.export(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.is_dir()) == ["0", "9"]  # only read
