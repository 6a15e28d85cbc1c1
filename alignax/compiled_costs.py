"""What a compiled XLA program costs per device: matmul FLOPs and the bytes its collectives move.

`cost_analysis()` counts a loop body once, not once per trip (a scan of 1 and of 10 matmuls report the same
FLOPs), and says nothing about collectives. Every sampler-based objective loops over its sampler steps, so
its cost-analysis FLOPs are too small by up to the number of steps. The optimised HLO text has what is
missing: each instruction's computation, and each while loop's `known_trip_count`. Here the dots and
convolutions (the FLOPs that matter) and the collectives are counted from it, each times the number of
times its computation runs. Loops whose trip count is only known at run time (ReFL's traced stop step)
count once.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def shape_bytes(text: str) -> int:
    """Bytes of an HLO shape string, e.g. `bf16[24,1536]{1,0}` or a tuple `(f32[2], f32[3])`."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
        total += DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(line: str, default: int) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    return len(explicit.group(1).split(",")) if explicit else default


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO computation name -> its instruction lines."""
    out, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            out[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            out[name].append(line)
    return out


def call_multiplicity(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per execution: summed over its call sites, a while body
    times its loop's known trip count (1 when unknown), a conditional branch as if taken."""
    callers: dict[str, list[tuple[str, int]]] = {}
    for name, lines in comps.items():
        for line in lines:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for callee in re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line):
                factor = int(trips.group(1)) if trips and " while(" in line else 1
                callers.setdefault(callee, []).append((name, factor))
            for callee in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for c in re.findall(r"%?([\w.\-]+)", callee):
                    callers.setdefault(c, []).append((name, 1))

    memo: dict[str, int] = {}

    def times(name: str, depth: int = 0) -> int:
        if name in memo:
            return memo[name]
        if name not in callers or depth > 50:
            memo[name] = 1
            return 1
        memo[name] = sum(factor * times(caller, depth + 1) for caller, factor in callers[name])
        return memo[name]

    return {name: times(name) for name in comps}


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\w+)\[([\d,]*)\]")
_OPERAND = r"(?:\w+\[[\d,]*\]\S*\s)?%?([\w.\-]+)"
_MATMUL = re.compile(rf"\s*(?:ROOT )?%?[\w.\-]+ = \w+\[([\d,]*)\]\S* (dot|convolution)\({_OPERAND}, {_OPERAND}[,)]")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def matmul_flops(hlo: str) -> float:
    """FLOPs of every dot and convolution (2 per multiply-add) times the runs of its computation."""
    comps = computations(hlo)
    runs = call_multiplicity(comps)
    total = 0.0
    for name, lines in comps.items():
        shapes = {m.group(1): _dims(m.group(2)) for m in map(_INSTRUCTION.match, lines) if m}
        for line in lines:
            m = _MATMUL.match(line)
            if not m:
                continue
            out, kind, lhs, rhs = _dims(m.group(1)), m.group(2), shapes.get(m.group(3)), shapes.get(m.group(4))
            if lhs is None or rhs is None:
                continue
            if kind == "dot":
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                reduced = math.prod(lhs[i] for i in _dims(contracting.group(1))) if contracting else 1
            else:  # the kernel's size over its output-feature axis: window x input features / groups
                labels = re.search(r"dim_labels=\w+_(\w+)->", line)
                out_features = rhs[labels.group(1).index("o")] if labels else 1
                reduced = math.prod(rhs) // max(out_features, 1)
            total += 2.0 * math.prod(out) * reduced * runs.get(name, 1)
    return total


def collective_bytes(hlo: str, devices: int) -> dict[str, float]:
    """Bytes each device sends per step, by collective kind (ring algorithms; loops counted by trip count)."""
    comps = computations(hlo)
    runs = call_multiplicity(comps)
    sent: dict[str, float] = {}
    for name, lines in comps.items():
        for line in lines:
            kind = next((k for k in COLLECTIVES if re.search(rf"\s{k}(-start)?\(", line)), None)
            if kind is None:
                continue
            shape = re.search(r"= (\(.*?\)|\S+) " + kind, line)
            size = shape_bytes(shape.group(1)) if shape else 0
            n = group_size(line, devices)
            if n <= 1:
                continue
            if kind == "all-gather":          # output is the gathered array
                moved = size * (n - 1) / n
            elif kind == "reduce-scatter":    # output is one shard
                moved = size * (n - 1)
            elif kind == "all-reduce":
                moved = 2 * size * (n - 1) / n
            else:
                moved = size
            sent[kind] = sent.get(kind, 0.0) + moved * runs.get(name, 1)
    return sent


def cost(compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return {"flops": float(analysis.get("flops", 0.0)), "bytes": float(analysis.get("bytes accessed", 0.0))}


