"""Where a run reports: `workdir/metrics.jsonl`, TensorBoard event files, PNG sample grids and
one console line. Only process 0 writes; the other processes' calls are no-ops.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from alignax import fs


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] → one uint8 (rows·H, cols·W, 3) grid."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return grid


class MetricsWriter:
    """`metrics.jsonl` (one JSON row per step), TensorBoard events and PNG grids under `workdir`,
    local or remote (`gs://`, `memory://`, any fsspec URL; alignax.fs).

    Object stores have no append and tensorboardX's own gs:// writer is broken, so for a remote
    workdir both the jsonl and the event files are written to a local staging directory and
    uploaded whole by `flush` (throttled to `upload_every` seconds unless forced) and `close`.
    PNGs are written directly, one atomic put each.
    """

    def __init__(self, workdir: fs.PathLike, *, enabled: bool = True, purge_step: int | None = None,
                 upload_every: float = 60.0):
        self.enabled = enabled
        self.workdir = fs.absolute(workdir)
        self.remote = fs.is_remote(self.workdir)
        self.upload_every = upload_every
        self._jsonl = None
        self._tb = None
        self._staging: str | None = None
        self._uploaded_at = time.monotonic()
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        self._jsonl_url = fs.join(self.workdir, "metrics.jsonl")
        if self.remote:
            self._staging = tempfile.mkdtemp(prefix="alignax-metrics-")
            self._jsonl_path = os.path.join(self._staging, "metrics.jsonl")
            self._tb_dir = os.path.join(self._staging, "tensorboard")
            if fs.exists(self._jsonl_url):
                with open(self._jsonl_path, "w") as f:
                    f.write(fs.read_text(self._jsonl_url))
        else:
            fs.makedirs(self.workdir)
            self._jsonl_path = self._jsonl_url
            self._tb_dir = fs.join(self.workdir, "tensorboard")
        self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115 (closed by close())
        # purge_step: TensorBoard drops the events a resumed run re-writes (steps >= purge_step).
        self._tb = SummaryWriter(self._tb_dir, purge_step=purge_step or None)

    def truncate(self, step: int) -> int:
        """Keeps only what a checkpoint at `step` covers: rows of earlier steps and the training rows
        (those with a loss) of `step` itself; `step=0` empties the file. A resumed run re-runs the
        later steps and writes their rows again, so each step appears once. A torn last line (a kill
        mid-write) goes too. The rewrite is atomic. Returns how many rows were dropped."""
        if not self.enabled:
            return 0
        self._jsonl.close()
        with open(self._jsonl_path) as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
                row_step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if row_step < step or (row_step == step and "loss" in row):
                kept.append(line)
        if len(kept) != len(lines):
            fs.write_text_atomic(self._jsonl_path, "".join(line + "\n" for line in kept))
        self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115
        if len(kept) != len(lines):
            self.flush(force=True)
        return len(lines) - len(kept)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for name, value in clean.items():
            self._tb.add_scalar(name, value, step)

    def record(self, step: int, fields: dict[str, Any]) -> None:
        """A non-scalar row in metrics.jsonl (e.g. `config_change`), not sent to TensorBoard."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **fields}, default=str) + "\n")
        self._jsonl.flush()

    def images(self, step: int, name: str, images: np.ndarray) -> str | None:
        """Writes a grid to TensorBoard and `workdir/samples/{name}_{step:06d}.png` (atomically)."""
        if not self.enabled:
            return None
        from PIL import Image
        grid = image_grid(np.asarray(images, np.float32))
        self._tb.add_image(name, grid, step, dataformats="HWC")
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG")
        path = fs.join(self.workdir, "samples", f"{name}_{step:06d}.png")
        fs.write_bytes_atomic(path, buffer.getvalue())
        return path

    def flush(self, *, force: bool = False) -> None:
        """Local: to disk. Remote: uploads the staged jsonl and events when forced or `upload_every`
        seconds have passed since the last upload."""
        if not self.enabled:
            return
        self._jsonl.flush()
        self._tb.flush()
        if self.remote and (force or time.monotonic() - self._uploaded_at >= self.upload_every):
            self._upload()

    def _upload(self) -> None:
        fs.put_file(self._jsonl_path, self._jsonl_url)
        if os.path.isdir(self._tb_dir):
            fs.put_tree(self._tb_dir, fs.join(self.workdir, "tensorboard"))
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        """Flushes, uploads (remote) and closes; safe to call twice."""
        if not self.enabled or self._jsonl is None:
            return
        self._tb.close()
        self._jsonl.close()
        try:
            if self.remote:
                self._upload()
        finally:
            self._jsonl = None
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)


def write_status(workdir: fs.PathLike, state: str, step: int | None, total_steps: int, reason: str = "") -> None:
    """`workdir/status.json`, atomically: how the run ended (`finished`, `preempted`, `diverged`,
    `nonfinite`, `failed`, or `stopped` for a `stop_after` test run), at which step, and why. Sweeps
    read it to mark points."""
    payload = {"state": state, "step": step, "total_steps": int(total_steps), "reason": reason}
    fs.write_text_atomic(fs.join(fs.absolute(workdir), "status.json"), json.dumps(payload, indent=1) + "\n")


class ConsoleProgress:
    """`step 120/1000 | loss 0.4310 | 3.2 steps/s | ETA 4m35s` rewritten in place on a terminal."""

    def __init__(self, total_steps: int, *, enabled: bool = True, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, loss: float, steps_per_second: float) -> None:
        if not self.enabled:
            return
        remaining = (self.total - step) / steps_per_second if steps_per_second > 0 else float("inf")
        eta = "?" if not math.isfinite(remaining) else time.strftime("%Hh%Mm%Ss", time.gmtime(remaining))
        line = f"step {step}/{self.total} | loss {loss:.4f} | {steps_per_second:.2f} steps/s | ETA {eta}"
        self.stream.write(("\r" + line) if self._tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
