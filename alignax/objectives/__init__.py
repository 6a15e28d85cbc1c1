"""Objective registry: `get(name)` → `ObjectiveSpec`; `build(config.objective, models)` → `Objective`.

Objectives register themselves on import; each declares its config defaults, so
`config.objective` holds only the fields its objective understands.
"""

from __future__ import annotations

import ml_collections

from alignax.errors import ConfigError
from alignax.objectives.base import Models, Objective, ObjectiveSpec

REGISTRY: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"objective {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ObjectiveSpec:
    if name not in REGISTRY:
        raise ConfigError(f"config.objective.name={name!r}: unknown objective; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def with_defaults(objective_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The objective's defaults overlaid with the configured values (after validation)."""
    spec = get(objective_config.get("name", "sft"))
    merged = ml_collections.ConfigDict({"name": spec.name, **spec.defaults})
    merged.update(objective_config)
    return merged


def validate_config(objective_config: ml_collections.ConfigDict) -> None:
    from alignax.config import check_against
    spec = get(objective_config.get("name", "sft"))
    check_against({"name": spec.name, **spec.defaults}, objective_config.to_dict(), "config.objective")


def build(objective_config: ml_collections.ConfigDict, models: Models) -> Objective:
    merged = with_defaults(objective_config)
    return get(merged.name).build(merged, models)


# Importing each objective registers it; they import `register` from above, so this comes last.
from alignax.objectives import dpo, feature_align, reward_backprop, sft  # noqa: E402,F401

__all__ = ["Models", "Objective", "ObjectiveSpec", "REGISTRY", "build", "get", "register", "validate_config"]
