"""From `config.rewards` to built rewards: each entry is a named instance of a registered reward.

    config.rewards.red = dict(kind='channel_mean', channel=0)
    config.rewards.hps = dict(kind='hpsv2', checkpoint='/ckpt/HPS_v2_compressed.pt', tokenizer='/tok')

`kind` defaults to the entry's name, so `config.rewards.aesthetic = dict(...)` works too. The entry's
name is the reward's instance name (`Reward.name`): the batch keys it adds (`<name>/input_ids`, ...)
are built from it, so two instances of one kind never share token ids.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import ml_collections

from alignax.errors import ConfigError, DataError
from alignax.rewards.base import RESERVED


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
        if kind not in rewards.REGISTRY:
            raise ConfigError(f"config.rewards.{name}: unknown reward kind {kind!r}; alignax knows "
                              f"{sorted(rewards.REGISTRY)}")
        if "name" in settings:
            raise ConfigError(f"config.rewards.{name}: ['name'] is not a reward setting: the instance name is "
                              f"the key under config.rewards ({name!r}); remove it")
        params = inspect.signature(rewards.REGISTRY[kind]).parameters
        accepted = sorted(set(params) - set(RESERVED))
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(settings) - set(accepted))
            if unknown:
                raise ConfigError(f"config.rewards.{name}: reward {kind!r} does not take {unknown}; "
                                  f"it takes {accepted}")


def prepare(rewards: Mapping[str, Any], host_batch: dict) -> dict:
    """Adds each reward's host-side inputs (token ids of the batch's prompts, and what `host_fn`
    computes from other host fields such as `identity`) to the batch."""
    if not rewards:
        return host_batch
    extra = {}
    for reward in rewards.values():
        extra.update(reward.prepare_batch(host_batch))
    return {**host_batch, **extra}


def check_fields(rewards: Mapping[str, Any], fields: Any, where: str) -> None:
    """DataError unless every record field a reward reads on the host (`Reward.host_fields`, e.g.
    `identity`) is in `fields`; called when the dataset is opened, before anything compiles."""
    for name, reward in rewards.items():
        missing = [f for f in getattr(reward, "host_fields", ()) if f not in fields]
        if missing:
            raise DataError(f"{where}: config.rewards.{name} (kind {getattr(reward, 'kind', name)!r}) reads the "
                            f"record fields {missing}, which this dataset lacks (it has {sorted(fields)})")


def build(rewards_config: ml_collections.ConfigDict) -> dict[str, Any]:
    from alignax import rewards
    built = {}
    for name, entry in rewards_config.items():
        kind, settings = _settings(name, entry)
        built[name] = rewards.get(kind, name=name, **settings)
    return built
