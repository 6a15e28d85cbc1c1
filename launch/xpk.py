"""`--backend=xpk`: every point as an XPK workload (a JobSet) on a GKE cluster with TPU node pools.

The image (`launch/Dockerfile`, pushed by the user) carries the code; `xpk workload create` runs the
point's command on every host of `--num_slices` slices, and `--max-restarts` lets the JobSet restart a
preempted point in place, resuming from its last checkpoint in the bucket. A workload that still ends
failed with the trainer's status `preempted` is re-submitted as a new attempt, like tpu_vm's re-queue.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

from alignax.errors import ConfigError
from launch import backends, tpu_types
from launch.remote import Attempt, RemoteBackend, resource_name

NAME_LIMIT = 40  # xpk derives pod and service names from the workload name
APP_DIR = "/app"  # where launch/Dockerfile puts the repository


class XpkBackend(RemoteBackend):
    name = "xpk"
    OPTIONS = (*RemoteBackend.OPTIONS, "cluster", "tpu_type", "num_slices", "docker_image", "max_restarts")

    def __init__(self, *, cluster: str | None = None, tpu_type: str | None = None, num_slices: int = 1,
                 docker_image: str | None = None, max_restarts: int = 3, **options: Any):
        super().__init__(**options)
        missing = [flag for flag, value in (("--cluster", cluster), ("--tpu_type", tpu_type),
                                            ("--docker_image", docker_image)) if not value]
        if missing:
            raise ConfigError(f"--backend=xpk needs {' and '.join(missing)} (the image: docker build -f "
                              f"launch/Dockerfile -t IMAGE . && docker push IMAGE)")
        self.tpu = tpu_types.parse(tpu_type)
        if num_slices < 1:
            raise ConfigError(f"--num_slices={num_slices}: expected ≥ 1")
        self.cluster, self.tpu_type, self.num_slices = cluster, tpu_type, num_slices
        self.docker_image, self.max_restarts = docker_image, max_restarts
        if self._num_devices is None:
            self._num_devices = self.tpu.devices * num_slices

    def chips_per_point(self) -> int:
        return self.tpu.chips * self.num_slices

    def plan_lines(self, runs: Sequence[backends.Run]) -> list[str]:
        lines = super().plan_lines(runs)
        lines[0] = (f"xpk: {len(runs)} points on cluster {self.cluster}, {self.num_slices} × {self.tpu_type} each, "
                    f"at most {self.max_parallel} at a time; image {self.docker_image}; workdirs under "
                    f"{self.remote_root}/")
        return lines

    def _where(self) -> list[str]:
        return ([f"--project={self.project}"] if self.project else []) + ([f"--zone={self.zone}"] if self.zone else [])

    def workload(self, point: str, attempt: int) -> str:
        return resource_name(self.prefix, point, attempt, limit=NAME_LIMIT)

    def create_argv(self, config: str | None, run: backends.Run, attempt: int) -> list[str]:
        return ["xpk", "workload", "create", f"--cluster={self.cluster}",
                f"--workload={self.workload(run.name, attempt)}", f"--tpu-type={self.tpu_type}",
                f"--num-slices={self.num_slices}", f"--docker-image={self.docker_image}",
                f"--command=cd {APP_DIR} && {self.worker_command(config, run)}",
                f"--max-restarts={self.max_restarts}", *self._where()]

    def list_argv(self, workload: str | None = None) -> list[str]:
        return ["xpk", "workload", "list", f"--cluster={self.cluster}", *self._where(),
                *([f"--filter-by-job={workload}"] if workload else [])]

    def delete_argv(self, workload: str) -> list[str]:
        return ["xpk", "workload", "delete", f"--cluster={self.cluster}", f"--workload={workload}", *self._where()]

    def dry_run_commands(self, config: str | None, runs: Sequence[backends.Run]) -> list[str]:
        lines = []
        for run in runs:
            lines += [f"# point {run.name}", shlex.join(self.create_argv(config, run, 0)),
                      shlex.join(self.list_argv(self.workload(run.name, 0))) + f"  # every {self.poll_seconds:g} s "
                      f"until it is finished or failed"]
        return lines

    def status_of(self, workload: str) -> str:
        """'running', 'finished', 'failed' or 'missing', from `xpk workload list`'s row for the workload."""
        code, out, err = self.run_command(self.list_argv(workload))
        if code:
            raise ConfigError(f"{shlex.join(self.list_argv(workload))} failed (exit {code}): {err.strip()[-500:]}")
        rows = [line for line in out.splitlines() if workload in line.split()]
        if not rows:
            return "missing"
        row = rows[-1].lower()
        if "fail" in row:
            return "failed"
        if "finished" in row or "completed" in row or "succeeded" in row:
            return "finished"
        return "running"

    def attempt(self, config: str | None, run: backends.Run, number: int, log: Callable[[str], None]) -> Attempt:
        workload = self.workload(run.name, number)
        self.record(run.name, state="queued", resource=workload)
        code, _, err = self.run_command(self.create_argv(config, run, number))
        if code:
            return Attempt("failed", code, f"xpk workload create {workload} failed (exit {code}): {err.strip()[-300:]}")
        log(f"[{run.name}] submitted workload {workload}")
        started, deadline = time.monotonic(), (self.max_hours * 3600 if self.max_hours else None)
        while True:
            state = self.status_of(workload)
            self.record(run.name, state="running" if state == "running" else state, resource_state=state)
            if state in ("finished", "failed", "missing"):
                break
            if deadline is not None and time.monotonic() - started > deadline:
                self.run_command(self.delete_argv(workload))
                return Attempt("failed", 1, f"ran longer than --max_hours={self.max_hours:g}; deleted {workload}")
            self.sleep(self.poll_seconds)
        status = self.read_status(run.workdir) or {}
        if state == "finished" and status.get("state") == "finished":
            return Attempt("done", 0)
        if status.get("state") == "preempted" or state == "missing":
            return Attempt("preempted", reason=f"workload {workload} {state} with the run {status.get('state')} at "
                                               f"step {status.get('step')}")
        return Attempt("failed", 1, f"workload {workload} {state}; the run's status: {status or 'none written'}")

    def list_resources(self) -> list[dict[str, Any]]:
        code, out, err = self.run_command(self.list_argv())
        if code:
            raise ConfigError(f"{shlex.join(self.list_argv())} failed (exit {code}): {err.strip()[-500:]}")
        found = []
        for line in out.splitlines():
            words = line.split()
            if words and words[0].startswith(f"{self.prefix}-"):  # the study's workloads carry its prefix
                found.append(dict(name=words[0], state=" ".join(words[1:])[:80], labels={}))
        return found

    def delete_resource(self, name: str) -> int:
        if not name.startswith(f"{self.prefix}-"):
            raise ConfigError(f"workload {name!r} does not carry the study's prefix {self.prefix!r}; not deleting it")
        return self.run_command(self.delete_argv(name))[0]
