"""Messages to the user: stderr, one line each, no colour codes when not on a terminal.

Verbosity is set once per run by the ``sinet`` callback (``-q/--quiet``, ``-v/--verbose``):
quiet keeps warnings and errors only, verbose adds :func:`detail` lines. Results a command
prints on stdout (:func:`table`, :func:`out`) are its output and print at every level.
"""

from __future__ import annotations

import re
import sys

from rich.console import Console

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def set_verbosity(level: int) -> None:
    """QUIET: warnings and errors only; NORMAL: one line per step; VERBOSE: also :func:`detail` lines."""
    global _level
    _level = int(level)


def verbosity() -> int:
    return _level


def info(message: str) -> None:
    if _level >= NORMAL:
        _err.print(message, markup=False)


def detail(message: str) -> None:
    """An extra line shown only with ``-v/--verbose``: what was read, which rule was applied."""
    if _level >= VERBOSE:
        _err.print(message, markup=False)


def warn(message: str) -> None:
    _err.print(f"warning: {message}", markup=False)


def error(message: str) -> None:
    # one line, whatever the message held
    print(f"sinet: error: {' '.join(str(message).split())}", file=sys.stderr)


# terminal escape sequences: CSI (colours, cursor moves) and OSC (titles, hyperlinks)
# A string from a crawl (a name, a title, a path) made safe for a terminal: ANSI escape sequences
# dropped, other control characters become spaces, runs of spaces one, ``limit`` cuts it with an
# ellipsis. Rich markup in it stays literal because every writer here prints with markup off. The
# report's page uses the same function (it lives with the report's computation, below the CLI).
from stages.report import plain  # noqa: E402


_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?(\.\d+)?( ± [\d.]+)?%?$|^–$")


def _stdout() -> Console:
    # off a terminal (a file, a pipe, make's log) rich would wrap at 80 columns: give tables room
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def out(line: str = "") -> None:
    """One line of a command's result on stdout (never markup)."""
    _stdout().print(line, markup=False)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A small aligned table on stdout (rich on a terminal, plain text otherwise). Every cell is
    printed as literal text: a class name or title holding ``[bold]`` or escape codes stays text.
    Columns of numbers are right-aligned, text left-aligned."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(plain(title)), show_lines=False)
    for j, h in enumerate(header):
        numeric = j > 0 and all(_NUMBER.match(str(r[j]).strip()) for r in rows if j < len(r))
        t.add_column(Text(plain(h)), justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*(Text(plain(c)) for c in r))
    _stdout().print(t)
