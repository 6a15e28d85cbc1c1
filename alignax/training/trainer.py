"""The trainer: one short loop around one AOT-compiled, sharded, donated train step.

Everything is resolved from the config by name (objective, rewards, optimiser groups,
LoRA, EMA), so this file never changes when an objective is added. A run is a pure
function of (config, step): the RNG is `fold_in(key(seed), step)` and the data batch is
`loader.batch_at(step)`, which is what makes kill-and-resume exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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

from alignax import compiled_costs, fs, objectives, sampling
from alignax import config as config_lib
from alignax import mesh as mesh_lib
from alignax import rng as rng_lib
from alignax.conditioning import negative_prompt, on_the_fly
from alignax.errors import AlignaxError
from alignax.models import setup as model_setup
from alignax.rewards import setup as reward_setup
from alignax.training import checkpoint as checkpoint_lib
from alignax.training import ema as ema_lib
from alignax.training import lora, optim, preemption, train_state, workdir_lock

log = logging.getLogger("alignax")
PyTree = Any


class NonFiniteError(AlignaxError, FloatingPointError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


@dataclasses.dataclass
class RunResult:
    final_step: int
    preempted: bool
    state: PyTree


@dataclasses.dataclass
class _RunRecord:
    """What run()'s cleanup needs to know, whichever way the loop ended."""
    step: int | None = None
    state: str = "failed"            # status.json: finished | preempted | diverged | nonfinite | failed | stopped
    reason: str = ""
    failed: bool = False             # an exception is propagating
    writer: Any = None
    progress: Any = None
    pending: list = dataclasses.field(default_factory=list)   # (step, device metrics) not yet fetched
    rows: list = dataclasses.field(default_factory=list)      # (step, host metrics) fetched, not yet written
    window_start: float = 0.0


