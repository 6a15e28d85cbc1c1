"""Pretrained weights on object storage (`gs://`, `s3://`, any fsspec URL), mirrored once to local disk.

The loaders read safetensors headers first and then seek into the files, which wants a local
disk; TPU VMs keep their weights in GCS. So a remote model directory is copied the first time
into `$ALIGNAX_CACHE_DIR` (default `~/.cache/alignax`) under `remote/<protocol>/<path>`, and
later runs reuse the copy. The copy is atomic: it is written to a scratch directory beside the
target, marked complete, then renamed, so an interrupted download is never mistaken for a model.
Only the directory asked for is copied: for a pipeline root, just its `transformer/` or `vae/`.
`gs://` needs `gcsfs` installed; fsspec finds it by protocol.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from alignax.errors import ConfigError

COMPLETE = ".alignax-complete"  # written last, inside the scratch copy, before the rename


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNAX_CACHE_DIR") or Path.home() / ".cache" / "alignax")


def _filesystem(url: str, field: str):
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        hint = " (gs:// needs `pip install gcsfs`)" if url.startswith("gs://") else ""
        raise ConfigError(f"{field}={url!r}: cannot open its filesystem{hint}: {e}") from e


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def exists(url: str, *, field: str) -> bool:
    fs, path = _filesystem(url, field)
    return fs.exists(path)


def _mirror_path(url: str) -> Path:
    protocol, _, rest = url.partition("://")
    return cache_dir() / "remote" / protocol / rest.strip("/")


def mirrored(url: str) -> Path | None:
    """The complete local mirror of `url`, if there is one (no remote access)."""
    target = _mirror_path(url)
    return target if (target / COMPLETE).is_file() else None


def localize(url: str, *, field: str) -> Path:
    """The local mirror of the remote directory `url`, downloading it first if it is not complete."""
    if (done := mirrored(url)) is not None:
        return done
    fs, root = _filesystem(url, field)
    target = _mirror_path(url)
    if not fs.isdir(root):
        raise ConfigError(f"{field}={url!r}: not a directory")
    files = fs.find(root)  # files only: no per-file round trip to ask
    if not files:
        raise ConfigError(f"{field}={url!r}: the directory is empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        prefix = root.rstrip("/") + "/"
        for path in files:
            local = scratch / path[len(prefix):]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(local))
        (scratch / COMPLETE).write_text(url)
        if target.exists():  # an older, incomplete mirror
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
