"""Procedural portraits: identities with fixed faces, per-image attributes, captions and landmarks.

An identity (`Identity`) is a fixed face: face width/height, eye spacing/height/size, a slight eye-height
asymmetry, nose length, mouth width/height, a mole at a fixed place, skin tone, hair and eye colour.
Hair colours and skin tones are shared by several identities, so telling people apart needs the face's
geometry, not only its colours.

Per image, the attributes (`ATTRIBUTES`, each named in the caption) are:

    expression   neutral | smiling | frowning | surprised      (mouth and eyebrows)
    glasses      none | glasses                                  ("wearing glasses")
    hat          none | hat                                      ("wearing a hat")
    hair         short | long
    light        front | left | right                            (a brightness gradient across the image)
    background   red | green | blue | yellow | purple | grey

and a pose jitter that is not captioned: shift (±4% of the image), scale (±5%) and rotation (±6°).

A caption names the identity and every attribute, e.g. "portrait of person 07, smiling, wearing glasses,
long hair, light from left, red background" (`caption`). Every word is in `VOCABULARY`.

`ideal` in [0, 1] morphs a face towards the world's aesthetic ideal: the average face geometry shared by
all identities, no asymmetry, no mole, and warm light. The preference scorer learns to like it
(`aesthetic_value`), so pushing a generator towards the scorer erodes what makes a person recognisable:
the conflict the identity reward has to hold against.

Images are drawn at twice the size and averaged down 2x2 (anti-aliased edges), uint8 RGB.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "expression": ("neutral", "smiling", "frowning", "surprised"),
    "glasses": ("none", "glasses"),
    "hat": ("none", "hat"),
    "hair": ("short", "long"),
    "light": ("front", "left", "right"),
    "background": ("red", "green", "blue", "yellow", "purple", "grey"),
}
BACKGROUNDS = {"red": (196, 64, 60), "green": (70, 150, 80), "blue": (64, 96, 190), "yellow": (214, 190, 70),
               "purple": (130, 80, 160), "grey": (128, 128, 128)}
HAIR_COLOURS = ((40, 30, 25), (120, 70, 35), (215, 180, 100), (170, 60, 30))     # black, brown, blonde, red
SKIN_TONES = ((236, 200, 170), (180, 130, 95))
EYE_COLOURS = ((60, 90, 160), (90, 60, 30), (60, 120, 70))
HAT_COLOUR = (30, 40, 70)
GLASSES_COLOUR = (20, 20, 20)
CLOTHES_COLOUR = (60, 60, 70)

# Face geometry, in units of the image side, measured from the face centre (y down): (low, high) per field.
GEOMETRY = {
    "face_w": (0.20, 0.27),      # half-width of the face ellipse
    "face_h": (0.25, 0.32),      # half-height
    "eye_dx": (0.065, 0.115),    # half the distance between the eyes
    "eye_y": (-0.08, 0.0),       # eye height
    "eye_r": (0.022, 0.038),     # eye radius
    "nose": (0.06, 0.13),        # nose length below the eyes
    "mouth_w": (0.05, 0.11),     # half-width of the mouth
    "mouth_y": (0.12, 0.19),     # mouth height
}
IDEAL = {k: (lo + hi) / 2 for k, (lo, hi) in GEOMETRY.items()}
FACE_CENTRE = (0.0, 0.02)        # (x, y) of the face centre, image-centred units
WARM = np.array([1.10, 1.0, 0.86])
POSE = {"shift": 0.04, "scale": 0.05, "rotate_degrees": 6.0}


@dataclasses.dataclass(frozen=True)
class Identity:
    index: int
    geometry: Mapping[str, float]
    asymmetry: float             # the right eye sits this much lower (image units)
    mole: tuple[float, float]    # (x, y) of the mole, face-centred units
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eyes: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"person {self.index:02d}"


def make_identities(num: int = 16, seed: int = 0) -> list[Identity]:
    """`num` identities: colours from a small shared palette (hair x skin cycles every 8), geometry spread
    over its range by a shuffled stratified draw per field, so no two faces are close in every field."""
    rng = np.random.default_rng([seed, 101])
    strata = {k: (rng.permutation(num) + rng.uniform(0.1, 0.9, num)) / num for k in GEOMETRY}
    identities = []
    for i in range(num):
        geometry = {k: lo + (hi - lo) * float(strata[k][i]) for k, (lo, hi) in GEOMETRY.items()}
        identities.append(Identity(
            index=i, geometry=geometry, asymmetry=float(rng.uniform(-0.02, 0.02)),
            mole=(float(rng.uniform(-0.14, 0.14)), float(rng.uniform(0.02, 0.16))),
            skin=SKIN_TONES[(i // len(HAIR_COLOURS)) % len(SKIN_TONES)], hair=HAIR_COLOURS[i % len(HAIR_COLOURS)],
            eyes=EYE_COLOURS[int(rng.integers(len(EYE_COLOURS)))]))
    return identities


def all_combinations() -> list[dict[str, str]]:
    """Every attribute combination, in a fixed order."""
    return [dict(zip(ATTRIBUTES, values, strict=True)) for values in itertools.product(*ATTRIBUTES.values())]


def caption(identity: Identity, attributes: Mapping[str, str]) -> str:
    parts = [f"portrait of {identity.name}", attributes["expression"]]
    if attributes["glasses"] == "glasses":
        parts.append("wearing glasses")
    if attributes["hat"] == "hat":
        parts.append("wearing a hat")
    parts += [f"{attributes['hair']} hair", f"light from {attributes['light']}",
              f"{attributes['background']} background"]
    return ", ".join(parts)


VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"portrait", "of", "person", "wearing", "glasses", "a", "hat", "hair", "light", "from", "background"}
    | {v for values in ATTRIBUTES.values() for v in values if v != "none"}))


def identity_words(num: int) -> list[str]:
    """The person numbers captions use ('00' ... ), each one token of the world tokenizer."""
    return [f"{i:02d}" for i in range(num)]


@dataclasses.dataclass(frozen=True)
class Pose:
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0           # radians

    @staticmethod
    def random(rng: np.random.Generator) -> Pose:
        return Pose(float(rng.uniform(-1, 1) * POSE["shift"]), float(rng.uniform(-1, 1) * POSE["shift"]),
                    float(1.0 + rng.uniform(-1, 1) * POSE["scale"]),
                    float(np.deg2rad(rng.uniform(-1, 1) * POSE["rotate_degrees"])))

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face-frame (u, v) → image-centred (x, y)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        return (self.scale * (c * u - s * v) + self.dx + FACE_CENTRE[0],
                self.scale * (s * u + c * v) + self.dy + FACE_CENTRE[1])

    def to_face(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image-centred (x, y) → face frame (u, v)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        x, y = (x - self.dx - FACE_CENTRE[0]) / self.scale, (y - self.dy - FACE_CENTRE[1]) / self.scale
        return c * x + s * y, -s * x + c * y


def morphed(identity: Identity, ideal: float) -> tuple[dict[str, float], float, float]:
    """(geometry, asymmetry, mole opacity) of `identity` moved `ideal` of the way to the ideal face."""
    geometry = {k: (1 - ideal) * v + ideal * IDEAL[k] for k, v in identity.geometry.items()}
    return geometry, (1 - ideal) * identity.asymmetry, 1.0 - ideal


def landmarks(identity: Identity, pose: Pose, size: int, ideal: float = 0.0) -> np.ndarray:
    """float32 [5, 2] pixel (x, y): left eye, right eye, nose tip, left and right mouth corner (insightface order;
    'left' is the image's left)."""
    g, asym, _ = morphed(identity, ideal)
    u = np.array([-g["eye_dx"], g["eye_dx"], 0.0, -g["mouth_w"], g["mouth_w"]])
    v = np.array([g["eye_y"], g["eye_y"] + asym, g["eye_y"] + g["nose"], g["mouth_y"], g["mouth_y"]])
    x, y = pose.to_image(u, v)
    return np.stack([(x + 0.5) * size, (y + 0.5) * size], axis=-1).astype(np.float32)


def canonical_landmarks(size: int) -> np.ndarray:
    """The ideal face's landmarks with no pose jitter: the fixed landmarks of the world's `identity` reward."""
    average = Identity(index=-1, geometry=dict(IDEAL), asymmetry=0.0, mole=(0.0, 0.0), skin=SKIN_TONES[0],
                       hair=HAIR_COLOURS[0], eyes=EYE_COLOURS[0])
    return landmarks(average, Pose(), size)


def aesthetic_value(ideal: float, warmth: float) -> float:
    """The ground truth behind the world's preferences: closeness to the ideal face (which also means
    symmetric and unblemished) and warm light, both in [0, 1]."""
    return float(ideal + 0.5 * warmth)


def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _ring(u, v, cu, cv, r, width):
    d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2)
    return np.abs(d - r) <= width


