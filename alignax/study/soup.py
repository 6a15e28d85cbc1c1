"""Rewarded soups: points on a front obtained without retraining, by interpolating finished runs' params.

`python -m alignax.soup --workdirs=A,B[,C...] [--lambdas=0,0.25,0.5,0.75,1 | --lambdas=simplex:N] --out=DIR
[--study_root=ROOT]` (console script `alignax-soup`).

Rewarded soups (Ramé et al., 2023; AlignProp's `evaluate_soup` mixes two checkpoints the same way): fine-tune
once per reward (or weight vector), then mix the weights θ = Σ_i λ_i θ_i for mixing weights λ on the simplex.
With two endpoints `--lambdas` lists λ, the weight of B: θ = (1 − λ)·θ_A + λ·θ_B; `simplex:N` is the
simplex lattice with N values per weight for any number of endpoints (the study's weight grids).

- **Full fine-tunes**: every trainable leaf is mixed (the MM-DiT and any objective heads), in fp32, summing
  only the endpoints with λ_i ≠ 0, so λ = 0 and λ = 1 reproduce an endpoint bit for bit.
- **LoRA runs**: the *deltas* are mixed, not A and B one by one (that would mix bilinearly): Σ λ_i·s·A_i B_i
  is exactly the adapter with A = [A_1 … A_n] and B = [λ_1 B_1; … ; λ_n B_n] of rank n·r (alpha scaled by n,
  so alpha / rank stays s). A soup at a vertex (one λ_i = 1) is that endpoint's adapter unchanged.
- EMA weights (when the runs kept them) are mixed the same way, so `evaluate --ema` on a soup reads the mix
  of the EMAs.

Endpoints must be the same arm shape: the same trainable tree (a mismatch is a ConfigError naming the first
differing param path and both workdirs), the same model, LoRA settings and, when a frozen part is drawn
from the seed (a random-init VAE or LoRA base), the same seed. Each mix is written as a workdir that looks
like a finished run, `DIR/<name>/`: `checkpoints/<step>/` (the first endpoint's step; its config, with the
LoRA rank and alpha of the concatenated adapter, is the soup's config), a fresh optimiser state (a run
resumed from a soup starts its moments at zero), `status.json` finished, and `soup.json` recording the
endpoints (workdir, step, weights) and λ. `alignax.saved_run`, `alignax.evaluate` and `alignax.export`
read it like any run. With `--study_root=ROOT` (default: the endpoints' directory when it holds a
study.json) each soup is also evaluated like a study point (objective 'soup', its weights the λ-mix of
the endpoints' weights, its cost the sum of the endpoints' training costs) into `ROOT/<name>/eval.json`,
and the report is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignax import fs, saved_run
from alignax.errors import ConfigError

log = logging.getLogger("alignax")
PyTree = Any
SOUP_JSON = "soup.json"
OBJECTIVE = "soup"
REASON = "a rewarded soup: interpolated params of finished runs, not trained"
# Config fields the endpoints must share: what their params mean and what the frozen parts are.
SAME_FIELDS = ("model", "lora.enabled", "lora.targets", "lora.rank", "ema.enabled")


@dataclasses.dataclass(frozen=True)
class Soup:
    """One written mix: its workdir, name and mixing weights (one per endpoint)."""

    name: str
    workdir: str
    lambdas: tuple[float, ...]


# ---- the grid -----------------------------------------------------------------------------------------

def mixing_grid(spec: str | Sequence[float], num_endpoints: int) -> tuple[tuple[float, ...], ...]:
    """The mixing vectors (one weight per endpoint, summing to 1) `--lambdas` names.

    A list of numbers in [0, 1] (two endpoints only: λ is B's weight), or 'simplex:N' (any number of
    endpoints). ConfigError naming --lambdas otherwise."""
    from alignax.study.weights import DECIMALS, resolve_grid
    if num_endpoints < 2:
        raise ConfigError(f"--workdirs: a soup mixes at least 2 finished runs, got {num_endpoints}")
    if isinstance(spec, str) and spec.strip().startswith(("simplex:", "dirichlet:")):
        grid = resolve_grid(spec.strip(), num_endpoints, "--lambdas")
        return tuple(tuple(w / sum(row) for w in row) for row in grid)
    values = [v for v in spec.split(",") if v.strip()] if isinstance(spec, str) else list(spec)
    try:
        lambdas = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--lambdas={spec!r}: expected numbers in [0, 1] or 'simplex:N' ({e})") from e
    if num_endpoints != 2:
        raise ConfigError(f"--lambdas={spec!r}: a list of λ mixes exactly 2 runs; for {num_endpoints} runs "
                          "give --lambdas=simplex:N")
    if not lambdas or any(not (0.0 <= v <= 1.0) for v in lambdas):
        raise ConfigError(f"--lambdas={spec!r}: expected one or more numbers in [0, 1] (the weight of the "
                          "second run)")
    out = []
    for v in lambdas:
        v = round(v, DECIMALS)
        row = (1.0 - v, v)
        if row not in out:
            out.append(row)
    return tuple(out)


def soup_name(workdirs: Sequence[str], lambdas: Sequence[float]) -> str:
    """`soup__<A>+<B>__l-0.75-0.25`: the endpoints' directory names and the mixing weights."""
    from alignax.study.weights import format_weight
    ends = "+".join(posixpath.basename(fs.absolute(w).rstrip("/")) for w in workdirs)
    return f"soup__{ends}__l-" + "-".join(format_weight(v) for v in lambdas)


