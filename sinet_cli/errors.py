"""User-facing errors: one line, naming the file (and line or image id) and what is wrong."""

from __future__ import annotations

import errno
import os
import re


class SinetError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""


class InputError(SinetError):
    """A malformed input file. Formats as ``file:line: message`` when a line is known."""

    def __init__(self, path: object, message: str, line: int | None = None):
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


class Interrupted(SinetError):
    """Ctrl-C (SIGINT): the CLI prints what was kept and how to continue, and exits 130."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

# What to do about a failed read or write, by errno.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_HDF5_ERRNO = re.compile(r"errno = (\d+), error message = '([^']*)'")
_HDF5_FILE = re.compile(r"(?:filename|name) = '([^']*)'")


class StorageError(SinetError):
    """A file could not be read or written (disk full, a file size limit, a read-only or
    forbidden folder, an I/O error): one line naming the file and what to do. Whatever a command
    had committed before stays as it was (every artifact is written to a temporary name first)."""

    @classmethod
    def from_os_error(cls, e: BaseException, path: object = None, writing: bool | None = None) -> "StorageError":
        """``writing`` None: not known (a full disk or a read-only file system then says writing)."""
        code, reason, name = os_error_parts(e)
        where = path if path is not None else (name or "a file")
        if writing is None and code in _FULL + (errno.EROFS,):
            writing = True
        verb = {True: "write", False: "read", None: "access"}[writing]
        return cls(f"{where}: cannot {verb} ({reason}); {advice(code, writing is not False)}")


def os_error_parts(e: BaseException) -> tuple[int | None, str, str | None]:
    """(errno, reason, file name) of an OSError, or of an HDF5 error h5py raised as an OSError or
    RuntimeError (its message carries ``errno = N, error message = '...'`` and the file name)."""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    reason = getattr(e, "strerror", None) if isinstance(e, OSError) else None
    name = getattr(e, "filename", None) if isinstance(e, OSError) else None
    text = str(e)
    m = _HDF5_ERRNO.search(text)
    if m:
        code = code or int(m.group(1))
        reason = reason or m.group(2)
    if name is None:
        f = _HDF5_FILE.search(text)
        name = f.group(1) if f else None
    if not reason:
        reason = os.strerror(code) if code else " ".join(text.split())[:160]
    return code, reason, None if name is None else str(name)


def is_storage_error(e: BaseException) -> bool:
    """An OSError, or an HDF5 write/read failure that h5py raised as a RuntimeError."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and _HDF5_ERRNO.search(str(e)) is not None)


def advice(code: int | None, writing: bool = True) -> str:
    if code in _FULL:
        return ("the disk is full or a file size limit (ulimit -f) was reached: free space or raise the limit, then "
                "run the same command again (finished artifacts are unchanged)")
    if code in _NOT_WRITABLE:
        return ("not writable: pass --out with a folder you may write, or fix its permissions"
                if writing else "not readable: fix its permissions")
    if code == errno.ENOENT:
        return "it does not exist"
    return "check the disk and the path, then run the same command again (finished artifacts are unchanged)"
