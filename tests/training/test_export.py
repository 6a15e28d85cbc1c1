"""`alignax.export`: checkpoints → diffusers directories that diffusers loads, with equal outputs."""

from __future__ import annotations

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
