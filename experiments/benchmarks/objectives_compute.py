"""Reward gain per unit of compute: Flow-GRPO (and its fast variant) against reward backprop (DRaFT-K, full,
ReFL), on the tiny world, each trained to the same XLA-counted FLOP budget.

    python -m experiments.benchmarks.objectives_compute [--budget_steps=24] [--learning_rate=0.01]

Every arm starts from the same random tiny MM-DiT (seed 0), trains on the red share of the image (weights
red=1, blue=0) with the same optimiser, and is scored before and after on fixed held-out noise and eval
prompts by the mean red share. The budget is `--budget_steps` steps of DRaFT-K; each arm gets as many steps as
fit in it by its compiled train step's FLOPs (`compile/flops`). Printed per arm: steps, FLOPs, the compiled
steps' wall time, the held-out gain, gain per PFLOP and per second. The last line is
`best_per_flop=<arm> grpo_over_draftk=<gain per FLOP of grpo ÷ that of draft_k> grpo_over_draftk_per_second=<x>`.

Caveat, measured here: XLA's cost analysis counts the body of a loop (`lax.scan`, `fori_loop`) once, not once
per trip, so every sampler-based objective's "FLOPs" is an undercount (by up to the number of sampler steps in
the loop). All five arms loop over the same 4 steps, so the budgets stay roughly comparable; the wall time of
the compiled steps is the second, independent cost axis, and both ratios are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from alignax import mesh as mesh_lib
from alignax import sampling
from alignax.study.evaluation import run_cost
from alignax.training.trainer import Trainer, compiled_statistics

ARMS = {  # name: (config module, option string)
    "grpo": ("grpo_tiny", ""),
    "grpo_fast": ("grpo_tiny", "fast"),
    "draft_k": ("reward_backprop_tiny", "draft_k"),
    "full": ("reward_backprop_tiny", "full"),
    "refl": ("reward_backprop_tiny", "refl"),
}


def make_trainer(arm: str, workdir: Path, world: str, steps: int, learning_rate: float) -> Trainer:
    import importlib
    module, options = ARMS[arm]
    c = importlib.import_module(f"experiments.configs.{module}").get_config(options)
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = steps, 1, 10 ** 6, 0
    c.data.generate, c.data.path = "", world
    c.pareto.weights.red, c.pareto.weights.blue = 1.0, 0.0
    c.optim.learning_rate = learning_rate
    c.mesh.shape = (1, 1, 1)
    return Trainer(c, workdir, mesh=mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]), async_checkpoints=False)


def held_out_red(trainer: Trainer, trainable) -> float:
    """Mean red share of images sampled (ODE, config.sample) from fixed noise for the eval prompts."""
    loader = trainer.make_loader(split=trainer.config.data.eval_split)
    batch = trainer.device_batch(loader.batch_at(0))
    models, frozen = trainer.models, trainer.frozen
    _, sigmas = sampling.flow_match_sigmas(trainer.config.sample.num_steps, trainer.config.sample.shift)

    @jax.jit
    def score(trainable):
        params = models.transformer_params(trainable, frozen)
        noise = jax.random.normal(jax.random.key(987), models.latent_shape(batch["pooled_projections"].shape[0]))
        x = sampling.denoise(models.velocity_fn(params), noise, sigmas, batch["encoder_hidden_states"],
                             batch["pooled_projections"])
        return jnp.mean(models.rewards["red"].apply(frozen["rewards"]["red"], models.decode(frozen, x), batch)[0])

    return float(score(trainable))


def flops_per_step(trainer: Trainer) -> float:
    example = trainer.device_batch(trainer.make_loader().batch_at(0))
    return compiled_statistics(trainer.compile(example))["flops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_steps", type=int, default=24, help="the budget: this many DRaFT-K steps' FLOPs")
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    args = parser.parse_args()
    from alignax.data.tiny_world import build_tiny_world
    root = Path(tempfile.mkdtemp(prefix="objectives_compute_"))
    world = build_tiny_world(root / "world").root
    per_step = {arm: flops_per_step(make_trainer(arm, root / f"probe_{arm}", world, 1, args.learning_rate))
                for arm in ARMS}
    budget = per_step["draft_k"] * args.budget_steps
    print(f"budget: {args.budget_steps} draft_k steps = {budget:.4g} FLOPs (XLA count of the compiled train step)")
    print(f"{'arm':10s} {'steps':>5s} {'FLOPs':>10s} {'seconds':>8s} {'gain':>9s} {'gain/PFLOP':>11s} {'gain/s':>9s}")
    results, per_second = {}, {}
    for arm in ARMS:
        steps = max(1, int(round(budget / per_step[arm])))
        trainer = make_trainer(arm, root / arm, world, steps, args.learning_rate)
        before = held_out_red(trainer, trainer.initial_state()["trainable"])
        after = held_out_red(trainer, trainer.run().state["trainable"])
        cost = run_cost(str(root / arm), trainer.config, steps)
        flops, seconds, gain = per_step[arm] * steps, cost["train_seconds"] or float("nan"), after - before
        results[arm], per_second[arm] = gain / flops, gain / seconds
        print(f"{arm:10s} {steps:5d} {flops:10.4g} {seconds:8.2f} {gain:+9.4f} {gain / flops * 1e15:11.4g} "
              f"{gain / seconds:9.4f}")
    best = max(results, key=results.get)
    ratio = results["grpo"] / results["draft_k"] if results["draft_k"] else float("nan")
    ratio_seconds = per_second["grpo"] / per_second["draft_k"] if per_second["draft_k"] else float("nan")
    print(f"wrote nothing; the runs are in {root}")
    print(f"best_per_flop={best} grpo_over_draftk={ratio:.3g} grpo_over_draftk_per_second={ratio_seconds:.3g}")


if __name__ == "__main__":
    main()
