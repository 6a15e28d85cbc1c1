"""Fault and bad-input campaign: run the CLIs as a careless user, a crashing machine and a corrupting
disk would, and classify every outcome.

    python experiments/robustness/fault_cases.py [--only=NAME,...] [--workdir=DIR]

Each case sets something up, runs one or more real CLI processes (from a scratch directory, not
the repository root, with absolute config paths) and classifies the result:

- ok:      the run did what it should (a refusal for bad input, a clean resume after a fault)
- clear:   (bad input only) refused with a short message that names the culprit; counted with ok
- unclear: refused, but with a traceback or without naming the culprit
- silent:  accepted something it should have refused (exit 0, wrong result)
- loss:    a user's file, a checkpoint or a metrics row was lost or damaged
- crash:   an unexpected exception, a hang (timeout) or a wrong exit code

The last line is `fault_cases: N ok, N unclear, N silent, N loss, N crash` (issue 9's counts).
It takes about 10-15 minutes on 2 CPU cores; run it after changing the trainer, checkpoints or CLIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
SFT = f"{CONFIGS / 'sft_tiny.py'}"
REWARD = f"{CONFIGS / 'reward_backprop_tiny.py'}"
TIMEOUT = 400


@dataclasses.dataclass
class Outcome:
    verdict: str  # ok | unclear | silent | loss | crash
    detail: str = ""


def run(args: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # as a user has it: the installed package, not the checkout
    try:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(args, -999, e.stdout or "", (e.stderr or "") + "\n<timeout>")


def train(workdir: Path, *overrides: str, config: str = SFT) -> list[str]:
    return ["-m", "alignax.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def refused(proc: subprocess.CompletedProcess, *must_name: str, max_lines: int = 6) -> Outcome:
    """Bad input: a non-zero exit with a short message naming every string in `must_name`."""
    text = proc.stderr + proc.stdout
    if proc.returncode == -999:
        return Outcome("crash", "timeout")
    if proc.returncode == 0:
        return Outcome("silent", "exit 0")
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    missing = [name for name in must_name if name not in text]
    if "Traceback (most recent call last)" in proc.stderr or missing:
        return Outcome("unclear", f"missing {missing}" if missing else "traceback: " + error_lines[-1][:160])
    if len(error_lines) > max_lines:
        return Outcome("unclear", f"{len(error_lines)} lines of stderr")
    return Outcome("ok", error_lines[-1][:160] if error_lines else "")


def succeeded(proc: subprocess.CompletedProcess, *must_say: str) -> Outcome:
    if proc.returncode == -999:
        return Outcome("crash", "timeout")
    if proc.returncode != 0:
        return Outcome("crash", f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][:200])
    missing = [s for s in must_say if s not in proc.stderr + proc.stdout]
    return Outcome("unclear", f"output lacks {missing}") if missing else Outcome("ok")


def metrics_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in rows if "loss" in r]


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


class Campaign:
    """Shared, expensive fixtures (one finished tiny run) and the cases."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.cwd = scratch / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self._base: Path | None = None

    def fresh(self, name: str) -> Path:
        path = self.scratch / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def base_run(self) -> Path:
        """A finished 4-step sft run (checkpoints at 2 and 4), copied by cases that damage it."""
        if self._base is None:
            workdir = self.fresh("base")
            proc = run(train(workdir, "--config.total_steps=4", "--config.checkpoint_every=2",
                             "--config.keep_checkpoints=5"), self.cwd)
            if proc.returncode != 0:
                raise RuntimeError("the base run failed:\n" + proc.stderr[-3000:])
            self._base = workdir
        return self._base

    def copy_of_base(self, name: str) -> Path:
        target = self.fresh(name)
        shutil.copytree(self.base_run(), target)
        return target

    # ---- command-line and config mistakes -------------------------------------------------------

    def case_override_typo(self) -> Outcome:
        return refused(run(train(self.fresh("typo"), "--config.totl_steps=5"), self.cwd), "totl_steps",
                       "total_steps")

    def case_weights_typo(self) -> Outcome:
        proc = run(train(self.fresh("wtypo"), "--config.pareto.weights.green=1", config=REWARD), self.cwd)
        return refused(proc, "green", "red", "blue")

    def case_missing_config_file(self) -> Outcome:
        return refused(run(train(self.fresh("nofile"), config=str(CONFIGS / "nope.py")), self.cwd), "nope.py")

    def case_config_option_typo(self) -> Outcome:
        return refused(run(train(self.fresh("opt"), config=REWARD + ":draftk"), self.cwd), "draftk")

    def case_unknown_flag(self) -> Outcome:
        return refused(run(train(self.fresh("flag"), "--total_steps=5"), self.cwd), "total_steps")

    def _value(self, override: str, field: str, config: str = SFT) -> Outcome:
        return refused(run(train(self.fresh("value"), override, config=config), self.cwd), field)

    def case_guidance_nan(self) -> Outcome:
        return self._value("--config.sample.guidance_scale=nan", "sample.guidance_scale")

    def case_shift_zero(self) -> Outcome:
        return self._value("--config.sample.shift=0", "sample.shift")

    def case_ema_decay_one(self) -> Outcome:
        return self._value("--config.ema.decay=1.0", "ema.decay")

    def case_ema_every_zero(self) -> Outcome:
        return self._value("--config.ema.every=0", "ema.every")

    def case_adam_b1(self) -> Outcome:
        return self._value("--config.optim.b1=1.5", "optim.b1")

    def case_eval_every_negative(self) -> Outcome:
        return self._value("--config.eval_every=-5", "eval_every")

    def case_max_nonfinite_zero(self) -> Outcome:
        return self._value("--config.max_nonfinite_steps=0", "max_nonfinite_steps")

    def case_seed_negative(self) -> Outcome:
        return self._value("--config.seed=-1", "seed")

    def case_draft_k_too_large(self) -> Outcome:
        return self._value("--config.objective.k=99", "k", config=REWARD + ":draft_k")

    def case_wrong_dataset_kind(self) -> Outcome:
        base = self.base_run()
        proc = run(train(self.fresh("kind"), "--config.objective.name=dpo", "--config.data.generate=",
                         f"--config.data.path={base / 'tiny_world' / 'captioned_images'}"), self.cwd)
        return refused(proc, "label_0")

    def case_embedding_width_mismatch(self) -> Outcome:
        base = self.base_run()
        proc = run(train(self.fresh("width"), "--config.data.generate=", f"--config.data.path={base / 'tiny_world'}",
                         "--config.model.transformer.joint_attention_dim=24"), self.cwd)
        return refused(proc, "encoder_hidden_states")

    def case_gcs_workdir_without_gcsfs(self) -> Outcome:
        try:
            import gcsfs  # noqa: F401
            return Outcome("ok", "gcsfs installed: not applicable")
        except ImportError:
            pass
        proc = run(train("gs://no-such-bucket/run"), self.cwd, timeout=120)  # type: ignore[arg-type]
        local = self.cwd / "gs:"
        if local.exists():
            return Outcome("loss", "wrote a local ./gs:/ tree")
        return refused(proc, "gs://no-such-bucket/run")

    # ---- export and evaluate ------------------------------------------------------------------

    def _export(self, workdir: Path, out: Path | str) -> subprocess.CompletedProcess:
        return run(["-m", "alignax.export", f"--workdir={workdir}", f"--out={out}"], self.cwd)

    def _export_refused(self, out: Path, workdir: Path | None = None) -> Outcome:
        workdir = workdir or self.base_run()
        before = snapshot(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
        outcome = refused(self._export(workdir, out), "--out")
        after = snapshot(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
        if before != after:
            return Outcome("loss", f"{out} changed")
        return outcome

    def case_export_onto_workdir(self) -> Outcome:
        workdir = self.copy_of_base("exp_workdir")
        return self._export_refused(workdir, workdir)

    def case_export_into_checkpoints(self) -> Outcome:
        workdir = self.copy_of_base("exp_ckpt")
        return self._export_refused(workdir / "checkpoints", workdir)

    def case_export_onto_pipeline_root(self) -> Outcome:
        root = self.fresh("pipeline")
        (root / "vae").mkdir(parents=True)
        (root / "vae" / "config.json").write_text("{}")
        (root / "model_index.json").write_text("{}")
        return self._export_refused(root)

    def case_export_onto_a_file(self) -> Outcome:
        target = self.fresh("afile")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("precious")
        return self._export_refused(target)

    def case_export_twice(self) -> Outcome:
        out = self.fresh("export_out")
        first, second = self._export(self.base_run(), out), self._export(self.base_run(), out)
        if first.returncode or second.returncode:
            return Outcome("crash", (second.stderr or first.stderr).strip().splitlines()[-1][:200])
        if not (out / "config.json").exists() or not (out / "vae" / "config.json").exists():
            return Outcome("silent", "the export lacks the transformer or the VAE")
        mode = (out / "config.json").stat().st_mode & 0o777
        if mode != 0o644:
            return Outcome("unclear", f"exported file mode {oct(mode)}")
        return succeeded(second, str(out))

    def case_export_wrong_workdir(self) -> Outcome:
        missing = self.fresh("no_such_run")
        outcome = refused(self._export(missing, self.fresh("x_out")), str(missing))
        return Outcome("loss", "created the workdir") if missing.exists() else outcome

    def case_evaluate_empty_workdir(self) -> Outcome:
        empty = self.fresh("empty_run")
        empty.mkdir(parents=True)
        proc = run(["-m", "alignax.evaluate", f"--workdir={empty}"], self.cwd)
        outcome = refused(proc, str(empty))
        return Outcome("loss", "created files in the workdir") if any(empty.iterdir()) else outcome

    # ---- checkpoints, preemption, concurrency -------------------------------------------------

    def _resume(self, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
        return run(train(workdir, "--config.total_steps=6", "--config.checkpoint_every=2",
                         "--config.keep_checkpoints=5", *extra), self.cwd)

    def case_corrupt_latest_checkpoint(self) -> Outcome:
        workdir = self.copy_of_base("corrupt")
        state = workdir / "checkpoints" / "4" / "state"
        victims = sorted(p for p in state.rglob("*") if p.is_file() and p.stat().st_size > 0)
        for victim in victims[: max(1, len(victims) // 2)]:
            victim.write_bytes(b"\0garbage")
        proc = self._resume(workdir)
        if proc.returncode != 0:
            return refused(proc, "4")  # stopping is acceptable if it names the step
        return succeeded(proc, "4") if metrics_steps(workdir) == [1, 2, 3, 4, 5, 6] else Outcome(
            "loss", f"metrics steps {metrics_steps(workdir)}")

    def case_stray_empty_step_dir(self) -> Outcome:
        workdir = self.copy_of_base("stray")
        (workdir / "checkpoints" / "31").mkdir()
        proc = self._resume(workdir)
        return succeeded(proc, "31") if proc.returncode == 0 else refused(proc, "31")

    def case_checkpoints_is_a_file(self) -> Outcome:
        workdir = self.fresh("ckfile")
        workdir.mkdir(parents=True)
        (workdir / "checkpoints").write_text("oops")
        start = time.time()
        outcome = refused(run(train(workdir, "--config.total_steps=2"), self.cwd, timeout=180), "checkpoints")
        return Outcome("crash", "took over 60 s") if time.time() - start > 60 else outcome

    def case_changed_seed_on_resume(self) -> Outcome:
        workdir = self.copy_of_base("seed")
        return refused(self._resume(workdir, "--config.seed=7"), "seed")

    def case_two_trainers_one_workdir(self) -> Outcome:
        workdir = self.fresh("twice")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        first = subprocess.Popen([sys.executable, *train(workdir, "--config.total_steps=400",
                                                         "--config.checkpoint_every=1000")],
                                 cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
                time.sleep(1)
            second = run(train(workdir, "--config.total_steps=400"), self.cwd, timeout=240)
            return refused(second, str(first.pid))
        finally:
            first.kill()
            first.wait()

    def _sigterm_after(self, workdir: Path, marker: Callable[[], bool], *overrides: str,
                       wait: float = 0.0) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        proc = subprocess.Popen([sys.executable, *train(workdir, *overrides)], cwd=self.cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not marker():
            time.sleep(0.05)
        time.sleep(wait)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, -999, out, err + "<timeout>")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def case_sigterm_during_startup(self) -> Outcome:
        workdir = self.fresh("term_start")
        proc = self._sigterm_after(workdir, lambda: True, "--config.total_steps=4", wait=2.0)
        if proc.returncode != 0:
            return Outcome("crash", f"exit {proc.returncode}")
        return succeeded(proc, "preempt")

    def case_sigterm_on_checkpoint_steps(self) -> Outcome:
        workdir = self.fresh("term_every")
        proc = self._sigterm_after(workdir, lambda: len(metrics_steps(workdir)) >= 2, "--config.total_steps=200",
                                   "--config.checkpoint_every=1", "--config.log_every=1", "--config.eval_every=0")
        if proc.returncode != 0:
            return Outcome("crash", f"exit {proc.returncode}: " + proc.stderr.strip().splitlines()[-1][:200])
        saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        steps = metrics_steps(workdir)
        if not saved or steps != list(range(1, saved[-1] + 1)):
            return Outcome("loss", f"saved {saved}, metrics steps {steps}")
        return Outcome("ok", f"preempted at {saved[-1]}")

    def case_sigterm_on_last_step(self) -> Outcome:
        workdir = self.fresh("term_last")
        proc = self._sigterm_after(workdir, lambda: (workdir / "checkpoints" / "3").exists(),
                                   "--config.total_steps=3", "--config.checkpoint_every=1", "--config.eval_every=0")
        return succeeded(proc) if proc.returncode == 0 else Outcome("crash", f"exit {proc.returncode}")

    def case_kill9_then_resume_is_exact(self) -> Outcome:
        import numpy as np
        reference = self.fresh("k9_ref")
        ok = run(train(reference, "--config.total_steps=6", "--config.checkpoint_every=2", "--config.eval_every=0"),
                 self.cwd)
        if ok.returncode:
            return Outcome("crash", "reference run failed")
        workdir = self.fresh("k9")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        command = train(workdir, "--config.total_steps=6", "--config.checkpoint_every=2", "--config.eval_every=0")
        proc = subprocess.Popen([sys.executable, *command], cwd=self.cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (workdir / "checkpoints" / "2").exists():
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        resumed = run(train(workdir, "--config.total_steps=6", "--config.checkpoint_every=2", "--config.eval_every=0"),
                      self.cwd)
        if resumed.returncode:
            return Outcome("crash", resumed.stderr.strip().splitlines()[-1][:200])
        from alignax.training.checkpoint import Checkpointer
        a = Checkpointer(reference, keep=10, async_save=False).restore_on_one_device(6)["trainable"]
        b = Checkpointer(workdir, keep=10, async_save=False).restore_on_one_device(6)["trainable"]
        import jax
        same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        steps = metrics_steps(workdir)
        if not same:
            return Outcome("silent", "resumed params differ from the uninterrupted run")
        if steps != [1, 2, 3, 4, 5, 6]:
            return Outcome("loss", f"metrics steps {steps}")
        return Outcome("ok")

    # ---- pretrained weights -------------------------------------------------------------------

    def _pretrained(self, name: str, mutate: Callable[[Path], None]) -> Path:
        base = self.base_run()
        out = self.fresh(name)
        ok = self._export(base, out)
        if ok.returncode:
            raise RuntimeError(ok.stderr[-2000:])
        mutate(out)
        return out

    def _weights_case(self, name: str, mutate: Callable[[Path], None], *must_name: str) -> Outcome:
        model = self._pretrained(name, mutate)
        return refused(run(train(self.fresh(name + "_run"), f"--config.model.pretrained={model}",
                                 "--config.total_steps=2"), self.cwd), *must_name)

    @staticmethod
    def _edit_tensor(directory: Path, edit: Callable) -> str:
        from safetensors.numpy import load_file, save_file
        path = next(directory.glob("*.safetensors"))
        tensors = load_file(str(path))
        key = sorted(k for k in tensors if k.endswith("weight"))[0]
        tensors[key] = edit(tensors[key])
        save_file(tensors, str(path), metadata={"format": "pt"})
        return key

    def case_nan_weights(self) -> Outcome:
        import numpy as np
        holder = {}
        def mutate(d):
            holder["key"] = self._edit_tensor(d, lambda a: np.full_like(a, np.nan))
        return self._weights_case("nanw", mutate, "nan")

    def case_integer_weights(self) -> Outcome:
        def mutate(d):
            self._edit_tensor(d, lambda a: a.astype("int32"))
        return self._weights_case("intw", mutate, "int")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated case names (without case_)")
    parser.add_argument("--workdir", default="", help="scratch directory (default: a new temporary one)")
    args = parser.parse_args()
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="alignax-faults-")).absolute()
    campaign = Campaign(scratch)
    names = [n.removeprefix("case_") for n in dir(campaign) if n.startswith("case_")]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"--only: unknown cases {unknown}; known: {', '.join(sorted(names))}")
        names = wanted
    counts = {v: 0 for v in ("ok", "unclear", "silent", "loss", "crash")}
    for name in names:
        start = time.time()
        try:
            outcome = getattr(campaign, f"case_{name}")()
        except Exception as e:  # a broken fixture is a crash of the case, not of the campaign
            outcome = Outcome("crash", f"{type(e).__name__}: {str(e)[-300:]}")
        counts[outcome.verdict] += 1
        print(f"{outcome.verdict:8s} {name:34s} {time.time() - start:6.1f}s  {outcome.detail}", flush=True)
    print(f"scratch directory: {scratch}")
    print("fault_cases: " + ", ".join(f"{n} {v}" for v, n in counts.items()))


if __name__ == "__main__":
    main()
