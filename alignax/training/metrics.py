"""Where a run reports: `workdir/metrics.jsonl`, TensorBoard event files, PNG sample grids and
one console line. Only process 0 writes; the other processes' calls are no-ops.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


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
    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._jsonl = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for name, value in clean.items():
            self._tb.add_scalar(name, value, step)

    def images(self, step: int, name: str, images: np.ndarray) -> Path | None:
        """Writes a grid to TensorBoard and `workdir/samples/{name}_{step:06d}.png`."""
        if not self.enabled:
            return None
        from PIL import Image
        grid = image_grid(np.asarray(images, np.float32))
        self._tb.add_image(name, grid, step, dataformats="HWC")
        path = self.workdir / "samples" / f"{name}_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


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
