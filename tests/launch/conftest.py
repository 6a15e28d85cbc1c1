"""Fake `gcloud` and `xpk` executables on PATH (tests/launch/fake_gcloud.py) and a fixed code bundle."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from launch import bundle

FAKE = Path(__file__).with_name("fake_gcloud.py")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeCloud:
    def __init__(self, root: Path):
        self.root = root
        self.gcs = root / "gcs"

    def scenario(self, **body) -> None:
        (self.root / "scenario.json").write_text(json.dumps(body))

    def calls(self) -> list[list[str]]:
        path = self.root / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def bucket(self, url: str) -> Path:
        return self.gcs / url.removeprefix("gs://")


@pytest.fixture
def fixed_bundle(monkeypatch):
    """The bundle of a fixed commit, whatever state this checkout is in."""
    fixed = bundle.Bundle(COMMIT, False, f"alignax-{COMMIT[:12]}.tar.gz")
    monkeypatch.setattr(bundle, "describe", lambda repo=bundle.REPO_ROOT, allow_dirty=False: fixed)

    def create(code, out_dir, repo=bundle.REPO_ROOT):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / code.name
        with tarfile.open(path, "w:gz") as tar:
            tar.add(str(bundle.REPO_ROOT / "requirements.txt"), arcname="requirements.txt")
        return path

    monkeypatch.setattr(bundle, "create", create)
    return fixed


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch, fixed_bundle) -> FakeCloud:
    root = tmp_path / "cloud"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("gcloud", "xpk"):
        path = bin_dir / program
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} {program} "$@"\n')
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_CLOUD_DIR", str(root))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR: bundles go under this test's directory
    return FakeCloud(root)
