"""Runs a study's points through a `launch.backends` backend, each in its own workdir `ROOT/<point>`.

- A point that is done (its status.json says `finished` at its `total_steps`, or its final checkpoint
  is complete: `launch.sweep.finished`) is skipped; any other point is (re)launched with the same
  command, and the trainer resumes it from its latest checkpoint.
- A point that crashes is recorded as `failed` (or `diverged` / `nonfinite`, from its status.json)
  with the tail of its log, and the others go on.
- `ROOT/study.json` holds the study's rewards, judges and eval settings and every resolved point
  (name, arm, objective, config, overrides, weights, workdir, total_steps, state, step, reason,
  exit_code, skipped, log_tail); it is rewritten at every start and end, so it is current while
  the study runs and `alignax.study.report.write_report` reads it afterwards.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from alignax import fs
from alignax.study import progress
from alignax.study.spec import Point, Study

STUDY_JSON = "study.json"
LOG_NAME = "train.log"  # where LocalBackend sends each run's output
LOG_TAIL_LINES = 40


def log_tail(workdir: str, lines: int = LOG_TAIL_LINES) -> str | None:
    """The last `lines` lines of the point's train.log (None when the backend keeps no log there)."""
    path = fs.join(workdir, LOG_NAME)
    try:
        if not fs.isfile(path):
            return None
        with fs.open_file(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def _status_written_since(workdir: str, since: float | None) -> dict[str, Any] | None:
    """status.json, unless a local one predates `since` (left by an earlier attempt of the point)."""
    from launch import sweep
    path = fs.join(workdir, "status.json")
    if since is not None and not fs.is_remote(path):
        try:
            if os.path.getmtime(path) < since:
                return None
        except OSError:
            return None
    return sweep.read_status(workdir)


def final_state(code: int | None, status: dict[str, Any] | None, total_steps: int) -> tuple[str, str]:
    """(state, reason) of a point whose process ended with `code`, from the status.json it wrote."""
    reason = str((status or {}).get("reason") or "")
    if status and status.get("state") in ("diverged", "nonfinite"):
        return str(status["state"]), reason
    if code not in (0, None):
        return "failed", reason or f"exit code {code} without a status.json"
    if not status:
        return "failed", "the process ended without writing status.json"
    if status.get("state") == "finished" and status.get("step") == total_steps:
        return "finished", reason
    return str(status.get("state")), reason or f"ended at step {status.get('step')} of {total_steps}"


class StudyRun:
    """The states of a study's points, `ROOT/study.json`, and the backend execution that changes them."""

    def __init__(self, study: Study, points: Sequence[Point], root: str, backend: Any, *,
                 num_devices: int | None = None, log: Callable[[str], None] | None = None):
        self.study, self.points, self.root, self.backend = study, list(points), root, backend
        self.num_devices = num_devices
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.by_name = {p.name: p for p in self.points}
        self.info: dict[str, dict[str, Any]] = {p.name: {} for p in self.points}
        self._started: dict[str, float] = {}
        self._lock = threading.RLock()
        self.display: progress.Display | None = None

    @property
    def manifest_path(self) -> str:
        return fs.join(self.root, STUDY_JSON)

    def skip_finished(self, rerun_finished: bool = False) -> dict[str, str]:
        """Marks the points that are done as `finished`; returns {name: why}."""
        from launch import sweep
        skipped = {}
        finished = getattr(self.backend, "finished", sweep.finished)  # a cloud backend reads its bucket
        read_status = getattr(self.backend, "read_status", sweep.read_status)
        for point in self.points:
            why = None if rerun_finished else finished(point.run, point.total_steps)
            if why:
                point.state = "finished"
                status = read_status(point.workdir) or {}
                self.info[point.name].update(skipped=why, step=status.get("step", point.total_steps),
                                             reason=status.get("reason", ""))
                skipped[point.name] = why
        return skipped

    def recall(self) -> None:
        """Keeps what the last study.json says about points that did not finish (state, reason, log tail):
        `--report_only` reports the failures of the last run without relaunching anything."""
        try:
            if not fs.isfile(self.manifest_path):
                return
            old = {e.get("name"): e for e in json.loads(fs.read_text(self.manifest_path)).get("points", [])}
        except (OSError, ValueError, AttributeError):
            return
        for point in self.points:
            entry = old.get(point.name)
            if point.state == "pending" and entry and entry.get("state") not in (None, "running", "finished"):
                point.state = str(entry["state"])
                self.info[point.name].update({k: entry.get(k) for k in ("step", "reason", "exit_code", "log_tail")})

    def write_manifest(self) -> str:
        with self._lock:
            manifest = dict(
                study=self.study.spec, name=self.study.name, workdir_root=self.root, backend=self.backend.name,
                num_devices=self.num_devices,
                rewards={name: cfg.to_dict() for name, cfg in self.study.rewards.items()},
                judges=list(self.study.judges), eval=self.study.eval.to_dict(),
                backend_options=self.backend.options() if hasattr(self.backend, "options") else {},
                points=[self._entry(p) for p in self.points])
            fs.write_text_atomic(self.manifest_path, json.dumps(manifest, indent=2, default=str) + "\n")
        return self.manifest_path

    def _entry(self, p: Point) -> dict[str, Any]:
        entry = dict(name=p.name, arm=p.arm, objective=p.objective, base=p.base, config=p.config_path,
                     overrides=p.overrides, weights=p.weights, targets=list(p.targets), workdir=p.workdir,
                     total_steps=p.total_steps,
                     state=p.state, command=self.backend.command(None, p.run), step=None, reason=None,
                     exit_code=None, skipped=None, log_tail=None)
        entry.update(self.info[p.name])
        return entry

    def snapshot(self) -> tuple[dict[str, str], dict[str, tuple[str, int, str | None]]]:
        """(state by point, {running point: (workdir, total_steps, phase)}) for the progress display; a cloud
        backend's phase (queued, provisioning, running, re-queued) shows until the step is readable."""
        records = getattr(self.backend, "records", {})
        with self._lock:
            states = {p.name: p.state for p in self.points}
            running = {p.name: (p.workdir, p.total_steps, records.get(p.name, {}).get("state"))
                       for p in self.points if p.state == "running"}
        return states, running

    def on_event(self, name: str, event: str, code: int | None) -> None:
        point = self.by_name[name]
        with self._lock:
            if event == "started":
                point.state = "running"
                self._started[name] = time.time() - 1.0  # mtime granularity: a status.json of this attempt is newer
                self.info[name].update(exit_code=None, log_tail=None, skipped=None)
            else:
                self._finish(point, code)
        self.write_manifest()
        if self.display is not None:
            self.display.show(force=True)

    def _finish(self, point: Point, code: int | None) -> None:
        if hasattr(self.backend, "read_status"):  # a cloud backend: the bucket's status.json, its local log
            status, tail_of = self.backend.read_status(point.workdir), self.backend.log_tail
        else:
            status, tail_of = _status_written_since(point.workdir, self._started.get(point.name)), log_tail
        point.state, reason = final_state(code, status, point.total_steps)
        tail = None if point.state == "finished" else tail_of(point.workdir)
        self.info[point.name].update(exit_code=code, reason=reason, log_tail=tail,
                                     step=(status or {}).get("step"))
        if point.state != "finished":
            self.log(f"[{point.name}] {point.state}: {reason}" + (f"; log {fs.join(point.workdir, LOG_NAME)}"
                                                                   if tail is not None else ""))

    def execute(self, *, progress_every: float = 5.0) -> dict[str, str]:
        """Runs every point that is not finished; returns {name: state} for all points."""
        todo = [p for p in self.points if p.state != "finished"]
        self.write_manifest()
        if todo:
            self.display = progress.Display(f"study {self.study.name}", self.snapshot, interval=progress_every)
            with self.display:
                codes = self.backend.execute(None, [p.run for p in todo], log=self.log, on_event=self.on_event)
            self.display = None
            with self._lock:  # a backend that reported no end for a point (it never started)
                for point in todo:
                    if point.state in ("pending", "running"):
                        self._finish(point, codes.get(point.name))
            self.write_manifest()
        return {p.name: p.state for p in self.points}
