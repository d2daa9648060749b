"""One advisory file lock (``<target>.lock``, flock) for every command that must not interleave."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import console
from .errors import SinetError

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, the invoker (cron, a retry loop) tries again later


class BusyError(SinetError):
    """Another run holds the lock: a temporary condition, so the CLI exits with EX_TEMPFAIL (75)."""


@contextmanager
def file_lock(target: Path, wait: float | None, holder: str) -> Iterator[None]:
    """Hold ``<target>.lock`` for the block. ``wait=None`` blocks until free; otherwise give up after
    ``wait`` seconds with a one-line :class:`BusyError` naming the lock and ``holder`` (the kind of
    run that holds it)."""
    lock_path = target.with_name(target.name + ".lock")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + max(0.0, wait)
            waiting = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BusyError(
                            f"{target}: another {holder} run holds {lock_path}; gave up after {wait:g}s "
                            "(it goes on; retry later or pass --wait SECONDS)"
                        ) from None
                    if not waiting:
                        console.detail(f"{lock_path}: held by another {holder} run, waiting up to {wait:g}s")
                        waiting = True
                    time.sleep(min(0.1, left))
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
