"""Writes a tiny checkpoint with open_clip's *own* model code, plus its outputs, for the format test.

    python tests/models/open_clip_reference.py OUT_DIR '<model config json>' [--quick_gelu]

Run in a subprocess: open_clip's package imports torchvision at import time (for its image
transforms and a ResNet batch-norm helper, neither used by ViT CLIP), and torchvision's PyPI
wheel does not load beside this machine's CPU torch. When torchvision is missing or broken, a
stand-in module supplies those names so that open_clip's model code can be imported; it would
fail loudly if any of them were called. Exit code 3 means open_clip is not installed.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _stand_in_torchvision() -> None:
    def unusable(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: not available in this test process")

    class Unusable:
        def __init__(self, *args, **kwargs):
            unusable()

    names = {
        "torchvision": {},
        "torchvision.transforms": {n: Unusable for n in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor",
                                                          "Resize", "CenterCrop", "ColorJitter", "Grayscale")},
        "torchvision.transforms.functional": {},
        "torchvision.ops": {},
        "torchvision.ops.misc": {"FrozenBatchNorm2d": Unusable},
    }
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes find_spec
        module.__getattr__ = lambda attr, name=name: Unusable  # any other name open_clip imports
        for key, value in attrs.items():
            setattr(module, key, value)
        sys.modules[name] = module
    for name in names:  # submodules as attributes of their parents, as the import system leaves them
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic",
                                                                                   BILINEAR="bilinear")


def main(out: Path, model_cfg: dict, quick_gelu: bool) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or the CUDA wheel failing to register its ops on this CPU torch
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        _stand_in_torchvision()
    try:
        import open_clip
    except ImportError:
        sys.exit(3)
    torch.manual_seed(0)
    model = open_clip.model.CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"],
                                 quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(1.7)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DDP-trained HPSv2 saves it
    torch.save({"state_dict": state, "epoch": 1}, out / "open_clip.pt")

    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, text_cfg["vocab_size"] - 1, (2, text_cfg["context_length"]))
    ids[0, 6:], ids[1, 3:] = 0, 0
    ids[0, 5], ids[1, 2] = text_cfg["vocab_size"] - 1, text_cfg["vocab_size"] - 1  # EOT: the highest id
    size = vision_cfg["image_size"]
    pixels = rng.standard_normal((3, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(pixels)).numpy()
        text = model.encode_text(torch.from_numpy(ids)).numpy()
    np.savez(out / "outputs.npz", ids=ids.astype(np.int32), pixels=pixels, image=image, text=text,
             logit_scale=model.logit_scale.detach().numpy(), open_clip_version=open_clip.__version__)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), "--quick_gelu" in sys.argv[3:])
