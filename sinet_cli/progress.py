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


def quiet_libraries() -> None:
    """Off a terminal (and with ``-q``), keep the progress bars of the libraries sinet loads out of
    stderr logs: transformers' "Loading weights", sentence-transformers' "Batches", huggingface_hub's
    and timm's tqdm bars. Call it before those libraries load a model; calling it again is harmless.
    On a terminal they stay as the libraries draw them."""
    if interactive():
        return
    # tqdm >= 4.66 takes any argument's default from TQDM_<NAME>: every bar not asked for explicitly
    os.environ["TQDM_DISABLE"] = "1"
    # huggingface_hub's switch; transformers reads it once, when it is first imported
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # sentence-transformers draws its "Batches" bar by default only when its logger is at INFO or DEBUG
    import logging

    logger = logging.getLogger("sentence_transformers")
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)


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
