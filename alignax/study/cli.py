"""`python -m alignax.study --study=experiments/studies/NAME.py[:ARG] --workdir=ROOT [--parallel=N]
[--backend=local|tpu_vm] [--report_only] [--dry_run]` (console script `alignax-study`).

Loads and resolves the study, validates every point's config for the backend's device count (nothing
starts if one is bad), skips finished points, trains the others through the backend with a progress
line on stderr, then evaluates every finished point and the base and writes the report
(`alignax.study.report`). `--report_only` only rebuilds the report from what ROOT holds; `--dry_run`
validates, writes ROOT/study.json and prints the commands. Exit code 1 when a point did not finish.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from alignax.errors import ConfigError
from alignax.study import runner, spec


def evaluate_and_report(study: spec.Study, points: list[spec.Point], root: str, *, evaluate: bool = True
                        ) -> Path | None:
    """Calls `alignax.study.report` (evaluation, then the HTML report) when that module exists."""
    if importlib.util.find_spec("alignax.study.report") is None:
        print(f"study {study.name}: alignax.study.report is not available; no evaluation or report written",
              file=sys.stderr)
        return None
    from alignax.study import report
    if evaluate:
        report.evaluate_points(study, points, root)
    return Path(report.write_report(root))


def finish(study: spec.Study, root: str, *, export: bool = True) -> None:
    """The front in a few lines; with the study's `export_best` (and `export`), its best point exported as a
    diffusers pipeline and sampled once by diffusers (alignax.study.best)."""
    from alignax.study import best, report
    built = report.build(root)
    for line in best.front_lines(built):
        print(line)
    if not (study.export_best and export):
        return
    point = best.best_point(built)
    if point is None:
        print(f"study {study.name}: no trained point on the joint front to export")
        return
    gains = ", ".join(f"{k} {v:+.2f}" for k, v in best.gains(built, point).items())
    out, png = best.export_best(built, point)
    print(f"best point: {point.name} (gain over base per reward spread: {gains}); exported as a diffusers "
          f"pipeline to {out}" + (f", sampled by diffusers to {png}" if png else ""))


def run_study(study_spec: str, root: str, *, backend_name: str = "local", parallel: int = 1,
              dry_run: bool = False, report_only: bool = False, rerun_finished: bool = False,
              progress_every: float = 5.0, **backend_options: Any) -> int:
    """The whole command; returns the exit code (1 when a point did not finish).

    With a cloud backend (`tpu_vm`, `xpk`), ROOT stays on this machine (study.json, launch.json, the
    points' logs, the collected results and the report), the points train in the bucket
    (`backend.workdir_for`), each point is evaluated on its workers right after training, and the
    results are collected into ROOT before the report is built."""
    from launch import backends
    study = spec.load_study(study_spec)
    points = spec.resolve(study, root)
    if backend_name != "local":
        backend_options.setdefault("name_prefix", study.name)
    backend = backends.get(backend_name, parallel=parallel, **backend_options)
    remote = getattr(backend, "remote", False)
    if remote:
        if "://" in root:
            raise ConfigError(f"--workdir={root}: with --backend={backend_name} the workdir is this machine's "
                              f"study root (study.json, logs, report); the points train under --bucket")
        backend.state_dir = root
        backend.evaluation_study = study_spec
        for point in points:
            point.workdir = backend.workdir_for(point.name)
    num_devices = None if report_only else backend.num_devices()
    configs = spec.validate(study, points, num_devices)  # before anything starts: a bad point stops the study here
    work = runner.StudyRun(study, points, root, backend, num_devices=num_devices)
    skipped = work.skip_finished(rerun_finished)
    label = f"study {study.name}"
    print(f"{label}: {len(points)} points validated" + (f" for {num_devices} devices" if num_devices else "") +
          (f"; {len(skipped)} already finished" if skipped else ""), file=sys.stderr)
    if report_only:
        work.recall()
        manifest = work.write_manifest()
        index = evaluate_and_report(study, points, root, evaluate=False)
        print(f"{label}: wrote {manifest}" + (f" and the report {index}" if index else ""))
        return 0
    if dry_run:
        manifest = work.write_manifest()
        todo = [point for point in points if point.state != "finished"]
        if hasattr(backend, "dry_run_lines"):
            for line in backend.dry_run_lines(None, [p.run for p in todo]):
                print(line)
        else:
            for point in todo:
                print(backend.command(None, point.run))
        print(f"{label}: dry run, nothing started; wrote {manifest}", file=sys.stderr)
        return 0
    if remote:  # the plan (chips × hours) and a yes before anything is requested
        backend.confirm([p.run for p in points if p.state != "finished"], lambda m: print(m, file=sys.stderr))
    else:
        from alignax.data import setup as data_setup
        for generate in sorted({c.data.get("generate", "") for c in configs.values()} & set(data_setup.SHARED)):
            print(f"{label}: preparing the {generate} datasets the points share", file=sys.stderr)
            data_setup.prepare_shared(generate)  # once here, not raced by parallel points
    states = work.execute(progress_every=progress_every)
    manifest = work.manifest_path
    if remote:
        backend.collect([p.name for p in points], root, log=lambda m: print(m, file=sys.stderr))
    index = evaluate_and_report(study, points, root, evaluate=not remote)
    if index is not None:
        finish(study, root, export=not remote)  # a cloud study's best point: `python -m alignax.export` on its workdir
    not_finished = sorted(name for name, state in states.items() if state != "finished")
    finished = len(points) - len(not_finished)
    print(f"{label}: {finished}/{len(points)} points finished" +
          (f", not finished: {', '.join(f'{n} ({states[n]})' for n in not_finished)}" if not_finished else "") +
          f"; wrote {manifest}" + (f" and the report {index}" if index else ""))
    return 1 if not_finished else 0


def main(argv: list[str]) -> int:
    from absl import flags
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    from launch import flags as launch_flags
    f = flags.FLAGS
    options = launch_flags.options(f)
    launch_flags.check_local(f.backend, options)
    return run_study(f.study, f.workdir, backend_name=f.backend, parallel=f.parallel, dry_run=f.dry_run,
                     report_only=f.report_only, rerun_finished=f.rerun_finished, progress_every=f.progress_every,
                     **options)


def cli() -> None:
    """`alignax-study` / `python -m alignax.study`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib
    from launch import flags as launch_flags

    flags.DEFINE_string("study", None, "experiments/studies/NAME.py[:ARG] defining get_study()")
    flags.DEFINE_string("workdir", None, "ROOT: point P trains in ROOT/P (cloud backends: under --bucket); "
                                         "ROOT/study.json, ROOT/report/")
    launch_flags.define()
    flags.DEFINE_integer("parallel", 1, "local: points trained at a time")
    flags.DEFINE_bool("dry_run", False, "validate, write ROOT/study.json and print the commands; run nothing")
    flags.DEFINE_bool("report_only", False, "rebuild the report from ROOT; train and evaluate nothing")
    flags.DEFINE_bool("rerun_finished", False, "relaunch the points that are finished")
    flags.DEFINE_float("progress_every", 10.0, "seconds between progress lines (0: only at starts and ends)")
    flags.mark_flags_as_required(["study", "workdir"])
    cli_lib.run_main(main)
