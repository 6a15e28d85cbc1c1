"""TPU accelerator types (`v5p-64`, `v5litepod-16`, `v6e-256`, ...): chips, hosts and JAX devices per slice.

The number after the dash counts TensorCores for v4, v5p and TPU7x (two per chip, one JAX device per
chip) and chips for v5e and v6e. Hosts carry 4 chips, except single-host v5e/v6e slices of up to 8.
"""

from __future__ import annotations

import dataclasses
import re

from alignax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    counts: str             # 'cores' | 'chips': what the number in the type counts
    runtime_version: str    # the TPU VM image a queued resource asks for by default ('' = GKE only)
    single_host_chips: int  # the largest slice on one host


FAMILIES = {
    "v4": Family("cores", "tpu-ubuntu2204-base", 4),
    "v5p": Family("cores", "v2-alpha-tpuv5", 4),
    "v5litepod": Family("chips", "v2-alpha-tpuv5-lite", 8),
    "v6e": Family("chips", "v2-alpha-tpuv6e", 8),
    "tpu7x": Family("cores", "", 4),   # TPU7x (Ironwood): GKE only here (--backend=xpk)
}


@dataclasses.dataclass(frozen=True)
class TpuType:
    name: str
    family: str
    chips: int    # per slice

    @property
    def hosts(self) -> int:
        return 1 if self.chips <= FAMILIES[self.family].single_host_chips else self.chips // 4

    @property
    def devices(self) -> int:
        """JAX devices per slice (one per chip on every family here)."""
        return self.chips

    @property
    def runtime_version(self) -> str:
        return FAMILIES[self.family].runtime_version


def parse(name: str, flag: str = "--tpu_type") -> TpuType:
    """`v5p-64` → TpuType(chips=32); ConfigError naming the flag and the known families."""
    match = re.fullmatch(r"([a-z0-9]+?)-(\d+)", name or "")
    if not match or match.group(1) not in FAMILIES:
        raise ConfigError(f"{flag}={name!r}: expected FAMILY-SIZE with FAMILY one of {sorted(FAMILIES)} "
                          f"(e.g. v5p-64, v5litepod-16, v6e-256)")
    family, size = match.group(1), int(match.group(2))
    per_chip = 2 if FAMILIES[family].counts == "cores" else 1
    if size < per_chip or size % per_chip:
        raise ConfigError(f"{flag}={name!r}: {family} sizes count TensorCores, two per chip; expected an even size")
    return TpuType(name, family, size // per_chip)
