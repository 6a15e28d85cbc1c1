"""Objective registry: `get(name)` → `ObjectiveSpec`; `build(config.objective, models)` → `Objective`.

Objectives register themselves on import; each declares its config defaults, so
`config.objective` holds only the fields its objective understands.
"""

from __future__ import annotations

import ml_collections

from alignax.objectives.base import Models, Objective, ObjectiveSpec, RunSettings
from alignax.registry import Registry
from alignax.schema import check_against

REGISTRY: Registry[ObjectiveSpec] = Registry("objective", field="config.objective.name")


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    return REGISTRY.register(spec.name, spec)


def get(name: str) -> ObjectiveSpec:
    return REGISTRY.lookup(name)


def with_defaults(objective_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The objective's defaults overlaid with the configured values (after validation)."""
    spec = get(objective_config.get("name", "sft"))
    merged = ml_collections.ConfigDict({"name": spec.name, **spec.defaults})
    merged.update(objective_config)
    return merged


def validate_config(objective_config: ml_collections.ConfigDict,
                    run_config: ml_collections.ConfigDict | None = None) -> None:
    """Unknown or mistyped objective fields; with the run config, also the objective's own `check`."""
    spec = get(objective_config.get("name", "sft"))
    check_against({"name": spec.name, **spec.defaults}, objective_config.to_dict(), "config.objective")
    if spec.check is not None and run_config is not None:
        spec.check(with_defaults(objective_config), run_config)


def build(objective_config: ml_collections.ConfigDict, models: Models, run: RunSettings | None = None) -> Objective:
    """The objective named by `objective_config.name`, built over `models`; `run` defaults to
    `RunSettings()` (no rewards, the default sampler)."""
    merged = with_defaults(objective_config)
    return get(merged.name).build(merged, models, run or RunSettings())


# Importing each objective registers it; they import `register` from above, so this comes last.
from alignax.objectives import dpo, feature_align, grpo, reward_backprop, sft  # noqa: E402,F401

__all__ = ["Models", "Objective", "ObjectiveSpec", "REGISTRY", "RunSettings", "build", "get", "register",
           "validate_config"]
