"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor"): an MLP on the L2-normalised
CLIP ViT-L/14 image embedding.

Files a user downloads: `sac+logos+ava1-l14-linearMSE.pth` (`checkpoint=`) and the CLIP it was
trained on, OpenAI ViT-L/14, as the transformers directory `openai/clip-vit-large-patch14`
(`clip=`; an open_clip state-dict file also works with `clip_model_config=`). LAION's script
preprocesses with OpenAI clip's `preprocess`: shortest side 224 bicubic, torchvision
CenterCrop 224 (offset rounded), OpenAI mean/std. Only the vision tower is kept.
"""

from __future__ import annotations

from typing import Any

import jax

from alignax.models.aesthetic import load_aesthetic
from alignax.models.pretrained import Pretrained
from alignax.rewards import preprocess
from alignax.rewards.base import Reward, register, require_path
from alignax.rewards.clip_similarity import check_exists, image_size, load_clip

# The CLIP params the image embedding needs; the text tower (~1/3 of ViT-L/14) is dropped.
_VISION_PARAMS = ("vision_model", "visual_projection", "logit_scale")


@register("aesthetic")
def aesthetic(name: str, *, checkpoint: str | None = None, clip: str | None = None,
              clip_model_config: dict | str = "ViT-L-14", **options: Any) -> Reward:
    """checkpoint: the LAION `.pth`. clip: CLIP ViT-L/14 transformers directory or open_clip file.
    options: dtype, compute_dtype, remat (for the CLIP)."""
    source = f"reward {name!r}"
    checkpoint = require_path(checkpoint, name, "checkpoint", "sac+logos+ava1-l14-linearMSE.pth")
    clip = require_path(clip, name, "clip", "CLIP ViT-L/14 transformers directory")
    check_exists(checkpoint, f"{source} checkpoint=")
    backbone = load_clip(clip, source=f"{source} clip=", open_clip_config=clip_model_config, **options)
    mlp = load_aesthetic(checkpoint, input_size=backbone.module.config.projection_dim,
                         dtype=options.get("dtype", jax.numpy.float32))
    return aesthetic_reward(name, backbone, mlp)


def aesthetic_reward(name: str, backbone: Pretrained, mlp: Pretrained) -> Reward:
    """The reward from a loaded CLIP and MLP (or abstract ones, as the roofline benchmark compiles)."""
    size, clip_module, mlp_module = image_size(backbone), backbone.module, mlp.module
    clip_specs = backbone.logical_specs()
    params = {"clip": {k: backbone.params[k] for k in _VISION_PARAMS},
              "mlp": mlp.params}
    specs = {"clip": {k: clip_specs[k] for k in _VISION_PARAMS}, "mlp": mlp.logical_specs()}

    def score_fn(params: Any, images: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        pixels = preprocess.clip_pixels(images, size, crop_offset="round")
        embeds = clip_module.apply({"params": params["clip"]}, pixels, method="get_image_features")
        return mlp_module.apply({"params": params["mlp"]}, embeds, method="score"), {}

    return Reward(name=name, score_fn=score_fn, params=params, specs=specs,
                  range="unbounded regression onto AVA-style ratings; real images score about 4-7 "
                        "(10 is the top of the rating scale)",
                  preprocessing=f"shortest side to {size} (bicubic, antialiased), centre crop {size} "
                                "(rounded offset, torchvision), OpenAI mean/std")