# ---- checks -------------------------------------------------------------------------------------------

def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaves(tree: PyTree) -> dict[str, Any]:
    return {_path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_same_tree(a: PyTree, b: PyTree, where_a: str, where_b: str, what: str = "trainable") -> None:
    """ConfigError naming the first param path where two trees differ (missing, or another shape/dtype)."""
    la, lb = _leaves(a), _leaves(b)
    for path in sorted(la.keys() | lb.keys()):
        x, y = la.get(path), lb.get(path)
        sx = None if x is None else (tuple(x.shape), str(x.dtype))
        sy = None if y is None else (tuple(y.shape), str(y.dtype))
        if sx != sy:
            show = lambda s: "absent" if s is None else f"shape {s[0]} {s[1]}"  # noqa: E731
            raise ConfigError(f"soup: the {what} params differ at {path!r}: {show(sx)} in --workdirs={where_a}, "
                              f"{show(sy)} in {where_b}; a soup mixes runs of the same arm shape")


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


def _seed_draws_frozen(config: ml_collections.ConfigDict) -> bool:
    """Whether a frozen part is drawn from the seed (a random-init VAE or LoRA base)."""
    from alignax.models import setup as model_setup
    t_src, _, v_src, _ = model_setup.build_modules(config.model)
    return v_src.directory is None or (bool(config.lora.enabled) and t_src.directory is None)


def _has_ema(runs: Sequence[saved_run.SavedRun]) -> bool:
    return all(bool(r.config.ema.enabled) and jax.tree.leaves(r.state.get("ema", {})) for r in runs)


def check_endpoints(runs: Sequence[saved_run.SavedRun]) -> None:
    """The runs can be mixed: same config shape, same trainable (and EMA) tree; ConfigError otherwise."""
    first = runs[0]
    for run in runs[1:]:
        for field in SAME_FIELDS:
            if _lookup(first.config, field) != _lookup(run.config, field):
                raise ConfigError(f"soup: config.{field} differs: {_lookup(first.config, field)!r} in "
                                  f"--workdirs={first.workdir}, {_lookup(run.config, field)!r} in {run.workdir}; "
                                  "a soup mixes runs of the same model")
        if _seed_draws_frozen(first.config) and first.config.seed != run.config.seed:
            raise ConfigError(f"soup: config.seed differs ({first.config.seed} in --workdirs={first.workdir}, "
                              f"{run.config.seed} in {run.workdir}) and the seed draws a frozen part of the model "
                              "(a random-init VAE or LoRA base), so the runs do not share it")
        check_same_tree(first.state["trainable"], run.state["trainable"], first.workdir, run.workdir)
        if _has_ema(runs):
            check_same_tree(first.state["ema"], run.state["ema"], first.workdir, run.workdir, "EMA")


# ---- mixing -------------------------------------------------------------------------------------------

def mix_trees(trees: Sequence[PyTree], lambdas: Sequence[float]) -> PyTree:
    """Σ_i λ_i·tree_i leaf by leaf, in fp32 and back to each leaf's dtype, over the λ_i ≠ 0 only (so a
    vertex returns its endpoint bit for bit); integer leaves are taken from the first endpoint."""
    active = [(float(lam), tree) for lam, tree in zip(lambdas, trees, strict=True) if lam != 0]

    def mix(*leaves):
        first = np.asarray(leaves[0])
        if not np.issubdtype(first.dtype, np.inexact):
            return first
        total = None
        for (lam, _), leaf in zip(active, leaves, strict=True):
            term = np.asarray(leaf, np.float32) * np.float32(lam)
            total = term if total is None else total + term
        return total.astype(first.dtype)

    return jax.tree.map(mix, *[tree for _, tree in active])


def _is_lora_module(node: Any) -> bool:
    return isinstance(node, Mapping) and "lora_A" in node and "lora_B" in node


def mix_lora(trees: Sequence[PyTree], lambdas: Sequence[float]) -> tuple[PyTree, int]:
    """LoRA trainables mixed by their deltas (module docstring): ([A_i], [λ_i B_i]) over the λ_i ≠ 0,
    other leaves (heads) mixed linearly; returns (tree, number of adapters concatenated)."""
    active = [(float(lam), tree) for lam, tree in zip(lambdas, trees, strict=True) if lam != 0]
    if len(active) == 1:
        return jax.tree.map(np.asarray, active[0][1]), 1

    def walk(nodes: list[Any]) -> Any:
        if _is_lora_module(nodes[0]):
            a = np.concatenate([np.asarray(n["lora_A"]) for n in nodes], axis=1)
            b = np.concatenate([(np.asarray(n["lora_B"], np.float32) * np.float32(lam)).astype(n["lora_B"].dtype)
                                for (lam, _), n in zip(active, nodes, strict=True)], axis=0)
            return {**{k: v for k, v in nodes[0].items() if k not in ("lora_A", "lora_B")},
                    "lora_A": a, "lora_B": b}
        if isinstance(nodes[0], Mapping):
            return {k: walk([n[k] for n in nodes]) for k in nodes[0]}
        return mix_trees(nodes, [lam for lam, _ in active])

    return walk([tree for _, tree in active]), len(active)


# ---- writing ------------------------------------------------------------------------------------------

def _endpoint_weights(run: saved_run.SavedRun, study_points: Mapping[str, Any]) -> dict[str, float]:
    """The endpoint's weight vector: its study.json record's, else its config.pareto.weights."""
    record = study_points.get(fs.absolute(run.workdir).rstrip("/"))
    weights = (record or {}).get("weights")
    if not weights:
        weights = _lookup(run.config, "pareto.weights") or {}
    return {str(k): float(v) for k, v in dict(weights).items()} if isinstance(weights, Mapping) else {}


def write_soup(runs: Sequence[saved_run.SavedRun], lambdas: Sequence[float], out: str, *,
               weights: Sequence[Mapping[str, float]] = ()) -> Soup:
    """Writes the mix of `runs` at `lambdas` as a finished-run workdir `out` (see the module docstring)."""
    from alignax.training import checkpoint as checkpoint_lib
    from alignax.training import metrics, optim

    first = runs[0]
    config = ml_collections.ConfigDict(first.config.to_dict())
    lora = bool(config.lora.enabled)
    ema = _has_ema(runs)
    parts = ["trainable"] + (["ema"] if ema else [])
    mixed, copies = {}, 1
    for part in parts:
        trees = [jax.device_get(r.state[part]) for r in runs]
        if lora:
            mixed[part], copies = mix_lora(trees, lambdas)
        else:
            mixed[part] = mix_trees(trees, lambdas)
    if lora and copies > 1:
        config.lora.rank = int(config.lora.rank) * copies
        config.lora.alpha = float(config.lora.alpha) * copies
    trainable = jax.tree.map(jnp.asarray, mixed["trainable"])
    tx, _ = optim.make_optimizer(config.optim, trainable, config.total_steps)
    state = {**first.state, "trainable": trainable, "opt_state": tx.init(trainable),
             "ema": jax.tree.map(jnp.asarray, mixed["ema"]) if ema else first.state.get("ema", {})}
    bad = checkpoint_lib.nonfinite_parts(state)
    if bad:
        raise ConfigError(f"soup {out}: the mix holds non-finite values in {bad}; an endpoint is damaged")
    name = posixpath.basename(fs.absolute(out).rstrip("/"))
    checkpointer = checkpoint_lib.Checkpointer(out, keep=1, async_save=False)
    try:
        checkpointer.save(first.step, state, config.to_dict())
        checkpointer.wait()
    finally:
        checkpointer.close()
    record = {"name": name, "objective": OBJECTIVE, "mode": "lora_delta" if lora else "params", "ema": ema,
              "lambdas": [float(v) for v in lambdas], "step": first.step,
              "endpoints": [{"workdir": fs.absolute(r.workdir), "step": r.step,
                             "weights": dict(weights[i]) if i < len(weights) else {}} for i, r in enumerate(runs)]}
    if lora:
        record["lora"] = {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha)}
    metrics.write_status(out, "finished", first.step, int(config.total_steps), REASON)
    fs.write_text_atomic(fs.join(out, SOUP_JSON), json.dumps(record, indent=2) + "\n")  # last: marks it complete
    return Soup(name, fs.absolute(out), tuple(float(v) for v in lambdas))


