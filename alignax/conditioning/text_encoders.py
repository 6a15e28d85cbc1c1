"""SD3's prompt encoding in JAX: `TextEncoders.encode_prompt` returns what diffusers'
`StableDiffusion3Pipeline.encode_prompt` returns (its outputs 0 and 2), with no PyTorch.

    encoders = TextEncoders.load("path/to/sd3-pipeline")
    prompt_embeds, pooled = encoders.encode_prompt(["a red fox"], max_sequence_length=256)
    # [B, 77 + 256, 4096], [B, 2048] for the real model

As diffusers does it: both CLIP towers see the prompt tokenized to the first tokenizer's
`model_max_length` (77), padded with the pad token and no attention mask; each contributes its
hidden state `hidden_states[-(clip_skip + 2)]` (the penultimate layer's output by default, before
the final norm) and its projected EOS vector (pooled). The CLIP states are concatenated on features,
zero-padded to the T5 width and concatenated on the sequence with T5's `last_hidden_state` (padded to
`max_sequence_length`, also unmasked). Without T5 (`use_t5=False`, or a pipeline saved without
`text_encoder_3`) the T5 part is zeros [B, max_sequence_length, joint_attention_dim]. Prompts longer
than a tokenizer's limit are truncated, and the count is logged.

The three towers run in one jitted program, compiled once per (padded batch, T5 length, clip_skip)
and cached. With a mesh, params are placed by their logical axis specs (fsdp over `embed`, tensor
parallel over heads/mlp: T5-XXL in fp32 is 19 GB) and the batch is split over the data axes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignax import fs
from alignax import mesh as mesh_lib
from alignax.errors import DataError, WeightsError
from alignax.models import pretrained as pretrained_lib
from alignax.models import remote_weights, weights_io
from alignax.models.transformers_format import load_transformers

log = logging.getLogger("alignax")

CLIP_FOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
T5_FOLDERS = ("tokenizer_3", "text_encoder_3")
EXPECTED_MODEL_TYPES = (("clip_text_model", "CLIPTextModelWithProjection"),) * 2 + (("t5", "T5EncoderModel"),)


def _folder(root: str, name: str) -> Path:
    """`root/name` as a local directory (a remote pipeline's folder is mirrored once); WeightsError if absent."""
    if remote_weights.is_remote(root):
        url = remote_weights.join(root, name)
        if remote_weights.mirrored(url) is None and not remote_weights.exists(url, field="pipeline_dir"):
            raise WeightsError(f"{url}: no such folder; an SD3 pipeline needs {name}/")
        return remote_weights.localize(url, field="pipeline_dir")
    path = Path(root) / name
    if not path.is_dir():
        raise WeightsError(f"{path}: no such folder; an SD3 pipeline needs {name}/")
    return path


def _has_t5(root: str) -> bool:
    """Whether the pipeline was saved with T5: model_index.json's `text_encoder_3` entry (null when saved
    with `text_encoder_3=None`), or the folder's presence when there is no model_index.json."""
    if remote_weights.is_remote(root):
        index_url = remote_weights.join(root, "model_index.json")
        if not remote_weights.exists(index_url, field="pipeline_dir"):
            return remote_weights.exists(remote_weights.join(root, T5_FOLDERS[1]), field="pipeline_dir")
        index = json.loads(fs.read_text(index_url))
    else:
        index_path = Path(root) / "model_index.json"
        if not index_path.is_file():
            return (Path(root) / T5_FOLDERS[1]).is_dir()
        index = weights_io.read_json(index_path)
    entry = index.get(T5_FOLDERS[1])
    return isinstance(entry, (list, tuple)) and entry[0] is not None


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: not a readable transformers tokenizer ({e})") from e


def _load_model(folder: Path, dtype: Any, compute_dtype: Any, mesh: Any, rules: mesh_lib.Rules
                ) -> pretrained_lib.Pretrained:
    """A transformers directory; with a mesh, read on the host and placed by logical specs (never whole
    on one accelerator)."""
    if mesh is None:
        return load_transformers(folder, dtype=dtype, compute_dtype=compute_dtype)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        loaded = load_transformers(folder, dtype=dtype, compute_dtype=compute_dtype)
    abstract, specs = pretrained_lib.abstract_params(loaded.architecture, loaded.module)
    shardings = mesh_lib.fitted_shardings(specs, abstract, mesh, rules)
    return loaded.replace(params=jax.device_put(loaded.params, shardings))


@dataclasses.dataclass
class TextEncoders:
    """SD3's CLIP-L, OpenCLIP bigG and (optionally) T5 with their tokenizers. Build with `load`."""

    tokenizers: tuple[Any, ...]
    models: tuple[pretrained_lib.Pretrained, ...]  # CLIP-L, CLIP-G[, T5]
    clip_max_length: int
    joint_attention_dim: int  # T5's width, or the transformer's joint_attention_dim without T5
    mesh: Any = None
    rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def use_t5(self) -> bool:
        return len(self.models) == 3

    @property
    def compiled_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(padded batch, T5 length, hidden-state index) of every program compiled so far."""
        return tuple(self._compiled)

    @classmethod
    def load(cls, pipeline_dir: str | os.PathLike, *, use_t5: bool = True, dtype: Any = jnp.float32,
             compute_dtype: Any = None, mesh: Any = None,
             rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> TextEncoders:
        """Loads only what encoding needs: the two CLIP towers, T5 only if `use_t5` and the pipeline has it,
        and without T5 just `transformer/config.json` (for the zero T5 part's width).

        dtype: the params' dtype; compute_dtype: the matmul dtype (e.g. jnp.bfloat16), default = params'.
        mesh/rules: place params by their logical specs (alignax.mesh) and split batches over the data axes.
        Tokenizers are read first, so a missing folder fails before any weights are read.
        """
        root = os.fspath(pipeline_dir)
        t5 = use_t5 and _has_t5(root)
        names = list(CLIP_FOLDERS) + ([T5_FOLDERS] if t5 else [])
        tokenizers = tuple(_load_tokenizer(_folder(root, tok)) for tok, _ in names)
        folders = [_folder(root, model) for _, model in names]
        if not t5:
            config_path = _folder(root, "transformer") / "config.json"
            if not config_path.is_file():
                raise WeightsError(f"{config_path}: no such file; without T5 the prompt embeddings' width is the "
                                   "transformer's joint_attention_dim")
            width = weights_io.read_json(config_path).get("joint_attention_dim")
            if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
                raise WeightsError(f"{config_path}: joint_attention_dim={width!r}, expected a positive int")
        for folder, expected in zip(folders, EXPECTED_MODEL_TYPES, strict=False):
            config_path = folder / "config.json"
            found = weights_io.read_json(config_path).get("model_type") if config_path.is_file() else None
            if found != expected[0]:
                raise WeightsError(f"{config_path}: model_type {found!r}, expected {expected[0]!r} ({expected[1]})")
        models = tuple(_load_model(folder, dtype, compute_dtype, mesh, rules) for folder in folders)
        if t5:
            width = models[2].module.config.d_model
        clip_width = sum(m.module.config.text.hidden_size for m in models[:2])
        if clip_width > width:
            raise WeightsError(f"{root}: the CLIP hidden sizes add up to {clip_width}, wider than the T5 / joint "
                               f"width {width} they are zero-padded to")
        clip_max_length = tokenizers[0].model_max_length
        for folder, model in zip(folders[:2], models[:2], strict=True):
            positions = model.module.config.text.max_position_embeddings
            if clip_max_length > positions:
                raise WeightsError(f"{folder / 'config.json'}: max_position_embeddings={positions} is less than "
                                   f"tokenizer/'s model_max_length={clip_max_length}")
        return cls(tokenizers=tokenizers, models=models, clip_max_length=clip_max_length,
                   joint_attention_dim=width, mesh=mesh, rules=tuple(rules))

    def tokenize(self, prompts: Sequence[str], *, max_sequence_length: int = 256) -> list[np.ndarray]:
        """The int32 ids each tower sees ([B, 77] twice, then [B, max_sequence_length] for T5), as diffusers
        tokenizes them (padding to max length, truncation). Logs how many prompts each limit truncated."""
        lengths = [self.clip_max_length] * 2 + ([max_sequence_length] if self.use_t5 else [])
        out = []
        for index, (tokenizer, length) in enumerate(zip(self.tokenizers, lengths, strict=True)):
            ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_tensors="np")["input_ids"].astype(np.int32)
            untruncated = tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]
            truncated = sum(len(row) > length for row in untruncated)
            if truncated:
                which = "T5" if index == 2 else f"CLIP (tokenizer{'_2' if index else ''})"
                log.warning("%d of %d prompts were truncated to %d %s tokens", truncated, len(prompts), length,
                            which)
            out.append(ids)
        return out

    def encode_prompt(self, prompts: str | Sequence[str], *, max_sequence_length: int = 256,
                      clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(prompt_embeds [B, clip_max_length + max_sequence_length, D], pooled [B, P]) in float32, equal to
        outputs 0 and 2 of diffusers' `encode_prompt(prompt=prompts, do_classifier_free_guidance=False, ...)`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise DataError("encode_prompt: prompts is empty; give at least one prompt ('' is the empty prompt)")
        if not all(isinstance(p, str) for p in prompts):
            types = sorted({type(p).__name__ for p in prompts})
            raise DataError(f"encode_prompt: prompts must be strings, got {types}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length <= 0:
            raise DataError(f"encode_prompt: max_sequence_length={max_sequence_length!r}, expected a positive int")
        layer = self._hidden_state_index(clip_skip)
        ids = self.tokenize(prompts, max_sequence_length=max_sequence_length)
        batch = len(prompts)
        padded = _round_up(batch, self._batch_shards())
        if padded != batch:  # repeat the last row: a valid token sequence, dropped below
            ids = [np.concatenate([x, np.repeat(x[-1:], padded - batch, axis=0)]) for x in ids]
        ids = [self._place(x) for x in ids]
        compiled = self._compiled_for(ids, max_sequence_length, layer)
        prompt_embeds, pooled = compiled(tuple(m.params for m in self.models), *ids)
        return prompt_embeds[:batch], pooled[:batch]

    # --- internals ---------------------------------------------------------------------------------------

    def _hidden_state_index(self, clip_skip: int | None) -> int:
        if clip_skip is None:
            return -2
        layers = min(m.module.config.text.num_hidden_layers for m in self.models[:2])
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
            raise DataError(f"encode_prompt: clip_skip={clip_skip!r}, expected None or an int in [0, {layers - 1}] "
                            f"(the CLIP towers have {layers}+ layers)")
        return -(clip_skip + 2)

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        spec = mesh_lib.logical_sharding(("activation_batch", None), self.mesh, self.rules).spec[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))

    def _place(self, ids: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(ids)
        return jax.device_put(ids, mesh_lib.logical_sharding(("activation_batch", None), self.mesh, self.rules))

    def _compiled_for(self, ids: Sequence[jax.Array], max_sequence_length: int, layer: int):
        key = (ids[0].shape[0], max_sequence_length, layer)
        if key not in self._compiled:
            fn = jax.jit(_encode_fn(self.models, layer, max_sequence_length, self.joint_attention_dim))
            params = tuple(m.params for m in self.models)
            if self.mesh is None:
                self._compiled[key] = fn.lower(params, *ids).compile()
            else:
                with mesh_lib.use_mesh(self.mesh, self.rules):
                    self._compiled[key] = fn.lower(params, *ids).compile()
        return self._compiled[key]


def _encode_fn(models: Sequence[pretrained_lib.Pretrained], layer: int, max_sequence_length: int, width: int):
    clip_l, clip_g = models[0].module, models[1].module
    t5 = models[2].module if len(models) == 3 else None

    def encode(params, ids_l, ids_g, ids_t5=None):
        out_l = clip_l.apply({"params": params[0]}, ids_l)
        out_g = clip_g.apply({"params": params[1]}, ids_g)
        clip = jnp.concatenate([out_l.hidden_states[layer], out_g.hidden_states[layer]], axis=-1)
        clip = jnp.pad(clip.astype(jnp.float32), ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        if t5 is None:
            t5_embeds = jnp.zeros((ids_l.shape[0], max_sequence_length, width), jnp.float32)
        else:
            t5_embeds = t5.apply({"params": params[2]}, ids_t5).astype(jnp.float32)
        pooled = jnp.concatenate([out_l.text_embeds, out_g.text_embeds], axis=-1).astype(jnp.float32)
        return jnp.concatenate([clip, t5_embeds], axis=1), pooled

    return encode


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
