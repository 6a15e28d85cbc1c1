"""`python -m launch COMMAND --workdir=ROOT ...` (console script `alignax-launch`): a study on Cloud TPU.

    submit   validate the study, print the plan (chips × hours), confirm, then provision, run, re-queue
             preempted points, evaluate each point on its workers, collect and build the report
             (= `alignax.study` with a cloud backend; `--dry_run` prints every command and touches nothing)
    status   each point's state: the study's, the launcher's (attempts, resource) and the bucket's
             status.json, and the study's live resources
    collect  copy eval.json, grid.png, status.json and metrics.jsonl of every point into ROOT and
             build ROOT/report/index.html
    delete   delete the study's resources (only those labelled with its prefix); asks unless --yes

ROOT is a directory on this machine; `status`, `collect` and `delete` rebuild the backend from
ROOT/study.json, so they need nothing but --workdir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from alignax.errors import ConfigError

COMMANDS = ("submit", "status", "collect", "delete")


def _manifest(root: str) -> dict[str, Any]:
    path = Path(root) / "study.json"
    if not path.is_file():
        raise ConfigError(f"--workdir={root}: no study.json there; `python -m launch submit --study=... "
                          f"--workdir={root}` writes it")
    return json.loads(path.read_text())


def backend_of(root: str) -> Any:
    """The cloud backend a study in ROOT was submitted with (from ROOT/study.json)."""
    from launch import backends
    manifest = _manifest(root)
    name, options = manifest.get("backend"), dict(manifest.get("backend_options") or {})
    if name not in ("tpu_vm", "xpk"):
        raise ConfigError(f"{Path(root) / 'study.json'}: the study ran on backend {name!r}; status, collect and "
                          f"delete are for the cloud backends (tpu_vm, xpk)")
    options["name_prefix"] = options.pop("prefix", options.get("name_prefix"))
    backend = backends.get(name, yes=True, **options)
    backend.state_dir = root
    return backend


def status(root: str) -> list[str]:
    manifest = _manifest(root)
    backend = backend_of(root)
    launch_path = Path(root) / "launch.json"
    records = json.loads(launch_path.read_text()).get("points", {}) if launch_path.is_file() else {}
    lines = []
    for point in manifest.get("points", []):
        name = point["name"]
        record = records.get(name, {})
        bucket = backend.read_status(backend.workdir_for(name)) or {}
        step = (f"step {bucket.get('step')}/{bucket.get('total_steps')} ({bucket.get('state')})" if bucket
                else "no status")
        lines.append(f"{name}: {point.get('state')}; launcher {record.get('state', '-')}"
                     f" (attempt {record.get('attempt', 0)}, {record.get('resource', 'no resource')}); {step}")
    try:
        live = backend.list_resources()
    except ConfigError as e:  # the points' states above are still worth printing
        lines.append(f"live resources labelled {backend.prefix}: could not list them: {str(e).splitlines()[0]}")
        return lines
    lines.append(f"{len(live)} live resources labelled {backend.prefix}: "
                 + (", ".join(f"{r['name']} ({r['state']})" for r in live) or "none"))
    return lines


def collect(root: str) -> str:
    from alignax.study import report
    backend = backend_of(root)
    names = [p["name"] for p in _manifest(root).get("points", [])]
    backend.collect(names, root, log=lambda m: print(m, file=sys.stderr))
    return str(report.write_report(root))


def delete(root: str, yes: bool) -> list[str]:
    backend = backend_of(root)
    live = backend.list_resources()
    if not live:
        return []
    print("\n".join(f"will delete {r['name']} ({r['state']})" for r in live), file=sys.stderr)
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("delete: not deleting without confirmation; pass --yes")
        if input(f"delete these {len(live)} resources? [y/N] ").strip().lower() not in ("y", "yes"):
            raise ConfigError("delete: nothing deleted")
    failed = [r["name"] for r in live if backend.delete_resource(r["name"])]
    if failed:
        raise ConfigError(f"delete: could not delete {failed}")
    return [r["name"] for r in live]


def main(argv: list[str]) -> int:
    from absl import flags

    from alignax.study import cli as study_cli
    from launch import flags as launch_flags
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise ConfigError(f"expected one command of {list(COMMANDS)}, found {argv[1:]}; e.g. "
                          f"python -m launch submit --study=experiments/studies/NAME.py --workdir=ROOT "
                          f"--backend=tpu_vm --tpu_type=v5p-64 --zone=ZONE --bucket=gs://BUCKET")
    command = argv[1]
    if command == "submit":
        if not f.study:
            raise ConfigError("submit needs --study=experiments/studies/NAME.py[:ARG]")
        if f.backend == "local":
            raise ConfigError("submit is for the cloud backends: pass --backend=tpu_vm or --backend=xpk "
                              "(a local study: python -m alignax.study)")
        return study_cli.run_study(f.study, f.workdir, backend_name=f.backend, dry_run=f.dry_run,
                                   rerun_finished=f.rerun_finished, **launch_flags.options(f))
    if command == "status":
        for line in status(f.workdir):
            print(line)
        print(f"status of {f.workdir}: read {Path(f.workdir) / 'study.json'} and the bucket")
    elif command == "collect":
        print(f"collected into {f.workdir}; wrote the report {collect(f.workdir)}")
    else:
        deleted = delete(f.workdir, f.yes)
        print(f"deleted {len(deleted)} resources of {f.workdir}" + (f": {', '.join(deleted)}" if deleted else ""))
    return 0


def cli() -> None:
    from absl import flags

    from alignax import cli as cli_lib
    from launch import flags as launch_flags
    flags.DEFINE_string("study", None, "submit: experiments/studies/NAME.py[:ARG]")
    flags.DEFINE_string("workdir", None, "this machine's study root: study.json, launch.json, logs, report")
    flags.DEFINE_bool("dry_run", False, "submit: print the plan and every command; touch nothing")
    flags.DEFINE_bool("rerun_finished", False, "submit: relaunch points that are finished")
    launch_flags.define()
    flags.mark_flags_as_required(["workdir"])
    cli_lib.run_main(main)
