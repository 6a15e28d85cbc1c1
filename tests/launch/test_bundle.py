"""The code bundle: a clean tree ships HEAD; uncommitted changes are refused (naming the files) unless allowed,
and then ship as a commit of the working tree; untracked files never ship; configs outside the repository are
refused. On a throwaway git repository."""

from __future__ import annotations

import subprocess
import tarfile

import pytest

from alignax.errors import ConfigError
from launch import bundle


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    (root / "a.py").write_text("A = 1\n")
    git(root, "add", "a.py")
    git(root, "commit", "-qm", "one")
    return root


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_a_clean_tree_ships_head(repo, tmp_path):
    (repo / "untracked.txt").write_text("never shipped")
    code = bundle.describe(repo)
    assert code.commit == git(repo, "rev-parse", "HEAD") and not code.dirty
    assert code.name == f"alignax-{code.commit[:12]}.tar.gz"
    assert members(bundle.create(code, tmp_path / "out", repo)) == {"a.py": b"A = 1\n"}


def test_uncommitted_changes_are_refused_unless_allowed_and_then_shipped(repo, tmp_path):
    (repo / "a.py").write_text("A = 2\n")
    with pytest.raises(ConfigError, match=r"uncommitted changes \(a.py\).*--allow_dirty"):
        bundle.describe(repo)
    code = bundle.describe(repo, allow_dirty=True)
    assert code.dirty and code.commit != git(repo, "rev-parse", "HEAD") and code.name.endswith("-dirty.tar.gz")
    assert members(bundle.create(code, tmp_path / "out", repo)) == {"a.py": b"A = 2\n"}
    assert git(repo, "status", "--porcelain") == "M a.py"  # the working tree and index are untouched


def test_configs_outside_the_repository_are_refused(repo, tmp_path):
    (repo / "configs").mkdir()
    assert bundle.repo_relative(str(repo / "configs" / "x.py") + ":lora", repo) == "configs/x.py:lora"
    with pytest.raises(ConfigError, match="outside the repository"):
        bundle.repo_relative(str(tmp_path / "x.py"), repo)
