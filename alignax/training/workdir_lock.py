"""One run per workdir: an exclusive lock that refuses a second trainer, naming the holder.

Two trainers writing one `checkpoints/` would overwrite each other's steps (the second used to
die with a raw orbax error, or worse, not die). Process 0 of a run holds `WORKDIR/.alignax.lock`
with `fcntl.flock` and writes its pid, host and start time into it; a second run fails at once
with a ConfigError naming that holder.

The kernel drops a flock when its holder exits in any way (even `kill -9`), so a lock never goes
stale: a leftover file from a dead run is unlocked and the next run simply takes it (this is the
stale-lock detection, exact on one host; on NFS it rests on the server's lock manager).
Within one process the lock is re-entrant: a notebook or a test that builds a second Trainer on the
same workdir shares the first one's lock, released when the last holder releases it.
Object stores (`gs://`, any fsspec URL) have no locks: there the lock is skipped with a warning,
and keeping one run per remote workdir is the launcher's job.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import threading
from typing import Any

from alignax import fs
from alignax.errors import ConfigError

log = logging.getLogger("alignax")

LOCK_NAME = ".alignax.lock"

_registry_lock = threading.Lock()
_held: dict[str, list[int]] = {}  # real path of a lock file → [fd, holders in this process]


def _holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


class WorkdirLock:
    """`WorkdirLock(workdir).acquire()` ... `.release()`; both idempotent, also a context manager."""

    def __init__(self, workdir: fs.PathLike):
        self.workdir = fs.absolute(workdir)
        self.path = None if fs.is_remote(self.workdir) else os.path.join(self.workdir, LOCK_NAME)
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises ConfigError naming the run that holds it."""
        if self._key is not None:
            return self
        if self.path is None:
            log.warning("%s: object stores have no file locks, so nothing stops a second run from writing this "
                        "workdir at the same time; run one trainer per workdir", self.workdir)
            return self
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ConfigError(f"--workdir={self.workdir}: is a file, expected a directory (or a path to create)")
        os.makedirs(self.workdir, exist_ok=True)
        key = os.path.realpath(self.path)
        with _registry_lock:
            if key in _held:
                _held[key][1] += 1
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise ConfigError(
                        f"--workdir={self.workdir}: another alignax run is using it (pid {holder.get('pid', '?')} "
                        f"on host {holder.get('host', '?')}, since {holder.get('since', '?')}; it holds {self.path}); "
                        "wait for it to finish, stop it, or choose another --workdir") from None
                except BaseException:
                    os.close(fd)
                    raise
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
                _held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Drops this holder; the file lock goes when the last holder in this process releases it."""
        if self._key is None:
            return
        with _registry_lock:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    fd = entry[0]
                    del _held[self._key]
                    try:
                        os.ftruncate(fd, 0)  # the leftover file names no holder
                    finally:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                        os.close(fd)
        self._key = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
