"""The run loop of the small trainers (`alignax.identity.train`, `alignax.reward_model.train`).

They train one replicated state with one jitted step, so they do not need the main Trainer, but they
owe their users the same guarantees (alignax/training/trainer.py):

- one run per workdir: process 0 holds `WORKDIR/.alignax.lock` (training/workdir_lock.py) for the whole
  run, so a second trainer on the workdir fails at once naming the holder;
- SIGTERM (training/preemption.py) stops at the next step boundary with that step checkpointed, or
  before the first step with nothing to save; the run then returns `preempted=True` (no export) and a
  rerun of the same command resumes;
- resume from the newest READABLE checkpoint: a damaged newer step is moved aside and an older one
  restored (training/checkpoint.py `restore_latest`), a checkpoint of an incompatible config refused;
- `metrics.jsonl` cut back to the restored step (rows a killed run wrote past its checkpoint are written
  again, so each step appears once), and the eval of the restored step re-run when it falls on the
  eval cadence (its row is not one a checkpoint keeps);
- `WORKDIR/status.json` on every exit: finished, preempted or failed, with the step and the reason.

Use:

    with SmallLoop(workdir, config.to_dict(), total_steps=..., ...) as loop:
        ...build data, model, state (a dict with an int "step")...
        start, state = loop.restore(state, shardings)
        result = loop.train(state, loader.batches(start), step_fn, evaluate, start=start)
        if not result.preempted:
            ...export...
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from alignax import fs
from alignax.training import preemption
from alignax.training.workdir_lock import WorkdirLock

PyTree = Any
log = logging.getLogger("alignax")


@dataclasses.dataclass(frozen=True)
class LoopResult:
    final_step: int
    state: PyTree
    preempted: bool                  # stopped by SIGTERM before total_steps; a rerun resumes


class SmallLoop:
    """Lock, SIGTERM handler, checkpoints, metrics and status.json around one train loop (module docstring).

    A context manager: entering takes the workdir lock and installs the SIGTERM handler; leaving, however
    the run ended, closes the checkpointer and writers, writes status.json and releases both."""

    def __init__(self, workdir: fs.PathLike, config: Mapping[str, Any], *, total_steps: int, log_every: int,
                 eval_every: int, checkpoint_every: int, keep_checkpoints: int):
        self.workdir = fs.absolute(workdir)
        self.config = dict(config)   # saved with every checkpoint; a resume must be compatible with it
        self.total_steps = int(total_steps)
        self.log_every = int(log_every)
        self.eval_every = int(eval_every)
        self.checkpoint_every = int(checkpoint_every)
        self.keep_checkpoints = int(keep_checkpoints)
        self.is_main = jax.process_index() == 0
        self.checkpointer = None
        self.writer = None
        self.progress = None
        self.step: int | None = None
        self.status, self.reason = "failed", ""
        self._lock: WorkdirLock | None = None
        self._previous_handler: Any = None

    @classmethod
    def for_config(cls, workdir: fs.PathLike, config: Any) -> SmallLoop:
        """The loop for a validated small-trainer ConfigDict (the cadence fields every small trainer has)."""
        return cls(workdir, config.to_dict(), total_steps=config.total_steps, log_every=config.log_every,
                   eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
                   keep_checkpoints=config.keep_checkpoints)

    # ---- the run's frame ------------------------------------------------------------------------

    def __enter__(self) -> SmallLoop:
        self._previous_handler = preemption.install()
        try:
            if self.is_main:
                self._lock = WorkdirLock(self.workdir).acquire()
        except BaseException:
            preemption.restore(self._previous_handler)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        from alignax.training import metrics as metrics_lib

        if exc is not None:
            self.status, self.reason = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        errors: list[BaseException] = []

        def attempt(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (logged; raised below unless an error is propagating)
                log.error("%s failed: %s: %s", what, type(e).__name__, e)
                errors.append(e)

        if self.checkpointer is not None:
            attempt("closing the checkpointer", self.checkpointer.close)
        if self.progress is not None:
            attempt("closing the progress line", self.progress.finish)
        if self.writer is not None:
            attempt("closing the metrics writer", self.writer.close)
        if self.is_main:
            attempt("writing status.json", lambda: metrics_lib.write_status(
                self.workdir, self.status, self.step, self.total_steps, self.reason))
        if self._lock is not None:
            attempt("releasing the workdir", self._lock.release)
        preemption.restore(self._previous_handler)
        if errors and exc is None:
            raise errors[0]

    # ---- start-up ----------------------------------------------------------------------------------

    def preempted(self, phase: str) -> bool:
        """True, with status.json = preempted and nothing saved, when a SIGTERM came before the first step
        (`phase` says when; every process calls this at the same points)."""
        if not preemption.agreed():
            return False
        if self.step is None:
            steps = [int(n) for n in fs.listdir(fs.join(self.workdir, "checkpoints")) if n.isdigit()]
            self.step = max(steps, default=0)
        resume = f"; a rerun resumes from step {self.step}" if self.step else ""
        log.warning("preempted %s, before the first step: nothing to save%s", phase, resume)
        self.status, self.reason = "preempted", f"SIGTERM {phase}, before the first step: nothing saved"
        return True

    def restore(self, state: PyTree, shardings: PyTree) -> tuple[int, PyTree]:
        """(start step, state): the newest readable checkpoint placed with `shardings` (damaged newer steps
        moved aside), or (0, `state`); opens metrics.jsonl cut back to that step."""
        from alignax.training.checkpoint import Checkpointer, check_compatible
        from alignax.training.metrics import ConsoleProgress, MetricsWriter

        start = 0
        if self.checkpoint_every:
            self.checkpointer = Checkpointer(self.workdir, keep=self.keep_checkpoints, async_save=False)
            directory = self.checkpointer.directory
            restored = self.checkpointer.restore_latest(
                jax.eval_shape(lambda s: s, state), shardings,
                check_config=lambda saved: check_compatible(saved, self.config, directory))
            if restored is not None:
                start, state = restored
                log.info("resumed from %s step %d", directory, start)
        self.step = start
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main, purge_step=start)
        dropped = self.writer.truncate(start)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows past step %d (this run writes them again)", dropped, start)
        self.progress = ConsoleProgress(self.total_steps, enabled=self.is_main)
        return start, state

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self, state: PyTree, batches: Iterable[tuple[int, Any]],
              step_fn: Callable[[PyTree, Any], tuple[PyTree, Mapping[str, Any]]],
              evaluate: Callable[[PyTree, int], Mapping[str, float]], *, start: int,
              on_step: Callable[[int], None] | None = None) -> LoopResult:
        """Runs `step_fn(state, host_batch) -> (state, metrics with 'loss')` over `batches` (pairs (step, host
        batch) from `start`) up to total_steps. `evaluate(state, step) -> scalars` runs at `start` when that is
        0 or on the eval cadence, every `eval_every` steps and at the end. Train rows are `train/<metric>` plus
        `loss` (what metrics.jsonl keeps of a checkpointed step). `on_step(done)` runs after each finished
        step and its checkpoint (tests kill or preempt runs from it)."""
        evaluated: int | None = None

        def record_eval(step: int) -> None:
            nonlocal evaluated
            self.writer.scalars(step, evaluate(state, step))
            evaluated = step

        try:
            if start == 0 or (self.eval_every and start % self.eval_every == 0 and start < self.total_steps):
                record_eval(start)
            if self.preempted("before the first step"):
                return LoopResult(start, state, True)
            saved = start if self.checkpointer is not None and start else None
            tick, tick_step = time.perf_counter(), start
            for step, host in batches:
                if step >= self.total_steps:
                    break
                state, metrics = step_fn(state, host)
                done = self.step = step + 1
                if done % self.log_every == 0 or done == self.total_steps:
                    row = {f"train/{k}": float(v) for k, v in jax.device_get(dict(metrics)).items()}
                    now = time.perf_counter()
                    row["train/steps_per_second"] = (done - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, done
                    self.writer.scalars(done, {**row, "loss": row["train/loss"]})
                    self.progress.update(done, row["train/loss"], row["train/steps_per_second"])
                if self.eval_every and done % self.eval_every == 0 and done != self.total_steps:
                    record_eval(done)
                if self.checkpointer is not None and done % self.checkpoint_every == 0:
                    self.checkpointer.save(done, state, self.config)
                    saved = done
                if on_step is not None:
                    on_step(done)
                if done < self.total_steps and preemption.agreed():
                    return self._preempted_at(done, state, saved)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        final = max(int(jax.device_get(state["step"])), start)
        self.step = final
        if self.checkpointer is not None:
            self.checkpointer.save(final, state, self.config)  # a no-op when that step is saved already
        if evaluated != final:
            record_eval(final)
        self.status = "finished"
        self.reason = (f"the restored step {start} is already at total_steps={self.total_steps}"
                       if start >= self.total_steps else "")
        return LoopResult(final, state, False)

    def _preempted_at(self, step: int, state: PyTree, saved: int | None) -> LoopResult:
        if self.checkpointer is None:
            what = f"checkpoints are off (checkpoint_every=0): step {step} not saved"
        else:
            if saved != step:
                self.checkpointer.save(step, state, self.config)
            what = f"saved step {step}"
        if self.writer is not None:
            self.writer.flush(force=True)
        log.warning("preempted: %s", what)
        self.status, self.reason = "preempted", f"SIGTERM: {what}"
        return LoopResult(step, state, True)
