"""The code every worker runs: a tarball of the submitting commit (`git archive`), named by its hash.

Uncommitted changes to tracked files are refused unless `allow_dirty`: then the bundle is the working
tree as `git stash create` records it (a commit object that touches neither the index nor the tree),
so a point always runs code that has a hash. Untracked files are never bundled.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from alignax.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Bundle:
    commit: str      # the archived commit (HEAD, or the stash commit of a dirty tree)
    dirty: bool
    name: str        # alignax-<12 hex>[-dirty].tar.gz

    @property
    def directory(self) -> str:
        """Where a worker unpacks it (relative to its home)."""
        return self.name.removesuffix(".tar.gz")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise ConfigError(f"git {' '.join(args)} in {repo} failed: {done.stderr.strip()[-300:]} "
                          f"(the TPU backends ship the repository's commit to the workers)")
    return done.stdout.rstrip("\n")


def describe(repo: Path = REPO_ROOT, allow_dirty: bool = False) -> Bundle:
    """What `create` would archive; ConfigError listing the changed files of a dirty tree without `allow_dirty`."""
    changed = _git(repo, "status", "--porcelain", "--untracked-files=no")
    head = _git(repo, "rev-parse", "HEAD").strip()
    if not changed:
        return Bundle(head, False, f"alignax-{head[:12]}.tar.gz")
    if not allow_dirty:
        files = ", ".join(line[3:] for line in changed.splitlines()[:10])
        raise ConfigError(f"{repo} has uncommitted changes ({files}): commit them, or pass --allow_dirty to ship "
                          f"the working tree as it is")
    stash = _git(repo, "stash", "create").strip() or head
    return Bundle(stash, True, f"alignax-{stash[:12]}-dirty.tar.gz")


def create(bundle: Bundle, out_dir: Path, repo: Path = REPO_ROOT) -> Path:
    """Writes the archive of `bundle.commit` into `out_dir`; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / bundle.name
    _git(repo, "archive", "--format=tar.gz", f"--output={path}", bundle.commit)
    return path


def repo_relative(config: str, repo: Path = REPO_ROOT) -> str:
    """`path[:arg]` of a config as the workers see it (relative to the unpacked bundle)."""
    path, sep, arg = config.partition(":")
    try:
        relative = Path(path).absolute().resolve().relative_to(repo.resolve())
    except ValueError:
        raise ConfigError(f"config {path} is outside the repository {repo}: the workers only have the "
                          f"repository's bundle; move the config into experiments/configs/ and commit it") from None
    return str(relative) + sep + arg
