"""open_clip checkpoints (HPSv2's `HPS_v2_compressed.pt`, LAION ViT-H/14, bigG) as the `clip` architecture.

`load_open_clip` turns the open_clip model config into a transformers CLIP config and the
open_clip keys into transformers keys, so the result runs, shards and exports
(`save_transformers`) exactly like a transformers CLIP directory. open_clip pools text at
argmax(input_ids); transformers does the same for `eos_token_id == 2`, which the converted
config therefore carries.

Key mapping, transformers key ← open_clip key (N is the block index):

    logit_scale                                      ← logit_scale
    visual_projection.weight                         ← visual.proj, transposed ([D, P] → [P, D])
    text_projection.weight                           ← text_projection, transposed
    vision_model.embeddings.class_embedding          ← visual.class_embedding
    vision_model.embeddings.patch_embedding.weight   ← visual.conv1.weight
    vision_model.embeddings.position_embedding.weight ← visual.positional_embedding
    vision_model.pre_layrnorm.{weight,bias}          ← visual.ln_pre.{weight,bias}
    vision_model.post_layernorm.{weight,bias}        ← visual.ln_post.{weight,bias}
    vision_model.encoder.layers.N.<block>            ← visual.transformer.resblocks.N.<block>
    text_model.embeddings.token_embedding.weight     ← token_embedding.weight
    text_model.embeddings.position_embedding.weight  ← positional_embedding
    text_model.final_layer_norm.{weight,bias}        ← ln_final.{weight,bias}
    text_model.encoder.layers.N.<block>              ← transformer.resblocks.N.<block>

    <block>:
    layer_norm1.{weight,bias}                        ← ln_1.{weight,bias}
    layer_norm2.{weight,bias}                        ← ln_2.{weight,bias}
    self_attn.{q,k,v}_proj.weight                    ← attn.in_proj_weight rows [0:D], [D:2D], [2D:3D]
    self_attn.{q,k,v}_proj.bias                      ← attn.in_proj_bias, same thirds
    self_attn.out_proj.{weight,bias}                 ← attn.out_proj.{weight,bias}
    mlp.fc1.{weight,bias}                            ← mlp.c_fc.{weight,bias}
    mlp.fc2.{weight,bias}                            ← mlp.c_proj.{weight,bias}

`attn_mask` (the causal-mask buffer some exports keep) is ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from alignax.errors import WeightsError
from alignax.models import clip, hf_directory, torch_checkpoint, weights_io
from alignax.models.pretrained import Pretrained, abstract_params

# open_clip's own model configs (src/open_clip/model_configs/*.json) for the reward backbones.
MODEL_CONFIGS: dict[str, dict] = {
    "ViT-L-14": {"embed_dim": 768,
                 "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14": {"embed_dim": 1280,
                    "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                   "mlp_ratio": 4.9231, "patch_size": 14},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20,
                                 "layers": 32}},
}

# open_clip options that change the architecture away from plain CLIP, with the value CLIP has.
_PLAIN_CLIP = {
    "vision_cfg": {"pool_type": "tok", "attentional_pool": False, "global_average_pool": False, "no_ln_pre": False,
                   "ls_init_value": None, "input_patchnorm": False, "pos_embed_type": "learnable",
                   "timm_model_name": None},
    "text_cfg": {"pool_type": "argmax", "no_causal_mask": False, "proj_bias": False, "embed_cls": False,
                 "ls_init_value": None, "hf_model_name": None},
    "": {"init_logit_bias": None},
}
_DIRECTORY_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_IGNORED = frozenset({"attn_mask"})


def _section(model_cfg: dict, name: str) -> dict:
    section = model_cfg if not name else model_cfg.get(name, {})
    for key, plain in _PLAIN_CLIP[name].items():
        if section.get(key, plain) != plain:
            where = f"{name}.{key}" if name else key
            raise ValueError(f"open_clip {where}={section[key]!r} is not supported (alignax loads plain CLIP "
                             f"towers, {where}={plain!r})")
    return section


def transformers_config(model_cfg: dict) -> dict:
    """The transformers CLIP config.json equivalent of an open_clip model config (defaults as open_clip's)."""
    vision, text = _section(model_cfg, "vision_cfg"), _section(model_cfg, "text_cfg")
    _section(model_cfg, "")
    if "embed_dim" not in model_cfg:
        raise ValueError("open_clip model config has no 'embed_dim'")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vision_width, text_width = vision.get("width", 768), text.get("width", 512)
    return {
        "model_type": "clip",
        "projection_dim": model_cfg["embed_dim"],
        "vision_config": {
            "image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
            "hidden_size": vision_width, "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"]},
        "text_config": {
            "vocab_size": text.get("vocab_size", 49408), "max_position_embeddings": text.get("context_length", 77),
            "hidden_size": text_width, "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"],
            "eos_token_id": clip.LEGACY_EOS_TOKEN_ID},
    }


