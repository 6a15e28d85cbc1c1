"""What the cloud backends (`tpu_vm`, `xpk`) share: remote workdirs in a bucket, the plan and its
confirmation, points driven in parallel through attempts that a preemption re-queues, status read
from the bucket, and the results collected back for the report.

A point's life, whatever runs it (`Attempt` is what one try ended as):

    queued → provisioning → active → running → done
                                   ↘ preempted → re-queued (a new attempt, resuming from the
                                     point's last checkpoint in the bucket) … → failed after
                                     `max_preemptions`
    a resource that never becomes active within `active_timeout`, or a run that fails on a
    healthy resource → failed, with its log tail

Every state change goes to `ROOT/launch.json` (the study's local root), which `status` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignax.errors import ConfigError
from launch import backends, bundle, storage

LAUNCH_JSON = "launch.json"
COLLECTED = ("eval.json", "grid.png", "status.json", "metrics.jsonl", "train.log")  # what `collect` brings back
LABEL = "alignax-study"     # every cloud resource carries it, with the study's prefix as value


@dataclasses.dataclass(frozen=True)
class Attempt:
    """How one try of a point ended: 'done' (exit 0), 'failed' (a real failure), 'preempted' (the resource
    went away under it: re-queue) or 'never_active' (the resource was not granted in time)."""

    outcome: str
    code: int | None = None
    reason: str = ""


def slug(text: str, limit: int) -> str:
    """Lowercase letters, digits and hyphens (cloud resource names and label values)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")[:limit].strip("-")


def digest(point: str) -> str:
    """6 hex digits naming a point in resource names and labels (point names do not fit their alphabet)."""
    return hashlib.sha1(point.encode()).hexdigest()[:6]


def resource_name(prefix: str, point: str, attempt: int, limit: int = 63) -> str:
    """`PREFIX-POINT…-HASH-aN`: at most `limit` characters, starts with a letter, unique per point and attempt
    (a re-queued point never waits for its previous resource's deletion)."""
    tail = f"-{digest(point)}-a{attempt}"
    head = slug(f"{prefix}-{point}", limit - len(tail))
    return (head if head[:1].isalpha() else f"a{head}")[: limit - len(tail)].rstrip("-") + tail


