"""Run one sinet command with faults injected at its renames (tests and bench/fault_cases.py).

    python tests/fault_run.py SINET ARGS...
    python tests/fault_run.py --batch FILE.json   # several commands in one process (one import)

``--batch`` reads a JSON list of argument lists, runs each as ``sinet ARGS``, and prints one JSON
list of {"code", "stderr"} (the exit status and what the command wrote on stderr).

Environment (each optional):

* ``FAULT_DIR``: only renames whose destination lies under this folder count (default: all).
* ``FAULT_KILL_AT=N``: SIGKILL this process just before the N-th counted rename (a kill at that
  point of the commit: nothing after it runs, no cleanup handler either). ``FAULT_KILL_DST=REL``:
  just before the rename onto ``FAULT_DIR/REL``.
* ``FAULT_PAUSE_AT=N`` (or ``FAULT_PAUSE_DST=REL``) and ``FAULT_SIGNAL=FILE``: before that rename,
  create ``FILE.paused`` and wait until ``FILE`` exists (another process acts in between).
* ``FAULT_PAUSE_CALL=module:Attr.path:N`` and ``FAULT_SIGNAL=FILE``: the same pause before the
  N-th call of that function (e.g. ``sinet_cli.store:ArtifactWriter.append_rows:2``: mid-run).
* ``FAULT_COUNT=FILE``: write the number of counted renames to FILE at exit.
* ``FAULT_READY=module:function`` and ``FAULT_READY_FILE=FILE``: create FILE when that function is
  first called (the command has reached its long computation: a signal sent then lands in it).
  ``FAULT_READY_HOLD=SECONDS``: then wait that long inside the call before the work starts, so a
  signal sent after FILE appears lands in the command even when its work is quick.

Every rename of the store and the commands goes through ``os.replace``, which is what is wrapped,
so the same runner works on any version of sinet.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from pathlib import Path

_real_replace = os.replace
_count = 0


def _counted(dst: object) -> bool:
    root = os.environ.get("FAULT_DIR")
    return not root or os.path.abspath(str(dst)).startswith(os.path.abspath(root) + os.sep)


def _pause() -> None:
    flag = Path(os.environ["FAULT_SIGNAL"])
    Path(str(flag) + ".paused").touch()
    deadline = time.monotonic() + 300
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
    global _count
    if _counted(dst):
        _count += 1
        rel = os.path.relpath(os.path.abspath(str(dst)), os.path.abspath(os.environ.get("FAULT_DIR", "/")))
        if os.environ.get("FAULT_KILL_AT") == str(_count) or os.environ.get("FAULT_KILL_DST") == rel:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("FAULT_PAUSE_AT") == str(_count) or os.environ.get("FAULT_PAUSE_DST") == rel:
            _pause()
    return _real_replace(src, dst, *args, **kwargs)


def _pause_at_call() -> None:
    spec = os.environ.get("FAULT_PAUSE_CALL")
    if not spec:
        return
    import importlib

    module_name, path, n = spec.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real = getattr(owner, name)
    calls = [0]

    def paused(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == int(n):
            _pause()
        return real(*args, **kwargs)

    setattr(owner, name, paused)


def _batch(path: str) -> None:
    import contextlib
    import io
    import json

    from sinet_cli.app import main as sinet_main

    results = []
    for argv in json.loads(Path(path).read_text()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                sinet_main([str(a) for a in argv])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException as e:  # noqa: BLE001 - what escaped sinet is the finding
                code, _ = -1, err.write(f"ESCAPED {type(e).__name__}: {e}\n")
        results.append({"code": code, "stderr": err.getvalue()})
    print(json.dumps(results))


def _mark_ready() -> None:
    spec = os.environ.get("FAULT_READY")
    if not spec:
        return
    import importlib

    module_name, _, name = spec.partition(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    flag = Path(os.environ["FAULT_READY_FILE"])

    hold = float(os.environ.get("FAULT_READY_HOLD", "0"))

    def entered(*args, **kwargs):  # type: ignore[no-untyped-def]
        flag.touch()
        if hold:
            time.sleep(hold)
        return real(*args, **kwargs)

    setattr(module, name, entered)


def main() -> None:
    # Ctrl-C as on a terminal: a process started from a background job of a non-interactive shell
    # (a test suite run with `&`) inherits SIGINT ignored, and the interrupt cases would not land
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.replace = _replace  # type: ignore[assignment]
    _mark_ready()
    _pause_at_call()
    if os.environ.get("FAULT_COUNT"):
        atexit.register(lambda: Path(os.environ["FAULT_COUNT"]).write_text(str(_count)))
    if sys.argv[1:2] == ["--batch"]:
        _batch(sys.argv[2])
        return
    from sinet_cli.app import main as sinet_main

    sinet_main(sys.argv[1:])


if __name__ == "__main__":
    main()