def _study_points(study_root: str | None) -> tuple[dict | None, dict[str, Any]]:
    if not study_root:
        return None, {}
    path = fs.join(study_root, "study.json")
    if not fs.exists(path):
        raise ConfigError(f"--study_root={study_root}: no study.json there (run alignax.study first)")
    try:
        study = json.loads(fs.read_text(path))
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from e
    points = {fs.absolute(str(p.get("workdir"))).rstrip("/"): p for p in study.get("points", []) if p.get("workdir")}
    return study, points


def default_study_root(workdirs: Sequence[str]) -> str | None:
    """The endpoints' common parent when it holds a study.json (they are points of that study)."""
    parents = {posixpath.dirname(fs.absolute(w).rstrip("/")) for w in workdirs}
    if len(parents) == 1:
        parent = parents.pop()
        if fs.exists(fs.join(parent, "study.json")):
            return parent
    return None


def make_soups(workdirs: Sequence[str], lambdas: str | Sequence[float], out: str, *,
               study_root: str | None = None, evaluate: bool = True) -> list[Soup]:
    """The whole command: checks every input, then writes (and evaluates) each mix; existing soups are kept."""
    grid = mixing_grid(lambdas, len(workdirs))  # before any checkpoint is opened
    study, study_points = _study_points(study_root)
    runs = [saved_run.load(w) for w in workdirs]
    check_endpoints(runs)
    weights = [_endpoint_weights(r, study_points) for r in runs]
    soups = []
    for mix in grid:
        name = soup_name(workdirs, mix)
        target = fs.join(out, name)
        if fs.exists(fs.join(target, SOUP_JSON)):
            log.info("soup %s exists; kept", target)
            soup = Soup(name, fs.absolute(target), mix)
        else:
            soup = write_soup(runs, mix, target, weights=weights)
        soups.append(soup)
    if study is not None and evaluate:
        evaluate_soups(study, soups, runs, weights, study_root)
    return soups