class RemoteBackend:
    """Base of the cloud backends; subclasses implement `attempt`, `dry_run_commands` and the resource
    listing/deletion that `status` and `delete` use."""

    name = "remote"
    remote = True
    OPTIONS: tuple[str, ...] = ("bucket", "name_prefix", "max_parallel", "max_preemptions", "max_hours", "yes",
                                "allow_dirty", "poll_seconds", "active_timeout", "project", "zone")

    def __init__(self, *, bucket: str | None = None, name_prefix: str | None = None, max_parallel: int = 1,
                 max_preemptions: int = 5, max_hours: float | None = None, yes: bool = False,
                 allow_dirty: bool = False, poll_seconds: float = 30.0, active_timeout: float = 6 * 3600.0,
                 project: str | None = None, zone: str | None = None, num_devices: int | None = None,
                 run_command: storage.Runner = storage.run_command, sleep: Callable[[float], None] = time.sleep,
                 **unused: Any):
        if not bucket or not bucket.startswith("gs://") or bucket.rstrip("/") == "gs:":
            raise ConfigError(f"--bucket={bucket!r}: expected gs://BUCKET[/PATH], where the points' workdirs and "
                              f"the code bundle go")
        if max_parallel < 1:
            raise ConfigError(f"--max_parallel={max_parallel}: expected ≥ 1")
        if max_preemptions < 0:
            raise ConfigError(f"--max_preemptions={max_preemptions}: expected ≥ 0")
        if max_hours is not None and max_hours <= 0:
            raise ConfigError(f"--max_hours={max_hours}: expected > 0 (or unset for no limit)")
        self.bucket, self.prefix = bucket.rstrip("/"), slug(name_prefix or "alignax", 30)
        if not self.prefix or not self.prefix[0].isalpha():
            raise ConfigError(f"--name_prefix={name_prefix!r}: expected letters, digits and hyphens, starting "
                              f"with a letter")
        self.max_parallel, self.max_preemptions, self.max_hours = max_parallel, max_preemptions, max_hours
        self.yes, self.allow_dirty = yes, allow_dirty
        self.poll_seconds, self.active_timeout = poll_seconds, active_timeout
        self.project, self.zone = project, zone
        self._num_devices = num_devices
        self.run_command, self.sleep = run_command, sleep
        self.storage = storage.GcloudStorage(run_command, project)
        self.state_dir: str | None = None     # the study's local root: launch.json and the point logs
        self.evaluation_study: str | None = None  # a study's file: workers evaluate each point after training
        self.records: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._bundle: bundle.Bundle | None = None

    # ---- where things live ---------------------------------------------------------------------------

    @property
    def remote_root(self) -> str:
        return f"{self.bucket}/{self.prefix}"

    def workdir_for(self, point: str) -> str:
        return f"{self.remote_root}/{point}"

    @property
    def code(self) -> bundle.Bundle:
        if self._bundle is None:
            self._bundle = bundle.describe(allow_dirty=self.allow_dirty)
        return self._bundle

    @property
    def bundle_url(self) -> str:
        return f"{self.remote_root}/bundles/{self.code.name}"

    def options(self) -> dict[str, Any]:
        """What `status`, `collect` and `delete` need to rebuild this backend (study.json's `backend_options`)."""
        return {name: getattr(self, name if name != "name_prefix" else "prefix") for name in self.OPTIONS
                if name not in ("yes",)}

    def num_devices(self) -> int | None:
        return self._num_devices

    # ---- the worker's command ------------------------------------------------------------------------

    def worker_argv(self, config: str | None, run: backends.Run) -> list[str]:
        """The point's training command as a worker runs it, from the unpacked bundle."""
        return backends.train_argv(bundle.repo_relative(run.config or config), run, python="python3")

    def worker_command(self, config: str | None, run: backends.Run) -> str:
        """Training, then (in a study) the point's evaluation on the same workers."""
        command = shlex.join(self.worker_argv(config, run))
        if self.evaluation_study:
            command += " && " + shlex.join(["python3", "-m", "alignax.study.evaluate_point",
                                            f"--study={bundle.repo_relative(self.evaluation_study)}",
                                            f"--root={self.remote_root}", f"--point={run.name}"])
        return command

    def command(self, config: str | None, run: backends.Run) -> str:
        return self.worker_command(config, run)

    # ---- the plan ------------------------------------------------------------------------------------

    def chips_per_point(self) -> int:
        raise NotImplementedError

    def plan_lines(self, runs: Sequence[backends.Run]) -> list[str]:
        chips = self.chips_per_point()
        lines = [f"{self.name}: {len(runs)} points, {chips} chips each, at most {self.max_parallel} at a time; "
                 f"workdirs under {self.remote_root}/; code {self.code.name} ({self.code.commit[:12]}"
                 + (", uncommitted changes included)" if self.code.dirty else ")")]
        if self.max_hours:
            lines.append(f"requested: {chips} chips × {self.max_hours:g} h × {len(runs)} points = "
                         f"{chips * self.max_hours * len(runs):g} chip-hours at most (--max_hours stops a point)")
        else:
            lines.append(f"requested: {chips} chips × {len(runs)} points, no time limit (set --max_hours to bound "
                         f"the chip-hours)")
        return lines

    def confirm(self, runs: Sequence[backends.Run], log: Callable[[str], None]) -> None:
        for line in self.plan_lines(runs):
            log(line)
        if self.yes:
            return
        if not sys.stdin.isatty():
            raise ConfigError(f"{self.name}: not submitting without confirmation; pass --yes to submit from a "
                              f"script (or --dry_run to see every command)")
        if input("submit? [y/N] ").strip().lower() not in ("y", "yes"):
            raise ConfigError(f"{self.name}: not submitted")

    def dry_run_lines(self, config: str | None, runs: Sequence[backends.Run]) -> list[str]:
        return [*[f"# {line}" for line in self.plan_lines(runs)], *self.dry_run_commands(config, runs)]

    def dry_run_commands(self, config: str | None, runs: Sequence[backends.Run]) -> list[str]:
        raise NotImplementedError

    # ---- driving the points --------------------------------------------------------------------------

    def prepare(self, log: Callable[[str], None]) -> None:
        """Once before any point: the code bundle goes to the bucket (tpu_vm)."""

    def attempt(self, config: str | None, run: backends.Run, number: int, log: Callable[[str], None]) -> Attempt:
        raise NotImplementedError

    def record(self, name: str, **fields: Any) -> None:
        with self._lock:
            self.records.setdefault(name, {}).update(fields, updated=time.time())
            if self.state_dir:
                path = Path(self.state_dir) / LAUNCH_JSON
                path.parent.mkdir(parents=True, exist_ok=True)
                body = dict(backend=self.name, options=self.options(), points=self.records)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
                os.replace(tmp, path)

    def log_path(self, name: str) -> Path | None:
        return Path(self.state_dir) / name / "train.log" if self.state_dir else None

    def run_point(self, config: str | None, run: backends.Run, log: Callable[[str], None]) -> int:
        """All attempts of one point; its exit code (0 done, else failed)."""
        preemptions = 0
        while True:
            self.record(run.name, state="queued", attempt=preemptions, workdir=run.workdir)
            result = self.attempt(config, run, preemptions, log)
            if result.outcome == "preempted":
                preemptions += 1
                if preemptions > self.max_preemptions:
                    reason = (f"preempted {preemptions} times (--max_preemptions={self.max_preemptions}): "
                              f"{result.reason}")
                    self.record(run.name, state="failed", reason=reason)
                    log(f"[{run.name}] failed: {reason}")
                    return 1
                log(f"[{run.name}] preempted ({result.reason}); re-queued, attempt {preemptions}")
                self.record(run.name, state="re-queued", reason=result.reason, preemptions=preemptions)
                continue
            state = "done" if result.outcome == "done" else "failed"
            self.record(run.name, state=state, reason=result.reason, exit_code=result.code)
            if state == "failed":
                log(f"[{run.name}] failed: {result.reason}")
            return 0 if state == "done" else (result.code or 1)

    def execute(self, config: str | None, runs: Sequence[backends.Run], log: Callable[[str], None] = print,
                on_event: backends.RunEvent | None = None) -> dict[str, int]:
        """Prepares (the code bundle), then drives every point, `max_parallel` at a time; {point: exit code}.
        The caller confirms the plan first (`confirm`)."""
        runs = list(runs)
        self.prepare(log)
        pending, codes, lock = list(runs), {}, threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    run = pending.pop(0)
                if on_event is not None:
                    on_event(run.name, "started", None)
                try:
                    code = self.run_point(config, run, log)
                except Exception as e:  # noqa: BLE001 (one point's crash must not stop the others)
                    self.record(run.name, state="failed", reason=f"{type(e).__name__}: {e}")
                    log(f"[{run.name}] failed: {type(e).__name__}: {e}")
                    code = 1
                codes[run.name] = code
                if on_event is not None:
                    on_event(run.name, "ended", code)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.max_parallel, len(runs)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return codes

    # ---- reading the bucket --------------------------------------------------------------------------

    def read_status(self, workdir: str) -> dict[str, Any] | None:
        status = self.storage.read_json(f"{workdir}/status.json")
        return status if isinstance(status, dict) else None

    def finished(self, run: backends.Run, total_steps: int) -> str | None:
        status = self.read_status(run.workdir)
        if status and status.get("state") == "finished" and status.get("step") == total_steps:
            return f"status.json: finished at step {total_steps}"
        return None

    def log_tail(self, workdir: str, lines: int = 40) -> str | None:
        name = workdir.rstrip("/").rsplit("/", 1)[-1]
        path = self.log_path(name)
        if path is None or not path.is_file():
            return None
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def collect(self, names: Sequence[str], root: str, log: Callable[[str], None] = print) -> dict[str, list[str]]:
        """Copies each point's results from its workdir into ROOT/<point>/; {point: files brought back}."""
        got: dict[str, list[str]] = {}
        for name in names:
            target = Path(root) / name
            target.mkdir(parents=True, exist_ok=True)
            got[name] = [f for f in COLLECTED if f != "train.log" and
                         self.storage.download(f"{self.workdir_for(name)}/{f}", str(target / f))]
        log(f"{self.name}: collected {sum(map(len, got.values()))} files of {len(got)} points from "
            f"{self.remote_root}/ into {root}")
        return got

    # ---- resources -----------------------------------------------------------------------------------

    def list_resources(self) -> list[dict[str, Any]]:
        """This study's live resources: [{name, state, labels}] (only those labelled with its prefix)."""
        raise NotImplementedError

    def delete_resource(self, name: str) -> int:
        raise NotImplementedError
