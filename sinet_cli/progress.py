"""Progress reporting: a rich bar on an interactive terminal, silence in CI and cron."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

ProgressFn = Callable[[int], None]


def interactive() -> bool:
    """A TTY on stderr and not CI: the only case where a bar is drawn."""
    if os.environ.get("CI") or os.environ.get("SINET_QUIET"):
        return False
    return sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[ProgressFn]:
    """Yield ``advance(n)``; draws a rich bar only on a terminal."""
    if not interactive():
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
