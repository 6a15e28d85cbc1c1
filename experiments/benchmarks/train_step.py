"""One SFT forward+backward of a ~20M-param MM-DiT: alignax (jitted) vs diffusers in PyTorch eager.

    python -m experiments.benchmarks.train_step [--layers 4] [--repeats 9] [--attention xla,einsum]

Both sides get the same weights (a randomised diffusers model saved and loaded through
`load_diffusers`) and the same batch, noise and timesteps, and compute the rectified-flow
loss: x_t = (1 - t) x0 + t * noise, target noise - x0, MSE. Timings are interleaved
(alignax, torch, GEMM peak, alignax, ...) and reported as medians, so a busy shared machine
slows every side alike. Results and what was tried: docs/performance.md.

Last line: `speedup_vs_torch=<x> flops_fraction=<y> fsdp_bytes_ratio=<z>`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (why: common.py)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from alignax import compiled_costs  # noqa: E402
from alignax import mesh as mesh_lib  # noqa: E402
from alignax.models import attention, load_diffusers  # noqa: E402
from alignax.objectives import flow_matching  # noqa: E402
from alignax.training import train_state  # noqa: E402
from experiments.benchmarks import common  # noqa: E402

BATCH = 4
TEXT_TOKENS = 77
GEMM = 1024


def model_config(layers: int) -> dict:
    """6 heads x 64 (width 384), 32x32x16 latents with patch 2 -> 256 image tokens; 4 layers ~ 22M params."""
    return dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                attention_head_dim=64, num_attention_heads=6, joint_attention_dim=512,
                caption_projection_dim=384, pooled_projection_dim=512, pos_embed_max_size=32)


def make_batch(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size, channels = config["sample_size"], config["in_channels"]
    return dict(
        x0=rng.standard_normal((BATCH, size, size, channels)).astype(np.float32),
        noise=rng.standard_normal((BATCH, size, size, channels)).astype(np.float32),
        t=rng.uniform(0.05, 0.95, (BATCH,)).astype(np.float32),
        context=rng.standard_normal((BATCH, TEXT_TOKENS, config["joint_attention_dim"])).astype(np.float32),
        pooled=rng.standard_normal((BATCH, config["pooled_projection_dim"])).astype(np.float32),
    )


def build_torch_model(config: dict, directory: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    model = common.randomize_(SD3Transformer2DModel(**config), seed=0, scale=0.02)
    model.save_pretrained(directory)
    return model.train()


def torch_step(model: torch.nn.Module, batch: dict[str, np.ndarray], threads: int) -> Callable[[], float]:
    """Eager forward + backward of the flow loss (NCHW, diffusers' layout) on `threads` intra-op threads."""
    nchw = {k: torch.from_numpy(np.ascontiguousarray(batch[k].transpose(0, 3, 1, 2))) for k in ("x0", "noise")}
    t = torch.from_numpy(batch["t"])
    context, pooled = torch.from_numpy(batch["context"]), torch.from_numpy(batch["pooled"])

    def step() -> float:
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * nchw["x0"] + tb * nchw["noise"]
        prediction = model(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=context,
                           pooled_projections=pooled).sample
        loss = torch.mean(torch.square(prediction - (nchw["noise"] - nchw["x0"])))
        loss.backward()
        return float(loss.detach())
    return step


def alignax_step(directory: str, kernel: str, batch: dict[str, np.ndarray]):
    """(compiled value_and_grad step, params, device batch) for one attention kernel."""
    pretrained = load_diffusers(directory, attention=kernel)
    module = pretrained.module

    def loss_fn(params, x0, noise, t, context, pooled):
        x_t = flow_matching.noised(x0, noise, t)
        prediction = module.apply({"params": params}, x_t, t * 1000.0, context, pooled, method="forward_nhwc")
        return jnp.mean(flow_matching.per_sample_error(prediction, flow_matching.velocity_target(x0, noise)))

    args = tuple(jnp.asarray(batch[k]) for k in ("x0", "noise", "t", "context", "pooled"))
    params = jax.device_put(pretrained.params)
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, *args).compile()

    def step() -> float:
        loss, grads = compiled(params, *args)
        jax.block_until_ready(grads)
        return float(loss)
    return step, compiled, pretrained


