"""Reward backprop: XLA compiled temp memory versus sampler steps, per mode, and step-time ratios.

    python -m experiments.benchmarks.reward_backprop_memory [--steps=2,10,20] [--time_steps=10] [--batch=2]

For each mode and number of steps, the gradient of the reward_backprop loss w.r.t. the MM-DiT
params is lowered and compiled, and `memory_analysis().temp_size_in_bytes` is read: the
activation memory XLA plans for the backward pass. Modes: full with per-step remat, full
without remat, draft_k (k=2), random_k (k_max=2), draft_lv (n=2), refl (last quarter). Then each
mode's compiled step runs at `--time_steps` steps and the median wall time is given relative to
full+remat. Tiny random models (the config defaults) on whatever backend JAX finds.
The last line is `memory_ratio_20_over_2=<x>` for full backprop with remat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections

from alignax import config as config_lib
from alignax import objectives
from alignax.models import init_params
from alignax.models import setup as model_setup
from alignax.rewards import setup as reward_setup

MODES = {
    "full+remat": dict(mode="full", remat="full"),
    "full,no remat": dict(mode="full", remat="none"),
    "draft_k(k=2)": dict(mode="draft_k", k=2),
    "random_k(k_max=2)": dict(mode="random_k", k_max=2),
    "draft_lv(n=2)": dict(mode="draft_lv", lv_n=2),
    "refl": dict(mode="refl"),
}


def build_world(batch: int):
    c = config_lib.base_config()
    c.rewards = ml_collections.ConfigDict(dict(brightness={}))
    c.pareto.weights = ml_collections.ConfigDict(dict(brightness=1.0))
    t_src, transformer, v_src, vae = model_setup.build_modules(c.model)
    fast = model_setup.run_once_compiler_options()
    init = lambda src, module, seed: jax.jit(lambda k: init_params(src.architecture, module, k)).lower(  # noqa: E731
        jax.random.key(seed)).compile(compiler_options=fast)(jax.random.key(seed))
    params, vae_params = init(t_src, transformer, 1), init(v_src, vae, 2)
    frozen = {"vae": vae_params, "rewards": {"brightness": {}}}
    data = {"encoder_hidden_states": jax.random.normal(jax.random.key(3), (batch, 5, 16)),
            "pooled_projections": jax.random.normal(jax.random.key(4), (batch, 16))}
    return c, transformer, vae, params, frozen, data


def compile_grad(c, transformer, vae, params, frozen, data, num_steps, fields):
    sample = ml_collections.ConfigDict(dict(c.sample.to_dict(), num_steps=num_steps))
    scale, shift = model_setup.vae_scaling(vae)
    models = objectives.Models(transformer, vae, scale, shift, rewards=reward_setup.build(c.rewards))
    run = objectives.RunSettings.from_config(ml_collections.ConfigDict(dict(c.to_dict(), sample=sample)))
    objective = objectives.build(ml_collections.ConfigDict(dict(name="reward_backprop", **fields)), models, run)
    state = objective.init_state({}, frozen)

    def grad_fn(params, rng):
        return jax.grad(lambda p: objective.loss({"transformer": p}, frozen, state, data, rng)[0])(params)

    return jax.jit(grad_fn).lower(params, jax.random.key(0)).compile()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="2,10,20")
    parser.add_argument("--time_steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per mode; 0 skips the timing")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    if 2 not in steps or 20 not in steps:
        raise SystemExit("--steps must include 2 and 20 (the summary ratio)")
    world = build_world(args.batch)
    print(f"backend={jax.default_backend()} batch={args.batch} (tiny MM-DiT + VAE, brightness reward)")
    memory, compiled_at = {}, {}
    for name, fields in MODES.items():
        for n in steps:
            compiled = compile_grad(*world, n, fields)
            memory[name, n] = compiled.memory_analysis().temp_size_in_bytes
            if n == args.time_steps:
                compiled_at[name] = compiled
        if args.time_steps not in steps:  # timed at a step count outside the memory table
            compiled_at[name] = compile_grad(*world, args.time_steps, fields)
    header = "mode".ljust(20) + "".join(f"{n:>12d}" for n in steps) + f"{'20/2':>10}"
    print("compiled temp memory (bytes) vs sampler steps")
    print(header)
    for name in MODES:
        row = "".join(f"{memory[name, n]:>12d}" for n in steps)
        print(name.ljust(20) + row + f"{memory[name, 20] / memory[name, 2]:>10.2f}")

    if args.repeats > 0:
        params, rng = world[3], jax.random.key(0)
        times = {}
        for name, compiled in compiled_at.items():
            jax.block_until_ready(compiled(params, rng))
            samples = []
            for i in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, jax.random.fold_in(rng, i)))
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples)
        print(f"step time at {args.time_steps} steps (median of {args.repeats}), ratio to full+remat")
        for name, t in times.items():
            print(f"{name.ljust(20)}{t * 1e3:>10.1f} ms{t / times['full+remat']:>8.2f}x")
    print(f"memory_ratio_20_over_2={memory['full+remat', 20] / memory['full+remat', 2]:.3f}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
