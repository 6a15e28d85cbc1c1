"""SigLIP parity against transformers' SiglipModel, loaded through `load_transformers`."""

import json
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from alignax.errors import WeightsError
from alignax.models import load_transformers
from tests.parity import max_rel_err, to_numpy

OUTPUTS = ["image", "patches", "text", "text_masked", "logits_per_image", "logits_per_text"]


def tiny_config(num_layers: int = 2, image_size: int = 30) -> transformers.SiglipConfig:
    # projection_size must equal the vision width for the logits, as in every released SigLIP.
    return transformers.SiglipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=num_layers,
                         num_attention_heads=4, max_position_embeddings=16, projection_size=48,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=53, num_hidden_layers=num_layers, num_attention_heads=4,
                           image_size=image_size, patch_size=10))


def run_all(pretrained, ids, mask, pixels):
    """Every output in one compiled call."""
    def all_outputs(params, ids, mask, pixels):
        apply = lambda *a, **k: pretrained.module.apply({"params": params}, *a, **k)
        out = apply(ids, pixels, mask)
        return dict(image=apply(pixels, method="get_image_features"),
                    patches=apply(pixels, method="get_image_patch_features"),
                    text=apply(ids, method="get_text_features"),
                    text_masked=apply(ids, mask, method="get_text_features"),
                    logits_per_image=out.logits_per_image, logits_per_text=out.logits_per_text)
    return jax.jit(all_outputs)(pretrained.params, ids.numpy().astype(np.int32), mask.numpy().astype(np.int32),
                                pixels.numpy())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.SiglipModel(tiny_config()).eval()
    with torch.no_grad():  # off the init (zero biases, unit norms, zero logit scale/bias)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    directory = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(directory)
    ids = torch.randint(3, 99, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])  # padded row: its last token is padding
    pixels = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        image = model.get_image_features(pixel_values=pixels)
        expected = dict(image=image.pooler_output, patches=image.last_hidden_state,
                        text=model.get_text_features(input_ids=ids).pooler_output,
                        text_masked=model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                        logits_per_image=out.logits_per_image, logits_per_text=out.logits_per_text)
    pretrained = load_transformers(directory)
    return SimpleNamespace(directory=directory, pretrained=pretrained,
                           expected={k: to_numpy(v) for k, v in expected.items()},
                           actual=run_all(pretrained, ids, mask, pixels))


@pytest.mark.parametrize("output", OUTPUTS)
def test_matches_transformers(case, output):
    err = max_rel_err(case.actual[output], case.expected[output])
    print(f"siglip {output}: max_rel_err={err:.2e}")
    assert err <= 1e-5


def test_patch_features_shape(case):
    assert case.actual["patches"].shape == (3, 9, 48)


def test_mask_changes_the_padded_row(case):
    """The padded row's pooled token is padding; masking it out must matter, or the masked test proves nothing."""
    assert max_rel_err(case.expected["text_masked"][1], case.expected["text"][1]) > 1e-3


def test_pooling_head_params_keep_torch_names(case):
    head = case.pretrained.params["vision_model"]["head"]
    assert head["attention"]["in_proj_weight"].shape == (3 * 48, 48)
    assert head["probe"].shape == (1, 1, 48)
    specs = case.pretrained.logical_specs()
    assert specs["vision_model"]["head"]["attention"]["in_proj_weight"] == PartitionSpec("heads", "embed")


def test_vision_without_head_is_refused(case, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(case.directory, directory)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = False
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="vision_use_head"):
        load_transformers(directory)
