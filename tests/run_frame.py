"""Helpers for tests of a run's frame (alignax.training.small_loop and the trainers using it): status.json,
metrics rows, a real SIGTERM from inside a run, and the workdir lock held as another run holds it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alignax.training import preemption
from alignax.training.workdir_lock import LOCK_NAME


def status(workdir: Path) -> dict:
    return json.loads((Path(workdir) / "status.json").read_text())


def train_rows(workdir: Path) -> list[int]:
    """The steps of metrics.jsonl's training rows, in file order (a step twice means a resume re-wrote it)."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def sigterm_at(step: int) -> Callable[[int], None]:
    """An `on_step` hook sending this process a real SIGTERM after `step`, only once the run's handler is
    installed (without one the signal would end pytest: the assertion fails instead)."""
    def hook(done: int) -> None:
        if done == step:
            assert signal.getsignal(signal.SIGTERM) is preemption.request, "no SIGTERM handler during the run"
            signal.raise_signal(signal.SIGTERM)
    return hook


@pytest.fixture
def clear_preemption() -> Iterator[None]:
    """The preemption flag is sticky per process: clear it before and after a test that sets it."""
    preemption.clear()
    yield
    preemption.clear()


@contextlib.contextmanager
def other_run_holds(workdir: Path) -> Iterator[None]:
    """The workdir lock held as another run holds it: its own open file with an flock (WorkdirLock is
    re-entrant within a process, so it cannot stand for another run here)."""
    import fcntl

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "since": "then"}).encode())
        yield
    finally:
        os.close(fd)
