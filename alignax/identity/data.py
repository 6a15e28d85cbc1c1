"""`identity_images` datasets (image uint8 [H,W,3], label int64, identity str) for `alignax.identity.train`.

Two sources, both split into train / validation / test with held-out images of every identity (the same
identities in every split; `label` is the identity's index in sorted-name order):

- `from_identity_directory(root)`: one sub-directory of images per identity (`root/<identity>/*.jpg|png|...`),
  the layout of most face datasets after alignment (CASIA-WebFace, VGGFace2, a folder of one's own people).
  Local or remote (`gs://`) via alignax.fs.
- `synthetic_identities(...)`: a tiny procedural world for tests and the synthetic portrait pipeline: each
  identity is a fixed face-like arrangement (background, head ellipse, hair band, eyes, mouth, a mark), and
  each image of it is jittered in position, scale, brightness and pixel noise, so recognising the identity
  means ignoring the jitter.

`write_identity_images(out_dir, splits)` writes either as a TFDS array_record dataset (alignax.data.writer).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from alignax import fs
from alignax.data.schemas import IDENTITY_IMAGES
from alignax.data.writer import Examples, write_dataset
from alignax.errors import DataError

SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def write_identity_images(out_dir: str | os.PathLike, examples: Mapping[str, Examples] | Examples, *,
                          overwrite: bool = False) -> str:
    """Records: image uint8 [H,W,3] (one size per dataset), label int64, identity str."""
    return write_dataset(out_dir, IDENTITY_IMAGES, examples, overwrite=overwrite)


def _held_out_split(count: int, num_validation: int, num_test: int, rng: np.random.Generator) -> list[str]:
    """The split of each of `count` images of one identity: `num_test` test, `num_validation` validation, the
    rest train, drawn at random so held-out images are not always the last-named ones."""
    order = rng.permutation(count)
    split = np.full(count, "train", dtype=object)
    split[order[:num_test]] = "test"
    split[order[num_test:num_test + num_validation]] = "validation"
    return list(split)


# --- a directory per identity --------------------------------------------------------------------------------


def identity_directories(root: str | os.PathLike) -> dict[str, list[str]]:
    """{identity: sorted image paths} of `root/<identity>/<image>`; DataError naming `root` when there is none.

    Hidden entries and files without an image suffix (.jpg .jpeg .png .bmp .webp) are skipped."""
    root = os.fspath(root)
    if not fs.isdir(root):
        raise DataError(f"{root}: identity image directory not found (expected one sub-directory of images per "
                        "identity)")
    out: dict[str, list[str]] = {}
    for name in fs.listdir(root):
        path = fs.join(root, name)
        if name.startswith(".") or not fs.isdir(path):
            continue
        images = [fs.join(path, f) for f in fs.listdir(path)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
        if images:
            out[name] = sorted(images)
    if not out:
        raise DataError(f"{root}: no identity sub-directory with images ({', '.join(IMAGE_SUFFIXES)}) found")
    return out


def read_image(path: str, image_size: int) -> np.ndarray:
    """RGB uint8 [image_size, image_size, 3] (bilinear resize); DataError naming the file it cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with fs.open_file(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image: {e}") from e


def from_identity_directory(root: str | os.PathLike, *, image_size: int, num_validation: int = 2,
                            num_test: int = 2, seed: int = 0) -> dict[str, Iterator[dict]]:
    """{split: examples} from `root/<identity>/<image>`: every identity keeps `num_validation` and `num_test`
    of its images out of training. Identities with too few images are a DataError naming them (all of them
    are listed before any image is decoded)."""
    if image_size <= 0:
        raise DataError(f"image_size={image_size}: expected a positive size (images are resized to it)")
    identities = identity_directories(root)
    need = num_validation + num_test + 1
    short = {name: len(paths) for name, paths in identities.items() if len(paths) < need}
    if short:
        shown = ", ".join(f"{name!r} ({n})" for name, n in sorted(short.items())[:5])
        raise DataError(f"{os.fspath(root)}: every identity needs >= {need} images ({num_validation} validation + "
                        f"{num_test} test + 1 train); {len(short)} have fewer: {shown}")
    assignment: dict[str, list[tuple[int, str, str]]] = {s: [] for s in SPLITS}
    for label, (name, paths) in enumerate(sorted(identities.items())):
        splits = _held_out_split(len(paths), num_validation, num_test, np.random.default_rng([seed, label]))
        for path, split in zip(paths, splits, strict=True):
            assignment[split].append((label, name, path))

    def examples(items: list[tuple[int, str, str]]) -> Iterator[dict]:
        for label, name, path in items:
            yield {"image": read_image(path, image_size), "label": np.int64(label), "identity": name}

    return {split: examples(items) for split, items in assignment.items() if items}


# --- a tiny synthetic identity world -------------------------------------------------------------------------


def _identity_traits(rng: np.random.Generator) -> dict:
    """What stays fixed for one identity: colours, proportions and positions, in units of the image size."""
    return dict(
        skin=rng.uniform(60, 255, 3),
        head=(0.5 + rng.uniform(-0.04, 0.04), 0.55, rng.uniform(0.26, 0.36), rng.uniform(0.32, 0.42)),
        hair=rng.uniform(0, 255, 3), hair_line=rng.uniform(0.22, 0.4),
        eye=rng.uniform(0, 255, 3), eye_gap=rng.uniform(0.1, 0.18), eye_y=rng.uniform(0.42, 0.52),
        eye_radius=rng.uniform(0.04, 0.075),
        mouth=rng.uniform(0, 255, 3), mouth_width=rng.uniform(0.08, 0.2), mouth_y=rng.uniform(0.68, 0.76),
        mark=rng.uniform(0, 255, 3), mark_at=(rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.7)),
        mark_radius=rng.uniform(0.03, 0.06),
    )