@dataclasses.dataclass(frozen=True)
class _Take:
    """How a transformers tensor is cut from its open_clip source: a third of fused qkv rows, or transposed."""

    third: int | None = None
    transpose: bool = False

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.third is not None:
            return (3 * shape[0],) + tuple(shape[1:])
        return tuple(reversed(shape)) if self.transpose else tuple(shape)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if self.third is not None:
            rows = array.shape[0] // 3
            return array[self.third * rows:(self.third + 1) * rows]
        return array.T if self.transpose else array


_AS_IS, _TRANSPOSED = _Take(), _Take(transpose=True)
_BLOCK = (
    (r"layer_norm1\.(?P<p>weight|bias)", r"ln_1.\g<p>", _AS_IS),
    (r"layer_norm2\.(?P<p>weight|bias)", r"ln_2.\g<p>", _AS_IS),
    *((rf"self_attn\.{name}_proj\.(?P<p>weight|bias)", r"attn.in_proj_\g<p>", _Take(third=i))
      for i, name in enumerate("qkv")),
    (r"self_attn\.out_proj\.(?P<p>weight|bias)", r"attn.out_proj.\g<p>", _AS_IS),
    (r"mlp\.fc1\.(?P<p>weight|bias)", r"mlp.c_fc.\g<p>", _AS_IS),
    (r"mlp\.fc2\.(?P<p>weight|bias)", r"mlp.c_proj.\g<p>", _AS_IS),
)
_TOWERS = (("vision_model.encoder.layers", "visual.transformer.resblocks"),
           ("text_model.encoder.layers", "transformer.resblocks"))
_RULES = (
    (r"logit_scale", "logit_scale", _AS_IS),
    (r"visual_projection\.weight", "visual.proj", _TRANSPOSED),
    (r"text_projection\.weight", "text_projection", _TRANSPOSED),
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding", _AS_IS),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight", _AS_IS),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding", _AS_IS),
    (r"vision_model\.pre_layrnorm\.(?P<p>weight|bias)", r"visual.ln_pre.\g<p>", _AS_IS),
    (r"vision_model\.post_layernorm\.(?P<p>weight|bias)", r"visual.ln_post.\g<p>", _AS_IS),
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight", _AS_IS),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding", _AS_IS),
    (r"text_model\.final_layer_norm\.(?P<p>weight|bias)", r"ln_final.\g<p>", _AS_IS),
    *((rf"{re.escape(ours)}\.(?P<n>\d+)\.{pattern}", rf"{theirs}.\g<n>.{template}", take)
      for ours, theirs in _TOWERS for pattern, template, take in _BLOCK),
)


def open_clip_source(key: str) -> tuple[str, _Take]:
    """The open_clip key a transformers CLIP key is read from, and how."""
    for pattern, template, take in _RULES:
        if match := re.fullmatch(pattern, key):
            return match.expand(template), take
    raise ValueError(f"transformers CLIP key {key!r} has no open_clip counterpart")


