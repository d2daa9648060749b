"""Artifact locks: one reader-writer discipline for every command that touches an artifact folder.

Each artifact (``features.h5``, ``graph.h5``, ``prototypes.h5`` with ``prototypes.faiss``,
``scores.h5`` with ``suspects.tsv``, a ``train-X/`` run, ``export/``, ``report/``, the shared
``metrics.json``) has a lock file beside it, ``<artifact>.lock`` (flock). A command takes an
EXCLUSIVE lock on each artifact it writes and a SHARED lock on each artifact it reads, all of them
before it reads any input, option recorded in an artifact, or up-to-date check, and holds them
until it ends: two writers never interleave, a reader never sees half of a commit, and a command
that waited re-reads everything after it got its locks.

Locks are taken in one global order (:func:`order_key`: by absolute path, the shared
``metrics.json`` last), so two commands can never wait for each other. A lock that stays busy
past ``--wait`` seconds is a one-line :class:`BusyError` naming the artifact and the run that holds
it; the CLI exits 75 (EX_TEMPFAIL), which cron and retry loops treat as "try again later".

Locks are re-entrant within a thread (``rescore`` runs ``score-noise`` in process under the locks
it already holds). A folder nobody can write (read-only) is read without a lock: no writer can
change it either.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import console
from .errors import Interrupted, SinetError, StorageError

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, the invoker (cron, a retry loop) tries again later
LOCK_SUFFIX = ".lock"
# Locks taken after every other one: the shared metrics.json is merged by each train run at its
# end, while that run holds its other locks; nothing is locked after it, so it closes no cycle.
LAST = ("metrics.json",)
SHARED, EXCLUSIVE = "shared", "exclusive"


class BusyError(SinetError):
    """Another run holds the lock: a temporary condition, so the CLI exits with EX_TEMPFAIL (75)."""


def lock_path(artifact: Path) -> Path:
    """The lock file of an artifact (a file or a folder): ``<artifact>.lock`` beside it."""
    return artifact.with_name(artifact.name + LOCK_SUFFIX)


def order_key(artifact: Path) -> tuple[int, str]:
    """The one global order locks are taken in: by absolute path, ``metrics.json`` last."""
    return (1 if artifact.name in LAST else 0, os.path.abspath(artifact))


@dataclass
class _Held:
    fd: int
    mode: str
    depth: int = 1


_local = threading.local()  # per thread: a second thread of one process must wait like another process


def _held() -> dict[str, _Held]:
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


def held_mode(artifact: Path) -> str | None:
    """The mode this thread holds ``artifact``'s lock in (None: not held)."""
    h = _held().get(os.path.abspath(lock_path(artifact)))
    return None if h is None else h.mode


def _holder_of(fd: int) -> str:
    """Who the lock file says holds it ("<command> run (pid N)"), from what its holders wrote."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return f"another {text}" if text else "another process"


def _record_holder(fd: int, command: str) -> None:
    try:
        data = f"{command} run (pid {os.getpid()})\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # a lock file we may only read: the holder stays unnamed
        pass


def _open_lock(artifact: Path, mode: str) -> int | None:
    """The lock file's descriptor; None for a shared lock in a folder nobody can write."""
    path = lock_path(artifact)
    try:
        if mode == EXCLUSIVE:
            path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if mode == SHARED and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
            try:  # an existing lock file we may only read still orders us after its writers
                return os.open(path, os.O_RDONLY)
            except OSError:
                return None
        raise StorageError.from_os_error(e, path, writing=True) from None


def _acquire(fd: int, mode: str, artifact: Path, deadline: float | None, wait: float | None,
             command: str) -> None:
    op = fcntl.LOCK_EX if mode == EXCLUSIVE else fcntl.LOCK_SH
    if deadline is None:
        fcntl.flock(fd, op)
        return
    waiting = False
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusyError(_busy_message(fd, mode, artifact, wait)) from None
            if not waiting:
                console.detail(f"{lock_path(artifact)}: held by {_holder_of(fd)}; {command} waits up to {wait:g}s")
                waiting = True
            time.sleep(min(0.1, left))