def gemm_peak() -> Callable[[], None]:
    """One 1024^3 f32 GEMM in JAX (2 * 1024^3 flops); its best-case rate is the CPU's usable peak."""
    a = jax.random.normal(jax.random.key(1), (GEMM, GEMM), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (GEMM, GEMM), jnp.float32)
    dot = jax.jit(jnp.dot)

    def step() -> None:
        dot(a, b).block_until_ready()
    return step


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(tree) -> int:
    """Bytes that device 0 holds of a (sharded) tree."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
               if shard.device == device)


FSDP_DEVICES = 8


def fsdp_child(directory: str) -> None:
    """Run in a process with 8 fake CPU devices: the fsdp figure as JSON on stdout."""
    device_bytes, unsharded = fsdp_bytes_ratio(load_diffusers(directory))
    print(json.dumps({"device_bytes": device_bytes, "unsharded": unsharded}))


def fsdp_bytes_in_child(directory: str) -> tuple[int, int]:
    """The fsdp figure needs 8 fake devices, and splitting the CPU into 8 devices slowed the timed step by
    ~9% (docs/performance.md), so it is measured in a separate process and the timed one keeps 1 device."""
    env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                                 f"--xla_force_host_platform_device_count={FSDP_DEVICES}"]).strip()}
    module = __spec__.name if __spec__ else "experiments.benchmarks.train_step"
    figures = common.run_child(module, ["--fsdp-child", directory], env=env)
    return figures["device_bytes"], figures["unsharded"]


def fsdp_bytes_ratio(pretrained) -> tuple[int, int]:
    """(per-device bytes on an 8-way fsdp mesh, unsharded bytes) of params + AdamW state."""
    mesh = mesh_lib.make_mesh((1, FSDP_DEVICES, 1))
    params = pretrained.params
    specs = pretrained.logical_specs()
    shapes = jax.eval_shape(lambda p: p, params)
    param_shardings = mesh_lib.fitted_shardings(specs, shapes, mesh)
    optimizer = optax.adamw(1e-4)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_specs = train_state.specs_by_suffix(opt_shapes, shapes, specs)
    opt_shardings = train_state.to_shardings(opt_specs, opt_shapes, mesh, mesh_lib.DEFAULT_RULES)
    sharded_params = jax.device_put(params, param_shardings)
    sharded_opt = jax.jit(optimizer.init, out_shardings=opt_shardings)(sharded_params)
    unsharded = tree_bytes(params) + tree_bytes(opt_shapes)
    return per_device_bytes(sharded_params) + per_device_bytes(sharded_opt), unsharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--attention", default="einsum,xla",
                        help="comma-separated alignax attention kernels to compare (splash runs interpreted off TPU)")
    parser.add_argument("--fsdp-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fsdp_child:
        fsdp_child(args.fsdp_child)
        return
    unknown = [k for k in args.attention.split(",") if k not in attention.KERNELS]
    if unknown:
        parser.error(f"--attention: unknown {unknown}; expected some of {sorted(attention.KERNELS)}")
    config = model_config(args.layers)
    batch = make_batch(config)
    kernels = args.attention.split(",")
    print(common.machine_line())

    with tempfile.TemporaryDirectory() as directory:
        torch_model = build_torch_model(config, directory)
        n_params = sum(p.numel() for p in torch_model.parameters())
        print(f"model: {config} params={n_params / 1e6:.1f}M batch={BATCH} tokens=256+{TEXT_TOKENS} fp32")
        built = {kernel: alignax_step(directory, kernel, batch) for kernel in kernels}
        device_bytes, unsharded = fsdp_bytes_in_child(directory)

    steps = {f"alignax[{k}]": step for k, (step, _, _) in built.items()}
    torch_threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    for threads in torch_threads:
        steps[f"torch[{threads}t]"] = torch_step(torch_model, batch, threads)
    steps["gemm"] = gemm_peak()
    losses = {name: fn() for name, fn in steps.items() if name != "gemm"}
    print("loss: " + " ".join(f"{name}={value:.6f}" for name, value in losses.items()))

    median = common.report_times(common.interleaved(steps, args.warmup, args.repeats))

    best = min(kernels, key=lambda k: median[f"alignax[{k}]"])
    # The ratio is taken against torch's faster thread setting, so load cannot flatter alignax.
    torch_best = min((f"torch[{n}t]" for n in torch_threads), key=median.__getitem__)
    alignax_time, torch_time = median[f"alignax[{best}]"], median[torch_best]
    speedup = torch_time / alignax_time
    for kernel in kernels:
        print(f"attention {kernel}: speedup_vs_torch={torch_time / median[f'alignax[{kernel}]']:.3f}")
    for threads in torch_threads:
        print(f"torch {threads} thread(s): speedup_vs_torch={median[f'torch[{threads}t]'] / alignax_time:.3f}")
    print(f"speedup: {torch_best} {torch_time * 1e3:.1f} ms / alignax[{best}] {alignax_time * 1e3:.1f} ms "
          f"= {speedup:.3f}")

    flops = compiled_costs.cost(built[best][1])["flops"]
    achieved = flops / alignax_time
    peak = 2 * GEMM**3 / median["gemm"]
    print(f"flops: {flops / 1e9:.2f} GFLOP/step / {alignax_time * 1e3:.1f} ms = {achieved / 1e9:.1f} GFLOP/s; "
          f"peak {GEMM}^3 f32 GEMM {peak / 1e9:.1f} GFLOP/s; fraction {achieved / peak:.3f}")

    ratio = device_bytes / unsharded
    print(f"fsdp: per-device {device_bytes / 2**20:.2f} MiB / unsharded {unsharded / 2**20:.2f} MiB "
          f"(params + AdamW mu, nu) on mesh (data=1, fsdp=8, tensor=1) = {ratio:.4f}")
    print(f"load after: {os.getloadavg()}")
    print(f"speedup_vs_torch={speedup:.3f} flops_fraction={achieved / peak:.3f} fsdp_bytes_ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
