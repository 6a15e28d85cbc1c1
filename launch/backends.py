"""Where a sweep's or a study's runs execute: a registry of backends by name ('local'; the cloud
backends 'tpu_vm' and 'xpk' live in launch.tpu_vm and launch.xpk).

A backend turns resolved runs into commands and, unless it is a dry run, executes them.
Every backend builds the same `python -m alignax.train --config=... --config.k=v --workdir=...`
argument list (`train_argv`), so a run means the same thing wherever it goes.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignax.errors import ConfigError
from alignax.registry import Registry

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Run:
    """One resolved run: its name, flat {dotted config key: value} overrides and its workdir; `config`
    (when set) replaces the launch's config file for this run (a study mixes config files), and `module`
    is the entry point that runs it (a study's base point writes its initial checkpoint instead)."""

    name: str
    overrides: dict[str, Any]
    workdir: str
    config: str = ""
    module: str = "alignax.train"


def flag_value(value: Any) -> str:
    """The text `ml_collections.config_flags` parses back to `value` (str stays raw, the rest is repr)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | tuple | list) or value is None:
        return repr(tuple(value) if isinstance(value, list) else value)
    raise ConfigError(f"override value {value!r}: expected str, bool, int, float, tuple or list, "
                      f"found {type(value).__name__}")


def override_flags(overrides: dict[str, Any]) -> list[str]:
    return [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]


def train_argv(config: str, run: Run, python: str = "python") -> list[str]:
    """`config` is the already resolved config of the run (the caller applies `run.config or config`)."""
    return [python, "-m", run.module, f"--config={config}", *override_flags(run.overrides),
            f"--workdir={run.workdir}"]


# Called as on_event(run name, 'started' | 'ended', exit code or None) by `execute`: a study's progress display.
RunEvent = Callable[[str, str, int | None], None]


class LocalBackend:
    """Subprocesses on this machine, `parallel` at a time; each run logs to WORKDIR/train.log."""

    name = "local"
    remote = False

    def __init__(self, *, parallel: int = 1, num_devices: int | None = None, **unused: Any):
        if parallel < 1:
            raise ConfigError(f"--parallel={parallel}: expected ≥ 1")
        self.parallel = parallel
        self._num_devices = num_devices

    def num_devices(self) -> int:
        """Devices a run will see; probed in a child process so this process never claims an accelerator."""
        if self._num_devices is None:
            out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                                 capture_output=True, text=True, check=True, cwd=REPO_ROOT)
            self._num_devices = int(out.stdout.strip().splitlines()[-1])
        return self._num_devices

    def config_path(self, config: str) -> str:
        path, sep, arg = config.partition(":")
        return str(Path(path).absolute()) + sep + arg  # children run from the repo root

    def argv(self, config: str, run: Run) -> list[str]:
        return train_argv(self.config_path(run.config or config), run, python=sys.executable)

    def command(self, config: str, run: Run) -> str:
        return shlex.join(self.argv(config, run))

    def execute(self, config: str, runs: Sequence[Run], log: Callable[[str], None] = print,
                on_event: RunEvent | None = None) -> dict[str, int]:
        """Runs everything; returns {run name: exit code}."""
        pending, active, codes = list(runs), {}, {}
        while pending or active:
            while pending and len(active) < self.parallel:
                run = pending.pop(0)
                Path(run.workdir).mkdir(parents=True, exist_ok=True)
                log_file = open(Path(run.workdir) / "train.log", "ab")  # noqa: SIM115 (closed when the run ends)
                process = subprocess.Popen(self.argv(config, run), stdout=log_file, stderr=subprocess.STDOUT,
                                           cwd=REPO_ROOT)
                active[run.name] = (process, log_file, time.monotonic())
                if on_event is not None:
                    on_event(run.name, "started", None)
                log(f"[{run.name}] started (pid {process.pid}), log {Path(run.workdir) / 'train.log'}")
            for name, (process, log_file, started) in list(active.items()):
                if process.poll() is not None:
                    log_file.close()
                    codes[name] = process.returncode
                    del active[name]
                    status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                    log(f"[{name}] {status} after {time.monotonic() - started:.1f}s")
                    if on_event is not None:
                        on_event(name, "ended", process.returncode)
            time.sleep(0.2)
        return codes


BACKENDS: Registry[type] = Registry("backend", field="--backend")
BACKENDS.register("local", LocalBackend)


def _register_cloud_backends() -> None:
    from launch import tpu_vm, xpk  # they build on this module
    BACKENDS.register("tpu_vm", tpu_vm.TpuVmBackend)
    BACKENDS.register("xpk", xpk.XpkBackend)


def get(name: str, **options: Any) -> Any:
    return BACKENDS.lookup(name)(**options)


_register_cloud_backends()
