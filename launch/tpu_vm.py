"""`--backend=tpu_vm`: every point on its own Cloud TPU queued resource (or a reused pool of them).

For each point: `queued-resources create` (spot, reserved or on-demand; one slice `--node-id`, several
`--node-count --node-prefix`; labelled `alignax-study=PREFIX`), `describe` until ACTIVE, then over ssh on
every worker of every slice: unpack and install the code bundle, run the point's command (training,
then its evaluation), and `delete` the resource. A resource that is suspended or gone when the command
fails is a preemption: the point is re-queued on a new resource and the trainer resumes from its last
checkpoint in the bucket. See `launch.remote` for the life of a point.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignax.errors import ConfigError
from launch import backends, bundle, tpu_types
from launch.remote import LABEL, Attempt, RemoteBackend, digest, resource_name

WAITING = ("ACCEPTED", "CREATING", "WAITING_FOR_RESOURCES", "PROVISIONING")
GONE = ("SUSPENDING", "SUSPENDED", "DELETING", "NOT_FOUND")
REQUIREMENTS = "requirements.txt"
# gcsfs (alignax.fs on gs://) has no release for the fsspec that requirements.txt pins; installed
# without its pins beside its own dependencies.
WORKER_EXTRAS = ("google-cloud-storage", "google-auth-oauthlib", "aiohttp", "decorator")
GCSFS = "gcsfs==2026.8.2"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"  # torch (parity and export checks) without PyPI's CUDA build


def _jax_version(repo: Path = bundle.REPO_ROOT) -> str:
    text = (repo / REQUIREMENTS).read_text()
    match = re.search(r"^jax==(\S+)", text, re.M)
    if not match:
        raise ConfigError(f"{repo / REQUIREMENTS}: no `jax==VERSION` line to install jax[tpu] at")
    return match.group(1)


class TpuVmBackend(RemoteBackend):
    name = "tpu_vm"
    OPTIONS = (*RemoteBackend.OPTIONS, "tpu_type", "runtime_version", "provisioning", "num_slices", "pool",
               "ssh_batch_size")

    def __init__(self, *, tpu_type: str | None = None, zone: str | None = None, runtime_version: str | None = None,
                 spot: bool = False, reserved: bool = False, provisioning: str | None = None, num_slices: int = 1,
                 pool: bool = False, ssh_batch_size: int = 64, **options: Any):
        super().__init__(zone=zone, **options)
        missing = [flag for flag, value in (("--tpu_type", tpu_type), ("--zone", zone)) if not value]
        if missing:
            raise ConfigError(f"--backend=tpu_vm needs {' and '.join(missing)} (e.g. --tpu_type=v5p-64 "
                              f"--zone=us-east5-a)")
        self.tpu = tpu_types.parse(tpu_type)
        if not self.tpu.runtime_version and not runtime_version:
            raise ConfigError(f"--tpu_type={tpu_type}: no TPU VM image is known for {self.tpu.family} here; "
                              f"use --backend=xpk or pass --runtime_version")
        if spot and reserved:
            raise ConfigError("--spot and --reserved: choose one (neither = on-demand)")
        self.provisioning = provisioning or ("spot" if spot else "reserved" if reserved else "on-demand")
        if self.provisioning not in ("spot", "reserved", "on-demand"):
            raise ConfigError(f"provisioning={self.provisioning!r}: expected spot, reserved or on-demand")
        if num_slices < 1:
            raise ConfigError(f"--num_slices={num_slices}: expected ≥ 1")
        self.tpu_type, self.num_slices, self.pool, self.ssh_batch_size = tpu_type, num_slices, pool, ssh_batch_size
        self.runtime_version = runtime_version or self.tpu.runtime_version
        if self._num_devices is None:
            self._num_devices = self.tpu.devices * num_slices
        self._ready: list[str] = []          # pool: active, set-up resources between points
        self._pool_count = 0
        self._pool_lock = threading.Lock()

    def chips_per_point(self) -> int:
        return self.tpu.chips * self.num_slices

    # ---- gcloud commands (exactly as they run) ------------------------------------------------------

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def _qr(self, verb: str, name: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", verb, name, *self._where()]

    def create_argv(self, name: str, point: str) -> list[str]:
        nodes = ([f"--node-id={name}"] if self.num_slices == 1 else
                 [f"--node-count={self.num_slices}", f"--node-prefix={name}"])
        provisioning = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}[self.provisioning]
        labels = f"{LABEL}={self.prefix},alignax-point={digest(point)}"
        return [*self._qr("create", name), *nodes, f"--accelerator-type={self.tpu_type}",
                f"--runtime-version={self.runtime_version}", *provisioning, f"--labels={labels}"]

    def describe_argv(self, name: str) -> list[str]:
        return [*self._qr("describe", name), "--format=value(state.state)"]

    def delete_argv(self, name: str) -> list[str]:
        return [*self._qr("delete", name), "--force", "--quiet"]

    def list_argv(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "list", *self._where(), "--format=json"]

    def ssh_argv(self, name: str, command: str) -> list[str]:
        return [*self._qr("ssh", name), "--worker=all", "--node=all", f"--batch-size={self.ssh_batch_size}",
                f"--command={command}"]

    def setup_command(self) -> str:
        """Unpack and install the bundle on a worker, once per resource (a marker file says it is done)."""
        directory = self.code.directory
        home = f"~/{directory}"
        install = shlex.join(["python3", "-m", "pip", "install", "-q", f"--extra-index-url={TORCH_INDEX}", "-r",
                              REQUIREMENTS, f"jax[tpu]=={_jax_version()}"])
        extras = shlex.join(["python3", "-m", "pip", "install", "-q", *WORKER_EXTRAS])
        gcsfs = shlex.join(["python3", "-m", "pip", "install", "-q", "--no-deps", GCSFS])
        return (f"set -e; if [ ! -f {home}/.installed ]; then mkdir -p {home} && "
                f"gcloud storage cp {shlex.quote(self.bundle_url)} /tmp/{directory}.tar.gz && "
                f"tar -xzf /tmp/{directory}.tar.gz -C {home} && cd {home} && {install} && {extras} && {gcsfs} && "
                f"touch {home}/.installed; fi")

    def run_command_text(self, config: str | None, run: backends.Run) -> str:
        return f"cd ~/{self.code.directory} && {self.worker_command(config, run)}"

    def bundle_path(self) -> Path:
        return Path(tempfile.gettempdir()) / "alignax-bundles" / self.code.name

    def upload_argv(self) -> list[str]:
        return ["gcloud", "storage", "cp", str(self.bundle_path()), self.bundle_url,
                *([f"--project={self.project}"] if self.project else [])]

    def dry_run_commands(self, config: str | None, runs: Sequence[backends.Run]) -> list[str]:
        lines = [shlex.join(["git", "-C", str(bundle.REPO_ROOT), "archive", "--format=tar.gz",
                             f"--output={self.bundle_path()}", self.code.commit]),
                 shlex.join(self.upload_argv())]
        for index, run in enumerate(runs):
            name = (resource_name(self.prefix, f"pool{index % self.max_parallel}", 0) if self.pool
                    else resource_name(self.prefix, run.name, 0))
            lines.append(f"# point {run.name}: resource {name}")
            if not self.pool or index < self.max_parallel:
                lines += [shlex.join(self.create_argv(name, run.name)),
                          shlex.join(self.describe_argv(name)) + f"  # every {self.poll_seconds:g} s until ACTIVE",
                          shlex.join(self.ssh_argv(name, self.setup_command()))]
            lines.append(shlex.join(self.ssh_argv(name, self.run_command_text(config, run))))
            if not self.pool:
                lines.append(shlex.join(self.delete_argv(name)))
        if self.pool:
            lines += [shlex.join(self.delete_argv(resource_name(self.prefix, f"pool{i}", 0)))
                      for i in range(min(self.max_parallel, len(runs)))]
        return lines

    # ---- driving one attempt ------------------------------------------------------------------------

    def prepare(self, log: Callable[[str], None]) -> None:
        path = self.bundle_path()
        bundle.create(self.code, path.parent)
        self.storage.upload(str(path), self.bundle_url)
        log(f"tpu_vm: code bundle {self.code.name} uploaded to {self.bundle_url}")

    def state(self, name: str) -> str:
        code, out, err = self.run_command(self.describe_argv(name))
        if code:
            return "NOT_FOUND" if "NOT_FOUND" in err or "not found" in err.lower() else "UNKNOWN"
        return out.strip().splitlines()[-1].strip() if out.strip() else "UNKNOWN"

    def _check(self, argv: list[str]) -> None:
        code, _, err = self.run_command(argv)
        if code:
            raise ConfigError(f"{shlex.join(argv[:6])} failed (exit {code}): {err.strip()[-500:]}")

    def _stream(self, argv: list[str], log_file: Path | None, timeout: float | None) -> int | None:
        """Runs a long command with its output appended to the point's log; None when it ran past `timeout`."""
        sink = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 (closed below)
        try:
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
            try:
                return process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return None
        finally:
            if log_file:
                sink.close()

    def _wait_active(self, name: str, point: str) -> str:
        """The first state that is not a waiting one (or 'TIMEOUT' after `active_timeout`)."""
        deadline = time.monotonic() + self.active_timeout
        while True:
            state = self.state(name)
            if state not in WAITING and state != "UNKNOWN":
                return state
            self.record(point, state="provisioning" if state == "PROVISIONING" else "queued", resource_state=state)
            if time.monotonic() >= deadline:
                return "TIMEOUT"
            self.sleep(self.poll_seconds)

    def _acquire(self, run: backends.Run, number: int, log: Callable[[str], None]) -> tuple[str | None, Attempt | None]:
        """An ACTIVE resource with the code installed, or the Attempt that ended trying to get one."""
        if self.pool:
            with self._pool_lock:
                if self._ready:
                    return self._ready.pop(), None
                name = resource_name(self.prefix, f"pool{self._pool_count}", number)
                self._pool_count += 1
        else:
            name = resource_name(self.prefix, run.name, number)
        self.record(run.name, state="queued", resource=name)
        log(f"[{run.name}] requesting {self.num_slices} × {self.tpu_type} ({self.provisioning}) as {name}")
        self._check(self.create_argv(name, run.name))
        state = self._wait_active(name, run.name)
        if state != "ACTIVE":
            self.run_command(self.delete_argv(name))
            if state in GONE:
                return None, Attempt("preempted", reason=f"{name} went {state} before it was ACTIVE")
            if state == "TIMEOUT":
                return None, Attempt("never_active", 1, f"{name} did not become ACTIVE within "
                                                         f"{self.active_timeout:g} s (--active_timeout)")
            return None, Attempt("failed", 1, f"{name} ended {state} before it was ACTIVE")
        self.record(run.name, state="active", resource_state=state)
        code = self._stream(self.ssh_argv(name, self.setup_command()), self.log_path(run.name), None)
        if code != 0:
            after = self.state(name)
            self.run_command(self.delete_argv(name))
            if after != "ACTIVE":
                return None, Attempt("preempted", reason=f"{name} went {after} while installing the code")
            return None, Attempt("failed", code, f"installing the code on {name} failed (exit {code}); "
                                                 f"see {self.log_path(run.name)}")
        return name, None

    def attempt(self, config: str | None, run: backends.Run, number: int, log: Callable[[str], None]) -> Attempt:
        log_file = self.log_path(run.name)
        if log_file:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a") as f:
                f.write(f"\n===== {run.name}: attempt {number} =====\n")
        name, ended = self._acquire(run, number, log)
        if ended is not None:
            return ended
        self.record(run.name, state="running", resource=name)
        timeout = self.max_hours * 3600 if self.max_hours else None
        code = self._stream(self.ssh_argv(name, self.run_command_text(config, run)), log_file, timeout)
        after = self.state(name)
        healthy = after == "ACTIVE"
        status = self.read_status(run.workdir) or {}
        if code == 0:
            self._release(name, healthy)
            return Attempt("done", 0)
        self._release(name, False)
        if code is None:
            return Attempt("failed", 1, f"ran longer than --max_hours={self.max_hours:g}; stopped and deleted {name}")
        if not healthy or status.get("state") == "preempted":
            return Attempt("preempted", reason=f"{name} {after} (the run exited {code} at step {status.get('step')})")
        return Attempt("failed", code, f"exit {code} on the healthy resource {name}"
                                       + (f" ({status.get('state')}: {status.get('reason')})" if status else ""))

    def _release(self, name: str, healthy: bool) -> None:
        if self.pool and healthy:
            with self._pool_lock:
                self._ready.append(name)
            return
        self.run_command(self.delete_argv(name))

    def execute(self, config: str | None, runs: Sequence[backends.Run], log: Callable[[str], None] = print,
                on_event: backends.RunEvent | None = None) -> dict[str, int]:
        try:
            return super().execute(config, runs, log, on_event)
        finally:
            with self._pool_lock:
                ready, self._ready = self._ready, []
            for name in ready:
                self.run_command(self.delete_argv(name))

    # ---- status and delete ---------------------------------------------------------------------------

    def list_resources(self) -> list[dict[str, Any]]:
        code, out, err = self.run_command(self.list_argv())
        if code:
            raise ConfigError(f"{shlex.join(self.list_argv())} failed (exit {code}): {err.strip()[-500:]}")
        resources = []
        for item in json.loads(out or "[]"):
            labels = _labels(item)
            if labels.get(LABEL) != self.prefix:
                continue  # not this study's: never listed, never deleted
            name = str(item.get("name", "")).rsplit("/", 1)[-1]
            resources.append(dict(name=name, state=(item.get("state") or {}).get("state", "UNKNOWN"), labels=labels))
        return resources

    def delete_resource(self, name: str) -> int:
        return self.run_command(self.delete_argv(name))[0]


def _labels(item: Any) -> dict[str, str]:
    """Every `labels` mapping in a queued resource's JSON, merged (they sit on its node specs)."""
    found: dict[str, str] = {}
    if isinstance(item, dict):
        for key, value in item.items():
            if key == "labels" and isinstance(value, dict):
                found.update({str(k): str(v) for k, v in value.items()})
            else:
                found.update(_labels(value))
    elif isinstance(item, list):
        for value in item:
            found.update(_labels(value))
    return found
