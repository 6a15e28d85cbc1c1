"""`python -m launch.sweep --sweep=experiments/sweeps/NAME.py[:ARG] --backend=local|tpu_vm [--dry_run]`.

A sweep file defines `get_sweep(arg='')` returning either

    {'config': 'experiments/configs/X.py[:ARG]',
     'runs': [{'name': 'red_only', 'pareto.weights': {'red': 1.0, 'blue': 0.0}, 'seed': 0}, ...]}

or just the list of runs, with the config in a module-level `CONFIG`. Each run's overrides
become `--config.<dotted key>=<value>` flags (a dict value gives one flag per leaf). Every
run's config is parsed by `ml_collections.config_flags` exactly as `alignax.train` will parse
it, and validated for the target's device count, before anything starts: a typo in run 7
fails the sweep in seconds, naming the run and the field. `ROOT/sweep.json` records the
resolved runs; run NAME trains in `ROOT/NAME`.

Re-running a sweep skips the points that are done: those whose `WORKDIR/status.json` (written
by the trainer) says `finished` at the run's `total_steps`, or whose final checkpoint
`checkpoints/<total_steps>` is complete; `--rerun_finished` relaunches them anyway. Preempted
or failed points are relaunched and resume from their last checkpoint. When the runs end,
each run's status goes into `sweep.json`, and points that ended `diverged`, `nonfinite` or
`failed` are flagged in the summary (and in `alignax.pareto.report`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from alignax.errors import ConfigError
from alignax.pareto.report import FLAGGED_STATES  # status.json states that make a point untrustworthy
from launch import backends

NAME_KEY = "name"


def load_sweep(spec: str) -> tuple[str, list[dict[str, Any]]]:
    """(config spec, raw run dicts) from `path.py[:arg]`."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--sweep={spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_alignax_sweep_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"--sweep={spec}: {path} defines no get_sweep()")
    sweep = module.get_sweep(arg) if arg else module.get_sweep()
    if isinstance(sweep, Mapping):
        config, runs = sweep.get("config"), sweep.get("runs")
    else:
        config, runs = getattr(module, "CONFIG", None), sweep
    if not isinstance(config, str) or not config:
        raise ConfigError(f"--sweep={spec}: expected get_sweep()['config'] (or a module-level CONFIG) naming a "
                          f"config file, found {config!r}")
    if not isinstance(runs, list | tuple) or not runs or not all(isinstance(r, Mapping) for r in runs):
        raise ConfigError(f"--sweep={spec}: expected get_sweep()['runs'] to be a non-empty list of override dicts, "
                          f"found {runs!r}")
    return config, [dict(r) for r in runs]


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'pareto.weights': {'red': 1.0}} → {'pareto.weights.red': 1.0}: config_flags overrides leaves."""
    flat = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            flat.update(flatten(dict(value), dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _default_name(index: int, overrides: dict[str, Any]) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
    return "_".join([f"{index:02d}", *parts])[:100]


def resolve_runs(raw_runs: list[dict[str, Any]], workdir_root: str) -> list[backends.Run]:
    runs, seen = [], set()
    for index, raw in enumerate(raw_runs):
        raw = dict(raw)
        overrides = flatten({k: v for k, v in raw.items() if k != NAME_KEY})
        name = str(raw.get(NAME_KEY) or _default_name(index, overrides))
        name = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._=+-]", "_", name)).strip("_")
        if name in seen:
            raise ConfigError(f"run {index} ({raw!r}): name {name!r} is used twice; give each run a unique 'name'")
        seen.add(name)
        for key, value in overrides.items():
            backends.flag_value(value)  # ConfigError on values a flag cannot carry
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ConfigError(f"run {name!r}: override key {key!r} is not a dotted config key")
        runs.append(backends.Run(name, overrides, f"{workdir_root.rstrip('/')}/{name}"))
    return runs


def parse_config(config: str, run: backends.Run) -> ml_collections.ConfigDict:
    """The run's config exactly as `alignax.train` will see it: the same config_flags parse of the same flags."""
    from absl import flags
    from ml_collections import config_flags

    config = run.config or config  # a study's run names its own config file
    argv = ["alignax.train", f"--config={config}", *backends.override_flags(run.overrides)]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                             sys_argv=argv)
    from alignax.cli import describe_flag_error, unloaded_config
    try:
        flag_values(argv)
    except Exception as e:  # absl/config_flags raise KeyError, flags.Error, ...; all mean a bad run
        raise ConfigError(f"run {run.name!r}: {config} with {' '.join(argv[2:])} does not parse: "
                          f"{describe_flag_error(e, argv, flag_values)}") from e
    problem = unloaded_config(flag_values)  # a missing config file surfaces only when the config is used
    if problem:
        raise ConfigError(f"run {run.name!r}: {problem}")
    return holder.value


