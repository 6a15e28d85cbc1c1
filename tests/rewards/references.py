"""PyTorch / PIL / numpy reference pipelines for the rewards (no torchvision here), and the
tiny checkpoints the reward tests load through the public loaders."""

from __future__ import annotations

import string
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from PIL import Image

from tests.models.test_aesthetic import MLP
from tests.models.test_open_clip_format import MODEL_CONFIG, to_open_clip, transformers_model

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_SIZE = MODEL_CONFIG["vision_cfg"]["image_size"]  # 30: the tiny CLIP's input side
CONTEXT = MODEL_CONFIG["text_cfg"]["context_length"]  # 16
PROMPTS = ["the cat sat", "a red hat at the sea"]


# ---- tiny checkpoints -------------------------------------------------------------------------

def write_tokenizer(directory: Path, extra_tokens: int = 0) -> Path:
    """A CLIP BPE tokenizer over a-z with three merges; <|endoftext|> is the highest id, as in CLIP."""
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for i in range(extra_tokens):
        vocab[f"zz{i}</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    return directory


def write_checkpoints(root: Path) -> dict[str, Path]:
    """The tiny CLIP as a transformers directory (with tokenizer files) and as an open_clip `.pt`, a tokenizer
    directory, and a LAION-format aesthetic `.pth` sized for the tiny CLIP's embedding."""
    model = transformers_model()
    paths = dict(hf=root / "hf", open_clip=root / "HPS_v2_compressed.pt", tokenizer=root / "tokenizer",
                 aesthetic=root / "sac+logos+ava1-l14-linearMSE.pth")
    model.save_pretrained(paths["hf"])
    write_tokenizer(paths["hf"])
    torch.save(to_open_clip(model.state_dict()), paths["open_clip"])
    write_tokenizer(paths["tokenizer"])
    torch.manual_seed(1)
    mlp = MLP(input_size=MODEL_CONFIG["embed_dim"]).eval()
    with torch.no_grad():  # LAION's weights are not an init; give the tiny layers real scale
        for p in mlp.parameters():
            p.mul_(3.0)
    torch.save(mlp.state_dict(), paths["aesthetic"])
    return paths


def reference_models(paths: dict[str, Path]) -> tuple[transformers.CLIPModel, MLP]:
    clip = transformers.CLIPModel.from_pretrained(paths["hf"]).eval()
    mlp = MLP(input_size=MODEL_CONFIG["embed_dim"]).eval()
    mlp.load_state_dict(torch.load(paths["aesthetic"], weights_only=True))
    return clip, mlp


# ---- images ----------------------------------------------------------------------------------

def sample_images(height: int, width: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth random images in (0.1, 0.9) on the 8-bit grid, so PIL sees exactly the same pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(batch):
        freq, phase = rng.uniform(2, 6, (2, 3)), rng.uniform(0, 2 * np.pi, (2, 3))
        image = 0.5 + 0.2 * np.sin(freq[0] * 2 * xx[..., None] + phase[0]) * np.cos(freq[1] * yy[..., None]
                                                                                      + phase[1])
        images.append(image + rng.uniform(-0.15, 0.15, image.shape))
    return (np.round(np.stack(images) * 255) / 255).astype(np.float32)


# ---- PIL + numpy preprocessing ---------------------------------------------------------------

def pil_resize(image: np.ndarray, height: int, width: int, eight_bit: bool) -> np.ndarray:
    """PIL bicubic on an HWC [0, 1] image: as an 8-bit RGB image (the real pipelines), or per channel in
    PIL's float mode 'F' (the same filter without 8-bit rounding and clipping)."""
    if (height, width) == image.shape[:2]:
        return image
    if eight_bit:
        pil = Image.fromarray(np.round(image * 255).astype(np.uint8))
        return np.asarray(pil.resize((width, height), Image.BICUBIC)).astype(np.float32) / 255
    return np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize((width, height), Image.BICUBIC))
                     for c in range(3)], axis=-1)


def hpsv2_reference(image: np.ndarray, size: int, eight_bit: bool) -> np.ndarray:
    """open_clip ResizeMaxSize(size, fill=0) + ToTensor + Normalize, written from its documented rule:
    scale = size / max(h, w); sides round(side * scale); pad [left, top, right, bottom] =
    [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2] with zeros. Returns CHW."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        image = pil_resize(image, nh, nw, eight_bit)
        ph, pw = size - nh, size - nw
        image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    return ((image - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1)


def clip_reference(image: np.ndarray, size: int, eight_bit: bool, crop_offset: str) -> np.ndarray:
    """Resize(size) shortest side (long side int(size * long / short)) + CenterCrop(size) + Normalize; CHW.
    crop_offset 'floor' is transformers' center_crop, 'round' torchvision's int(round(excess / 2))."""
    h, w = image.shape[:2]
    nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    image = pil_resize(image, nh, nw, eight_bit)
    offset = (lambda e: e // 2) if crop_offset == "floor" else (lambda e: int(round(e / 2.0)))
    top, left = offset(nh - size), offset(nw - size)
    image = image[top:top + size, left:left + size]
    return ((image - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1)


def open_clip_token_ids(tokenizer, prompts: list[str], context: int) -> np.ndarray:
    """open_clip's tokenize: [sot] + tokens + [eot], truncated with eot kept last, zero padded."""
    out = np.zeros((len(prompts), context), np.int64)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) > context:
            ids = ids[:context - 1] + [ids[-1]]
        out[row, :len(ids)] = ids
    return out


# ---- torch scores ----------------------------------------------------------------------------

def torch_cosine(clip: transformers.CLIPModel, pixels: np.ndarray, ids: np.ndarray,
                 mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        text = clip.get_text_features(input_ids=torch.from_numpy(ids),
                                      attention_mask=None if mask is None else torch.from_numpy(mask)).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1).double().numpy()


def torch_logit_scale(clip: transformers.CLIPModel) -> float:
    return float(clip.logit_scale.detach().exp())


def torch_aesthetic(clip: transformers.CLIPModel, mlp: MLP, pixels: np.ndarray) -> np.ndarray:
    """LAION's script: image features, L2-normalised, through the MLP."""
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        return mlp(image / image.norm(dim=-1, keepdim=True))[:, 0].double().numpy()


# ---- gradients -------------------------------------------------------------------------------

def directional_check(reward, images: np.ndarray, batch: dict, eps: float = 1e-2, seed: int = 0):
    """(grad . v, central difference (f(x + eps v) - f(x - eps v)) / 2 eps) for f = sum of scores."""
    total = jax.jit(lambda params, x, b: reward.apply(params, x, b)[0].sum())
    grad = jax.jit(jax.grad(total, argnums=1))(reward.params, images, batch)
    v = np.random.default_rng(seed).standard_normal(images.shape).astype(np.float32)
    analytic = float(np.sum(np.asarray(grad, np.float64) * v))
    plus = float(total(reward.params, images + eps * v, batch))
    minus = float(total(reward.params, images - eps * v, batch))
    return np.asarray(grad), analytic, (plus - minus) / (2 * eps)
