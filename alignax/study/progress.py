"""The study's progress display on stderr: points done / running / failed / total, and for each running
point its step and ETA, read from what its trainer writes (`metrics.jsonl`: one row per step with a
`loss`, and per logging window `steps_per_second`). Works for any backend whose workdirs this
process can read (local or gs://, through alignax.fs)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from alignax import fs
from alignax.errors import ConfigError

TAIL_BYTES = 64 * 1024
DONE_STATES = ("finished",)
FAILED_STATES = ("failed", "diverged", "nonfinite")


def read_step(workdir: str) -> tuple[int | None, float | None]:
    """(last trained step, steps/s of the last logging window) from the tail of `workdir/metrics.jsonl`;
    (None, None) before the first row (data generation, compilation)."""
    path = fs.join(workdir, "metrics.jsonl")
    try:
        if not fs.isfile(path):
            return None, None
        with fs.open_file(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except (OSError, ConfigError):  # not written yet, or a bucket this machine cannot read (a cloud study)
        return None, None
    step = speed = None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the first (cut) line of the tail, or a torn last one
        if not isinstance(row, dict) or "loss" not in row:
            continue
        step = int(row.get("step", 0))
        if row.get("steps_per_second"):
            speed = float(row["steps_per_second"])
    return step, speed


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def running_line(name: str, workdir: str, total_steps: int, phase: str | None = None) -> str:
    """`NAME step 12/20 ETA 40s` (or `NAME starting`, or a cloud backend's phase, before its first step)."""
    step, speed = read_step(workdir)
    if step is None:
        return f"{name} {phase or 'starting'}"
    eta = f" ETA {format_seconds((total_steps - step) / speed)}" if speed and total_steps > step else ""
    return f"{name} step {step}/{total_steps}{eta}"


def summary_line(states: Mapping[str, str], running: Mapping[str, tuple]) -> str:
    """`3/9 done, 2 running, 1 failed, 9 total | a step 4/20 ETA 12s | b starting`."""
    values = list(states.values())
    done = sum(s in DONE_STATES for s in values)
    failed = sum(s in FAILED_STATES for s in values)
    head = f"{done}/{len(values)} done, {len(running)} running, {failed} failed, {len(values)} total"
    return " | ".join([head, *(running_line(name, *entry) for name, entry in running.items())])


class Display:
    """Prints the summary line to `stream` when it changes, at most every `interval` seconds, from a daemon
    thread while the backend runs (and on demand: `show(force=True)` after every start and end)."""

    def __init__(self, label: str, snapshot: Callable[[], tuple[dict[str, str], dict[str, tuple[str, int]]]],
                 *, interval: float = 5.0, stream: TextIO | None = None):
        self.label, self.snapshot, self.interval = label, snapshot, interval
        self.stream = stream or sys.stderr
        self._last = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def show(self, *, force: bool = False) -> None:
        line = f"{self.label}: {summary_line(*self.snapshot())}"
        with self._lock:
            if force or line != self._last:
                self.stream.write(line + "\n")
                self.stream.flush()
                self._last = line

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.show()

    def __enter__(self) -> Display:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="study-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.show()