def validate_runs(config: str, runs: list[backends.Run], num_devices: int | None
                  ) -> dict[str, ml_collections.ConfigDict]:
    """Every run's parsed config, validated; ConfigError naming the first bad run."""
    from alignax import config as config_lib
    configs = {}
    for run in runs:
        try:
            configs[run.name] = config_lib.validate(parse_config(config, run), num_devices)
        except ConfigError as e:
            message = str(e) if str(e).startswith(f"run {run.name!r}") else f"run {run.name!r}: {e}"
            raise ConfigError(message) from e
    return configs


def read_status(workdir: str) -> dict[str, Any] | None:
    """`WORKDIR/status.json` as the trainer wrote it ({state, step, total_steps, reason}), or None when the run
    has not ended yet (or never started) or the file cannot be read (a warning says why)."""
    from alignax import fs
    path = fs.join(workdir, "status.json")
    try:
        if not fs.isfile(path):
            return None
        status = json.loads(fs.read_text(path))
    except Exception as e:  # noqa: BLE001 (unreadable status: treat the run as not done, say so)
        print(f"warning: cannot read {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return status if isinstance(status, dict) else None


def final_checkpoint_complete(workdir: str, step: int) -> bool:
    """True when `workdir/checkpoints/<step>` is a committed, readable orbax step (not a stray empty directory
    or an in-flight `.orbax-checkpoint-tmp`). Read-only: creates nothing."""
    from alignax import fs
    from alignax.training import checkpoint
    if not fs.isdir(fs.join(checkpoint.checkpoint_directory(workdir), str(step))):
        return False  # the common case (a fresh point) costs one stat, no orbax
    ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False, create=False)  # never saves: deletes nothing
    try:
        return step in ckpt.all_steps() and ckpt.unreadable(step) is None
    finally:
        ckpt.close()


def finished(run: backends.Run, total_steps: int) -> str | None:
    """Why `run` needs no relaunch, or None: status.json says finished at `total_steps`, or the final
    checkpoint is complete (a run that finished before status.json existed, or lost it)."""
    status = read_status(run.workdir)
    if status and status.get("state") == "finished" and status.get("step") == total_steps:
        return f"status.json: finished at step {total_steps}"
    if final_checkpoint_complete(run.workdir, total_steps):
        return f"checkpoints/{total_steps} is complete"
    return None


def describe_status(status: dict[str, Any] | None) -> str:
    if not status:
        return "no status.json"
    text = f"{status.get('state')} at step {status.get('step')}/{status.get('total_steps')}"
    return text + (f": {status['reason']}" if status.get("reason") else "")