def soup_weights(endpoint_weights: Sequence[Mapping[str, float]], mix: Sequence[float]) -> dict[str, float]:
    """The λ-mix of the endpoints' weight vectors: where a soup sits in weight space."""
    names = sorted({n for w in endpoint_weights for n in w})
    return {n: float(sum(lam * w.get(n, 0.0) for lam, w in zip(mix, endpoint_weights, strict=True))) for n in names}


def endpoints_cost(runs: Sequence[saved_run.SavedRun]) -> dict[str, Any]:
    """A soup's cost: the sum of its endpoints' training costs (a field is None when one endpoint lacks it);
    the mix itself costs no training."""
    from alignax.study import evaluation
    costs = [evaluation.run_cost(r.workdir, r.config, r.step) for r in runs]
    total: dict[str, Any] = {}
    for key in costs[0]:
        values = [c.get(key) for c in costs]
        total[key] = None if any(v is None for v in values) else sum(values)
    return total


def evaluate_soups(study: Mapping[str, Any], soups: Sequence[Soup], runs: Sequence[saved_run.SavedRun],
                   endpoint_weights: Sequence[Mapping[str, float]], root: str) -> None:
    """Each soup evaluated like a study point into ROOT/<name>/eval.json (objective 'soup', its cost the
    endpoints' summed, `soup` = its endpoints and λ), then the report rebuilt."""
    from alignax.study import evaluation, report
    rewards, judges, num_prompts, seeds, batch_size = evaluation._settings(study)
    cost = endpoints_cost(runs)
    for soup in soups:
        point = {"name": soup.name, "arm": OBJECTIVE, "objective": OBJECTIVE, "state": "finished",
                 "workdir": soup.workdir, "weights": soup_weights(endpoint_weights, soup.lambdas)}
        result = evaluation.evaluate_point(point, root, source=soup.workdir, rewards=rewards, judges=judges,
                                           num_prompts=num_prompts, seeds=seeds, batch_size=batch_size)
        if result is not None:
            result["cost"] = cost
            result["soup"] = {"endpoints": [fs.absolute(r.workdir) for r in runs], "lambdas": list(soup.lambdas)}
            fs.write_text_atomic(fs.join(root, soup.name, evaluation.EVAL_JSON), json.dumps(result, indent=2) + "\n")
    report.write_report(root)


