"""CLIP parity against transformers' CLIPModel, loaded through `load_transformers`."""

import json
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

from alignax.errors import WeightsError
from alignax.models import load_transformers
from tests.parity import max_rel_err, to_numpy

# Old configs (eos_token_id == 2) pool text at argmax(input_ids); new ones at the first eos_token_id.
CASES = {
    "quick_gelu-argmax": dict(hidden_act="quick_gelu", eos_token_id=2),
    "gelu-first_eos": dict(hidden_act="gelu", eos_token_id=5),
}
EOS_POSITIONS = [6, 3]
LENGTH = 9


def tiny_config(hidden_act: str, eos_token_id: int) -> transformers.CLIPConfig:
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                         eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=53, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=10, hidden_act=hidden_act),
        projection_dim=24, logit_scale_init_value=1.7)


def perturb(model: torch.nn.Module) -> None:
    """Moves every param off its init (zero biases, unit norms) so a mis-mapped one shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def token_ids(eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids where argmax(ids) and the first eos_token_id sit at different positions."""
    ids = torch.randint(10, 90, (len(EOS_POSITIONS), LENGTH))
    mask = torch.zeros_like(ids)
    for row, eos in enumerate(EOS_POSITIONS):
        mask[row, :eos + 1] = 1
        if eos_token_id == 2:  # EOT is the highest id; padding after it is 0 as in open_clip
            ids[row, eos], ids[row, eos + 1:] = 98, 0
        else:  # padded with eos itself, so only the *first* occurrence is right
            ids[row, eos:] = eos_token_id
    return ids, mask


def pooled_positions(ids: torch.Tensor, eos_token_id: int) -> list[int]:
    rule_ids = ids if eos_token_id == 2 else (ids == eos_token_id).int()
    return rule_ids.argmax(-1).tolist()


def run_all(pretrained, ids, mask, pixels):
    """Image and text features plus logits in one compiled call."""
    def all_outputs(params, ids, mask, pixels):
        apply = lambda *a, **k: pretrained.module.apply({"params": params}, *a, **k)
        out = apply(ids, pixels, mask)
        return dict(image=apply(pixels, method="get_image_features"),
                    text=apply(ids, mask, method="get_text_features"),
                    logits_per_image=out.logits_per_image, logits_per_text=out.logits_per_text)
    return jax.jit(all_outputs)(pretrained.params, ids.numpy().astype(np.int32), mask.numpy().astype(np.int32),
                                pixels.numpy())


@pytest.fixture(scope="module")
def build_case(tmp_path_factory):
    """name → built case, each built once per module whichever test asks first."""
    built = {}

    def build(name):
        if name not in built:
            built[name] = _build(name, tmp_path_factory.mktemp(name))
        return built[name]
    return build


def _build(name, directory):
    torch.manual_seed(0)
    settings = CASES[name]
    model = transformers.CLIPModel(tiny_config(**settings)).eval()
    perturb(model)
    model.save_pretrained(directory)
    ids, mask = token_ids(settings["eos_token_id"])
    pixels = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        expected = dict(image=model.get_image_features(pixel_values=pixels).pooler_output,
                        text=model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                        logits_per_image=out.logits_per_image, logits_per_text=out.logits_per_text)
    pretrained = load_transformers(directory)
    return SimpleNamespace(name=name, settings=settings, model=model, directory=directory, ids=ids, mask=mask,
                           pixels=pixels, pretrained=pretrained,
                           expected={k: to_numpy(v) for k, v in expected.items()},
                           actual=run_all(pretrained, ids, mask, pixels))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, build_case):
    return build_case(request.param)


@pytest.mark.parametrize("output", ["image", "text", "logits_per_image", "logits_per_text"])
def test_matches_transformers(case, output):
    err = max_rel_err(case.actual[output], case.expected[output])
    print(f"clip {case.name} {output}: max_rel_err={err:.2e}")
    assert err <= 1e-5


def test_inputs_tell_the_pooling_rules_apart(case):
    eos = case.settings["eos_token_id"]
    other = 5 if eos == 2 else 2
    assert pooled_positions(case.ids, eos) == EOS_POSITIONS
    assert pooled_positions(case.ids, other) != EOS_POSITIONS


def test_image_gradient_with_remat_matches_torch(build_case):
    """Reward backprop differentiates through the vision tower; remat must not change the result."""
    case = build_case("gelu-first_eos")
    pretrained = load_transformers(case.directory, remat="full")
    weights = np.random.default_rng(0).normal(size=(3, 24)).astype(np.float32)

    def loss(pixels):
        return jnp.sum(pretrained.get_image_features(pixels) * weights)

    grad = jax.jit(jax.grad(loss))(case.pixels.numpy())
    pixels = case.pixels.clone().requires_grad_(True)
    (case.model.get_image_features(pixel_values=pixels).pooler_output * torch.from_numpy(weights)).sum().backward()
    err = max_rel_err(grad, to_numpy(pixels.grad))
    print(f"clip {case.name} d(image features)/d(pixels): max_rel_err={err:.2e}")
    assert err <= 1e-5


def test_params_carry_logical_axes(case):
    specs = case.pretrained.logical_specs()
    layer = specs["vision_model"]["encoder"]["layers.1"]
    assert layer["self_attn"]["q_proj"]["kernel"] == PartitionSpec("embed", "heads")
    assert layer["mlp"]["fc2"]["kernel"] == PartitionSpec("mlp", "embed")
    embeddings = specs["text_model"]["embeddings"]
    assert embeddings["token_embedding"]["embedding"] == PartitionSpec("vocab", "embed")
    assert specs["logit_scale"] == PartitionSpec()


def copy_model(case, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(case.directory, target)
    return target


def edit_config(directory, section, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[section].update(changes)
    path.write_text(json.dumps(config))


def test_missing_key_names_it(case, tmp_path):
    directory = copy_model(case, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc1.bias"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing key 'vision_model\.encoder\.layers\.1\.mlp\.fc1\.bias'"):
        load_transformers(directory)


def test_wrong_architecture_is_a_shape_mismatch(case, tmp_path):
    directory = copy_model(case, tmp_path)
    edit_config(directory, "text_config", intermediate_size=40)
    with pytest.raises(WeightsError, match=r"shape mismatch for 'text_model\.encoder\.layers\.0\.mlp\.fc1"):
        load_transformers(directory)


def test_unknown_activation_names_the_field(case, tmp_path):
    directory = copy_model(case, tmp_path)
    edit_config(directory, "vision_config", hidden_act="swiglu")
    with pytest.raises(WeightsError, match=r"vision_config\.hidden_act='swiglu'"):
        load_transformers(directory)


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="not a directory"):
        load_transformers(tmp_path / "absent")
