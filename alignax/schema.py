"""Checking a config tree against its schema: unknown keys and wrong types, named by their path.

Shared by the run config (`alignax.config`), each objective's own fields (`alignax.objectives`) and
the reward-model trainer's config; it imports nothing of alignax but its errors, so every owner of
a schema can use it without import cycles.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from alignax.errors import ConfigError


def _is_free_form(path: str, free_form: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f + ".") for f in free_form)


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, Sequence) and not isinstance(default, str):
        return isinstance(value, Sequence) and not isinstance(value, str)
    return isinstance(value, type(default))


def check_against(schema: Mapping[str, Any], config: Mapping[str, Any], prefix: str = "config",
                  free_form: Sequence[str] = ()) -> None:
    """Unknown keys and wrong types, recursively; free-form subtrees are checked by their owners."""
    for key, value in config.items():
        path = f"{prefix}.{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            hint = f"did you mean {prefix}.{close[0]}? " if close else ""
            raise ConfigError(f"{path}: unknown key; {hint}{prefix} accepts {sorted(schema)}")
        default = schema[key]
        if _is_free_form(path.removeprefix("config."), free_form):
            continue
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a mapping, found {type(value).__name__} {value!r}")
            check_against(default, value, path, free_form)
        elif not _type_ok(default, value):
            raise ConfigError(f"{path}: expected {type(default).__name__}, found {type(value).__name__} {value!r}")
