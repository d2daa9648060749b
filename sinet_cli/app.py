"""The ``sinet`` command line: one small command per stage, registered from ``commands/``."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from . import console
from .errors import EXIT_INTERRUPTED, Interrupted, SinetError, StorageError, is_storage_error
from .locks import EX_TEMPFAIL, BusyError
from .datasets.manifest import ALLOW_OUTSIDE_ROOT_ENV
from .store import ArtifactError

app = typer.Typer(
    name="sinet",
    help="Find and down-weight mislabeled images in web-crawled datasets using side information (SINet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), else the source tree's pyproject.toml."""
    from .store import package_version as version

    found = version()
    if found != "0+unknown":
        return found
    try:
        import tomllib
        from pathlib import Path

        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, ValueError, ImportError):
        return found


def _print_version(value: bool) -> None:
    if value:
        print(f"sinet {package_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only (no progress, no "
                                        "step lines on stderr); results on stdout still print.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Extra detail lines on stderr: what was "
                                          "read, which rule or threshold was applied.")] = False,
    allow_outside_root: Annotated[bool, typer.Option(
        "--allow-outside-root", help="Let a manifest name images outside its own folder (absolute paths, ../). "
        f"Refused by default; also set by {ALLOW_OUTSIDE_ROOT_ENV}=1.")] = False,
) -> None:
    """Find and down-weight mislabeled images in web-crawled datasets using side information (SINet)."""
    if quiet and verbose:
        raise SinetError("--quiet and --verbose exclude each other")
    if allow_outside_root:
        os.environ[ALLOW_OUTSIDE_ROOT_ENV] = "1"
    if quiet:
        os.environ["SINET_QUIET"] = "1"  # no progress bars either (sinet_cli.progress)
        console.set_verbosity(console.QUIET)
    else:
        console.set_verbosity(console.VERBOSE if verbose else console.NORMAL)
    from .progress import quiet_libraries

    quiet_libraries()


# Each import registers its command(s) on `app`.
from .commands import extract  # noqa: E402,F401
from .commands import summary  # noqa: E402,F401
from .commands import prototypes  # noqa: E402,F401
from .commands import score  # noqa: E402,F401
from .commands import train  # noqa: E402,F401
from .commands import report  # noqa: E402,F401
from .commands import graph  # noqa: E402,F401
from .commands import rescore  # noqa: E402,F401
from .commands import export  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors; exit status 1 for bad input, artifacts or a failed
    read or write (disk full, read-only folder), 75 (EX_TEMPFAIL) when another run holds a lock, so
    cron and retry loops try again later, 130 after Ctrl-C (with what to do next)."""
    import signal

    saved = {k: os.environ.get(k) for k in ("SINET_QUIET", ALLOW_OUTSIDE_ROOT_ENV)}
    # past a file size limit (ulimit -f) a write then fails with EFBIG, reported as one line,
    # instead of SIGXFSZ killing the process (CPython ignores it too; an embedding might not)
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # called from another thread (an embedding): its main thread decides
            pass
    try:
        app(args=argv)
    except BusyError as e:
        console.error(str(e))
        sys.exit(EX_TEMPFAIL)
    except Interrupted as e:
        console.error(str(e))
        sys.exit(EXIT_INTERRUPTED)
    except (SinetError, ArtifactError) as e:
        console.error(str(e))
        sys.exit(1)
    except KeyboardInterrupt:  # outside a command (while starting): nothing was written
        console.error("interrupted before any command ran; nothing was changed")
        sys.exit(EXIT_INTERRUPTED)
    except (OSError, RuntimeError) as e:
        if not is_storage_error(e):
            raise
        console.error(str(StorageError.from_os_error(e)))
        sys.exit(1)
    finally:
        # an in-process caller (tests, a notebook) gets its environment and verbosity back
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        console.set_verbosity(console.NORMAL)


if __name__ == "__main__":
    main()
