"""The trainer: one short loop around one AOT-compiled, sharded, donated train step.

Everything is resolved from the config by name (objective, rewards, optimiser groups,
LoRA, EMA), so this file never changes when an objective is added. A run is a pure
function of (config, step): the RNG is `fold_in(key(seed), step)` and the data batch is
`loader.batch_at(step)`, which is what makes kill-and-resume exact.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from alignax import config as config_lib
from alignax import mesh as mesh_lib
from alignax import objectives, sampling
from alignax.conditioning import negative_prompt
from alignax.errors import AlignaxError
from alignax.models import setup as model_setup
from alignax.objectives import trajectory
from alignax.rewards import setup as reward_setup
from alignax.training import checkpoint as checkpoint_lib
from alignax.training import ema as ema_lib
from alignax.training import optim, train_state

log = logging.getLogger("alignax")
PyTree = Any


class NonFiniteError(AlignaxError, FloatingPointError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


@dataclasses.dataclass
class RunResult:
    final_step: int
    preempted: bool
    state: PyTree


class Trainer:
    """Builds models, state and the compiled step from a validated config; `run()` trains."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *, mesh=None,
                 async_checkpoints: bool = True):
        config_lib.validate(config, mesh.size if mesh is not None else jax.device_count())
        self.config = config
        self.workdir = Path(workdir)
        self.mesh = mesh or mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes)
        self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)
        self.is_main = jax.process_index() == 0
        self._preempted = False
        self._generate = None  # the jitted sampler of `sample_images`, built on first use

        t_src, transformer, v_src, vae_module = model_setup.build_modules(config.model)
        if config.lora.enabled and t_src.directory is None:
            log.warning("LoRA on a randomly initialised MM-DiT: its adaLN-Zero gates and proj_out start at 0, so "
                        "no gradient reaches the adapters; set config.model.pretrained to train a LoRA")
        rewards = reward_setup.build(config.rewards)
        lora_spec = optim_lora_spec(config)
        scale, shift = model_setup.vae_scaling(vae_module)
        self.negatives = negative_prompt.for_run(config.sample, transformer.config)  # checked before compiling
        self.models = objectives.Models(transformer, vae_module, scale, shift, lora=lora_spec, rewards=rewards,
                                        sample_config=config.sample, pareto=config.pareto)
        self.objective = objectives.build(config.objective, self.models)

        root = jax.random.key(config.seed)
        with mesh_lib.use_mesh(self.mesh, self.rules):
            base, base_specs = model_setup.load_params_sharded(t_src, transformer, jax.random.fold_in(root, 1),
                                                               self.mesh, self.rules)
            vae_params, vae_specs = model_setup.load_params_sharded(v_src, vae_module, jax.random.fold_in(root, 2),
                                                                    self.mesh, self.rules)
            self.frozen, frozen_specs = self._frozen(base, base_specs, vae_params, vae_specs, rewards)
            self.frozen_shardings = train_state.to_shardings(frozen_specs, self.frozen, self.mesh, self.rules)
            self._build_state(base, base_specs, root)
        self.checkpointer = checkpoint_lib.Checkpointer(self.workdir, keep=config.keep_checkpoints,
                                                        async_save=async_checkpoints)

    # ---- construction -------------------------------------------------------------------------

    def _frozen(self, base, base_specs, vae_params, vae_specs, rewards):
        frozen = {"vae": vae_params, "rewards": {}}
        specs = {"vae": vae_specs, "rewards": {}}
        for name, reward in rewards.items():
            reward_params = getattr(reward, "params", {}) or {}
            frozen["rewards"][name] = reward_params
            specs["rewards"][name] = reward.logical_specs() if reward_params else {}
        if self.models.lora is not None:
            frozen["transformer_base"], specs["transformer_base"] = base, base_specs
        elif self.objective.needs_reference:
            frozen["reference"], specs["reference"] = base, base_specs
        if frozen["rewards"]:
            shardings = train_state.to_shardings(specs["rewards"], frozen["rewards"], self.mesh, self.rules)
            frozen["rewards"] = jax.device_put(frozen["rewards"], shardings)
        return frozen, specs

    def _build_state(self, base: PyTree, base_specs: PyTree, root: jax.Array) -> None:
        config, models, objective = self.config, self.models, self.objective
        lora_spec = models.lora

        def trainable_and_specs(base_params, rng):
            if lora_spec is None:
                trainable, specs = {"transformer": base_params}, {"transformer": base_specs}
            else:
                from alignax.training import lora
                weights = lora.init_lora(base_params, spec=lora_spec, rng=rng)
                trainable = {"transformer": weights}
                specs = {"transformer": lora.lora_logical_specs(weights, base_specs)}
            if objective.init_heads is not None:
                trainable["heads"], specs["heads"] = objective.init_heads(jax.random.fold_in(rng, 1))
            return trainable, specs

        # Specs are static metadata: read them once from an abstract trace.
        holder = {}

        def abstract_trainable(base_params, rng):
            trainable, specs = trainable_and_specs(base_params, rng)
            holder["specs"] = specs
            return trainable

        abstract = jax.eval_shape(abstract_trainable, base, jax.random.fold_in(root, 3))
        trainable_specs = holder["specs"]
        self.tx, self.schedule = optim.make_optimizer(config.optim, abstract, config.total_steps)

        def make_state(base_params, frozen, rng):
            trainable, _ = trainable_and_specs(base_params, rng)
            # An explicit copy: the state is donated every step, the frozen base/reference is not.
            trainable = jax.tree.map(lambda x: x * jnp.ones((), x.dtype), trainable)
            return {
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(root),
                "trainable": trainable,
                "opt_state": self.tx.init(trainable),
                "ema": jax.tree.map(jnp.copy, trainable) if config.ema.enabled else {},
                "objective": objective.init_state(trainable, frozen),
                "nonfinite": {"consecutive": jnp.zeros((), jnp.int32), "total": jnp.zeros((), jnp.int32)},
            }

        self.abstract_state = jax.eval_shape(make_state, base, self.frozen, jax.random.fold_in(root, 3))
        state_specs = {
            "step": PartitionSpec(), "rng": PartitionSpec(),
            "trainable": trainable_specs,
            "opt_state": train_state.specs_by_suffix(self.abstract_state["opt_state"], abstract, trainable_specs),
            "ema": train_state.specs_by_suffix(self.abstract_state["ema"], abstract, trainable_specs),
            "objective": train_state.specs_by_suffix(self.abstract_state["objective"], abstract, trainable_specs),
            "nonfinite": {"consecutive": PartitionSpec(), "total": PartitionSpec()},
        }
        self.state_specs = state_specs
        self.state_shardings = train_state.to_shardings(state_specs, self.abstract_state, self.mesh, self.rules)
        self._make_state = jax.jit(make_state, out_shardings=self.state_shardings)
        self._base_for_init = base

    def initial_state(self) -> PyTree:
        with mesh_lib.use_mesh(self.mesh, self.rules):
            return self._make_state(self._base_for_init, self.frozen,
                                    jax.random.fold_in(jax.random.key(self.config.seed), 3))

    # ---- the step -----------------------------------------------------------------------------

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return mesh_lib.logical_sharding(("activation_batch",) + (None,) * (ndim - 1), self.mesh, self.rules)

    def _loss_and_grads(self, trainable, frozen, objective_state, batch, rng):
        grad_fn = jax.value_and_grad(self.objective.loss, has_aux=True)
        accum = self.config.grad_accum_steps
        if accum == 1:
            (loss, (metrics, objective_state)), grads = grad_fn(trainable, frozen, objective_state, batch, rng)
            return loss, metrics, objective_state, grads

        def split(x):  # micro-batch i = rows i, i + accum, ...: every device keeps its share of each
            micro = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                micro, mesh_lib.logical_sharding((None, "activation_batch") + (None,) * (x.ndim - 1), self.mesh,
                                                 self.rules))

        micro_batches = jax.tree.map(split, batch)

        def body(carry, inputs):
            grads_sum, loss_sum, metrics_sum, obj_state = carry
            index, micro = inputs
            (loss, (metrics, obj_state)), grads = grad_fn(trainable, frozen, obj_state, micro,
                                                          jax.random.fold_in(rng, index))
            add = lambda a, b: a + b  # noqa: E731
            return (jax.tree.map(add, grads_sum, grads), loss_sum + loss, jax.tree.map(add, metrics_sum, metrics),
                    obj_state), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        metrics_shape = jax.eval_shape(lambda: grad_fn(trainable, frozen, objective_state, first, rng)[0][1][0])
        zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape), objective_state)
        (grads, loss, metrics, objective_state), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_batches))
        scale = 1.0 / accum
        return (loss * scale, jax.tree.map(lambda m: m * scale, metrics), objective_state,
                jax.tree.map(lambda g: g * scale, grads))

    def train_step(self, state: PyTree, frozen: PyTree, batch: dict) -> tuple[PyTree, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step), 0)
        loss, metrics, objective_state, grads = self._loss_and_grads(state["trainable"], frozen, state["objective"],
                                                                     batch, rng)
        finite = jnp.isfinite(loss) & train_state.tree_all_finite(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        ema = state["ema"]
        if self.config.ema.enabled:
            ema = ema_lib.update(ema, trainable, step, decay=self.config.ema.decay, every=self.config.ema.every)
        proposed = {"trainable": trainable, "opt_state": opt_state, "ema": ema, "objective": objective_state}
        kept = {k: state[k] for k in proposed}
        # A non-finite step changes nothing but the counters: no NaN ever reaches params or checkpoints.
        chosen = jax.tree.map(lambda new, old: jnp.where(finite, new, old), proposed, kept)
        consecutive = jnp.where(finite, 0, state["nonfinite"]["consecutive"] + 1)
        new_state = {**chosen, "step": step + 1, "rng": state["rng"],
                     "nonfinite": {"consecutive": consecutive,
                                   "total": state["nonfinite"]["total"] + (~finite).astype(jnp.int32)}}
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "learning_rate": self.schedule(step),
                   "finite": finite.astype(jnp.float32), "nonfinite_consecutive": consecutive}
        return new_state, metrics

    def traced_step(self, example_batch: dict) -> Any:
        """The jitted step traced for these batch shapes (state donated; shardings explicit), under
        the mesh and its logical rules so that activation constraints take effect."""
        batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding(v.ndim))
                        for k, v in example_batch.items()}
        state_shapes = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    self.abstract_state, self.state_shardings)
        frozen_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                     self.frozen)
        step_fn = jax.jit(self.train_step, donate_argnums=(0,),
                          out_shardings=(self.state_shardings, NamedSharding(self.mesh, PartitionSpec())))
        with mesh_lib.use_mesh(self.mesh, self.rules):
            return step_fn.trace(state_shapes, frozen_shapes, batch_shapes)

    def compile(self, example_batch: dict) -> Any:
        """AOT-compiles the step for these batch shapes; logs FLOPs and memory."""
        traced = self.traced_step(example_batch)
        with mesh_lib.use_mesh(self.mesh, self.rules):
            compiled = traced.lower().compile()
        self.compiled_stats = compiled_statistics(compiled)
        log.info("compiled train step: %s", self.compiled_stats)
        return compiled

    # ---- data ---------------------------------------------------------------------------------

    def make_loader(self, split: str | None = None):
        from alignax import data
        from alignax.data import setup as data_setup
        path = data_setup.dataset_path(self.config.data, self.objective.data)
        source = data.open_dataset(path, split or self.config.data.split)
        return data.Loader(source, global_batch_size=self.config.batch_size, seed=self.config.seed,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           shuffle=self.config.data.shuffle)

    def device_batch(self, host_batch: dict) -> dict:
        """This process's rows → one global array per field, sharded over (data, fsdp). Strings stay
        home; rewards first turn the prompts into the token ids they need."""
        host_batch = reward_setup.prepare(self.models.rewards, host_batch)
        host_batch = negative_prompt.guided(host_batch, self.negatives, self.config.sample.guidance_scale)
        out = {}
        for key, value in host_batch.items():
            value = np.asarray(value)
            if value.dtype.kind in "OUS":
                continue
            global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
            out[key] = jax.make_array_from_process_local_data(self.batch_sharding(value.ndim), value, global_shape)
        return out

    # ---- the loop -----------------------------------------------------------------------------

    def restore_or_init(self) -> PyTree:
        step = self.checkpointer.latest_step()
        if step is None:
            return self.initial_state()
        checkpoint_lib.check_compatible(self.checkpointer.saved_config(step), self.config.to_dict(),
                                        self.checkpointer.directory)
        log.info("resuming from %s step %d", self.checkpointer.directory, step)
        with mesh_lib.use_mesh(self.mesh, self.rules):
            return self.checkpointer.restore(step, self.abstract_state, self.state_shardings)

    def save(self, state: PyTree) -> None:
        step = int(jax.device_get(state["step"]))
        if not bool(jax.jit(train_state.tree_all_finite)(state["trainable"])):
            raise NonFiniteError(f"step {step}: refusing to checkpoint non-finite params")
        self.checkpointer.save(step, state, self.config.to_dict())

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: saving at the next step boundary")
        self._preempted = True

    def _preemption_agreed(self) -> bool:
        if jax.process_count() == 1:
            return self._preempted
        flags = multihost_utils.process_allgather(np.asarray(self._preempted))
        return bool(np.any(flags))

    def run(self, *, stop_after: int | None = None) -> RunResult:
        """Trains to `config.total_steps` (or `stop_after` steps from the start, for tests)."""
        from alignax.training import metrics as metrics_lib
        config = self.config
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main)
        progress = metrics_lib.ConsoleProgress(config.total_steps, enabled=self.is_main)
        try:
            state = self.restore_or_init()
            start = int(jax.device_get(state["step"]))
            loader = self.make_loader()
            first = self.device_batch(loader.batch_at(start))
            compiled = self.compile(first)
            if self.is_main:
                writer.scalars(start, {f"compile/{k}": v for k, v in self.compiled_stats.items()})
            end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
            pending: list[tuple[int, dict]] = []
            tick, tick_step = time.perf_counter(), start
            step = start
            while step < end:
                batch = first if step == start else self.device_batch(loader.batch_at(step))
                state, metrics = compiled(state, self.frozen, batch)
                step += 1
                pending.append((step, metrics))
                if step % config.log_every == 0 or step == end:
                    tick, tick_step = self._report(pending, writer, progress, tick, tick_step, step)
                    pending = []
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    self.save(state)
                if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
                    self.write_samples(state, writer, step)
                if self._preemption_agreed():
                    self.save(state)
                    self.checkpointer.wait()
                    log.warning("preempted: saved step %d", step)
                    return RunResult(step, True, state)
            self.checkpointer.wait()
            return RunResult(step, False, state)
        finally:
            signal.signal(signal.SIGTERM, previous)
            progress.finish()
            writer.close()

    def _report(self, pending, writer, progress, tick, tick_step, step):
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), values in zip(pending, fetched, strict=True):
            consecutive = int(values["nonfinite_consecutive"])
            if consecutive > self.config.max_nonfinite_steps:
                raise NonFiniteError(f"step {s}: {consecutive} consecutive steps had non-finite loss or gradients "
                                     f"(config.max_nonfinite_steps={self.config.max_nonfinite_steps})")
        now = time.perf_counter()
        steps_per_second = (step - tick_step) / max(now - tick, 1e-9)
        # Every step is written (a Pareto evaluation wants each reward's raw and normalised value
        # per step); the device→host fetch still happens once per `log_every` window.
        for (s, _), values in zip(pending[:-1], fetched[:-1], strict=True):
            writer.scalars(s, values)
        last = {k: float(v) for k, v in fetched[-1].items()}
        last["steps_per_second"] = steps_per_second
        last["examples_per_second_per_device"] = steps_per_second * self.config.batch_size / jax.device_count()
        writer.scalars(step, last)
        progress.update(step, last["loss"], steps_per_second)
        return now, step

    # ---- samples ------------------------------------------------------------------------------

    def sample_images(self, trainable: PyTree, batch: dict, seed: int = 0) -> jax.Array:
        """Images NHWC in [0, 1] from the noise of `key(seed)`, with the configured sampler settings
        (guidance against the batch's negative embeddings, or zeros, when guidance_scale != 1)."""
        cfg = self.config.sample
        models = self.models
        if self._generate is None:
            def generate(trainable, frozen, conditioning, key):
                params = models.transformer_params(trainable, frozen)
                cond = trajectory.conditioning(conditioning, cfg.guidance_scale)
                noise = jax.random.normal(key, models.latent_shape(cond.context.shape[0]))
                _, sigmas = sampling.flow_match_sigmas(cfg.num_steps, cfg.shift)
                latents = sampling.denoise(models.velocity_fn(params), noise, sigmas, cond.context, cond.pooled,
                                           guidance_scale=cond.guidance_scale, negative_context=cond.negative_context,
                                           negative_pooled=cond.negative_pooled)
                return models.decode(frozen, latents)

            self._generate = jax.jit(generate)
        with mesh_lib.use_mesh(self.mesh, self.rules):
            return self._generate(trainable, self.frozen, dict(batch), jax.random.key(seed))

    def write_samples(self, state: PyTree, writer, step: int) -> None:
        loader = self.make_loader(self.config.data.eval_split)
        batch = loader.batch_at(0)
        count = min(self.config.sample.num_images, len(batch["encoder_hidden_states"]))
        conditioning = {k: batch[k][:count] for k in ("encoder_hidden_states", "pooled_projections")}
        conditioning = negative_prompt.guided(conditioning, self.negatives, self.config.sample.guidance_scale)
        conditioning = {k: jnp.asarray(v) for k, v in conditioning.items()}
        trainable = state["ema"] if self.config.ema.enabled else state["trainable"]
        images = multihost_utils.process_allgather(self.sample_images(trainable, conditioning), tiled=True)
        writer.images(step, "samples", np.asarray(images))


def optim_lora_spec(config: ml_collections.ConfigDict):
    if not config.lora.enabled:
        return None
    from alignax.training import lora
    return lora.LoraSpec.from_config(config.lora)


def compiled_statistics(compiled: Any) -> dict[str, float]:
    """FLOPs and per-device memory of a compiled executable (whatever this backend reports)."""
    stats: dict[str, float] = {}
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    if cost and "flops" in cost:
        stats["flops"] = float(cost["flops"])
    memory = compiled.memory_analysis()
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"):
        if memory is not None and hasattr(memory, field):
            stats[field.removesuffix("_in_bytes")] = float(getattr(memory, field))
    return stats