def _busy_message(fd: int, mode: str, artifact: Path, wait: float | None) -> str:
    doing = "writing"
    if mode == EXCLUSIVE:  # readers or a writer? a shared lock is free exactly when only readers hold it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            doing = "reading"
        except BlockingIOError:
            pass
    return (f"{artifact}: busy: {_holder_of(fd)} holds {lock_path(artifact)} ({doing} it); gave up after "
            f"{wait or 0:g}s (it goes on; retry later or pass --wait SECONDS)")


def _release(fd: int) -> None:
    """Unlock; the last holder leaving clears the name it wrote (so a later waiter is not told of a
    run that ended)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only when no other run holds it
        os.ftruncate(fd, 0)
    except OSError:  # others still hold it (BlockingIOError), or a lock file we may only read
        pass
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def artifact_locks(writes: Iterable[Path] = (), reads: Iterable[Path] = (), wait: float | None = 0.0,
                   command: str = "sinet") -> Iterator[None]:
    """Hold an exclusive lock on each of ``writes`` and a shared lock on each of ``reads`` (an
    artifact in both is written) for the block, taken in :func:`order_key` order. ``wait``: seconds
    to wait for all of them together (None: until free); then a :class:`BusyError`."""
    wanted: dict[str, tuple[Path, str]] = {}
    for p in reads:
        wanted[os.path.abspath(p)] = (Path(p), SHARED)
    for p in writes:
        wanted[os.path.abspath(p)] = (Path(p), EXCLUSIVE)
    deadline = None if wait is None else time.monotonic() + max(0.0, float(wait))
    held = _held()
    taken: list[str] = []
    try:
        for _, (artifact, mode) in sorted(wanted.items(), key=lambda kv: order_key(kv[1][0])):
            key = os.path.abspath(lock_path(artifact))
            h = held.get(key)
            if h is not None:
                if mode == EXCLUSIVE and h.mode == SHARED:
                    raise RuntimeError(f"{lock_path(artifact)}: held shared by this run, cannot be upgraded")
                h.depth += 1
                taken.append(key)
                continue
            fd = _open_lock(artifact, mode)
            if fd is None:
                continue  # read-only folder: nobody can write it
            try:
                _acquire(fd, mode, artifact, deadline, wait, command)
            except BaseException:
                os.close(fd)
                raise
            _record_holder(fd, command)
            held[key] = _Held(fd, mode)
            taken.append(key)
        yield
    finally:
        for key in reversed(taken):
            h = held[key]
            h.depth -= 1
            if h.depth == 0:
                del held[key]
                try:
                    _release(h.fd)
                finally:
                    os.close(h.fd)


@contextmanager
def file_lock(target: Path, wait: float | None, holder: str) -> Iterator[None]:
    """An exclusive lock on one artifact (:func:`artifact_locks` with ``writes=[target]``)."""
    with artifact_locks(writes=[target], wait=wait, command=holder):
        yield


# -- commands ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a command locks: the artifacts it writes and reads, how long it waits, and what the
    user reruns after an interrupt (``resume``: how the rerun continues)."""

    writes: list[Path] = field(default_factory=list)
    reads: list[Path] = field(default_factory=list)
    wait: float | None = 0.0
    resume: str = "nothing was changed; run the same command again"
    units: list[Path] = field(default_factory=list)  # multi-file outputs whose interrupted commit to complete


def locked(command: str, plan: Callable[[dict[str, Any]], Plan]) -> Callable:
    """Decorate a typer command: compute its :class:`Plan` from its arguments, take the locks before
    the command body reads anything, complete any multi-file commit an interrupted run left
    (``plan.units``, under their exclusive locks), and turn Ctrl-C into one line saying what to do.
    Place it between ``@app.command(...)`` and the function."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            p = plan(dict(bound.arguments))
            try:
                with artifact_locks(p.writes, p.reads, p.wait, command):
                    from . import store

                    for unit in p.units:
                        done = store.recover_outputs(unit)
                        if done:
                            console.info(done)
                    return fn(*args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted(f"{command}: interrupted; {p.resume}") from None

        return run

    return wrap
