"""Messages to the user: stderr, one line each, no colour codes when not on a terminal."""

from __future__ import annotations

import sys

from rich.console import Console

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    _err.print(message, markup=False)


def warn(message: str) -> None:
    _err.print(f"warning: {message}", markup=False)


def error(message: str) -> None:
    # one line, whatever the message held
    print(f"sinet: error: {' '.join(str(message).split())}", file=sys.stderr)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A small aligned table on stdout (rich on a terminal, plain text otherwise)."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for h in header:
        t.add_column(h, justify="right" if h != header[0] else "left")
    for r in rows:
        t.add_row(*r)
    Console(highlight=False, soft_wrap=True).print(t)
