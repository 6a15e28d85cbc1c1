"""Errors users can act on.

Every message names the file, key or field at fault, what was expected and what was
found, so a bad checkpoint or config is fixed without reading a stack trace.
"""


class AlignaxError(Exception):
    """Base of all errors alignax raises on purpose."""


class ConfigError(AlignaxError, ValueError):
    """A config field is unknown, mistyped or inconsistent."""


class WeightsError(AlignaxError, ValueError):
    """A weights file or directory is missing, corrupt or does not fit the architecture."""


class DataError(AlignaxError, ValueError):
    """A dataset or batch does not have the expected fields, shapes or types."""
