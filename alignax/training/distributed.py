"""Multi-host start-up: `jax.distributed.initialize()` once, from the entry point only."""

from __future__ import annotations

import os

import jax

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def _on_tpu_vm() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"))


def initialize(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """'off' skips; 'on' always initialises; 'auto' does on TPU VMs (where JAX finds the cluster
    itself) or when a coordinator address is given. On CPU the cross-process collectives use gloo."""
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    if mode == "off" or (mode == "auto" and not (_on_tpu_vm() or coordinator_address)):
        return False
    if not _on_tpu_vm():  # do not touch backends before initialize()
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