def to_transformers_keys(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                         source: str) -> dict[str, np.ndarray]:
    """open_clip state dict → transformers-named arrays for the keys/shapes in `shapes`, checked by open_clip name."""
    plan = {key: open_clip_source(key) for key in shapes}
    needed = {name for name, _ in plan.values()}
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - needed - _IGNORED)
    if missing:
        raise WeightsError(f"{source}: missing open_clip key {missing[0]!r}"
                           + (f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else "")
                           + "; is model_config the checkpoint's architecture?")
    if unexpected:
        raise WeightsError(f"{source}: unexpected open_clip key {unexpected[0]!r}"
                           + (f" and {len(unexpected) - 1} more: {unexpected[1:6]}" if len(unexpected) > 1 else "")
                           + "; is model_config the checkpoint's architecture?")
    converted = {}
    for key, (name, take) in plan.items():
        expected = take.source_shape(shapes[key])
        if tuple(state[name].shape) != expected:
            raise WeightsError(f"{source}: shape mismatch for {name!r}: checkpoint has {tuple(state[name].shape)}, "
                               f"model_config expects {expected}")
        converted[key] = take(weights_io.check_array(state[name], name, source))
    return converted


def _unwrap(checkpoint: Any) -> Any:
    """open_clip's own loading rule: take `state_dict` if wrapped, drop DataParallel's `module.` prefix."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if isinstance(checkpoint, Mapping) and checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def _weights_file(path: Path) -> Path:
    """A file as given; in a directory (HF hub layout), the safetensors export before the pickle."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsError(f"{path}: file not found")
    for name in _DIRECTORY_FILES:
        if (path / name).is_file():
            return path / name
    raise WeightsError(f"{path}: no open_clip weights found (expected one of {list(_DIRECTORY_FILES)})")


def plain(value: Any) -> Any:
    """Nested mappings (an ml_collections ConfigDict from a config file, say) as plain dicts, as JSON gives them."""
    if isinstance(value, Mapping) or callable(getattr(value, "items", None)):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def _model_config(model_config: Mapping | str) -> dict:
    if not isinstance(model_config, str | os.PathLike):
        if not callable(getattr(model_config, "items", None)):
            raise WeightsError(f"model_config={model_config!r}: expected an open_clip model config mapping, a name "
                               f"from {sorted(MODEL_CONFIGS)} or a .json file")
        model_config = plain(model_config)
        return model_config.get("model_cfg", model_config)
    if model_config in MODEL_CONFIGS:
        return MODEL_CONFIGS[model_config]
    if Path(model_config).suffix == ".json":
        raw = weights_io.read_json(Path(model_config))
        return raw.get("model_cfg", raw)  # HF hub open_clip_config.json nests it
    raise WeightsError(f"model_config={model_config!r}: not a known open_clip model ({sorted(MODEL_CONFIGS)}) "
                       "nor a .json model config file")


def load_open_clip(path: str | os.PathLike, *, model_config: Mapping | str, dtype: Any = jnp.float32,
                   **options: Any) -> Pretrained:
    """Loads an open_clip checkpoint as the transformers-compatible `clip` model.

    path: a `.pt`/`.bin`/`.pth` state dict (optionally under `state_dict`, optionally with a
      `module.` prefix) or `.safetensors`; or an HF hub directory holding open_clip weights.
    model_config: an open_clip model config dict, a name from MODEL_CONFIGS ('ViT-H-14' for
      HPSv2), or the path of an open_clip config .json.
    options: runtime choices of the Flax module (compute_dtype, remat).
    """
    file = _weights_file(Path(path))
    model_cfg = _model_config(model_config)
    try:
        config = transformers_config(model_cfg)
    except ValueError as e:
        raise WeightsError(f"{file}: {e}") from e
    module = hf_directory.build_module(clip.ARCHITECTURE, config, file, **options)
    shapes = torch_checkpoint.torch_shapes(abstract_params(clip.ARCHITECTURE, module)[0])
    state = torch_checkpoint.to_numpy(_unwrap(torch_checkpoint.read_file(file)), str(file))
    converted = to_transformers_keys(state, shapes, str(file))
    params = torch_checkpoint.load_params(converted, clip.ARCHITECTURE, module, dtype, str(file), checked=True)
    return Pretrained(module=module, params=params, config=config, architecture=clip.ARCHITECTURE)
