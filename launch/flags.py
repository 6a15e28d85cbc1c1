"""The backend flags every launching CLI shares (alignax.study, launch.sweep, python -m launch), defined once."""

from __future__ import annotations

from typing import Any

from launch import backends

CLOUD_FLAGS = (
    # (name, kind, default, help)
    ("tpu_type", "string", None, "tpu_vm/xpk: accelerator type per slice, e.g. v5p-64, v5litepod-16, v6e-256"),
    ("zone", "string", None, "tpu_vm/xpk: the zone (e.g. us-east5-a)"),
    ("project", "string", None, "tpu_vm/xpk: the GCP project (default: gcloud's)"),
    ("runtime_version", "string", None, "tpu_vm: the TPU VM image (default: the type's usual one)"),
    ("spot", "bool", False, "tpu_vm: spot capacity (preemptible; points re-queue)"),
    ("reserved", "bool", False, "tpu_vm: the project's reservation (default: on-demand)"),
    ("num_slices", "integer", 1, "tpu_vm/xpk: slices per point (multislice over DCN)"),
    ("bucket", "string", None, "tpu_vm/xpk: gs://BUCKET[/PATH] for the points' workdirs and the code bundle"),
    ("max_parallel", "integer", 1, "tpu_vm/xpk: points running at a time"),
    ("name_prefix", "string", None, "tpu_vm/xpk: prefix of resource names and the alignax-study label "
                                    "(default: the study's name)"),
    ("pool", "bool", False, "tpu_vm: reuse max_parallel resources across points instead of one per point"),
    ("max_preemptions", "integer", 5, "tpu_vm/xpk: re-queues per point before it is marked failed"),
    ("max_hours", "float", None, "tpu_vm/xpk: stop a point after this many hours (bounds the chip-hours)"),
    ("poll_seconds", "float", 30.0, "tpu_vm/xpk: seconds between state polls"),
    ("active_timeout", "float", 6 * 3600.0, "tpu_vm: seconds a resource may wait to become ACTIVE"),
    ("ssh_batch_size", "integer", 64, "tpu_vm: workers ssh reaches at once (gcloud --batch-size)"),
    ("allow_dirty", "bool", False, "tpu_vm/xpk: ship uncommitted changes to tracked files"),
    ("yes", "bool", False, "tpu_vm/xpk: submit without asking for confirmation"),
    ("cluster", "string", None, "xpk: the GKE cluster"),
    ("docker_image", "string", None, "xpk: the image built from launch/Dockerfile"),
    ("max_restarts", "integer", 3, "xpk: JobSet restarts of a point in place (preemptions)"),
)


def define() -> None:
    """Defines --backend, --num_devices and every cloud backend's flags."""
    from absl import flags
    flags.DEFINE_enum("backend", "local", sorted(backends.BACKENDS), "where the runs execute")
    flags.DEFINE_integer("num_devices", None, "devices per run for validation (local: probed; cloud: from --tpu_type)")
    for name, kind, default, text in CLOUD_FLAGS:
        getattr(flags, f"DEFINE_{kind}")(name, default, text)


def options(values: Any) -> dict[str, Any]:
    """The backend options from parsed flags: a cloud flag is passed only when set away from its default,
    so the local backend never sees one (and `backends.get` refuses nothing it would ignore)."""
    chosen = {"num_devices": values.num_devices}
    for name, _, default, _ in CLOUD_FLAGS:
        value = getattr(values, name)
        if value != default:
            chosen[name] = value
    return chosen


def check_local(backend: str, chosen: dict[str, Any]) -> None:
    """A cloud flag given with --backend=local is a mistake worth naming (it would be ignored)."""
    from alignax.errors import ConfigError
    stray = sorted(k for k in chosen if k != "num_devices")
    if backend == "local" and stray:
        raise ConfigError(f"--{stray[0]} is a flag of the cloud backends; pass --backend=tpu_vm or --backend=xpk "
                          f"(or drop {', '.join('--' + s for s in stray)})")
