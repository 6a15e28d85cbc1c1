"""A stand-in for the `gcloud` (and `xpk`) executables, installed on PATH by tests/launch/conftest.py.

It records every call (FAKE_CLOUD_DIR/calls.jsonl) and plays the scenario in FAKE_CLOUD_DIR/scenario.json:

    {"resources": {NAME: {"states": ["WAITING_FOR_RESOURCES", "ACTIVE", ...],   # one per describe; last repeats
                          "run": ["preempt", "ok", "fail", "execute", "execute_then_preempt"]}},  # one per run ssh
     "default_states": ["ACTIVE"], "default_run": "ok", "total_steps": 8,
     "list": [queued resource JSON, ...],                                   # `queued-resources list`
     "xpk": {WORKLOAD: ["running", "finished"]}}                            # rows of `xpk workload list`

Buckets live under FAKE_CLOUD_DIR/gcs (gs://b/x is FAKE_CLOUD_DIR/gcs/b/x). A run ssh either writes the
point's status.json (`ok`: finished; `fail`: exit 1; `preempt`: exit 255 and the resource goes SUSPENDED)
or executes the real command on this machine with gs:// mapped to that directory (`execute`), and
`execute_then_preempt` sends it SIGTERM once it has saved a checkpoint, as a maintenance event would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ["FAKE_CLOUD_DIR"])
GCS = ROOT / "gcs"
REPO = Path(__file__).resolve().parents[2]


def load(name: str, default):
    path = ROOT / name
    return json.loads(path.read_text()) if path.is_file() else default


def save(name: str, value) -> None:
    (ROOT / name).write_text(json.dumps(value, indent=1))


def local(url: str) -> Path:
    return GCS / url.removeprefix("gs://")


@contextlib.contextmanager
def locked_state():
    """The shared state (resource counters), read and written under a lock: the backend calls concurrently."""
    with open(ROOT / "state.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load("state.json", {})
        yield state
        save("state.json", state)


def resource(state: dict, name: str) -> dict:
    return state.setdefault("resources", {}).setdefault(name, {"describes": 0, "runs": 0, "deleted": False})


def flag(argv: list[str], name: str) -> str | None:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def write_status(command: str, state: str, step: int, total: int) -> None:
    workdir = re.search(r"--workdir=(\S+)", command).group(1)
    path = local(workdir) / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"state": state, "step": step, "total_steps": total, "reason": ""}))


def execute(command: str, preempt: bool) -> int:
    """The worker command on this machine: ~/<bundle dir> is the repository, gs:// the fake bucket."""
    command = re.sub(r"cd ~/\S+", f"cd {REPO}", command)
    command = command.replace("gs://", f"{GCS}/").replace("python3 ", f"{sys.executable} ")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(["/bin/sh", "-c", command], env=env, start_new_session=True)
    if not preempt:
        return process.wait()
    workdir = Path(re.search(r"--workdir=(\S+)", command).group(1))
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # the maintenance event: the trainer saves and stops
    process.wait()
    return 255


def gcloud(argv: list[str]) -> int:
    scenario = load("scenario.json", {})
    if argv[:2] == ["storage", "cp"]:
        source, target = argv[2], argv[3]
        src = local(source) if source.startswith("gs://") else Path(source)
        if not src.is_file():
            print(f"ERROR: {source} not found", file=sys.stderr)
            return 1
        dst = local(target) if target.startswith("gs://") else Path(target)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return 0
    if argv[:2] == ["storage", "cat"]:
        path = local(argv[2])
        if not path.is_file():
            print(f"ERROR: {argv[2]} not found", file=sys.stderr)
            return 1
        sys.stdout.write(path.read_text())
        return 0
    if argv[:3] != ["compute", "tpus", "queued-resources"]:
        print(f"fake gcloud: unsupported {argv}", file=sys.stderr)
        return 2
    verb = argv[3]
    if verb == "list":
        if scenario.get("list_error"):
            print(f"ERROR: (gcloud.compute.tpus.queued-resources.list) {scenario['list_error']}", file=sys.stderr)
            return 1
        print(json.dumps(scenario.get("list", [])))
        return 0
    name = argv[4]
    spec = scenario.get("resources", {}).get(name, {})
    with locked_state() as state:
        mine = resource(state, name)
        if verb == "create":
            mine.update(created=True, deleted=False)
            return 0
        if verb == "delete":
            mine["deleted"] = True
            return 0
        if verb == "describe":
            if mine["deleted"] or not mine.get("created"):
                print(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: {name}", file=sys.stderr)
                return 1
            states = spec.get("states") or scenario.get("default_states", ["ACTIVE"])
            print(states[min(mine["describes"], len(states) - 1)])
            mine["describes"] += 1
            return 0
        if verb != "ssh":
            print(f"fake gcloud: unsupported verb {verb}", file=sys.stderr)
            return 2
        command = flag(argv, "command")
        if "tar -xzf" in command:
            return int(spec.get("setup_exit", 0))
        runs = spec.get("run") or [scenario.get("default_run", "ok")]
        behaviour = runs[min(mine["runs"], len(runs) - 1)]
        mine["runs"] += 1
    total = int(scenario.get("total_steps", 8))
    if behaviour == "ok":
        write_status(command, "finished", total, total)
        return 0
    if behaviour == "fail":
        write_status(command, "failed", 3, total)
        print("Traceback (most recent call last):\nValueError: the point broke", file=sys.stderr)
        return 1
    if behaviour == "preempt":
        write_status(command, "preempted", 4, total)
        return 255
    return execute(command, preempt=behaviour == "execute_then_preempt")


def xpk(argv: list[str]) -> int:
    scenario = load("scenario.json", {})
    if argv[:2] == ["workload", "create"]:
        return 0
    if argv[:2] == ["workload", "delete"]:
        return 0
    if argv[:2] == ["workload", "list"]:
        job = flag(argv, "filter-by-job")
        lines = ["Jobset Name   Created Time   Status"]
        with locked_state() as state:
            counts = state.setdefault("xpk", {})
            for name, rows in scenario.get("xpk", {}).items():
                if job and name != job:
                    continue
                index = counts.get(name, 0)
                counts[name] = index + 1
                lines.append(f"{name}   2026-12-03   {rows[min(index, len(rows) - 1)]}")
        print("\n".join(lines))
        return 0
    print(f"fake xpk: unsupported {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    program, args = Path(sys.argv[1]).name, sys.argv[2:]
    with open(ROOT / "calls.jsonl", "a") as log:
        log.write(json.dumps([program, *args]) + "\n")
    sys.exit(gcloud(args) if program == "gcloud" else xpk(args))
