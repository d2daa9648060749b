"""Per-image side text from untrusted JSON metadata (WebVision's per-query title/description/tags).

The files come from a web crawl: they are parsed with :func:`json.loads` only, refused above
:data:`MAX_JSON_BYTES`, and every string is cleaned (control characters and lone surrogates removed,
length capped at :data:`MAX_SIDE_TEXT_CHARS`) before it reaches the artifact store. A file that
cannot be used raises :class:`MetadataError`; the reader logs it and goes on without that file's text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

#: Largest metadata file read (bytes). WebVision's per-query files are a few MB at most.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Side text kept per image (characters): sentence encoders read ~256 tokens, and millions of rows
#: are held in memory.
MAX_SIDE_TEXT_CHARS = 1024
TEXT_FIELDS = ("title", "description", "tags")
ID_KEYS = ("id", "image_id", "photo_id", "img_id")
URL_KEYS = ("url", "orig_url", "image_url", "img_url", "photo_url")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MetadataError(Exception):
    """A metadata file that cannot be used; the message names the file (and line, column)."""


def load_json(path: Path, max_bytes: int | None = None) -> Any:
    """Parse one JSON file with a size limit.

    Raises:
        MetadataError: unreadable, larger than ``max_bytes`` (default :data:`MAX_JSON_BYTES`),
            not JSON (message gives line and column) or nested too deeply.
    """
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
        if size > limit:
            raise MetadataError(f"{path}: {size} bytes, over the {limit}-byte limit for metadata files; not read")
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # the file may have grown since stat()
    except OSError as e:
        raise MetadataError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise MetadataError(f"{path}: over the {limit}-byte limit for metadata files; not read")
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8/16/32 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise MetadataError(f"{path}: JSON nested too deeply") from None


def entries_of(obj: Any) -> list[dict]:
    """The per-image records of a parsed file: a list of objects, an object holding such a list
    (under any key), or an object mapping image ids to objects."""
    if isinstance(obj, list):
        return [e for e in obj if isinstance(e, dict)]
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, list) and any(isinstance(e, dict) for e in value):
                return [e for e in value if isinstance(e, dict)]
        if obj and all(isinstance(v, dict) for v in obj.values()):
            return [{"id": k, **v} if not any(i in v for i in ID_KEYS) else v for k, v in obj.items()]
    return []


def clean_text(value: Any) -> str:
    """A display string from an untrusted JSON value: numbers and strings only, one line, valid UTF-8."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    s = str(value)
    if not s.isascii():  # lone surrogates from "\ud800" escapes cannot be stored as UTF-8: U+FFFD
        s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    s = " ".join(_CONTROL.sub(" ", s).split())
    return s[:MAX_SIDE_TEXT_CHARS]


def entry_text(entry: dict) -> str:
    """``title. description. tags`` (empty parts left out); tags may be a list or a string."""
    parts = []
    for key in TEXT_FIELDS:
        value = entry.get(key)
        if isinstance(value, list):
            value = ", ".join(t for t in (clean_text(v) for v in value) if t)
        text = clean_text(value)
        if text:
            parts.append(text)
    out = ""
    for part in parts:
        out = part if not out else out + (" " if out[-1] in ".!?" else ". ") + part
    return out[:MAX_SIDE_TEXT_CHARS]


def entry_keys(entry: dict) -> list[str]:
    """Strings an image file stem may match: the record's id, and the file stem of its URL."""
    keys = []
    for k in ID_KEYS:
        v = entry.get(k)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
            keys.append(str(v).strip())
    for k in URL_KEYS:
        v = entry.get(k)
        if isinstance(v, str) and v:
            name = urlparse(v).path.rsplit("/", 1)[-1]
            stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
            if stem:
                keys.append(stem)
    return keys


def _norm(key: str) -> str:
    return (key.lstrip("0") or "0") if key.isdigit() else key


def side_texts(stems: list[str], entries: list[dict]) -> list[str]:
    """Side text for each image file stem of one query: matched by record id (or URL stem) first,
    then, for numeric stems (``000001``) with no id match, by position in the file (1-based unless a
    stem is ``0``). Unmatched images get ``""``."""
    by_key: dict[str, str] = {}
    for entry in entries:
        text = entry_text(entry)
        for key in entry_keys(entry):
            by_key.setdefault(key, text)
            by_key.setdefault(_norm(key), text)
    numeric = [int(s) for s in stems if s.isdigit()]
    base = 0 if numeric and min(numeric) == 0 else 1
    out = []
    for stem in stems:
        text = by_key.get(stem, by_key.get(_norm(stem)))
        if text is None and stem.isdigit() and 0 <= int(stem) - base < len(entries):
            text = entry_text(entries[int(stem) - base])
        out.append(text or "")
    return out