# ---- the CLI ------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    from absl import flags
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    workdirs = [w.strip() for w in f.workdirs.split(",") if w.strip()]
    root = f.study_root if f.study_root is not None else default_study_root(workdirs)
    soups = make_soups(workdirs, f.lambdas, f.out, study_root=root or None, evaluate=f.evaluate)
    evaluated = f" and evaluated them into {root}/<soup>/eval.json" if root and f.evaluate else ""
    print(f"wrote {len(soups)} soups of {len(workdirs)} runs to {fs.absolute(f.out)}{evaluated}", file=sys.stdout)
    return 0


def cli() -> None:
    """`alignax-soup` / `python -m alignax.soup`: flags defined here, not at import."""
    from absl import flags

    from alignax import cli as cli_lib

    flags.DEFINE_string("workdirs", None, "comma-separated finished runs to mix (2 or more, same arm shape)")
    flags.DEFINE_string("lambdas", "simplex:5", "two runs: λ values in [0, 1], the second run's weight "
                        "(e.g. 0,0.25,0.5,0.75,1); any number: simplex:N")
    flags.DEFINE_string("out", None, "directory that receives one workdir per mix")
    flags.DEFINE_string("study_root", None, "evaluate each soup like a point of this study (ROOT/<soup>/eval.json) "
                        "and rebuild its report; default: the runs' directory if it holds study.json; '' for none")
    flags.DEFINE_bool("evaluate", True, "with a study root, evaluate the soups and rebuild the report")
    flags.mark_flags_as_required(["workdirs", "out"])
    cli_lib.run_main(main)


if __name__ == "__main__":
    cli()
