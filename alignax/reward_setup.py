"""From `config.rewards` to built rewards: each entry is a named instance of a registered reward.

    config.rewards.red = dict(kind='channel_mean', channel=0)
    config.rewards.hps = dict(kind='hpsv2', checkpoint='/ckpt/HPS_v2_compressed.pt', tokenizer='/tok')

`kind` defaults to the entry's name, so `config.rewards.aesthetic = dict(...)` works too.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import ml_collections

from alignax.errors import ConfigError


def _settings(name: str, entry: Any) -> tuple[str, dict]:
    if not isinstance(entry, Mapping | ml_collections.ConfigDict):
        raise ConfigError(f"config.rewards.{name}: expected a mapping of reward settings, found {entry!r}")
    settings = dict(entry)
    return settings.pop("kind", name), settings


def validate_config(rewards_config: ml_collections.ConfigDict) -> None:
    """Unknown kinds and unknown settings are ConfigErrors; no checkpoint is opened."""
    from alignax import rewards
    for name, entry in rewards_config.items():
        kind, settings = _settings(name, entry)
        factory = rewards.factory(kind) if hasattr(rewards, "factory") else None
        if factory is None:
            try:
                rewards.get  # noqa: B018
            except AttributeError as e:
                raise ConfigError("alignax.rewards has no registry") from e
            continue
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(settings) - set(params))
            if unknown:
                raise ConfigError(f"config.rewards.{name}: reward {kind!r} does not take {unknown}; "
                                  f"it takes {sorted(params)}")


def build(rewards_config: ml_collections.ConfigDict) -> dict[str, Any]:
    from alignax import rewards
    built = {}
    for name, entry in rewards_config.items():
        kind, settings = _settings(name, entry)
        built[name] = rewards.get(kind, **settings)
    return built
