"""Prompts encoded inside the run: `config.text.encode='on_the_fly'`.

With `config.model.pretrained` an SD3 pipeline root that has its text encoders (`tokenizer/`,
`text_encoder/`, `tokenizer_2/`, `text_encoder_2/`, T5 optional by `config.text.use_t5`), a dataset
needs only a `prompt` field: no caching pass (`alignax.cache_embeddings`) before `reward_backprop`
on a new prompt list. The split of work keeps the train step one compiled program:

- host (`OnTheFly.tokenize`): the batch's prompt strings → int32 ids, padded to fixed lengths
  (77 per CLIP tower, `config.text.max_sequence_length` for T5), as diffusers tokenizes them;
- device (`OnTheFly.encode`, inside the jitted step, before the objective): ids → the
  `encoder_hidden_states` / `pooled_projections` `TextEncoders.encode_prompt` returns, from the text
  encoders' params, which live in the trainer's `frozen` pytree (sharded like the rest, no grads).

Stored embeddings in the dataset are ignored in this mode (the prompt is the source of truth). The
negative prompt (`config.sample.negative_prompt`, '' by default) is encoded once at start-up, unless
`config.sample.negative_embeddings` names an `.npz` (that file wins).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alignax import mesh as mesh_lib
from alignax.errors import ConfigError

MODES = ("dataset", "on_the_fly")
CONDITIONING = ("encoder_hidden_states", "pooled_projections")
ID_FIELDS = ("text_ids_clip_l", "text_ids_clip_g", "text_ids_t5")  # host → device batch fields
REQUIRED_FOLDERS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def enabled(config: Any) -> bool:
    """Whether the run encodes prompts itself (configs saved before `config.text` existed: no)."""
    text = config.get("text") if hasattr(config, "get") else None
    return bool(text) and text.get("encode", "dataset") == "on_the_fly"


def check_config(config: Any) -> None:
    """ConfigError naming the field: an unknown `config.text.encode`, a bad `max_sequence_length` or
    `use_t5`, or on_the_fly without a pipeline root whose text encoder folders exist. Remote roots
    (gs://...) are checked when loaded (a WeightsError naming the folder)."""
    text = config.get("text")
    if not text:
        return
    mode = text.get("encode", "dataset")
    if mode not in MODES:
        raise ConfigError(f"config.text.encode={mode!r}: expected one of {list(MODES)}")
    length = text.get("max_sequence_length", 256)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ConfigError(f"config.text.max_sequence_length={length!r}: expected a positive int (T5 tokens)")
    if not isinstance(text.get("use_t5", True), bool):
        raise ConfigError(f"config.text.use_t5={text.get('use_t5')!r}: expected True or False")
    if mode != "on_the_fly":
        return
    root = config.model.pretrained
    if not root:
        raise ConfigError("config.text.encode='on_the_fly' needs config.model.pretrained to name an SD3 pipeline "
                          "root with its text encoders (tokenizer/, text_encoder/, ...); it is empty")
    from alignax.models import remote_weights
    if remote_weights.is_remote(root):
        return
    missing = [name for name in REQUIRED_FOLDERS if not os.path.isdir(os.path.join(root, name))]
    if missing:
        raise ConfigError(f"config.text.encode='on_the_fly': config.model.pretrained={root!r} has no text encoder "
                          f"folder(s) {missing}; point it at a pipeline saved with its text encoders, or set "
                          "config.text.encode='dataset' and precompute embeddings (python -m alignax.cache_embeddings)")


@dataclasses.dataclass
class OnTheFly:
    """The run's `TextEncoders` and its fixed padded T5 length. Build with `for_run`."""

    encoders: Any  # alignax.conditioning.TextEncoders
    max_sequence_length: int

    @classmethod
    def for_run(cls, config: Any, *, mesh: Any = None,
                rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> OnTheFly | None:
        """None unless `config.text.encode='on_the_fly'`; else the encoders loaded (sharded on `mesh`)."""
        if not enabled(config):
            return None
        from alignax.conditioning.text_encoders import TextEncoders
        encoders = TextEncoders.load(config.model.pretrained, use_t5=config.text.get("use_t5", True), mesh=mesh,
                                     rules=rules)
        return cls(encoders, int(config.text.get("max_sequence_length", 256)))

    @property
    def sequence_length(self) -> int:
        return self.encoders.clip_max_length + self.max_sequence_length

    def check_widths(self, transformer_config: Any) -> None:
        """ConfigError when the encoders' widths are not the MM-DiT's (caught before compiling)."""
        pooled = sum(m.module.config.projection_dim for m in self.encoders.models[:2])
        want = (transformer_config.joint_attention_dim, transformer_config.pooled_projection_dim)
        if (self.encoders.joint_attention_dim, pooled) != want:
            raise ConfigError(f"config.text.encode='on_the_fly': the text encoders give widths "
                              f"({self.encoders.joint_attention_dim}, {pooled}), the transformer's "
                              f"(joint_attention_dim, pooled_projection_dim) are {want}")

    def params(self) -> tuple:
        return tuple(m.params for m in self.encoders.models)

    def logical_specs(self) -> tuple:
        from alignax.models import pretrained as pretrained_lib
        return tuple(pretrained_lib.abstract_params(m.architecture, m.module)[1] for m in self.encoders.models)

    def tokenize(self, host_batch: Mapping[str, Any]) -> dict:
        """The host batch with int32 id fields for its `prompt` strings; stored embeddings dropped."""
        ids = self.encoders.tokenize([str(p) for p in host_batch["prompt"]],
                                     max_sequence_length=self.max_sequence_length)
        out = {k: v for k, v in host_batch.items() if k not in CONDITIONING}
        out.update(zip(ID_FIELDS, ids, strict=False))
        return out

    def encode(self, params: Sequence, batch: Mapping[str, Any]) -> dict:
        """Traceable: the batch with its id fields replaced by the encoded conditioning (float32)."""
        ids = [batch[k] for k in ID_FIELDS if k in batch]
        from alignax.conditioning.text_encoders import _encode_fn
        fn = _encode_fn(self.encoders.models, -2, self.max_sequence_length, self.encoders.joint_attention_dim)
        prompt_embeds, pooled = fn(tuple(params), *ids)
        out = {k: v for k, v in batch.items() if k not in ID_FIELDS}
        out.update(encoder_hidden_states=prompt_embeds, pooled_projections=pooled)
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """{encoder_hidden_states, pooled_projections} on the host (TextEncoders.encode_prompt)."""
        embeds, pooled = self.encoders.encode_prompt(list(prompts), max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": np.asarray(embeds), "pooled_projections": np.asarray(pooled)}

    def negatives(self, negative_prompt: str) -> dict[str, np.ndarray]:
        """The negative prompt encoded once, shaped as `negative_prompt.load` returns it."""
        from alignax.conditioning import negative_prompt as negative_lib
        encoded = self.encode_prompts([negative_prompt])
        return {negative_lib.FIELDS[k]: v[0] for k, v in encoded.items()}


@functools.lru_cache(maxsize=8)
def _cached_encoders(pipeline_dir: str, use_t5: bool) -> Any:
    from alignax.conditioning.text_encoders import TextEncoders
    return TextEncoders.load(pipeline_dir, use_t5=use_t5)


def for_evaluation(config: Any) -> OnTheFly | None:
    """`OnTheFly` for `alignax.evaluate` (one device; the encoders are loaded once per process)."""
    if not enabled(config):
        return None
    return OnTheFly(_cached_encoders(str(config.model.pretrained), bool(config.text.get("use_t5", True))),
                    int(config.text.get("max_sequence_length", 256)))


def negatives_for_run(sample_config: Any, transformer_config: Any, text: OnTheFly | None) -> dict | None:
    """The run's negative embeddings: the `.npz` when `config.sample.negative_embeddings` names one, else with
    on-the-fly encoding `config.sample.negative_prompt` encoded once (only when guidance uses it)."""
    from alignax.conditioning import negative_prompt as negative_lib
    if text is None or sample_config.get("negative_embeddings", ""):
        return negative_lib.for_run(sample_config, transformer_config)
    if sample_config.guidance_scale == 1.0 or not math.isfinite(sample_config.guidance_scale):
        return None
    return text.negatives(str(sample_config.get("negative_prompt", "")))
