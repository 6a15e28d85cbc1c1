"""Golden `--dry_run` of a 3-point study (experiments/studies/sd35_tpu.py: the base and two weight vectors) on
v5p-64 spot, one slice and two slices. There is no cloud here, so the check is that every command is exactly
right: order, quoting, per-point overrides, labels. The expected commands are written out by hand from the
gcloud reference (queued-resources create/describe/ssh/delete, storage cp), not produced by the code."""

from __future__ import annotations

import shlex
import sys

import pytest

from alignax.study import cli
from launch.bundle import REPO_ROOT

from .conftest import COMMIT

STUDY = str(REPO_ROOT / "experiments/studies/sd35_tpu.py")
SHA = COMMIT[:12]
BUNDLE = f"alignax-{SHA}.tar.gz"
HOME = f"~/alignax-{SHA}"
WHERE = "--zone=us-east5-a --project=my-proj"
SETUP = (f"set -e; if [ ! -f {HOME}/.installed ]; then mkdir -p {HOME} && gcloud storage cp URL/bundles/{BUNDLE} "
         f"/tmp/alignax-{SHA}.tar.gz && tar -xzf /tmp/alignax-{SHA}.tar.gz -C {HOME} && cd {HOME} && "
         f"python3 -m pip install -q --extra-index-url=https://download.pytorch.org/whl/cpu -r requirements.txt "
         f"'jax[tpu]==0.10.2' && "
         f"python3 -m pip install -q google-cloud-storage google-auth-oauthlib aiohttp decorator && "
         f"python3 -m pip install -q --no-deps gcsfs==2026.8.2 && touch {HOME}/.installed; fi")
CONFIG = "experiments/configs/sd35_reward_backprop.py"
# point: (its part of the resource name, label digest, the training module and its point overrides)
POINTS = {
    "base": ("base-1405df-a0", "1405df", "alignax.study.base_point", ""),
    "draft_k__w-0.7-0.3": ("draft-k-w-0-7-0-3-41a1be-a0", "41a1be", "alignax.train",
                           " --config.pareto.weights.aesthetic=0.3 --config.pareto.weights.hps=0.7"),
    "draft_k__w-0.3-0.7": ("draft-k-w-0-3-0-7-139ac2-a0", "139ac2", "alignax.train",
                           " --config.pareto.weights.aesthetic=0.7 --config.pareto.weights.hps=0.3"),
}


def expected(tmp: str, slices: int) -> list[str]:
    prefix = "sd35-tpu" if slices == 1 else "sd35-tpu-2"  # the study's name: sd35_tpu[-ARG]
    URL = f"gs://my-bucket/alignax/{prefix}"  # noqa: N806
    bundle_path = f"{tmp}/alignax-bundles/{BUNDLE}"
    setup = SETUP.replace("URL", URL)
    lines = [
        f"# tpu_vm: 3 points, {32 * slices} chips each, at most 1 at a time; workdirs under {URL}/; "
        f"code {BUNDLE} ({SHA})",
        f"# requested: {32 * slices} chips × 12 h × 3 points = {1152 * slices} chip-hours at most (--max_hours "
        f"stops a point)",
        f"git -C {REPO_ROOT} archive --format=tar.gz --output={bundle_path} {COMMIT}",
        f"gcloud storage cp {bundle_path} {URL}/bundles/{BUNDLE} --project=my-proj",
    ]
    nodes = "--node-id={}" if slices == 1 else "--node-count=2 --node-prefix={}"
    for point, (part, digest, module, weights) in POINTS.items():
        name = f"{prefix}-{part}"
        run = (f"cd {HOME} && python3 -m {module} --config={CONFIG} '--config.mesh.shape=({slices}, -1, 1)'{weights} "
               f"--workdir={URL}/{point} && python3 -m alignax.study.evaluate_point "
               f"--study=experiments/studies/sd35_tpu.py{':2' if slices == 2 else ''} --root={URL} --point={point}")
        lines += [
            f"# point {point}: resource {name}",
            f"gcloud compute tpus queued-resources create {name} {WHERE} {nodes.format(name)} "
            f"--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot "
            f"--labels=alignax-study={prefix},alignax-point={digest}",
            f"gcloud compute tpus queued-resources describe {name} {WHERE} '--format=value(state.state)'"
            f"  # every 30 s until ACTIVE",
            f"gcloud compute tpus queued-resources ssh {name} {WHERE} --worker=all --node=all --batch-size=64 "
            f"{shlex.quote('--command=' + setup)}",
            f"gcloud compute tpus queued-resources ssh {name} {WHERE} --worker=all --node=all --batch-size=64 "
            f"{shlex.quote('--command=' + run)}",
            f"gcloud compute tpus queued-resources delete {name} {WHERE} --force --quiet",
        ]
    return lines


@pytest.mark.parametrize("slices", [1, 2])
def test_golden_dry_run_of_a_3_point_study_on_v5p_64_spot(slices, tmp_path, fake_cloud, capsys):
    study = STUDY + (":2" if slices == 2 else "")
    code = cli.run_study(study, str(tmp_path / "root"), backend_name="tpu_vm", dry_run=True, tpu_type="v5p-64",
                         zone="us-east5-a", project="my-proj", spot=True, bucket="gs://my-bucket/alignax",
                         num_slices=slices, max_hours=12.0)
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out == expected(str(tmp_path / "tmp"), slices)
    # A dry run changes nothing: it only reads each point's status.json (to skip finished points).
    calls = fake_cloud.calls()
    assert len(calls) == 3 and all(call[:3] == ["gcloud", "storage", "cat"] for call in calls)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["study.json"]


def test_golden_commands_parse_as_the_shell_will_run_them(tmp_path, fake_cloud, capsys):
    """The ssh --command is one argument; inside it, the overrides with spaces stay single arguments."""
    cli.run_study(STUDY, str(tmp_path / "root"), backend_name="tpu_vm", dry_run=True, tpu_type="v5p-64",
                  zone="us-east5-a", project="my-proj", spot=True, bucket="gs://my-bucket/alignax", max_hours=12.0)
    run_line = [line for line in capsys.readouterr().out.splitlines() if "alignax.train" in line][0]
    argv = shlex.split(run_line)
    assert argv[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"] and argv[-1].startswith("--command=")
    remote = shlex.split(argv[-1].removeprefix("--command=").split(" && ")[1])
    assert remote[:3] == ["python3", "-m", "alignax.train"] and "--config.mesh.shape=(1, -1, 1)" in remote
    assert sys.executable not in run_line  # the workers' python, not this machine's
