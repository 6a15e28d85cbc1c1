"""The front door every alignax command shares: command-line mistakes as one line, quiet libraries.

    if __name__ == "__main__":
        cli.run_main(main)

- A command-line mistake (an override typo such as `--config.totl_steps=3`, a reward that is not
  configured in `--config.pareto.weights.green=1`, a missing or broken config file, a bad option
  after `NAME.py:`) prints one `error: ...` line naming the key and the closest valid one, and exits 2.
  absl and config_flags would raise a 55-line traceback ending in `AttributeError: "'green'"`.
- An `AlignaxError` (ConfigError, WeightsError, DataError) raised from `main` prints `error: <message>`
  and exits 1: those messages already name the file, key or field. Other exceptions keep their
  traceback, since they are bugs. `--verbosity=1` shows the traceback of every error.
- Logging: absl bumps its verbosity to INFO when `--verbosity` is not given, so orbax and TFDS log every
  file they touch. Here the default stays WARNING for the libraries (and for the TPU runtime's C++
  logs) while alignax's own logger reports at INFO; `--verbosity=0` shows the libraries' INFO lines,
  `--verbosity=1` everything at DEBUG.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

from alignax.errors import AlignaxError

USAGE_EXIT = 2  # the command line is wrong: nothing ran
ERROR_EXIT = 1  # main refused its inputs with an AlignaxError

# Config groups keyed by reward instance: a key there that is not in config.rewards is named against the rewards.
REWARD_KEYED = ("pareto.weights", "pareto.normalization", "pareto.ideal")


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """`absl.app.run(main)` with the one-line error handling and quiet logging described above."""
    app.run(_guarded(main), argv=argv, flags_parser=parse_flags)


def _guarded(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    def wrapped(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except AlignaxError as e:
            if _verbosity() >= 1:
                raise
            print(f"error: {e}", file=sys.stderr)
            return ERROR_EXIT
    return wrapped


def _verbosity() -> int:
    try:
        return int(flags.FLAGS["verbosity"].value)
    except (KeyError, flags.Error, TypeError, ValueError):
        return -1


def usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    print("(pass --helpshort for the flags)", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses `argv` into `flag_values`; a mistake exits with one line (see the module docstring)."""
    try:
        remaining = flag_values(argv)
    except Exception as e:  # noqa: BLE001  (absl, config_flags and config files raise anything)
        try:
            message = describe_flag_error(e, argv, flag_values)
        except Exception:  # noqa: BLE001  (the diagnosis must never hide the error it diagnoses)
            message = f"{type(e).__name__}: {e}"
        usage_error(message)
    problem = unloaded_config(flag_values)
    if problem:
        usage_error(problem)
    if flag_values is flags.FLAGS:
        configure_logging()
    return remaining


def configure_logging() -> None:
    """Libraries at WARNING unless `--verbosity` says otherwise; alignax's logger at INFO (DEBUG at -v 1)."""
    verbosity = flags.FLAGS["verbosity"]
    if verbosity.using_default_value:
        flags.FLAGS.verbosity = -1  # also stops absl.app from raising it to INFO after parsing
    level = int(verbosity.value)
    # The C++ runtimes (XLA, libtpu) read these when the backend starts, i.e. after flag parsing.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if level < 0 else "0")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "1" if level < 0 else "0")
    logging.getLogger("alignax").setLevel(logging.DEBUG if level >= 1 else logging.INFO)


# --- what went wrong on the command line ---------------------------------------------------------------


def describe_flag_error(error: BaseException, argv: list[str], flag_values: flags.FlagValues) -> str:
    """One line for an exception raised while parsing `argv`: the override or config file at fault."""
    for name, flag in _config_flags(flag_values):
        path = _flag_argument(argv, name)
        if path is None:
            continue
        loading = _loading_problem(error, name, path)
        if loading:
            return loading
        try:
            config = flag.parser.parse(path)
        except Exception:  # noqa: BLE001  (reported by _loading_problem above when it is the cause)
            continue
        for override in _overrides(argv, name):
            problem = check_override(config, override, flag_name=name)
            if problem:
                return problem
    alignax_error = _innermost(error, AlignaxError)
    if alignax_error is not None:
        return str(alignax_error)
    message = str(error).strip()
    if "Traceback (most recent call last)" in message:  # config_flags embeds the config file's traceback
        head = message.splitlines()[0].rstrip(":")
        message = f"{head}: {message.splitlines()[-1].strip()}"
    return message.splitlines()[0] if isinstance(error, flags.Error) else f"{type(error).__name__}: {message}"


def check_override(config: Any, override: str, *, flag_name: str = "config") -> str | None:
    """Why `--<flag_name>.<override>` names no field of `config`, or None when it does."""
    import ml_collections

    node, walked = config, []
    for part in override.split("."):
        here = ".".join([flag_name, *walked])
        if node is None:
            group = ".".join(walked)
            if group in REWARD_KEYED:
                return _reward_keyed(config, group, part, flag_name, unset=True)
            return (f"--{flag_name}.{override}: {here} is None in this config, so it has no field {part!r}; "
                    f"set the whole group instead")
        if not isinstance(node, ml_collections.ConfigDict | dict):
            return f"--{flag_name}.{override}: {here} is a {type(node).__name__}, not a group with field {part!r}"
        if part not in node:
            group = ".".join(walked)
            if group in REWARD_KEYED:
                return _reward_keyed(config, group, part, flag_name, unset=False)
            return _unknown_key(config, node, walked, part, override, flag_name)
        node, walked = node[part], [*walked, part]
    return None


