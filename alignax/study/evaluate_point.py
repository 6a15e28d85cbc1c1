"""`python -m alignax.study.evaluate_point --study=S --root=ROOT --point=NAME`: one point's evaluation, where
it trained. A cloud backend's workers run it right after the point's training, so the study's samplers
and rewards run on the TPUs and `collect` only copies eval.json and grid.png back. The study file is
loaded on the worker (its reward paths resolve there), and the point is the one `--root` gives it.
"""

from __future__ import annotations

from alignax.errors import ConfigError


def evaluate(study_spec: str, root: str, name: str) -> str:
    """Writes ROOT/NAME/eval.json (and grid.png); returns its path."""
    from alignax import fs
    from alignax.study import evaluation, spec
    study = spec.load_study(study_spec)
    points = {p.name: p for p in spec.resolve(study, root)}
    if name not in points:
        raise ConfigError(f"--point={name!r}: study {study_spec} has no such point under {root} "
                          f"(its points: {', '.join(sorted(points))})")
    point = points[name]
    point.state = "finished"
    evaluation.evaluate_points(study, [point], root)
    return fs.join(root, name, evaluation.EVAL_JSON)


def main(argv: list[str]) -> int:
    from absl import flags
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    from alignax.training import distributed
    distributed.initialize("auto")  # every worker of the pod runs this, as it ran the training
    out = evaluate(f.study, f.root, f.point)
    print(f"evaluated point {f.point}: wrote {out}")
    return 0


def cli() -> None:
    from absl import flags

    from alignax import cli as cli_lib
    flags.DEFINE_string("study", None, "experiments/studies/NAME.py[:ARG]")
    flags.DEFINE_string("root", None, "the study's workdir root (point P trained in ROOT/P)")
    flags.DEFINE_string("point", None, "the point to evaluate")
    flags.mark_flags_as_required(["study", "root", "point"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
