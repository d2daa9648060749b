"""Reading users' text files: UTF-8 (a BOM tolerated), errors naming the file and line."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def read_text(path: Path | str) -> str:
    """The whole file as text; unreadable or non-UTF-8 content is an :class:`InputError`
    naming the file and the line of the first bad byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})", line) from None
    return text.removeprefix("\ufeff")


def read_text_lines(path: Path | str) -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file as ``(line number, text)``, CR/LF and a BOM stripped."""
    # split on "\n" only: str.splitlines() also breaks on \x0b, \x1c, U+2028 ... and would shift line numbers
    return [(i, line.rstrip("\r")) for i, line in enumerate(read_text(path).split("\n"), start=1) if line.strip()]
