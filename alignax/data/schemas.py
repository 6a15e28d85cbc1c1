"""Record schemas: which fields each dataset kind holds, with dtype and shape.

A schema is the contract between a dataset on disk and the trainer. Writers check every
example against it before encoding, and `open_dataset` checks a dataset's stored feature
spec against it, so a wrong dataset fails at open time with the field named instead of
deep inside a jitted step.

Shapes use `None` for dimensions a dataset chooses (sequence length, embedding width,
image size). Fields marked `variable` keep `None` on disk, so records may differ in that
field's size (images before resizing); all other `None` dimensions are fixed per dataset
from the first example written, and every later example must match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from alignax.errors import DataError
from alignax.registry import Registry

STRING = "str"


@dataclasses.dataclass(frozen=True)
class Field:
    """One record field: dtype (`"str"` or a numpy dtype name) and shape template."""

    dtype: str
    shape: tuple[int | None, ...] = ()
    variable: bool = False
    doc: str = ""

    @property
    def is_string(self) -> bool:
        return self.dtype == STRING

    def describe(self) -> str:
        if self.is_string:
            return "str"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclasses.dataclass(frozen=True)
class RecordSchema:
    """A dataset kind: its name (also the TFDS builder name) and its fields."""

    name: str
    required: Mapping[str, Field]
    optional: Mapping[str, Field] = dataclasses.field(default_factory=dict)
    doc: str = ""

    def field(self, key: str) -> Field:
        return {**self.optional, **self.required}[key]

    def fields_of(self, example: Mapping[str, object]) -> dict[str, Field]:
        """The schema fields present in `example`, in schema order."""
        return {k: f for k, f in {**self.required, **self.optional}.items() if k in example}

    def check_example(self, example: Mapping[str, object], where: str) -> dict[str, object]:
        """Return `example` normalised (numpy arrays of the right dtype, str); raise DataError if it does not fit."""
        if not isinstance(example, Mapping):
            raise DataError(f"{where}: expected a dict of fields for a {self.name!r} record, found {type(example)}")
        missing = [k for k in self.required if k not in example]
        unknown = [k for k in example if k not in self.required and k not in self.optional]
        if missing or unknown:
            raise DataError(
                f"{where}: a {self.name!r} record needs fields {sorted(self.required)}"
                f" (optional {sorted(self.optional)}); missing {missing}, unknown {unknown}"
            )
        out: dict[str, object] = {}
        for key, spec in self.fields_of(example).items():
            out[key] = _normalise(example[key], spec, f"{where}, field {key!r}")
        return out


def _normalise(value: object, spec: Field, where: str) -> object:
    if spec.is_string:
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not isinstance(value, str):
            raise DataError(f"{where}: expected str, found {type(value).__name__}")
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected {spec.describe()}, found dtype {array.dtype}")
    if spec.dtype == "uint8" and array.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 pixels, found {array.dtype} (convert explicitly; no silent rescale)")
    array = array.astype(spec.dtype, copy=False)
    wrong_rank = array.ndim != len(spec.shape)
    if wrong_rank or any(d is not None and d != n for d, n in zip(spec.shape, array.shape, strict=True)):
        raise DataError(f"{where}: expected shape {spec.describe()}, found {array.dtype}{list(array.shape)}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise DataError(f"{where}: contains NaN or inf")
    return array


_IMAGE = Field("uint8", (None, None, 3), variable=True, doc="RGB pixels, HWC, 0..255")
_HIDDEN = Field(
    "float32", (None, None), doc="per-token text embeddings [L, D] (SD3: CLIP-L/G + T5, joint_attention_dim)"
)
_POOLED = Field("float32", (None,), doc="pooled text embedding [P] (SD3: CLIP-L/G pooled, pooled_projection_dim)")
_PROMPT = Field(STRING, doc="the caption or prompt text")

CAPTIONED_IMAGES = RecordSchema(
    name="captioned_images",
    required={"image": _IMAGE, "prompt": _PROMPT, "encoder_hidden_states": _HIDDEN, "pooled_projections": _POOLED},
    optional={
        "latents": Field("float32", (None, None, None), doc="pre-encoded VAE latents, NHWC [h, w, C]"),
        # Frozen SigLIP 2 targets for `feature_align` (alignax.data.siglip_targets writes them).
        "siglip_text_embeds": Field("float32", (None,), doc="SigLIP text embedding of the caption [D]"),
        "siglip_image_embeds": Field("float32", (None,), doc="SigLIP pooled image embedding [D]"),
        "siglip_patch_embeds": Field("float32", (None, None), doc="SigLIP patch features [N, D], N a square grid"),
    },
    doc="Images with captions and their text conditioning, for supervised fine-tuning.",
)

PROMPTS = RecordSchema(
    name="prompts",
    required={"prompt": _PROMPT},
    # Optional: a prompts-only dataset is trained on with config.text.encode='on_the_fly'; otherwise
    # alignax.data.check refuses it, naming the missing fields (every objective reads the conditioning).
    optional={"encoder_hidden_states": _HIDDEN, "pooled_projections": _POOLED,
              "identity": Field(STRING, doc="the identity the sample should show (the `identity` reward's key)")},
    doc="Prompts with text conditioning (or prompts alone, encoded on the fly), for on-policy reward training "
        "(no images).",
)

PREFERENCE_PAIRS = RecordSchema(
    name="preference_pairs",
    required={
        "prompt": _PROMPT,
        "image_0": _IMAGE,
        "image_1": _IMAGE,
        "label_0": Field("float32", (), doc="1.0 if image_0 is preferred, 0.0 if image_1, 0.5 for a tie"),
    },
    optional={
        "encoder_hidden_states": _HIDDEN,
        "pooled_projections": _POOLED,
        # Pre-encoded VAE latents: `dpo` then skips the VAE encoder (both or neither).
        "latents_0": Field("float32", (None, None, None), doc="VAE latents of image_0, NHWC [h, w, C]"),
        "latents_1": Field("float32", (None, None, None), doc="VAE latents of image_1, NHWC [h, w, C]"),
    },
    doc="Two images for one prompt and which one people preferred (Pick-a-Pic style).",
)

IDENTITY_IMAGES = RecordSchema(
    name="identity_images",
    required={
        "image": _IMAGE,
        "label": Field("int64", (), doc="the identity's class index, 0 .. num_identities - 1 (same in every split)"),
        "identity": Field(STRING, doc="the identity's name (its directory name in a directory-per-identity source)"),
    },
    doc="Face (or other identity) images labelled by who they show, for training an identity embedder "
        "(alignax.identity.train).",
)

SCHEMAS: Registry[RecordSchema] = Registry("dataset kind", error=DataError)
for _schema in (CAPTIONED_IMAGES, PROMPTS, PREFERENCE_PAIRS, IDENTITY_IMAGES):
    SCHEMAS.register(_schema.name, _schema)


def get_schema(name: str) -> RecordSchema:
    """The schema registered under `name`; DataError listing the known kinds otherwise."""
    return SCHEMAS.lookup(name)
