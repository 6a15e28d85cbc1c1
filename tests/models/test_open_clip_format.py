"""open_clip checkpoints.

- Against open_clip's own model code (when open_clip is installed; it runs in a subprocess with a
  torchvision stand-in, see open_clip_reference.py): a checkpoint its `CLIP` wrote loads to the same
  features.
- Always: a transformers CLIPModel re-keyed into open_clip's layout loads to the same model and outputs,
  and the two loaders agree param for param.
"""

import argparse
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from alignax.errors import WeightsError
from alignax.models import load_transformers, save_transformers
from alignax.models.open_clip_format import MODEL_CONFIGS, load_open_clip, transformers_config
from tests.parity import max_rel_err, to_numpy

# ViT-H-14-like in miniature: gelu, head_width instead of heads, mlp_ratio that is not 4 (as bigG).
MODEL_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 30, "layers": 2, "width": 48, "head_width": 12, "patch_size": 10,
                   "mlp_ratio": 1.125},
    "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 1.25},
}


def transformers_model() -> transformers.CLIPModel:
    """The same architecture as MODEL_CONFIG; eos_token_id=2 is transformers' argmax pooling, open_clip's rule."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=54, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=10, hidden_act="gelu"),
        projection_dim=24, logit_scale_init_value=1.7)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP keys → open_clip keys (fusing q, k, v into in_proj): the inverse of the loader's table."""
    towers = {"vision_model.encoder.layers.": "visual.transformer.resblocks.",
              "text_model.encoder.layers.": "transformer.resblocks."}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    top = {"logit_scale": "logit_scale",
           "vision_model.embeddings.class_embedding": "visual.class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
           "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
           "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
           "vision_model.post_layernorm.weight": "visual.ln_post.weight",
           "vision_model.post_layernorm.bias": "visual.ln_post.bias",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight",
           "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {"visual.proj": state["visual_projection.weight"].T.contiguous(),
           "text_projection": state["text_projection.weight"].T.contiguous()}
    out.update({theirs: state[ours].clone() for ours, theirs in top.items()})
    for ours, theirs in towers.items():
        layers = {int(k[len(ours):].split(".")[0]) for k in state if k.startswith(ours)}
        for i in layers:
            prefix, target = f"{ours}{i}.", f"{theirs}{i}."
            for name, renamed in renames.items():
                for leaf in ("weight", "bias"):
                    out[f"{target}{renamed}.{leaf}"] = state[f"{prefix}{name}.{leaf}"].clone()
            for leaf in ("weight", "bias"):
                out[f"{target}attn.in_proj_{leaf}"] = torch.cat(
                    [state[f"{prefix}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = transformers_model()
    root = tmp_path_factory.mktemp("open_clip")
    model.save_pretrained(root / "hf")
    state = to_open_clip(model.state_dict())
    torch.save(state, root / "open_clip.pt")
    ids = torch.randint(3, 90, (2, 9))
    ids[0, 6], ids[1, 3] = 98, 98  # EOT is the highest id
    ids[1, 4:] = 0
    pixels = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
        expected = dict(image=model.get_image_features(pixel_values=pixels).pooler_output,
                        text=model.get_text_features(input_ids=ids).pooler_output,
                        logits_per_image=out.logits_per_image)
    pretrained = load_open_clip(root / "open_clip.pt", model_config=MODEL_CONFIG)
    return SimpleNamespace(model=model, root=root, state=state, ids=ids, pixels=pixels, pretrained=pretrained,
                           expected={k: to_numpy(v) for k, v in expected.items()})


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [path for path, _ in flat_a] == [path for path, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_matches_transformers_outputs(case):
    def all_outputs(params, ids, pixels):
        apply = lambda *a, **k: case.pretrained.module.apply({"params": params}, *a, **k)
        return dict(image=apply(pixels, method="get_image_features"), text=apply(ids, method="get_text_features"),
                    logits_per_image=apply(ids, pixels).logits_per_image)
    actual = jax.jit(all_outputs)(case.pretrained.params, case.ids.numpy().astype(np.int32), case.pixels.numpy())
    for name, expected in case.expected.items():
        err = max_rel_err(actual[name], expected)
        print(f"open_clip {name}: max_rel_err={err:.2e}")
        assert err <= 1e-5, name


def test_same_params_as_the_transformers_loader(case):
    assert_same_params(case.pretrained.params, load_transformers(case.root / "hf").params)


def test_exports_a_directory_transformers_loads(case, tmp_path):
    save_transformers(case.pretrained, tmp_path / "exported")
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=case.ids, pixel_values=case.pixels).logits_per_image
    assert max_rel_err(to_numpy(logits), case.expected["logits_per_image"]) <= 1e-6


def test_state_dict_wrapper_and_module_prefix(case, tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in case.state.items()}}, path)
    assert_same_params(load_open_clip(path, model_config=MODEL_CONFIG).params, case.pretrained.params)


def test_safetensors_file_and_hub_directory(case, tmp_path):
    save_file(case.state, tmp_path / "open_clip_model.safetensors")
    assert_same_params(load_open_clip(tmp_path / "open_clip_model.safetensors", model_config=MODEL_CONFIG).params,
                       case.pretrained.params)
    torch.save({"state_dict": {}}, tmp_path / "open_clip_pytorch_model.bin")  # not read: safetensors wins
    assert_same_params(load_open_clip(tmp_path, model_config=MODEL_CONFIG).params, case.pretrained.params)


def test_full_pickle_is_refused(case, tmp_path):
    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": case.state, "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(WeightsError, match=r"epoch_1\.pt: holds more than tensors"):
        load_open_clip(path, model_config=MODEL_CONFIG)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match=r"HPS_v2_compressed\.pt: file not found"):
        load_open_clip(tmp_path / "HPS_v2_compressed.pt", model_config="ViT-H-14")


