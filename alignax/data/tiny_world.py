"""The tiny embedded world: small synthetic datasets the whole pipeline can train on in seconds.

Images are coloured shapes (circle, square, triangle) on a coloured background, drawn with
numpy, captioned "a red circle on a blue background" ("an orange ..."). Text conditioning comes from
`ToyTextEncoder` (real runs store SD3 pipeline embeddings instead), so captions that share
words share features and the model can learn to follow them.

Layout of `out_dir` (each a TFDS array_record dataset directory, splits 'train' and 'eval'):

    out_dir/
      captioned_images/   image uint8 [S,S,3], prompt, encoder_hidden_states [L,D], pooled_projections [P]
      prompts/            prompt, encoder_hidden_states, pooled_projections (other captions than the images'),
                          identity (the shape's name: the subject the `identity` reward keeps recognisable)
      preference_pairs/   prompt, image_0, image_1, label_0, encoder_hidden_states, pooled_projections
      world.json          the arguments used, the palette and the shapes; written last, so its
                          presence means the world is complete (an interrupted build is redone)

In a preference pair both images draw the same caption; one keeps full colour and the other
is desaturated towards its grey level by a random factor in [0.1, 0.6]. The preferred image
is the more saturated one, which is on side 0 or 1 at random (label_0 = 1.0 or 0.0), so a
reward model must learn saturation, not position.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from alignax.data.builders import write_captioned_images, write_preference_pairs, write_prompts
from alignax.data.toy_text_encoder import ToyTextEncoder
from alignax.errors import DataError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 200),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass(frozen=True)
class TinyWorld:
    """Paths of the datasets `build_tiny_world` wrote, and the encoder that made their conditioning."""

    root: str
    captioned_images: str
    prompts: str
    preference_pairs: str
    text_encoder: ToyTextEncoder


def build_tiny_world(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    num_train: int = 64,
    num_eval: int = 16,
    seq_len: int = 8,
    context_dim: int = 16,
    pooled_dim: int = 16,
    seed: int = 0,
    overwrite: bool = False,
) -> TinyWorld:
    """Write the three tiny datasets under `out_dir` (layout in the module docstring); deterministic in `seed`."""
    out_dir = os.fspath(out_dir)
    manifest = os.path.join(out_dir, "world.json")
    if os.path.exists(manifest) and not overwrite:
        raise DataError(f"tiny world {out_dir} is already built ({manifest} exists); pass overwrite=True to rebuild")
    # world.json is written last, so without it any dataset directories here are from an interrupted build.
    overwrite = True
    encoder = ToyTextEncoder(seq_len, context_dim, pooled_dim, seed)
    sizes = {"train": num_train, "eval": num_eval}
    paths = {name: os.path.join(out_dir, name) for name in ("captioned_images", "prompts", "preference_pairs")}

    def scenes(kind: int, split: str) -> list[dict[str, object]]:
        rng = np.random.default_rng([seed, kind, list(sizes).index(split)])
        return [random_scene(rng, image_size) for _ in range(sizes[split])]

    def with_text(examples: list[dict[str, object]]) -> list[dict[str, object]]:
        hidden, pooled = encoder.encode([e["prompt"] for e in examples])
        rows = zip(examples, hidden, pooled, strict=True)
        return [{**e, "encoder_hidden_states": h, "pooled_projections": p} for e, h, p in rows]

    write_captioned_images(
        paths["captioned_images"],
        {s: with_text([{"image": x["image"], "prompt": x["prompt"]} for x in scenes(0, s)]) for s in sizes},
        overwrite=overwrite,
    )
    write_prompts(
        paths["prompts"],
        {s: with_text([{"prompt": x["prompt"], "identity": x["shape"]} for x in scenes(1, s)]) for s in sizes},
        overwrite=overwrite,
    )
    write_preference_pairs(
        paths["preference_pairs"], {s: with_text(_pairs(scenes(2, s), seed, s)) for s in sizes}, overwrite=overwrite
    )

    with open(manifest + ".tmp", "w", encoding="utf-8") as f:
        json.dump(
            {
                "image_size": image_size,
                "num_train": num_train,
                "num_eval": num_eval,
                "seq_len": seq_len,
                "context_dim": context_dim,
                "pooled_dim": pooled_dim,
                "seed": seed,
                "palette": PALETTE,
                "shapes": list(SHAPES),
                "text_encoder": "ToyTextEncoder",
            },
            f,
            indent=2,
        )
    os.replace(manifest + ".tmp", manifest)
    return TinyWorld(out_dir, paths["captioned_images"], paths["prompts"], paths["preference_pairs"], encoder)


def random_scene(rng: np.random.Generator, image_size: int) -> dict[str, object]:
    """One random shape/colour/background image with its caption and shape name."""
    colours = list(PALETTE)
    fg, bg = rng.choice(len(colours), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(0.2, 0.35) * image_size
    centre = rng.uniform(radius, image_size - radius, size=2)
    image = draw(shape, PALETTE[colours[fg]], PALETTE[colours[bg]], image_size, centre, radius)
    return {"image": image, "prompt": f"{_article(colours[fg])} {shape} on {_article(colours[bg])} background",
            "shape": shape}


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def draw(shape: str, colour, background, image_size: int, centre, radius: float) -> np.ndarray:
    """uint8 [S, S, 3] image of `shape` in `colour` on `background`."""
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    cy, cx = centre
    masks = {
        "circle": (x - cx) ** 2 + (y - cy) ** 2 <= radius**2,
        "square": (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85),
        "triangle": (y >= cy - radius) & (y <= cy + radius) & (np.abs(x - cx) <= (y - (cy - radius)) / 2),
    }
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[...] = background
    image[masks[shape]] = colour
    return image


def desaturate(image: np.ndarray, keep: float) -> np.ndarray:
    """Blend each pixel towards its grey level, keeping `keep` of its colour (1.0: unchanged)."""
    pixels = image.astype(np.float32)
    grey = pixels.mean(axis=-1, keepdims=True)
    return np.clip(np.rint(grey + keep * (pixels - grey)), 0, 255).astype(np.uint8)


def saturation(image: np.ndarray) -> float:
    """Mean HSV-style saturation (max-min)/max of an RGB uint8 image, in [0, 1]."""
    pixels = image.astype(np.float32)
    high, low = pixels.max(axis=-1), pixels.min(axis=-1)
    return float(np.mean((high - low) / np.maximum(high, 1.0)))


def _pairs(scenes: list[dict[str, object]], seed: int, split: str) -> list[dict[str, object]]:
    rng = np.random.default_rng([seed, 3, 0 if split == "train" else 1])
    pairs = []
    for scene in scenes:
        vivid, dull = scene["image"], desaturate(scene["image"], rng.uniform(0.1, 0.6))
        vivid_first = bool(rng.integers(2))
        pairs.append(
            {
                "prompt": scene["prompt"],
                "image_0": vivid if vivid_first else dull,
                "image_1": dull if vivid_first else vivid,
                "label_0": np.float32(1.0 if vivid_first else 0.0),
            }
        )
    return pairs
