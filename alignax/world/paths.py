"""Where each part of a built portrait world lives, and which world a run uses by default.

    WORLD/
      pipeline/                 diffusers StableDiffusion3Pipeline (no T5): CLIP text towers, tokenizers, VAE,
                                the sft-pretrained transformer, the scheduler
      rewards/clip/             the world CLIP (transformers CLIPModel): `alignment` (clip_score) and `realism`
      rewards/aesthetic/        the preference scorer (transformers CLIPModel, read by the `pickscore` reward)
      rewards/identity/         the ArcFace IResNet (alignax.models.iresnet.save; read by the `identity` reward)
      rewards/realism_stats.npz held-out real portraits' CLIP feature statistics (the `realism` judge)
      references/seen/<identity>/*.png     reference portraits the `identity` reward compares with
      references/unseen/<identity>/*.png   other portraits of each identity (the held-out identity judge)
      world.json                what was built, with which settings, and the quality bars measured; written
                                last, so a world without it is incomplete

The shipped world is `alignax/world/portrait/` (built by `python -m alignax.world.build`); `ALIGNAX_WORLD`
points runs at another one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from alignax.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent / "portrait"
ENV = "ALIGNAX_WORLD"
MANIFEST = "world.json"


@dataclasses.dataclass(frozen=True)
class WorldPaths:
    root: Path

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def clip(self) -> Path:
        return self.root / "rewards" / "clip"

    @property
    def aesthetic(self) -> Path:
        return self.root / "rewards" / "aesthetic"

    @property
    def identity(self) -> Path:
        return self.root / "rewards" / "identity"

    @property
    def realism_stats(self) -> Path:
        return self.root / "rewards" / "realism_stats.npz"

    @property
    def references(self) -> Path:
        return self.root / "references" / "seen"

    @property
    def unseen_references(self) -> Path:
        return self.root / "references" / "unseen"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest.is_file()

    def read_manifest(self) -> dict[str, Any]:
        if not self.is_complete():
            raise ConfigError(f"{self.root}: not a built portrait world (no {MANIFEST}); build one with "
                              f"`python -m alignax.world.build --out={self.root}`")
        return json.loads(self.manifest.read_text())


def default_world() -> WorldPaths:
    """`$ALIGNAX_WORLD` if set, else the world shipped in the package."""
    return WorldPaths(Path(os.environ.get(ENV) or SHIPPED).expanduser().resolve())
