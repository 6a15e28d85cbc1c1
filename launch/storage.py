"""The submitting machine's view of a bucket, through `gcloud storage` (it needs gcloud anyway).

The controller of a TPU study reads each point's status.json and log from the bucket and copies the
results back (`collect`); it does not need gcsfs, which has no release matching the fsspec that
alignax pins. Workers write the bucket through orbax (tensorstore) and `alignax.fs` (gcsfs).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from alignax.errors import ConfigError

# Runs one command and returns (exit code, stdout, stderr); tests substitute a fake `gcloud` on PATH.
Runner = Callable[[Sequence[str]], tuple[int, str, str]]


def run_command(argv: Sequence[str]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ConfigError(f"{argv[0]!r} is not on PATH: the TPU backends drive the Google Cloud CLI "
                          f"(https://cloud.google.com/sdk/docs/install)") from e
    return done.returncode, done.stdout, done.stderr


class GcloudStorage:
    """`gs://` objects through `gcloud storage` (cat, cp, ls)."""

    def __init__(self, run: Runner = run_command, project: str | None = None):
        self.run, self.project = run, project

    def _argv(self, *args: str) -> list[str]:
        return ["gcloud", "storage", *args] + ([f"--project={self.project}"] if self.project else [])

    def read_text(self, url: str) -> str | None:
        """The object's text, or None when it does not exist (or cannot be read)."""
        code, out, _ = self.run(self._argv("cat", url))
        return out if code == 0 else None

    def read_json(self, url: str) -> Any:
        text = self.read_text(url)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return None

    def upload(self, local: str, url: str) -> None:
        code, _, err = self.run(self._argv("cp", local, url))
        if code:
            raise ConfigError(f"gcloud storage cp {local} {url} failed (exit {code}): {err.strip()[-500:]}")

    def download(self, url: str, local: str) -> bool:
        """Copies one object; False when it does not exist."""
        code, _, _ = self.run(self._argv("cp", url, local))
        return code == 0

    def list(self, url: str) -> list[str]:
        """The object and prefix URLs directly under `url/` ([] when there is none)."""
        code, out, _ = self.run(self._argv("ls", url.rstrip("/") + "/"))
        return [line.strip() for line in out.splitlines() if line.strip()] if code == 0 else []
