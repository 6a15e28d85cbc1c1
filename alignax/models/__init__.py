"""Flax models and their loaders for diffusers / transformers / open_clip / LAION / insightface ONNX formats.

Importing this package registers every architecture with the loaders.
"""

from alignax.models import (
    clip,  # noqa: F401  (registers clip)
    mmdit,  # noqa: F401  (registers SD3Transformer2DModel)
    siglip,  # noqa: F401  (registers siglip)
    t5,  # noqa: F401  (registers t5)
    vae,  # noqa: F401  (registers AutoencoderKL)
)
from alignax.models.diffusers_format import load_diffusers, save_diffusers
from alignax.models.insightface_format import load_insightface
from alignax.models.pretrained import Architecture, Pretrained, abstract_params, init_params
from alignax.models.transformers_format import load_transformers, save_transformers

__all__ = [
    "Architecture", "Pretrained", "abstract_params", "init_params",
    "load_diffusers", "save_diffusers", "load_insightface", "load_transformers", "save_transformers",
]
