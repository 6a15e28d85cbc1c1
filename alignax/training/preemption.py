"""SIGTERM (a TPU preemption, a scheduler's stop) as a process-wide flag.

The handler only sets the flag; the CLI checks it between expensive start-up phases and the
trainer at every step boundary, where the state is consistent and can be saved. The flag is
sticky: once a process has been asked to stop, every later check in it says so. The CLI
installs the handler first thing, so a SIGTERM during data generation, model building or
compilation is honoured too (nothing to save before the first step, one log line, exit 0).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("alignax")

_requested = threading.Event()
_UNCHANGED = object()


def request(signum: int | None = None, frame: Any = None) -> None:
    """Marks this process as preempted (the SIGTERM handler; tests call it directly)."""
    del frame
    if not _requested.is_set():
        what = "SIGTERM" if signum in (None, signal.SIGTERM) else signal.Signals(signum).name
        log.warning("%s: stopping at the next safe point (a step boundary: save and exit 0; before the first step: "
                    "exit 0 with nothing to save)", what)
    _requested.set()


def requested() -> bool:
    """True once this process has been asked to stop (by SIGTERM or `request`)."""
    return _requested.is_set()


def clear() -> None:
    """Forgets a request (tests only: a real process that was asked to stop should stop)."""
    _requested.clear()


def install() -> Any:
    """Installs the SIGTERM handler; returns what `restore` needs to put the previous one back.
    A no-op off the main thread (Python only delivers signals there) or when already installed."""
    if threading.current_thread() is not threading.main_thread():
        return _UNCHANGED
    previous = signal.getsignal(signal.SIGTERM)
    if previous is request:
        return _UNCHANGED
    signal.signal(signal.SIGTERM, request)
    return previous


def restore(previous: Any) -> None:
    if previous is not _UNCHANGED and previous is not None:
        signal.signal(signal.SIGTERM, previous)


def agreed(local: bool = False) -> bool:
    """Whether any process was asked to stop (`local` or's in an extra per-process flag). Every
    process must call this at the same points: with several processes it is a collective."""
    import jax
    flag = bool(local) or requested()
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