class Trainer:
    """Builds models, state and the compiled step from a validated config; `run()` trains."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *, mesh=None,
                 async_checkpoints: bool = True):
        config_lib.validate(config, mesh.size if mesh is not None else jax.device_count())
        self.config = config
        self.workdir = fs.absolute(workdir)  # a string: Path() would turn gs://b/run into the local gs:/b/run
        self.mesh = mesh or mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes,
                                               dcn_axis=config.mesh.get("dcn_axis", "data"))
        self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)
        self.is_main = jax.process_index() == 0
        self._preempted = False
        self._generate = None  # the jitted sampler of `sample_images`, built on first use

        # One run per workdir, refused before any model is built; released by close().
        self.workdir_lock = workdir_lock.WorkdirLock(workdir).acquire() if self.is_main else None
        try:
            self._build(config, workdir, async_checkpoints)
        except BaseException:
            self.close()
            raise

    def _build(self, config: ml_collections.ConfigDict, workdir: str | Path, async_checkpoints: bool) -> None:
        """Models, params, the train state's shardings and the checkpointer."""
        t_src, transformer, v_src, vae_module = model_setup.build_modules(config.model)
        if config.lora.enabled and t_src.directory is None:
            log.warning("LoRA on a randomly initialised MM-DiT: its adaLN-Zero gates and proj_out start at 0, so "
                        "no gradient reaches the adapters; set config.model.pretrained to train a LoRA")
        rewards = reward_setup.build(config.rewards)
        lora_spec = lora.LoraSpec.for_run(config.lora)
        scale, shift = model_setup.vae_scaling(vae_module)
        # config.text.encode='on_the_fly': the pipeline's text encoders, sharded on the mesh (else None).
        self.text = on_the_fly.OnTheFly.for_run(config, mesh=self.mesh, rules=self.rules)
        if self.text is not None:
            self.text.check_widths(transformer.config)
        self.negatives = on_the_fly.negatives_for_run(config.sample, transformer.config, self.text)  # before compiling
        self.models = objectives.Models(transformer, vae_module, scale, shift, lora=lora_spec, rewards=rewards)
        self.objective = objectives.build(config.objective, self.models, objectives.RunSettings.from_config(config))

        root = rng_lib.run_key(config.seed)
        with mesh_lib.use_mesh(self.mesh, self.rules):
            base, base_specs = model_setup.load_params_sharded(
                t_src, transformer, rng_lib.init_key(root, rng_lib.TRANSFORMER_INIT), self.mesh, self.rules)
            vae_params, vae_specs = model_setup.load_params_sharded(
                v_src, vae_module, rng_lib.init_key(root, rng_lib.VAE_INIT), self.mesh, self.rules)
            self.frozen, frozen_specs = self._frozen(base, base_specs, vae_params, vae_specs, rewards)
            self.frozen_shardings = train_state.to_shardings(frozen_specs, self.frozen, self.mesh, self.rules)
            self._build_state(base, base_specs, root)
        # `workdir` as given: a gs:// URL must reach orbax intact (Path() would make it gs:/...).
        self.checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                                        async_save=async_checkpoints)

    # ---- construction -------------------------------------------------------------------------

    def _frozen(self, base, base_specs, vae_params, vae_specs, rewards):
        frozen = {"vae": vae_params, "rewards": {}}
        specs = {"vae": vae_specs, "rewards": {}}
        for name, reward in rewards.items():
            reward_params = getattr(reward, "params", {}) or {}
            frozen["rewards"][name] = reward_params
            specs["rewards"][name] = reward.logical_specs() if reward_params else {}
        if self.text is not None:  # placed by their logical specs when loaded
            frozen["text_encoders"], specs["text_encoders"] = self.text.params(), self.text.logical_specs()
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

        abstract = jax.eval_shape(abstract_trainable, base, rng_lib.init_key(root, rng_lib.TRAINABLE_INIT))
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

        self.abstract_state = jax.eval_shape(make_state, base, self.frozen,
                                             rng_lib.init_key(root, rng_lib.TRAINABLE_INIT))
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
                                    rng_lib.init_key(self.config.seed, rng_lib.TRAINABLE_INIT))

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
        if self.text is not None:  # token ids → encoder_hidden_states / pooled_projections, no grads
            batch = self.text.encode(frozen["text_encoders"], batch)
        rng = rng_lib.step_key(jax.random.wrap_key_data(state["rng"]), step)
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
                   "param_norm": optax.tree.norm(new_state["trainable"]),
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
        from alignax.data import check
        from alignax.data import setup as data_setup
        path = data_setup.dataset_path(self.config.data, self.objective.data)
        source = data.open_dataset(path, split or self.config.data.split)
        check.check_dataset(source, self.objective, self.models.transformer.config, self.models.vae.config,
                            encode_on_the_fly=self.text is not None)
        reward_setup.check_fields(self.models.rewards, source.features, f"dataset {source.path}")
        return data.Loader(source, global_batch_size=self.config.batch_size, seed=self.config.seed,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           shuffle=self.config.data.shuffle)

    def device_batch(self, host_batch: dict) -> dict:
        """This process's rows → one global array per field, sharded over (data, fsdp). Strings stay
        home; rewards first turn the prompts into the token ids they need."""
        host_batch = reward_setup.prepare(self.models.rewards, host_batch)
        if self.text is not None:  # prompts → fixed-length token ids, encoded inside the step
            host_batch = self.text.tokenize(host_batch)
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

    def resolved_config(self) -> dict:
        """The config as this run uses it (objective defaults merged, `-1` mesh sizes filled in): what
        checkpoints store and what a resumed run's config is compared with."""
        return checkpoint_lib.resolved_config(self.config, self.mesh.size)

    def restore_or_init(self) -> PyTree:
        """The newest readable checkpoint's state (unreadable newer steps are reported and skipped, or
        stop the run, by config.checkpoint_on_damage), or a fresh state when there is none."""
        current = self.resolved_config()
        directory = self.checkpointer.directory
        with mesh_lib.use_mesh(self.mesh, self.rules):
            restored = self.checkpointer.restore_latest(
                self.abstract_state, self.state_shardings, on_damage=self.config.checkpoint_on_damage,
                check_config=lambda saved: checkpoint_lib.check_compatible(saved, current, directory))
        if restored is None:
            return self.initial_state()
        step, state = restored
        log.info("resuming from %s step %d", directory, step)
        return state

    def save(self, state: PyTree) -> None:
        """Checkpoints `state` with the resolved config; a step already saved is not saved again, and
        a state with NaN/inf anywhere (params, optimiser state, EMA, objective state) never is."""
        step = int(jax.device_get(state["step"]))
        if step in self.checkpointer.all_steps():
            return
        bad = checkpoint_lib.nonfinite_parts(state)
        if bad:
            raise NonFiniteError(f"step {step}: refusing to checkpoint non-finite values in "
                                 f"{', '.join(f'state[{part!r}]' for part in bad)}")
        self.checkpointer.save(step, state, self.resolved_config())

    def close(self) -> None:
        """Releases the workdir lock (idempotent). Call it once saves in flight have finished
        (`checkpointer.wait()`); run() does so on every exit."""
        lock = getattr(self, "workdir_lock", None)
        if lock is not None:
            lock.release()

    def _on_sigterm(self, signum, frame) -> None:
        preemption.request(signum, frame)
        self._preempted = True

    def _preemption_agreed(self) -> bool:
        """Whether any process was asked to stop, before or during run() (a collective with several
        processes: every process calls it at the same points)."""
        return preemption.agreed(self._preempted)

    def run(self, *, stop_after: int | None = None) -> RunResult:
        """Trains to `config.total_steps` (or `stop_after` steps from the start, for tests).

        SIGTERM (see alignax.training.preemption; a request made before run() counts too) stops at
        the next step boundary with that step saved, or before the first step with nothing to
        save. Every exit (finished, preempted, a halt, any exception, Ctrl-C) then finishes the
        checkpoint save in flight, writes the metrics rows not yet written, closes the writers,
        writes `workdir/status.json` and releases the workdir, and only then re-raises the
        original error: a failure after a save never costs that checkpoint."""
        previous = preemption.install()
        run = _RunRecord()
        try:
            return self._run(run, stop_after)
        except BaseException as error:
            run.failed = True
            run.state, run.reason = _status_of(error)
            raise
        finally:
            preemption.restore(previous)
            self._finish(run)

    def _run(self, run: _RunRecord, stop_after: int | None) -> RunResult:
        from alignax.training import divergence
        from alignax.training import metrics as metrics_lib
        config = self.config
        if self._preemption_agreed():
            run.step = self.checkpointer.latest_step() or 0
            return self._preempted_before_start(run, None, "before restoring the state")
        state = self.restore_or_init()
        start = run.step = int(jax.device_get(state["step"]))
        run.writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main, purge_step=start)
        dropped = run.writer.truncate(start)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows past step %d (this run writes them again)", dropped, start)
        if start:
            self._record_config_changes(start, run.writer)
        run.progress = metrics_lib.ConsoleProgress(config.total_steps, enabled=self.is_main)
        if self._preemption_agreed():
            return self._preempted_before_start(run, state, "after restoring the state")
        loader = self.make_loader()
        period = self.objective.batch_period  # several updates on one batch (grpo's inner epochs)
        first = self.device_batch(loader.batch_at(start // period))
        compiled = self.compile(first)
        run.writer.scalars(start, {f"compile/{k}": v for k, v in self.compiled_stats.items()})
        if self._preemption_agreed():
            return self._preempted_before_start(run, state, "after compiling")
        end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
        interval = sample_interval(config)
        guard = divergence.DivergenceGuard(config.get("divergence") or {})
        saved = start  # the step on disk (a restored one); never saved twice
        step = start
        run.window_start = time.perf_counter()
        while step < end:
            batch = first if step == start else self.device_batch(loader.batch_at(step // period))
            state, metrics = compiled(state, self.frozen, batch)
            step += 1
            run.step = step
            run.pending.append((step, metrics))
            checkpoint_now = step % config.checkpoint_every == 0 or step == config.total_steps
            sample_now = bool(interval) and (step % interval == 0 or step == config.total_steps)
            preempted = self._preemption_agreed()
            if not (checkpoint_now or sample_now or preempted or step == end or step % config.log_every == 0):
                continue
            # The window's compute ends when its last step's outputs exist; I/O is timed apart.
            jax.block_until_ready(metrics)
            compute_seconds = time.perf_counter() - run.window_start
            run.rows, run.pending = self._fetch_rows(run.pending), []
            halt = self._halt(run.rows, guard)
            if halt is not None:  # checked before saving: a diverged state never overwrites a good one
                self._report(run.rows, run.writer, run.progress, compute_seconds)
                run.rows = []
                raise halt
            io_start = time.perf_counter()
            if checkpoint_now and step != saved:
                self.save(state)
                saved = step
            if sample_now:
                self.write_samples(state, run.writer, step)
            preempted = preempted or self._preemption_agreed()  # a SIGTERM during the I/O above counts now
            if preempted and step != saved:
                self.save(state)
                saved = step
            self._report(run.rows, run.writer, run.progress, compute_seconds, time.perf_counter() - io_start)
            run.rows = []
            run.writer.flush(force=checkpoint_now or preempted)
            run.window_start = time.perf_counter()
            if preempted and step < config.total_steps:
                self.checkpointer.wait()
                log.warning("preempted: saved step %d", step)
                run.state, run.reason = "preempted", f"SIGTERM: saved step {step}"
                return RunResult(step, True, state)
        self.checkpointer.wait()
        if step >= config.total_steps:
            run.state = "finished"
            if start >= config.total_steps:
                run.reason = f"the restored step {start} is already at config.total_steps={config.total_steps}"
        else:
            run.state, run.reason = "stopped", f"stop_after={stop_after}"
        return RunResult(step, False, state)

    def _preempted_before_start(self, run: _RunRecord, state: PyTree, phase: str) -> RunResult:
        resume = f"; a rerun resumes from step {run.step}" if run.step else ""
        log.warning("preempted %s, before the first step: nothing to save%s", phase, resume)
        run.state, run.reason = "preempted", f"SIGTERM {phase}, before the first step: nothing saved"
        return RunResult(run.step, True, state)

    def _fetch_rows(self, pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
        """One device→host fetch for a window of steps' metrics."""
        fetched = jax.device_get([m for _, m in pending])
        return [(s, {k: float(v) for k, v in values.items()}) for (s, _), values in zip(pending, fetched, strict=True)]

    def _halt(self, rows: list[tuple[int, dict[str, float]]], guard) -> AlignaxError | None:
        """The error that stops the run at the first row that calls for it (too many consecutive
        non-finite steps, or a divergence), or None."""
        from alignax.training.divergence import DivergenceError
        for s, values in rows:
            consecutive = int(values["nonfinite_consecutive"])
            if consecutive > self.config.max_nonfinite_steps:
                return NonFiniteError(f"step {s}: {consecutive} consecutive steps had non-finite loss or gradients "
                                      f"(config.max_nonfinite_steps={self.config.max_nonfinite_steps})")
            reason = guard.check(s, values) if guard is not None else None
            if reason is not None:
                return DivergenceError(reason)
        return None

    def _report(self, rows: list[tuple[int, dict[str, float]]], writer, progress, compute_seconds: float,
                io_seconds: float = 0.0) -> None:
        """Writes every step's row (a Pareto evaluation wants each reward's raw and normalised value
        per step); the window's last row adds steps/s of the compiled steps alone and the seconds
        of checkpoint and sample I/O at its end."""
        if not rows:
            return
        steps_per_second = len(rows) / max(compute_seconds, 1e-9)
        for s, values in rows[:-1]:
            writer.scalars(s, values)
        step, last = rows[-1]
        last = {**last, "steps_per_second": steps_per_second, "io_seconds": io_seconds,
                "examples_per_second_per_device": steps_per_second * self.config.batch_size / jax.device_count()}
        writer.scalars(step, last)
        progress.update(step, last["loss"], steps_per_second)

    def _record_config_changes(self, step: int, writer) -> None:
        """Warns about, and writes to metrics.jsonl, every non-structural field that differs from
        the config the restored checkpoint was written with (structural ones are refused)."""
        try:  # the saved config is already resolved (an old unresolved one resolves the same, mesh aside)
            changes = config_changes(checkpoint_lib.resolved_config(self.checkpointer.saved_config(step)),
                                     self.resolved_config())
        except Exception as e:  # noqa: BLE001 (informational: never block a resume on it)
            log.warning("could not compare with the config saved at step %d (%s); config changes are not recorded",
                        step, e)
            return
        if not changes:
            return
        log.warning("resuming from step %d with a changed config: %s", step,
                    "; ".join(f"config.{k}: {old!r} → {new!r}" for k, (old, new) in changes.items()))
        if self.config.total_steps <= step:
            log.warning("config.total_steps=%d is not past the restored step %d: nothing left to train",
                        self.config.total_steps, step)
        writer.record(step, {"config_change": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}})

    def _finish(self, run: _RunRecord) -> None:
        """Cleans up after any exit. Each part runs even when another failed; while an error is
        propagating their failures are logged (the original error stays the one raised), otherwise
        the first is raised."""
        from alignax.training import metrics as metrics_lib
        errors: list[BaseException] = []

        def attempt(what: str, fn) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (logged, and raised below unless an error is propagating)
                log.error("%s failed: %s: %s", what, type(e).__name__, e)
                errors.append(e)

        # A save in flight completes (or reports why not) before the process can exit under it.
        attempt("finishing the checkpoint save in flight", self.checkpointer.wait)
        if run.failed and run.writer is not None and (run.rows or run.pending):
            attempt("writing the last metrics rows", lambda: self._write_unreported(run))
        if run.progress is not None:
            attempt("closing the progress line", run.progress.finish)
        if run.writer is not None:
            attempt("closing the metrics writer", run.writer.close)
        if self.is_main:
            attempt("writing status.json", lambda: metrics_lib.write_status(
                self.workdir, run.state, run.step, self.config.total_steps, run.reason))
        attempt("releasing the workdir", self.close)
        if errors and not run.failed:
            raise errors[0]

    def _write_unreported(self, run: _RunRecord) -> None:
        rows = run.rows + (self._fetch_rows(run.pending) if run.pending else [])
        run.rows, run.pending = [], []
        for s, values in rows:
            run.writer.scalars(s, values)

    # ---- samples ------------------------------------------------------------------------------

    def sample_images(self, trainable: PyTree, batch: dict, seed: int = 0) -> jax.Array:
        """Images NHWC in [0, 1] from the noise of `key(seed)`, with the configured sampler settings
        (guidance against the batch's negative embeddings, or zeros, when guidance_scale != 1)."""
        cfg = self.config.sample
        models = self.models
        if self._generate is None:
            def generate(trainable, frozen, conditioning, key):
                return sampling.generate_images(models, models.transformer_params(trainable, frozen), frozen,
                                                conditioning, key, num_steps=cfg.num_steps, shift=cfg.shift,
                                                guidance_scale=cfg.guidance_scale)

            self._generate = jax.jit(generate)
        with mesh_lib.use_mesh(self.mesh, self.rules):
            return self._generate(trainable, self.frozen, dict(batch), jax.random.key(seed))

    def write_samples(self, state: PyTree, writer, step: int) -> None:
        loader = self.make_loader(self.config.data.eval_split)
        batch = loader.batch_at(0)
        count = min(self.config.sample.num_images, len(batch["prompt" if self.text else "encoder_hidden_states"]))
        if self.text is not None:
            conditioning = self.text.encode_prompts([str(p) for p in batch["prompt"][:count]])
        else:
            conditioning = {k: batch[k][:count] for k in ("encoder_hidden_states", "pooled_projections")}
        conditioning = negative_prompt.guided(conditioning, self.negatives, self.config.sample.guidance_scale)
        conditioning = {k: jnp.asarray(v) for k, v in conditioning.items()}
        trainable = state["ema"] if self.config.ema.enabled else state["trainable"]
        images = multihost_utils.process_allgather(self.sample_images(trainable, conditioning), tiled=True)
        writer.images(step, "samples", np.asarray(images))


def sample_interval(config: ml_collections.ConfigDict) -> int:
    """Steps between sample grids: `config.eval_every`, or for -1 about four grids per run whatever
    `total_steps` is (every ceil(total_steps / 4) steps); 0: none. The last step always samples."""
    if config.eval_every >= 0:
        return int(config.eval_every)
    return max(1, math.ceil(config.total_steps / 4))


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (checkpoint's value, this run's value)} for leaves present in both configs that
    differ, structural fields (refused by checkpoint.check_compatible) left out."""
    def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict) and tree:
            out = {}
            for key, value in tree.items():
                out.update(flatten(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: tree}

    normal = lambda value: json.loads(json.dumps(value, default=str))  # noqa: E731 (tuples → lists)
    old, new = flatten(normal(saved)), flatten(normal(current))
    structural = lambda key: any(key == f or key.startswith(f + ".") for f in checkpoint_lib.STRUCTURAL_FIELDS)  # noqa: E731
    return {key: (old[key], new[key]) for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and not structural(key)}


def _status_of(error: BaseException) -> tuple[str, str]:
    """status.json's (state, reason) for the error that ended a run."""
    from alignax.training.divergence import DivergenceError
    state = ("nonfinite" if isinstance(error, NonFiniteError) else
             "diverged" if isinstance(error, DivergenceError) else "failed")
    return state, f"{type(error).__name__}: {error}"[:2000]


def compiled_statistics(compiled: Any) -> dict[str, float]:
    """FLOPs and per-device memory of a compiled executable (whatever this backend reports).

    `flops` is XLA's cost analysis, which counts a loop body once; `matmul_flops` counts every dot and
    convolution once per loop trip (`alignax.compiled_costs`), the figure that compares objectives."""
    stats: dict[str, float] = {}
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    if cost and "flops" in cost:
        stats["flops"] = float(cost["flops"])
    try:
        stats["matmul_flops"] = compiled_costs.matmul_flops(compiled.as_text())
    except Exception as e:  # a diagnostic figure: never worth failing a run
        log.warning("could not count the step's matmul FLOPs from its HLO: %s", e)
    memory = compiled.memory_analysis()
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"):
        if memory is not None and hasattr(memory, field):
            stats[field.removesuffix("_in_bytes")] = float(getattr(memory, field))
    return stats

