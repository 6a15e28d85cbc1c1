"""What the side-by-side benchmarks share: seeded torch weights, interleaved timing, XLA's figures.

Every benchmark times each variant once per round and repeats the rounds, so a busy machine slows
every side alike; ratios are taken between medians. Import this module *after* the benchmark has set
its environment, which must happen before jax and torch are imported: every benchmark sets
OMP_WAIT_POLICY=PASSIVE, because with OpenMP's default spin-waiting torch on a shared, oversubscribed CPU
measured 4.4x slower (11.6 s vs 2.5 s per step), which would flatter every ratio.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import torch


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Seeded noise in every param, norm scales around 1 (as the parity tests' reference models); kept here
    because benchmarks run from an installed package, where tests/ is not importable."""
    generator = torch.Generator().manual_seed(seed)
    norm_scales = {f"{name}.weight" for name, module in model.named_modules()
                   if isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm) or "RMSNorm" in type(module).__name__}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1.0 + noise if name in norm_scales else noise)
    return model.eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times of every step, one call of each per round."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    return times


def report_times(times: dict[str, list[float]]) -> dict[str, float]:
    """Prints one line per variant and returns the medians."""
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"time {name}: median={median[name] * 1e3:.1f} ms min={min(ts) * 1e3:.1f} ms "
              f"max={max(ts) * 1e3:.1f} ms n={len(ts)}")
    return median


def compiled_bytes(compiled) -> int:
    """What a compiled step allocates beyond its inputs: XLA's temp buffers plus its outputs (the gradients)."""
    memory = compiled.memory_analysis()
    return int(memory.temp_size_in_bytes + memory.output_size_in_bytes)


def run_child(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Runs `python -m module args` (a benchmark re-invoked for a figure that needs its own process) and
    returns the JSON object it prints last."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine_line() -> str:
    return (f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.device_count()} "
            f"torch {torch.__version__} threads={torch.get_num_threads()} "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} cpus={os.cpu_count()} load={os.getloadavg()}")


def op_profile(run: Callable[[], object], compiled, repeats: int = 3, top: int = 25) -> list[tuple[float, str, str]]:
    """Where a compiled step's time goes: a `jax.profiler` trace of `repeats` runs, summed per XLA op over the
    CPU worker threads (so on 2 threads the total is up to 2x the wall time), largest first, as
    (ms per run, op name, the op's fused computation in the optimised HLO, abridged)."""
    import collections
    import glob
    import tempfile

    run()
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(repeats):
                run()
        trace = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True))[-1])
        totals: collections.Counter = collections.Counter()
        for plane in trace.planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name:
                    continue
                for event in line.events:
                    if event.name != "ThunkExecutor::Execute":
                        totals[event.name] += event.duration_ns
    hlo = compiled.as_text()
    return [(ns / repeats / 1e6, name, _hlo_summary(hlo, name)) for name, ns in totals.most_common(top)]


def _hlo_summary(hlo: str, op: str) -> str:
    """The op's output shape and the source op it came from (XLA's metadata op_name), shortened."""
    import re

    line = next((ln for ln in hlo.splitlines() if re.match(rf"\s*(ROOT )?%?{re.escape(op)} = ", ln)), "")
    shape = re.search(r"= (\S+) ", line)
    source = re.search(r'op_name="([^"]*)"', line)
    where = source.group(1).replace("jit(", "").replace("MMDiT.", "") if source else ""
    return f"{shape.group(1) if shape else '?'} {where[-150:]}"