def _segment(u, v, p, q, width):
    """Points within `width` of the segment p-q."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    d = q - p
    t = np.clip(((u - p[0]) * d[0] + (v - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return (u - p[0] - t * d[0]) ** 2 + (v - p[1] - t * d[1]) ** 2 <= width ** 2


def render(identity: Identity, attributes: Mapping[str, str], pose: Pose = Pose(), *, size: int = 64,
           ideal: float = 0.0, warmth: float = 0.0) -> np.ndarray:
    """uint8 [size, size, 3]: the portrait of `identity` with `attributes`, posed, morphed `ideal` of the way to
    the ideal face, under light warmed by `warmth` in [0, 1]."""
    big = 2 * size
    y, x = (np.mgrid[0:big, 0:big] + 0.5) / big - 0.5
    u, v = pose.to_face(x, y)
    g, asym, mole_alpha = morphed(identity, ideal)
    canvas = np.empty((big, big, 3), np.float32)
    canvas[...] = BACKGROUNDS[attributes["background"]]

    def paint(mask, colour, alpha=1.0):
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(colour, np.float32)

    fw, fh = g["face_w"], g["face_h"]
    hair = identity.hair
    paint(_ellipse(u, v, 0.0, fh + 0.36, fw + 0.20, 0.28), CLOTHES_COLOUR)                    # shoulders
    if attributes["hair"] == "long":
        paint(_ellipse(u, v, 0.0, 0.05, fw + 0.06, fh + 0.12) & (v > -0.05), hair)              # hair down the back
    paint((np.abs(u) <= 0.35 * fw) & (v > 0.5 * fh) & (v < fh + 0.12), identity.skin)         # neck
    paint(_ellipse(u, v, 0.0, 0.0, fw, fh), identity.skin)                                     # face
    cap = _ellipse(u, v, 0.0, -0.02, fw + 0.025, fh + 0.04) & (v < -0.55 * fh)
    paint(cap | (_ellipse(u, v, 0.0, -0.02, fw + 0.025, fh + 0.04) & (np.abs(u) > 0.85 * fw) & (v < 0.1)), hair)
    skin_dark = np.asarray(identity.skin, np.float32) * 0.72
    for side, dy in ((-1, 0.0), (1, asym)):                                                    # eyes, brows
        cu, cv = side * g["eye_dx"], g["eye_y"] + dy
        r = g["eye_r"]
        paint(_ellipse(u, v, cu, cv, 1.35 * r, r), (245, 245, 245))
        paint(_ellipse(u, v, cu, cv, 0.6 * r, 0.6 * r), identity.eyes)
        tilt = {"frowning": 0.02, "surprised": -0.012}.get(attributes["expression"], 0.0)
        lift = -0.015 if attributes["expression"] == "surprised" else 0.0
        paint(_segment(u, v, (cu - side * 1.5 * r, cv - 1.9 * r + lift),
                       (cu + side * 1.5 * r, cv - 1.9 * r + lift + tilt), 0.006), np.asarray(hair) * 0.8)
    paint(_segment(u, v, (0.0, g["eye_y"] + 0.02), (0.012, g["eye_y"] + g["nose"]), 0.008), skin_dark)  # nose
    mw, my = g["mouth_w"], g["mouth_y"]
    mouth = (150, 50, 60)
    expression = attributes["expression"]
    if expression == "smiling":
        paint(_ring(u, v, 0.0, my - mw, mw * 1.41, 0.009) & (v > my - 0.3 * mw), mouth)
    elif expression == "frowning":
        paint(_ring(u, v, 0.0, my + mw, mw * 1.41, 0.009) & (v < my + 0.3 * mw), mouth)
    elif expression == "surprised":
        paint(_ellipse(u, v, 0.0, my, 0.45 * mw, 0.03), mouth)
    else:
        paint(_segment(u, v, (-mw, my), (mw, my), 0.008), mouth)
    if mole_alpha > 0:
        paint(_ellipse(u, v, identity.mole[0] * fw / 0.235, identity.mole[1], 0.012, 0.012), (70, 40, 30), mole_alpha)
    if attributes["glasses"] == "glasses":
        r = 2.0 * g["eye_r"] + 0.012
        for side, dy in ((-1, 0.0), (1, asym)):
            paint(_ring(u, v, side * g["eye_dx"], g["eye_y"] + dy, r, 0.006), GLASSES_COLOUR)
        paint(_segment(u, v, (-g["eye_dx"] + r, g["eye_y"]), (g["eye_dx"] - r, g["eye_y"] + asym), 0.005),
              GLASSES_COLOUR)
    if attributes["hat"] == "hat":
        paint(_ellipse(u, v, 0.0, -fh - 0.01, fw + 0.06, 0.16) & (v < -fh + 0.05), HAT_COLOUR)   # crown
        paint((np.abs(u) <= fw + 0.10) & (np.abs(v + fh - 0.05) <= 0.025), HAT_COLOUR)          # brim
    light = {"front": 0.0, "left": -1.0, "right": 1.0}[attributes["light"]]
    canvas *= (1.0 - 0.45 * light * x)[..., None]                                               # side light
    canvas *= (1.0 + warmth * (WARM - 1.0))
    small = canvas.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)