def render_identity(traits: dict, image_size: int, rng: np.random.Generator, *, shift: float = 0.06,
                    scale: float = 0.08, brightness: float = 0.25, tint: float = 0.15,
                    noise: float = 8.0) -> np.ndarray:
    """One uint8 [S, S, 3] image of the identity `traits`, jittered by `rng`: a random background colour, the
    face moved by up to `shift`·S pixels and scaled by 1 ± `scale`, brightness by 1 ± `brightness`, each
    channel by 1 ± `tint` (lighting colour), plus Gaussian pixel noise. None of that tells identities apart."""
    s = image_size
    dx, dy = rng.uniform(-shift, shift, 2)
    zoom = 1.0 + rng.uniform(-scale, scale)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # Face coordinates: the jitter moves and scales the whole face around the image centre.
    u = ((xx + 0.5) / s - 0.5 - dx) / zoom + 0.5
    v = ((yy + 0.5) / s - 0.5 - dy) / zoom + 0.5
    soft = 1.5 / s  # anti-aliased edges, one and a half pixels wide

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        d = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
        return np.clip((1.0 - d) * min(rx, ry) / soft + 0.5, 0.0, 1.0)[..., None]

    image = np.broadcast_to(rng.uniform(0, 255, 3), (s, s, 3)).astype(np.float32)
    cx, cy, rx, ry = traits["head"]
    head = ellipse(cx, cy, rx, ry)
    image = image * (1 - head) + traits["skin"] * head
    hair = head * np.clip((traits["hair_line"] - v) / soft + 0.5, 0.0, 1.0)[..., None]
    image = image * (1 - hair) + traits["hair"] * hair
    for side in (-1, 1):
        eye = ellipse(cx + side * traits["eye_gap"], traits["eye_y"], traits["eye_radius"], traits["eye_radius"])
        image = image * (1 - eye) + traits["eye"] * eye
    mouth = ellipse(cx, traits["mouth_y"], traits["mouth_width"], 0.03)
    image = image * (1 - mouth) + traits["mouth"] * mouth
    mark = ellipse(*traits["mark_at"], traits["mark_radius"], traits["mark_radius"])
    image = image * (1 - mark) + traits["mark"] * mark
    light = (1.0 + rng.uniform(-brightness, brightness)) * (1.0 + rng.uniform(-tint, tint, 3))
    image = image * light + rng.normal(0.0, noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def synthetic_identities(*, num_identities: int = 16, images_per_identity: int = 16, image_size: int = 32,
                         num_validation: int = 2, num_test: int = 2, seed: int = 0) -> dict[str, list[dict]]:
    """{split: examples} of a procedural identity world (see the module docstring); deterministic in `seed`.
    Identity names are `id000`, `id001`, ...; each keeps `num_validation` + `num_test` images held out."""
    if num_identities < 2 or images_per_identity < num_validation + num_test + 1:
        raise DataError(f"synthetic identities: need >= 2 identities and images_per_identity >= num_validation + "
                        f"num_test + 1; got {num_identities} identities of {images_per_identity} images")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in range(num_identities):
        traits = _identity_traits(np.random.default_rng([seed, 0, label]))
        rng = np.random.default_rng([seed, 1, label])
        splits = _held_out_split(images_per_identity, num_validation, num_test, rng)
        for split in splits:
            out[split].append({"image": render_identity(traits, image_size, rng), "label": np.int64(label),
                               "identity": f"id{label:03d}"})
    return {split: examples for split, examples in out.items() if examples}


def save_identity_directory(root: str | os.PathLike, splits: Mapping[str, list[dict]]) -> Path:
    """Writes examples as `root/<identity>/<split>_<n>.png` (a directory-per-identity source; for tests and for
    looking at the synthetic world)."""
    from PIL import Image

    root = Path(root)
    for split, examples in splits.items():
        for i, example in enumerate(examples):
            directory = root / example["identity"]
            directory.mkdir(parents=True, exist_ok=True)
            Image.fromarray(example["image"]).save(directory / f"{split}_{i:04d}.png")
    return root
