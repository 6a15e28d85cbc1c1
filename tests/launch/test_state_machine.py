"""The cloud backends' life of a point, driven through fake `gcloud` / `xpk` executables that record their
calls and play scripted responses: queued → provisioning → active → running → done; a preemption mid-run
re-queued on a new resource; a resource that never becomes active; a run that fails on a healthy
resource; too many preemptions; `status`, `collect` and a `delete` that never touches an unlabelled
resource; and a real trainer preempted on the fake TPU that resumes from its checkpoint when re-queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignax.errors import ConfigError
from alignax.study import cli as study_cli
from launch import backends
from launch import cli as launch_cli
from launch.bundle import REPO_ROOT
from launch.remote import resource_name

CONFIG = str(REPO_ROOT / "experiments/configs/sft_tiny.py")
BUCKET = "gs://bkt/runs"


def tpu_vm(tmp_path: Path, **options) -> backends.RemoteBackend:
    settings = dict(tpu_type="v5litepod-8", zone="z1", project="proj", spot=True, bucket=BUCKET,
                    name_prefix="st", poll_seconds=0.0, yes=True, max_parallel=2, max_preemptions=2)
    settings.update(options)
    backend = backends.get("tpu_vm", **settings)
    backend.sleep = lambda seconds: None
    backend.state_dir = str(tmp_path / "root")
    return backend


def run(backend, name: str, **overrides) -> backends.Run:
    return backends.Run(name, overrides, backend.workdir_for(name), config=CONFIG)


def verbs(calls: list[list[str]], resource: str) -> list[str]:
    """The gcloud verbs issued about one resource, in order (ssh split into setup / run)."""
    out = []
    for call in calls:
        if call[:4] == ["gcloud", "compute", "tpus", "queued-resources"] and call[5] == resource:
            verb = call[4]
            if verb == "ssh":
                verb = "ssh-setup" if "tar -xzf" in call[-1] else "ssh-run"
            out.append(verb)
    return out


def test_a_preemption_mid_run_is_re_queued_and_failures_are_told_apart(tmp_path, fake_cloud):
    backend = tpu_vm(tmp_path, active_timeout=2.0)
    names = {p: [resource_name("st", p, a) for a in range(3)] for p in ("a", "b", "c", "d")}
    fake_cloud.scenario(resources={
        names["a"][0]: {"states": ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "SUSPENDED"], "run": ["preempt"]},
        names["b"][0]: {"states": ["WAITING_FOR_RESOURCES"]},                # never granted
        names["c"][0]: {"run": ["fail"]},                                    # a real failure on a healthy VM
        names["d"][0]: {"states": ["ACTIVE", "SUSPENDED"], "run": ["preempt"]},
        names["d"][1]: {"states": ["ACTIVE", "SUSPENDED"], "run": ["preempt"]},
        names["d"][2]: {"states": ["ACTIVE", "SUSPENDED"], "run": ["preempt"]},
    }, total_steps=8)
    events = []
    codes = backend.execute(None, [run(backend, p) for p in "abcd"],
                            log=lambda m: None, on_event=lambda n, e, c: events.append((n, e, c)))
    assert codes["a"] == 0 and codes["b"] != 0 and codes["c"] == 1 and codes["d"] != 0
    calls = fake_cloud.calls()
    # a: queued → provisioning → active → running → preempted (SUSPENDED) → deleted → re-queued → done.
    assert verbs(calls, names["a"][0]) == ["create", "describe", "describe", "describe", "ssh-setup", "ssh-run",
                                           "describe", "delete"]
    assert verbs(calls, names["a"][1]) == ["create", "describe", "ssh-setup", "ssh-run", "describe", "delete"]
    run_a = [c for c in calls if c[4:6] == ["ssh", names["a"][1]] and "alignax.train" in c[-1]][0][-1]
    assert f"--workdir={BUCKET}/st/a" in run_a  # the same workdir: the trainer resumes there
    # b never becomes ACTIVE: failed, its request deleted, nothing run.
    b_verbs = verbs(calls, names["b"][0])
    assert b_verbs[0] == "create" and set(b_verbs[1:-1]) == {"describe"} and b_verbs[-1] == "delete"
    # c fails on a healthy resource: no re-queue.
    assert verbs(calls, names["c"][0]) == ["create", "describe", "ssh-setup", "ssh-run", "describe", "delete"]
    assert not verbs(calls, names["c"][1])
    # d: preempted 3 times with --max_preemptions=2.
    assert all(verbs(calls, names["d"][i])[-1] == "delete" for i in range(3))
    record = json.loads((tmp_path / "root" / "launch.json").read_text())["points"]
    assert record["a"]["state"] == "done" and record["a"]["attempt"] == 1
    assert "did not become ACTIVE" in record["b"]["reason"] and record["b"]["state"] == "failed"
    assert record["c"]["state"] == "failed" and "healthy" in record["c"]["reason"]
    assert record["d"]["state"] == "failed" and "preempted 3 times" in record["d"]["reason"]
    assert "ValueError: the point broke" in backend.log_tail(backend.workdir_for("c"))
    assert sorted(e for e in events if e[1] == "ended") == [("a", "ended", 0), ("b", "ended", 1), ("c", "ended", 1),
                                                            ("d", "ended", 1)]
    # Every resource that was created was deleted.
    created = {c[5] for c in calls if c[4:5] == ["create"]}
    deleted = {c[5] for c in calls if c[4:5] == ["delete"]}
    assert created == deleted


def test_a_pool_reuses_healthy_resources_across_points(tmp_path, fake_cloud):
    backend = tpu_vm(tmp_path, pool=True, max_parallel=1)
    fake_cloud.scenario(total_steps=8)
    codes = backend.execute(None, [run(backend, p) for p in ("x", "y", "z")], log=lambda m: None)
    assert codes == {"x": 0, "y": 0, "z": 0}
    calls = fake_cloud.calls()
    pool = resource_name("st", "pool0", 0)
    assert verbs(calls, pool) == ["create", "describe", "ssh-setup", "ssh-run", "describe", "ssh-run", "describe",
                                  "ssh-run", "describe", "delete"]


def test_status_collect_and_a_delete_that_only_touches_labelled_resources(tmp_path, fake_cloud, capsys):
    root = tmp_path / "root"
    study = str(REPO_ROOT / "experiments/studies/tiny.py")
    options = dict(tpu_type="v5litepod-8", zone="z1", project="proj", bucket=BUCKET, yes=True, poll_seconds=0.0,
                   max_parallel=2)
    # Each point's evaluation is the workers' job; here the bucket already holds a valid eval.json per point.
    from tests.study.test_report import POINTS, make_root
    made = tmp_path / "made"
    made.mkdir()
    make_root(made, {"base": POINTS["base"]})
    names = [p.name for p in _points(study, root)]
    for name in names:
        target = fake_cloud.bucket(f"{BUCKET}/tiny/{name}")
        target.mkdir(parents=True)
        body = json.loads((made / "base" / "eval.json").read_text())
        body.update(point=name, run=name, objective="base" if name == "base" else "sft")
        (target / "eval.json").write_text(json.dumps(body))
    fake_cloud.scenario(total_steps=8)
    code = study_cli.run_study(study, str(root), backend_name="tpu_vm", **options)
    assert code == 0, capsys.readouterr()
    assert all((root / name / "eval.json").is_file() and (root / name / "status.json").is_file() for name in names)
    assert (root / "report" / "index.html").is_file()
    lines = launch_cli.status(str(root))
    assert lines[0].startswith("base: finished; launcher done") and "step 8/8 (finished)" in lines[0]
    mine = {"name": "projects/proj/locations/z1/queuedResources/tiny-a-1-a0", "state": {"state": "ACTIVE"},
            "tpu": {"nodeSpec": [{"node": {"labels": {"alignax-study": "tiny"}}}]}}
    fake_cloud.scenario(list=[
        mine,
        {"name": "projects/proj/locations/z1/queuedResources/someone-else", "state": {"state": "ACTIVE"}},
        {"name": "projects/proj/locations/z1/queuedResources/tiny-lookalike", "state": {"state": "ACTIVE"},
         "tpu": {"nodeSpec": [{"node": {"labels": {"alignax-study": "tiny-2"}}}]}},
    ])
    assert launch_cli.status(str(root))[-1] == "1 live resources labelled tiny: tiny-a-1-a0 (ACTIVE)"
    with pytest.raises(ConfigError, match="without confirmation"):
        launch_cli.delete(str(root), yes=False)  # pytest's stdin is not a terminal
    assert launch_cli.delete(str(root), yes=True) == ["tiny-a-1-a0"]
    deletes = [c for c in fake_cloud.calls() if c[3:5] == ["queued-resources", "delete"]]
    assert [c[5] for c in deletes][-1] == "tiny-a-1-a0"
    assert not any(c[5] in ("someone-else", "tiny-lookalike") for c in deletes)
    fake_cloud.scenario(list_error="PERMISSION_DENIED: tpu.queuedResources.list")
    lines = launch_cli.status(str(root))
    assert lines[0].startswith("base: finished") and "could not list them" in lines[-1] and "PERMISSION" in lines[-1]


def test_nothing_is_requested_before_the_plan_is_confirmed(tmp_path, fake_cloud, capsys):
    study = str(REPO_ROOT / "experiments/studies/tiny.py")
    with pytest.raises(ConfigError, match="not submitting without confirmation; pass --yes"):
        study_cli.run_study(study, str(tmp_path / "root"), backend_name="tpu_vm", tpu_type="v5litepod-8", zone="z1",
                            bucket=BUCKET, max_hours=2.0)
    err = capsys.readouterr().err
    assert "requested: 8 chips × 2 h × 16 points = 256 chip-hours at most" in err
    assert all(call[:3] == ["gcloud", "storage", "cat"] for call in fake_cloud.calls())  # read-only


def _points(study: str, root: Path):
    from alignax.study import spec
    return spec.resolve(spec.load_study(study), str(root))


def test_xpk_restarts_in_place_and_re_submits_a_preempted_workload(tmp_path, fake_cloud):
    backend = backends.get("xpk", cluster="c1", tpu_type="v5p-128", num_slices=2, docker_image="gcr.io/p/alignax:1",
                           bucket=BUCKET, name_prefix="st", poll_seconds=0.0, yes=True, project="proj",
                           zone="us-east5")
    backend.sleep = lambda seconds: None
    backend.state_dir = str(tmp_path / "root")
    first, second = backend.workload("p", 0), backend.workload("p", 1)
    assert len(first) <= 40
    status = fake_cloud.bucket(f"{BUCKET}/st/p/status.json")
    status.parent.mkdir(parents=True)
    status.write_text(json.dumps({"state": "preempted", "step": 4, "total_steps": 8}))
    fake_cloud.scenario(xpk={first: ["QuotaReserved", "Admitted", "Failed"],
                             second: ["Admitted", "Finished  JobSet finished successfully"]})

    def finish_when_resubmitted(message):
        if second in message:  # the trainer of the second workload resumes and finishes
            status.write_text(json.dumps({"state": "finished", "step": 8, "total_steps": 8}))

    codes = backend.execute(None, [run(backend, "p")], log=finish_when_resubmitted)
    assert codes == {"p": 0}
    creates = [c for c in fake_cloud.calls() if c[:3] == ["xpk", "workload", "create"]]
    assert [c[4] for c in creates] == [f"--workload={first}", f"--workload={second}"]
    assert creates[0][5:8] == ["--tpu-type=v5p-128", "--num-slices=2", "--docker-image=gcr.io/p/alignax:1"]
    assert creates[0][8].startswith("--command=cd /app && python3 -m alignax.train --config=experiments/configs/")
    assert creates[0][9:] == ["--max-restarts=3", "--project=proj", "--zone=us-east5"]


@pytest.mark.parametrize("options, message", [
    (dict(zone="z"), "--tpu_type"),
    (dict(tpu_type="v5p-64", zone="z", bucket="/local/dir"), "gs://BUCKET"),
    (dict(tpu_type="v9z-64", zone="z"), "FAMILY one of"),
    (dict(tpu_type="v5p-63", zone="z"), "even size"),
    (dict(tpu_type="v5p-64", zone="z", spot=True, reserved=True), "choose one"),
    (dict(tpu_type="tpu7x-64", zone="z"), "--backend=xpk"),
])
def test_bad_cloud_options_are_refused_naming_the_flag(options, message):
    settings = dict(bucket="gs://b")
    settings.update(options)
    with pytest.raises(ConfigError, match=message):
        backends.get("tpu_vm", **settings)


def test_a_real_run_preempted_on_the_fake_tpu_resumes_from_its_checkpoint(tmp_path, fake_cloud):
    """The worker command runs this machine's trainer; the first attempt is SIGTERMed after its first
    checkpoint (a maintenance event) and the resource goes SUSPENDED; the re-queued attempt resumes."""
    backend = tpu_vm(tmp_path, max_parallel=1)
    first, second = resource_name("st", "r", 0), resource_name("st", "r", 1)
    fake_cloud.scenario(resources={first: {"states": ["ACTIVE", "SUSPENDED"], "run": ["execute_then_preempt"]},
                                   second: {"run": ["execute"]}})
    point = run(backend, "r", total_steps=6, checkpoint_every=2, log_every=1, eval_every=0)
    codes = backend.execute(None, [point], log=lambda m: None)
    log = (tmp_path / "root" / "r" / "train.log").read_text()
    assert codes == {"r": 0}, log[-3000:]
    assert "preempted at step" in log and "resuming" in log
    status = json.loads(fake_cloud.bucket(f"{BUCKET}/st/r/status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 6)
    steps = [json.loads(line)["step"] for line in
             fake_cloud.bucket(f"{BUCKET}/st/r/metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step once: resumed, not restarted
