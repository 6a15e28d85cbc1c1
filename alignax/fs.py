"""Paths that may be local or remote: one abstraction for every file alignax writes or reads.

A workdir, an export target or an eval JSON may live on local disk or on object storage
(`gs://bucket/...` on TPU pods; `memory://` in tests; any fsspec URL). Everything goes through
these helpers, never through `pathlib.Path(url)`, which silently turns `gs://b/x` into the local
directory `gs:/b/x`. Local paths stay plain strings handled by the local filesystem.
`gs://` needs `gcsfs` (`pip install gcsfs`); a missing backend is a ConfigError naming the path.

Object stores have no rename: a remote "atomic" write is one object put (atomic per object),
and a remote directory is published by writing its marker file last.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

from alignax.errors import ConfigError

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for `protocol://...` URLs other than `file://`."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def filesystem(path: PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, the path within it). Raises ConfigError when the protocol has no backend."""
    import fsspec
    text = os.fspath(path)
    try:
        return fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as e:
        hint = " (gs:// needs `pip install gcsfs`)" if text.startswith("gs://") else ""
        raise ConfigError(f"{text!r}: cannot open its filesystem{hint}: {e}") from e


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` for local paths and URLs alike (URLs keep their `protocol://`)."""
    text = os.fspath(base)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts) if parts else text
    return os.path.join(text, *parts)


def absolute(path: PathLike) -> str:
    """Local paths made absolute; URLs unchanged."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.abspath(os.path.expanduser(text))


def exists(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def isfile(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.isfile(p)


def makedirs(path: PathLike) -> None:
    """mkdir -p (a no-op on object stores without directories)."""
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
    """Base names of the entries directly under `path` ([] when it does not exist)."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        return []
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in fs.ls(p, detail=False))


def open_file(path: PathLike, mode: str = "r", **kwargs: Any) -> Any:
    """An open file object (text or binary by `mode`), local or remote."""
    fs, p = filesystem(path)
    if "w" in mode or "a" in mode:
        parent = posixpath.dirname(p) if is_remote(path) else os.path.dirname(p)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    return fs.open(p, mode, **kwargs)


def read_text(path: PathLike) -> str:
    with open_file(path, "r") as f:
        return f.read()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes `data` so that readers see the old file or the whole new one, never a part of it:
    a scratch file beside the target and `os.replace` locally; one object put remotely."""
    if is_remote(path):
        with open_file(path, "wb") as f:
            f.write(data)
        return
    target = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(scratch, 0o644)  # mkstemp's 0600 would make shared results unreadable to others
        os.replace(scratch, target)
    except BaseException:
        if os.path.exists(scratch):
            os.unlink(scratch)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def put_file(local: PathLike, remote: PathLike) -> None:
    """Copies a local file to `remote` (any path or URL)."""
    fs, p = filesystem(remote)
    if is_remote(remote):
        fs.put_file(os.fspath(local), p)
    else:
        with open(local, "rb") as f:
            write_bytes_atomic(remote, f.read())


def put_tree(local_dir: PathLike, remote_dir: PathLike) -> None:
    """Copies every file under `local_dir` to the same relative place under `remote_dir`."""
    local_dir = os.fspath(local_dir)
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            put_file(src, join(remote_dir, *rel.split("/")))