def _unknown_key(config: Any, node: Any, walked: list[str], part: str, override: str, flag_name: str) -> str:
    siblings = [str(k) for k in node.keys()]
    close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean --{flag_name}.{'.'.join([*walked, close[0]])}?"
    else:  # the right name in another group: --config.learning_rate -> --config.optim.learning_rate
        paths = list(_leaf_paths(config))
        same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == part]
        close = same_leaf or difflib.get_close_matches(override, paths, n=1, cutoff=0.6)
        hint = (f"did you mean --{flag_name}.{close[0]}?" if close
                else f"{'.'.join([flag_name, *walked])} has {sorted(siblings)}")
    where = ".".join([flag_name, *walked, part])
    return f"--{flag_name}.{override}: unknown config key {where}; {hint}"


def _reward_keyed(config: Any, group: str, part: str, flag_name: str, *, unset: bool) -> str:
    rewards = [str(k) for k in config.get("rewards", {}).keys()] if hasattr(config, "get") else []
    close = difflib.get_close_matches(part, rewards, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    state = f"; {flag_name}.{group} is unset in this config" if unset else ""
    return (f"--{flag_name}.{group}.{part}: {part!r} is not a configured reward{hint}; "
            f"{flag_name}.rewards has {rewards}{state}")


def _leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    import ml_collections

    for key in node.keys():
        path = f"{prefix}{key}"
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict | dict) and len(value):
            yield from _leaf_paths(value, path + ".")
        else:
            yield path


def unloaded_config(flag_values: flags.FlagValues) -> str | None:
    """config_flags defers a missing config file to the first use of the config; report it now instead."""
    for name, flag in _config_flags(flag_values):
        error = _deferred_error(flag.value)
        if error is not None:
            path = getattr(flag, "config_filename", None) or "?"
            return _loading_problem(error, name, path) or f"--{name}={path}: {error}"
    return None


def _deferred_error(value: Any) -> BaseException | None:
    try:
        from ml_collections.config_flags import config_flags as impl
        error_config = impl._ErrorConfig  # noqa: SLF001  (the placeholder of a config file that failed to load)
    except (ImportError, AttributeError):
        return None
    return object.__getattribute__(value, "_error") if isinstance(value, error_config) else None


def _loading_problem(error: BaseException, name: str, path: str) -> str | None:
    """The config file at `path` could not be loaded: missing, or raising while imported."""
    file = path.split(":", 1)[0]
    if _innermost(error, OSError) is not None and "Failed loading config file" in _chain_text(error):
        return missing_config_file(name, file)
    for cause in _chain(error):
        if isinstance(cause, SyntaxError | ImportError) and not isinstance(cause, AlignaxError):
            return f"--{name}={path}: cannot load the config file: {type(cause).__name__}: {cause}"
    return None


def missing_config_file(name: str, file: str) -> str:
    """Names the file, where a relative path was looked up, and the file meant where one is found."""
    message = f"--{name}={file}: config file not found"
    path = Path(file)
    if not path.is_absolute():
        message += f" (relative to the current directory {os.getcwd()})"
    project = Path(__file__).resolve().parents[1]  # the repository root when installed with `pip install -e .`
    candidates = [project / file] if not path.is_absolute() else []
    directory = path.parent if path.is_absolute() else project / path.parent
    if directory.is_dir():
        names = [p.name for p in directory.glob("*.py") if not p.name.startswith("_")]
        close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
        candidates += [directory / c for c in close]
    found = next((c for c in candidates if c.is_file()), None)
    if found:
        message += f"; did you mean --{name}={found}?"
    return message


def _config_flags(flag_values: flags.FlagValues) -> Iterator[tuple[str, Any]]:
    from ml_collections.config_flags import config_flags as impl

    for name, flag in flag_values._flags().items():  # noqa: SLF001  (FlagValues has no public iterator of objects)
        if impl.is_config_flag(flag) and "." not in name:
            yield name, flag


def _flag_argument(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if re.fullmatch(rf"--?{re.escape(name)}=.*", arg):
            return arg.split("=", 1)[1]
        if re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv: list[str], name: str) -> list[str]:
    pattern = re.compile(rf"--?(?:no)?{re.escape(name)}\.([^=]+)(?:=.*)?")
    return [m.group(1) for m in map(pattern.fullmatch, argv) if m]


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _chain_text(error: BaseException) -> str:
    return "\n".join(str(e) for e in _chain(error))


def _innermost(error: BaseException, kind: type) -> BaseException | None:
    """The deepest exception of `kind` in the chain: config_flags re-raises a config file's error as a copy
    whose message is the whole traceback, with the original as its context."""
    found = None
    for cause in _chain(error):
        if isinstance(cause, kind):
            found = cause
    return found

