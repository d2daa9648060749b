"""The ``sinet`` command line: one small command per stage, registered from ``commands/``."""

from __future__ import annotations

import sys

import typer

from . import console
from .errors import SinetError
from .store import ArtifactError

app = typer.Typer(
    name="sinet",
    help="Find and down-weight mislabeled images in web-crawled datasets using side information (SINet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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
    """Console entry point: one-line errors and exit status 1 for bad input or artifacts."""
    try:
        app(args=argv)
    except (SinetError, ArtifactError) as e:
        console.error(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        console.error("interrupted; written chunks are kept and the next run resumes")
        sys.exit(130)


if __name__ == "__main__":
    main()