def write_manifest(root: str, sweep: str, config: str, backend: Any, runs: list[backends.Run],
                   num_devices: int | None, *, skipped: dict[str, str] | None = None,
                   statuses: dict[str, dict | None] | None = None) -> Path | None:
    """`ROOT/sweep.json`: the resolved runs, which were skipped as finished (and why) and, once the runs
    have ended, each run's status.json and whether it is flagged (diverged, nonfinite, failed)."""
    if "://" in root:
        return None  # a bucket: the runs themselves write there
    path = Path(root) / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    skipped, statuses = skipped or {}, statuses or {}

    def entry(r: backends.Run) -> dict[str, Any]:
        out = dict(name=r.name, overrides=r.overrides, workdir=r.workdir, command=backend.command(config, r),
                   skipped=skipped.get(r.name))
        if r.name in statuses:
            status = statuses[r.name]
            out.update(status=status, flagged=bool(status) and status.get("state") in FLAGGED_STATES)
        return out

    manifest = dict(sweep=sweep, config=config, backend=backend.name, workdir_root=root, num_devices=num_devices,
                    runs=[entry(r) for r in runs])
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def launch(sweep: str, backend_name: str, *, workdir_root: str | None = None, dry_run: bool = False,
           rerun_finished: bool = False, **backend_options: Any) -> int:
    """Validates every run, skips finished ones, writes ROOT/sweep.json, then prints (dry run) or executes;
    returns the exit code (1 when a run failed or ended flagged)."""
    config, raw_runs = load_sweep(sweep)
    stem = Path(sweep.partition(':')[0]).stem
    if backend_name != "local":
        backend_options.setdefault("name_prefix", stem)
    backend = backends.get(backend_name, **backend_options)
    root = workdir_root or f"/tmp/alignax_runs/sweeps/{stem}"
    runs = resolve_runs(raw_runs, root)
    if getattr(backend, "remote", False):  # ROOT keeps the manifest and logs; the runs train in the bucket
        if "://" in root:
            raise ConfigError(f"--workdir_root={root}: with --backend={backend_name} it is this machine's directory "
                              f"for sweep.json and the logs; the runs train under --bucket")
        backend.state_dir = root
        runs = [dataclasses.replace(run, workdir=backend.workdir_for(run.name)) for run in runs]
    num_devices = backend.num_devices()
    configs = validate_runs(config, runs, num_devices)
    is_finished = getattr(backend, "finished", finished)
    skipped = {} if rerun_finished else {
        run.name: why for run in runs if (why := is_finished(run, configs[run.name].total_steps))}
    todo = [run for run in runs if run.name not in skipped]
    manifest = write_manifest(root, sweep, config, backend, runs, num_devices, skipped=skipped)
    print(f"sweep {sweep}: {len(runs)} runs validated for {num_devices} devices; manifest {manifest}")
    if skipped:
        print(f"sweep {sweep}: skipped {len(skipped)} finished points (--rerun_finished relaunches them): " +
              "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    if dry_run:
        lines = (backend.dry_run_lines(config, todo) if hasattr(backend, "dry_run_lines")
                 else [backend.command(config, run) for run in todo])
        for line in lines:
            print(line)
        print(f"sweep {sweep}: dry run, nothing started; wrote the manifest {manifest}", file=sys.stderr)
        return 0
    if todo and getattr(backend, "remote", False):
        backend.confirm(todo, lambda m: print(m, file=sys.stderr))  # the plan and a yes before anything is requested
    codes = backend.execute(config, todo) if todo else {}
    statuses = {run.name: getattr(backend, "read_status", read_status)(run.workdir) for run in runs}
    manifest = write_manifest(root, sweep, config, backend, runs, num_devices, skipped=skipped, statuses=statuses)
    failed = sorted(name for name, code in codes.items() if code != 0)
    flagged = {name: s for name, s in statuses.items() if s and s.get("state") in FLAGGED_STATES}
    print(f"sweep {sweep}: {len(todo) - len(failed)}/{len(todo)} runs succeeded" +
          (f", {len(skipped)} skipped as finished" if skipped else "") +
          (f"; failed: {failed}" if failed else "") + f"; run directories under {root}, manifest {manifest}")
    if flagged:
        print(f"sweep {sweep}: FLAGGED {len(flagged)} points that did not end cleanly: " +
              "; ".join(f"{name} ({describe_status(s)})" for name, s in sorted(flagged.items())))
    return 1 if failed or flagged else 0


def main(argv: list[str]) -> int:
    from absl import flags
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    from launch import flags as launch_flags
    f = flags.FLAGS
    try:
        options = launch_flags.options(f)
        launch_flags.check_local(f.backend, options)
        return launch(f.sweep, f.backend, workdir_root=f.workdir_root, dry_run=f.dry_run,
                      rerun_finished=f.rerun_finished, parallel=f.parallel, **options)
    except ConfigError as e:
        print(f"sweep {f.sweep}: {e}", file=sys.stderr)
        return 2


def cli() -> None:
    """`alignax-sweep` / `python -m launch.sweep`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib
    from launch import flags as launch_flags

    flags.DEFINE_string("sweep", None, "experiments/sweeps/NAME.py[:ARG] defining get_sweep()")
    launch_flags.define()
    flags.DEFINE_string("workdir_root", None, "run NAME trains in ROOT/NAME (default /tmp/alignax_runs/sweeps/<sweep>)")
    flags.DEFINE_bool("dry_run", False, "validate and print the commands, run nothing")
    flags.DEFINE_bool("rerun_finished", False, "relaunch points whose status.json says finished or whose final "
                                               "checkpoint is complete (skipped by default)")
    flags.DEFINE_integer("parallel", 1, "local: runs at a time")
    flags.mark_flags_as_required(["sweep"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