def test_missing_key_names_the_open_clip_key(case, tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in case.state.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}, path)
    with pytest.raises(WeightsError, match=r"missing open_clip key 'transformer\.resblocks\.1\.attn\.in_proj_bias'"):
        load_open_clip(path, model_config=MODEL_CONFIG)


def test_wrong_model_config_is_a_shape_mismatch(case):
    wrong = {**MODEL_CONFIG, "embed_dim": 32}
    with pytest.raises(WeightsError, match=r"shape mismatch for '(visual\.proj|text_projection)'"):
        load_open_clip(case.root / "open_clip.pt", model_config=wrong)


def test_unsupported_open_clip_option_names_it(case):
    avg_pool = {**MODEL_CONFIG, "vision_cfg": {**MODEL_CONFIG["vision_cfg"], "pool_type": "avg"}}
    with pytest.raises(WeightsError, match=r"vision_cfg\.pool_type='avg'"):
        load_open_clip(case.root / "open_clip.pt", model_config=avg_pool)


@pytest.mark.parametrize("name, millions", [("ViT-L-14", 427.62), ("ViT-H-14", 986.11), ("ViT-bigG-14", 2539.57)])
def test_named_configs_have_open_clips_param_counts(name, millions):
    """The converted config builds in transformers (on the meta device: nothing allocated) with the param
    count open_clip's model table lists; the tiny test above shows alignax matches transformers for a config."""
    config = {k: v for k, v in transformers_config(MODEL_CONFIGS[name]).items() if k != "model_type"}
    with torch.device("meta"):
        model = transformers.CLIPModel(transformers.CLIPConfig(**config))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_matches_open_clips_own_model_code(quick_gelu, tmp_path):
    """A checkpoint written by open_clip's real `CLIP` (DDP `module.` prefix under `state_dict`, as HPSv2
    ships) loads, and image features, text features and logit_scale equal open_clip's on the same inputs.
    open_clip runs in a subprocess (tests/models/open_clip_reference.py explains why)."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed: pip install --no-deps open_clip_torch==3.3.0 ftfy==6.3.1 "
                    "(its torchvision dependency does not load beside the CPU torch)")
    script = Path(__file__).with_name("open_clip_reference.py")
    model_cfg = {**MODEL_CONFIG, "quick_gelu": quick_gelu}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), json.dumps(MODEL_CONFIG)]
                          + (["--quick_gelu"] if quick_gelu else []), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = np.load(tmp_path / "outputs.npz")
    model = load_open_clip(tmp_path / "open_clip.pt", model_config=model_cfg)
    image = model.get_image_features(reference["pixels"])
    text = model.get_text_features(reference["ids"])
    errors = {"image": max_rel_err(image, reference["image"]), "text": max_rel_err(text, reference["text"])}
    print(f"open_clip {reference['open_clip_version']} ({'quick_gelu' if quick_gelu else 'gelu'}): {errors}")
    assert max(errors.values()) <= 1e-5, errors
    np.testing.assert_allclose(float(model.params["logit_scale"]), float(reference["logit_scale"]), rtol=1e-6)


@pytest.mark.parametrize("key, value, match", [
    ("text_projection", lambda v: v.to(torch.int32), r"tensor 'text_projection' has dtype int32"),
    ("transformer.resblocks.0.attn.in_proj_weight", lambda v: v.index_fill(0, torch.tensor([5]), float("nan")),
     r"tensor 'transformer\.resblocks\.0\.attn\.in_proj_weight' holds 32 NaN/Inf"),
])
def test_non_float_and_non_finite_tensors_name_the_open_clip_key(case, tmp_path, key, value, match):
    path = tmp_path / "bad.pt"
    torch.save({**case.state, key: value(case.state[key])}, path)
    with pytest.raises(WeightsError, match=rf"bad\.pt: {match}"):
        load_open_clip(path, model_config=MODEL_CONFIG)
