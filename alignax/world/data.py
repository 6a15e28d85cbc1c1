"""The portrait world's data, generated from a seed (`generate`), and its writers.

Splits: an attribute combination (expression, glasses, hat, hair, light, background) is either a train
or an eval combination (about one in five is held out, chosen by the seed), so eval prompts ask for
combinations no training image shows, for every identity.

- `train` / `eval`: portraits (uint8), captions, identity indices, landmarks; posed at random.
- `train_pairs` / `eval_pairs`: preference pairs — one caption, one pose, two renders that differ in how
  close the face is to the ideal and how warm the light is; the preferred one has the higher
  `portraits.aesthetic_value` (pairs closer than `MIN_MARGIN` are not made), on side 0 or 1 at random.
- `faces`: per identity, portraits for the identity embedder (train / validation / test).
- `references` / `unseen`: per identity, portraits the `identity` reward compares with, and others that
  only the held-out identity judge sees.

Writers: `write_datasets` (captioned_images, prompts with an `identity` field, preference_pairs; each with
the SD3 conditioning an `encode` callable gives), `write_identity_images` (faces aligned by the fixed
landmarks, exactly as the `identity` reward aligns generated images) and `write_references` (PNGs).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from alignax.world import portraits as P

MIN_MARGIN = 0.25
Encode = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray           # uint8 [N, S, S, 3]
    captions: list[str]
    identity: np.ndarray         # int [N]
    landmarks: np.ndarray        # float32 [N, 5, 2]


@dataclasses.dataclass(frozen=True)
class Pairs:
    prompts: list[str]
    image_0: np.ndarray
    image_1: np.ndarray
    label_0: np.ndarray          # float32 [N]: 1.0 when image_0 is preferred


@dataclasses.dataclass(frozen=True)
class WorldData:
    seed: int
    size: int
    identities: list[P.Identity]
    train: Split
    eval: Split
    train_pairs: Pairs
    eval_pairs: Pairs
    faces: dict[str, Split]      # 'train' / 'validation' / 'test'
    references: dict[str, list[np.ndarray]]
    unseen: dict[str, list[np.ndarray]]
    held_out: list[dict[str, str]]

    @property
    def eval_images(self) -> np.ndarray:
        """Held-out real portraits (the `realism` judge's reference distribution)."""
        return self.eval.images

    def names(self) -> list[str]:
        return [i.name for i in self.identities]


def split_combinations(seed: int, held_out_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    combos = P.all_combinations()
    order = np.random.default_rng([seed, 7]).permutation(len(combos))
    cut = int(round(held_out_fraction * len(combos)))
    return [combos[i] for i in sorted(order[cut:])], [combos[i] for i in sorted(order[:cut])]


def _portraits(rng: np.random.Generator, identities: list[P.Identity], combos: list[dict], count: int,
               size: int, *, who: np.ndarray | None = None) -> Split:
    who = np.arange(count) % len(identities) if who is None else who
    images, captions, points = [], [], []
    for k in who:
        identity, attributes, pose = identities[k], combos[rng.integers(len(combos))], P.Pose.random(rng)
        images.append(P.render(identity, attributes, pose, size=size))
        captions.append(P.caption(identity, attributes))
        points.append(P.landmarks(identity, pose, size))
    return Split(np.stack(images), captions, np.asarray(who, np.int64), np.stack(points))


def _pairs(rng: np.random.Generator, identities: list[P.Identity], combos: list[dict], count: int,
           size: int) -> Pairs:
    prompts, first, second, labels = [], [], [], []
    while len(prompts) < count:
        identity, attributes, pose = identities[rng.integers(len(identities))], combos[rng.integers(len(combos))], \
            P.Pose.random(rng)
        (ia, wa), (ib, wb) = rng.uniform(0, 1, (2, 2))
        va, vb = P.aesthetic_value(ia, wa), P.aesthetic_value(ib, wb)
        if abs(va - vb) < MIN_MARGIN:
            continue
        a = P.render(identity, attributes, pose, size=size, ideal=ia, warmth=wa)
        b = P.render(identity, attributes, pose, size=size, ideal=ib, warmth=wb)
        better, worse = (a, b) if va > vb else (b, a)
        better_first = bool(rng.integers(2))
        prompts.append(P.caption(identity, attributes))
        first.append(better if better_first else worse)
        second.append(worse if better_first else better)
        labels.append(1.0 if better_first else 0.0)
    return Pairs(prompts, np.stack(first), np.stack(second), np.asarray(labels, np.float32))


def generate(seed: int = 0, *, size: int = 64, num_identities: int = 16, num_train: int = 8192,
             num_eval: int = 512, num_pairs: int | None = None, num_eval_pairs: int | None = None,
             faces_per_identity: int = 96,
             references_per_identity: int = 4) -> WorldData:
    """The whole world's data, deterministic in its arguments."""
    identities = P.make_identities(num_identities, seed)
    train_combos, eval_combos = split_combinations(seed)
    rng = lambda *key: np.random.default_rng([seed, *key])  # noqa: E731  one stream per part
    num_pairs = num_pairs if num_pairs is not None else max(num_train // 4, 8)
    per = faces_per_identity
    faces_who = {name: np.repeat(np.arange(num_identities), n) for name, n in
                 (("train", per), ("validation", max(per // 12, 2)), ("test", max(per // 12, 2)))}
    refs = _portraits(rng(40), identities, train_combos, num_identities * references_per_identity, size)
    unseen = _portraits(rng(41), identities, eval_combos, num_identities * references_per_identity, size)
    group = lambda split: {i.name: [split.images[j] for j in np.flatnonzero(split.identity == i.index)]  # noqa: E731
                           for i in identities}
    return WorldData(
        seed=seed, size=size, identities=identities,
        train=_portraits(rng(10), identities, train_combos, num_train, size),
        eval=_portraits(rng(11), identities, eval_combos, num_eval, size),
        train_pairs=_pairs(rng(20), identities, train_combos, num_pairs, size),
        eval_pairs=_pairs(rng(21), identities, eval_combos,
                          num_eval_pairs if num_eval_pairs is not None else max(num_pairs // 8, 8), size),
        faces={name: _portraits(rng(30 + i), identities, train_combos, len(who), size, who=who)
               for i, (name, who) in enumerate(faces_who.items())},
        references=group(refs), unseen=group(unseen), held_out=eval_combos)


# ---- writers ----------------------------------------------------------------------------------------------

def write_datasets(data: WorldData, out_dir: str | os.PathLike, encode: Encode,
                   latents: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, str]:
    """captioned_images/, prompts/ (distinct captions, with `identity`) and preference_pairs/ under `out_dir`,
    splits train / eval, each record with `encode`'s conditioning of its caption; with `latents` (uint8
    images -> scaled VAE latents NHWC) the captioned images also carry pre-encoded `latents`."""
    from alignax.data import write_captioned_images, write_preference_pairs, write_prompts
    out = Path(out_dir)
    names = data.names()

    def captioned(split: Split):
        hidden, pooled = encode(split.captions)
        z = latents(split.images) if latents is not None else None
        return ({"image": split.images[i], "prompt": split.captions[i], "encoder_hidden_states": hidden[i],
                 "pooled_projections": pooled[i], **({} if z is None else {"latents": z[i]})}
                for i in range(len(split.captions)))

    def prompts(split: Split):
        first = {}
        for i, c in enumerate(split.captions):
            first.setdefault(c, i)
        rows = sorted(first.values())
        hidden, pooled = encode([split.captions[i] for i in rows])
        return ({"prompt": split.captions[i], "identity": names[int(split.identity[i])],
                 "encoder_hidden_states": hidden[j], "pooled_projections": pooled[j]} for j, i in enumerate(rows))

    def pairs(p: Pairs):
        hidden, pooled = encode(p.prompts)
        return ({"prompt": p.prompts[i], "image_0": p.image_0[i], "image_1": p.image_1[i], "label_0": p.label_0[i],
                 "encoder_hidden_states": hidden[i], "pooled_projections": pooled[i]} for i in range(len(p.prompts)))

    paths = {"captioned_images": str(out / "captioned_images"), "prompts": str(out / "prompts"),
             "preference_pairs": str(out / "preference_pairs")}
    write_captioned_images(paths["captioned_images"], {"train": captioned(data.train), "eval": captioned(data.eval)})
    write_prompts(paths["prompts"], {"train": prompts(data.train), "eval": prompts(data.eval)})
    write_preference_pairs(paths["preference_pairs"],
                           {"train": pairs(data.train_pairs), "eval": pairs(data.eval_pairs)})
    manifest = {"seed": data.seed, "size": data.size, "identities": names,
                "held_out_combinations": data.held_out, "counts": {
                    "train": len(data.train.captions), "eval": len(data.eval.captions),
                    "train_pairs": len(data.train_pairs.prompts), "eval_pairs": len(data.eval_pairs.prompts)}}
    (out / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def align_faces(images: np.ndarray, crop: int) -> np.ndarray:
    """uint8 crops [N, crop, crop, 3] aligned by the fixed landmarks, as the `identity` reward aligns."""
    import jax.numpy as jnp

    from alignax.rewards import face_align
    size = images.shape[1]
    points = np.broadcast_to(P.canonical_landmarks(size), (len(images), 5, 2))
    out = []
    for start in range(0, len(images), 256):
        chunk = jnp.asarray(images[start:start + 256], jnp.float32) / 255.0
        aligned = face_align.align(chunk, jnp.asarray(points[start:start + 256]), size=crop)
        out.append(np.clip(np.rint(np.asarray(aligned) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def write_identity_images(data: WorldData, out_dir: str | os.PathLike, crop: int) -> str:
    """identity_images dataset (train / validation / test) of `crop`-sized aligned faces."""
    from alignax.identity.data import write_identity_images as write
    names = data.names()

    def examples(split: Split):
        faces = align_faces(split.images, crop)
        return ({"image": faces[i], "label": np.int64(split.identity[i]), "identity": names[int(split.identity[i])]}
                for i in range(len(faces)))

    return write(out_dir, {name: examples(split) for name, split in data.faces.items()})


def write_references(data: WorldData, out_dir: str | os.PathLike) -> Path:
    """out_dir/seen/<identity>/<k>.png and out_dir/unseen/<identity>/<k>.png."""
    from PIL import Image
    out = Path(out_dir)
    for kind, groups in (("seen", data.references), ("unseen", data.unseen)):
        for name, images in groups.items():
            folder = out / kind / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(images):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                (folder / f"{k}.png").write_bytes(buffer.getvalue())
    return out
