"""Reader for WebDataset tar shards (``--data webdataset:PATTERN``), as img2dataset-style crawls store them.

::

    crawl/00000.tar   000000012.jpg   the image (.jpg, .jpeg, .png or .webp)
                      000000012.txt   its caption (optional)
                      000000012.json  {"url", "title", "caption", "label", "split", ...} (optional, untrusted)
    crawl/dress/00000.tar             no label in the JSON: the shard's folder name is the label

PATTERN: local paths or fsspec URLs (``file:///data/crawl/*.tar``, ``s3://bucket/{00000..00099}.tar``
where fsspec has that filesystem), with brace ranges (``{00000..00099}``) expanded first and then
globs (``*``, ``?``, ``[...]``, ``**``). Shards are uncompressed ``.tar`` files (images are
compressed already) and are streamed member by member, never unpacked to disk.

A sample is the tar members sharing a key (WebDataset's rule: the member name up to the first dot
of its file name). Its label is the JSON field ``label`` (``--label-field``): a class name, or an
index into ``--classes``; without that field, the name of the shard's folder. Without a class
table the classes are the sorted distinct label names. Its split is the JSON ``split`` field
(train, val or test), else train. Its side text is the caption (``.txt``) and the JSON ``title``,
``caption`` and ``text`` fields, cleaned as :mod:`.jsonmeta` cleans crawled text.

Ids are ``<shard stem>/<key>`` (``00000/000000012``), and ``<folder>/<shard stem>/<key>`` when the
folder gives the label, so per-class crawls whose keys restart in every folder stay distinct. A key
may be in one shard only (per folder, for folder labels): a second one is an error naming both
shards. ``paths`` name the image member as ``<shard>#<member>`` (``crawl/00000.tar#000000012.jpg``);
:func:`read_image_bytes` and :func:`image_source` open such a path.

Untrusted content: a JSON member is parsed with :func:`json.loads` only, refused above
:data:`MAX_SAMPLE_JSON_BYTES`, and a bad one is logged and skipped (the sample keeps its image and
takes its folder's label). A corrupt tar header is logged and named, and reading resumes at the
next valid member (the ``webdataset`` package's own tar iterator ends the shard there silently,
which is why members are read with :mod:`tarfile` here). Image bytes are only checked at
extraction, which logs and skips an image it cannot decode.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Iterator
from urllib.parse import urlparse

import numpy as np

from .. import console
from ..errors import InputError, SinetError
from . import jsonmeta
from .manifest import check_no_empty_class
from .table import SPLITS, ClassTable, DatasetTable

#: Image members, in the order one is picked when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIX = ".tar"
#: Largest per-sample JSON member parsed (bytes): img2dataset's are ~1 KB, and one is parsed per image.
MAX_SAMPLE_JSON_BYTES = 1024 * 1024
#: Caption bytes read from a ``.txt`` member (side text keeps jsonmeta.MAX_SIDE_TEXT_CHARS characters).
MAX_CAPTION_BYTES = 64 * 1024
#: Largest image member read at extraction (bytes); a larger one is logged and skipped.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Side text fields of the JSON, after the ``.txt`` caption.
TEXT_FIELDS = ("title", "caption", "text")
#: Problems of one kind printed before the rest are only counted.
WARN_LIMIT = 10
BLOCK = 512
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB = re.compile(r"[*?\[]")
_MEMBER_PATH = re.compile(r"^(.+?\.tar)#(.+)$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext's


def is_url(location: str) -> bool:
    return bool(_URL.match(location))


# -- shard lists -------------------------------------------------------------------------------


def expand_pattern(pattern: str) -> list[str]:
    """The shards a pattern names, in pattern order (brace ranges first, then globs, each glob's
    matches sorted); duplicates kept once. Glob matches that are not ``.tar`` files are left out
    (img2dataset writes ``_stats.json`` and ``.parquet`` files beside its shards).

    Raises:
        SinetError: nothing matches, a named shard is not a ``.tar`` file, or a brace is unbalanced.
    """
    import braceexpand  # webdataset's own brace expansion (a dependency of the webdataset package)

    if not pattern:
        raise SinetError("--data webdataset: expected a shard pattern, e.g. webdataset:shards/{00000..00099}.tar")
    if pattern.lower().startswith("pipe:"):
        raise SinetError(f"--data webdataset:{pattern}: pipe: commands are not run; give paths or fsspec URLs")
    try:
        parts = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError as e:
        raise SinetError(f"--data webdataset:{pattern}: {e}") from None
    shards: list[str] = []
    seen: set[str] = set()
    for part in parts:
        if _GLOB.search(part):
            found = [s for s in _glob(part) if s.lower().endswith(SHARD_SUFFIX)]
            if not found:
                raise SinetError(f"--data webdataset:{pattern}: no .tar shard matches {part}")
        else:
            if not part.lower().endswith(SHARD_SUFFIX):
                raise InputError(part, "not a .tar shard (WebDataset shards are uncompressed .tar files)")
            found = [part]
        for s in found:
            if s not in seen:
                seen.add(s)
                shards.append(s)
    return shards


def _glob(pattern: str) -> list[str]:
    if is_url(pattern):
        fs, path = _filesystem(pattern)
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
    import glob

    return sorted(glob.glob(pattern, recursive=True))


def _filesystem(url: str):
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise SinetError(f"{url}: URLs need the fsspec package") from None
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its filesystem package is missing
        raise SinetError(f"{url}: fsspec cannot open this URL ({e})") from None


def dataset_name(pattern: str) -> str:
    """A folder name for the artifacts: the last fixed folder of the pattern before any brace or
    glob (``/data/crawl/{00000..00099}.tar`` and ``crawl/*/*.tar`` -> ``crawl``)."""
    path = urlparse(pattern).path if is_url(pattern) else pattern
    parts = [p for p in path.replace("\\", "/").split("/")]
    fixed: list[str] = []
    for p in parts:
        if _GLOB.search(p) or "{" in p:
            break
        fixed.append(p)
    else:  # one shard named in full: its folder
        fixed = fixed[:-1]
    names = [p for p in fixed if p not in ("", ".", "..")]
    if names:
        return names[-1]
    return Path.cwd().name if not is_url(pattern) else (urlparse(pattern).netloc or "webdataset")


def shard_stem(shard: str) -> str:
    name = posixpath.basename(urlparse(shard).path if is_url(shard) else shard.replace("\\", "/"))
    return name[: -len(SHARD_SUFFIX)] if name.lower().endswith(SHARD_SUFFIX) else name


def shard_folder(shard: str) -> str:
    """The name of the folder holding the shard (``crawl/dress/00000.tar`` -> ``dress``)."""
    if is_url(shard):
        return posixpath.basename(posixpath.dirname(urlparse(shard).path))
    return Path(shard).resolve().parent.name


# -- tar members -------------------------------------------------------------------------------


@dataclass
class Member:
    """One regular file of a shard: its name, size, and its bytes when they were asked for."""

    name: str
    size: int
    data: bytes | None = None


def open_shard(shard: str) -> BinaryIO:
    """A seekable binary file object of a local shard or an fsspec URL."""
    if is_url(shard):
        fs, path = _filesystem(shard)
        f = fs.open(path, "rb")
    else:
        f = open(shard, "rb")
    if not f.seekable():
        f.close()
        raise OSError(f"{shard}: the filesystem gives a stream that cannot seek; copy the shards to a local disk")
    return f


def iter_members(f: BinaryIO, shard: str, wants: Callable[[str, int], bool],
                 on_corrupt: Callable[[str], None]) -> Iterator[Member]:
    """The regular files of an open tar shard in archive order, with the bytes of those
    ``wants(name, size)`` asks for (the others are seeked over, not read).

    A member whose header is corrupt cannot be found again in a tar stream: the reader skips block
    by block to the next valid header (``tarfile``'s ``ignore_zeros``), and ``on_corrupt`` gets a
    message naming the shard, the byte offset and the name field of the bad header. A member cut
    short by the end of the file is reported the same way, and so is anything that is not zeros
    after the last member. Raises OSError when the file cannot be read.
    """
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
    except tarfile.ReadError as e:
        if size:
            on_corrupt(f"{shard}: not a tar archive ({e})")
        return
    expected = 0  # where the next member's header should start
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError) as e:
            on_corrupt(f"{shard}: unreadable after byte {expected} ({e}); the rest of the shard is skipped")
            return
        tar.members = []  # tarfile keeps every header it read; a shard may hold millions
        if info is None:
            break
        if info.offset > expected:
            _report_gap(f, shard, expected, info.offset, on_corrupt)
        expected = info.offset_data + -(-info.size // BLOCK) * BLOCK
        if not info.isreg():
            continue
        if info.offset_data + info.size > size:
            on_corrupt(f"{shard}: member {_shown(info.name)} is cut short ({size - info.offset_data} of "
                       f"{info.size} bytes); skipped")
            return
        data = None
        if wants(info.name, info.size):
            extracted = tar.extractfile(info)
            data = extracted.read() if extracted is not None else None
        yield Member(info.name, info.size, data)
    _report_gap(f, shard, expected, size, on_corrupt)


def _report_gap(f: BinaryIO, shard: str, start: int, end: int, on_corrupt: Callable[[str], None]) -> None:
    """Bytes between two members (or after the last) that are not the zero padding of a tar file
    held a header that did not parse: name its offset and name field."""
    here = f.tell()
    f.seek(start)
    pos = start
    try:
        while pos < end:
            chunk = f.read(min(1 << 20, end - pos))
            if not chunk:
                return
            stripped = chunk.lstrip(b"\0")
            if stripped:
                bad = pos + (len(chunk) - len(stripped)) // BLOCK * BLOCK
                f.seek(bad)
                header = f.read(BLOCK)
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                on_corrupt(f"{shard}: corrupt tar header at byte {bad} (name field {_shown(name)}); "
                           f"{end - bad} bytes skipped up to the next valid member")
                return
            pos += len(chunk)
    finally:
        f.seek(here)


def _shown(name: str) -> str:
    return repr(jsonmeta.clean_text(name)[:200])


def split_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a member name by WebDataset's rule (``webdataset.tariterators.base_plus_ext``,
    the same regular expression: importing the package would import torch, seconds for an idle cron
    run): the extension is everything after the first dot of the file name, lower-cased; (None, None)
    for a name without one."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def bad_name(name: str) -> str | None:
    """Why a member name cannot become an id or path (None when it can)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not UTF-8"
    if _CONTROL.search(name):
        return "holds control characters"
    return None


# -- the reader --------------------------------------------------------------------------------


class _Log:
    """Warnings of one reader pass: the first WARN_LIMIT of each kind printed, all counted."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, list[str]] = {}

    def __call__(self, kind: str, message: str) -> None:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if n < WARN_LIMIT:
            self.first.setdefault(kind, []).append(message)
            console.warn(message)

    def summary(self) -> None:
        for kind, n in self.counts.items():
            if n > WARN_LIMIT:
                console.warn(f"{n} {kind} in all ({n - WARN_LIMIT} more not shown)")


@dataclass
class _Sample:
    shard: int
    key: str
    image: str
    label: tuple[str, object]  # ("json", value) or ("folder", name)
    split: str
    text: str = ""
    scope: str = field(default="")


def _parse_json(data: bytes, where: str) -> dict:
    """One per-sample JSON member, with jsonmeta's rules: ``json.loads`` only, errors with line and column."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise jsonmeta.MetadataError(f"{where}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise jsonmeta.MetadataError(f"{where}: not UTF-8/16/32 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise jsonmeta.MetadataError(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise jsonmeta.MetadataError(f"{where}: not a JSON object")
    return obj


def _join(parts: list[str]) -> str:
    """``a. b`` as jsonmeta joins title and description; repeated parts (img2dataset writes the
    caption both as .txt and as the JSON ``caption``) kept once."""
    out = ""
    for part in dict.fromkeys(p for p in parts if p):
        out = part if not out else out + (" " if out[-1] in ".!?" else ". ") + part
    return out[: jsonmeta.MAX_SIDE_TEXT_CHARS]


def _read_shard(shard: str, index: int, label_field: str, log: _Log) -> list[_Sample]:
    """The samples of one shard, in the order of their first member."""
    groups: dict[str, dict[str, Member]] = {}

    def wants(name: str, size: int) -> bool:
        ext = split_key(name)[1]
        return (ext == "json" and size <= MAX_SAMPLE_JSON_BYTES) or ext == "txt"

    try:
        with open_shard(shard) as f:
            for m in iter_members(f, shard, wants, lambda msg: log("corrupt tar members", msg)):
                key, ext = split_key(m.name)
                if key is None or (ext not in IMAGE_EXTENSIONS and ext not in ("json", "txt")):
                    continue
                why = bad_name(m.name)
                if why:
                    log("unusable member names", f"{shard}: member {_shown(m.name)} {why}; skipped")
                    continue
                group = groups.setdefault(key, {})
                if ext in group:
                    raise InputError(shard, f"member {m.name!r} appears twice")
                group[ext] = m
    except FileNotFoundError:
        raise InputError(shard, "shard not found") from None
    except OSError as e:
        raise InputError(shard, f"cannot read shard ({e.strerror or e})") from None
    folder = None
    samples = []
    for key, group in groups.items():
        image = next((group[e].name for e in IMAGE_EXTENSIONS if e in group), None)
        if image is None:
            log("samples without an image", f"{shard}: sample {key!r} has no .jpg/.jpeg/.png/.webp image; skipped")
            continue
        meta: dict = {}
        if "json" in group:
            m = group["json"]
            where = f"{shard}#{m.name}"
            try:
                if m.data is None:
                    raise jsonmeta.MetadataError(f"{where}: {m.size} bytes, over the {MAX_SAMPLE_JSON_BYTES}-byte "
                                                 "limit for a sample's metadata")
                meta = _parse_json(m.data, where)
            except jsonmeta.MetadataError as e:
                log("unusable JSON members", f"skipped the metadata of sample {key!r}: {e}")
        value = meta.get(label_field) if label_field else None
        if value is not None:
            label: tuple[str, object] = ("json", value)
            scope = ""
        else:
            folder = shard_folder(shard) if folder is None else folder
            label, scope = ("folder", folder), folder
        split = meta.get("split", "train")
        if split is None:
            split = "train"
        if not isinstance(split, str) or split not in SPLITS:
            raise InputError(shard, f"sample {key!r}: split {jsonmeta.clean_text(split)[:40]!r} is not one of "
                                    f"{', '.join(SPLITS)}")
        parts = []
        if "txt" in group and group["txt"].data is not None:
            parts.append(jsonmeta.clean_text(group["txt"].data[:MAX_CAPTION_BYTES].decode("utf-8", "replace")))
        parts += [jsonmeta.clean_text(meta.get(k)) for k in TEXT_FIELDS]
        samples.append(_Sample(index, key, image, label, split, _join(parts), scope))
    return samples


def _label_index(sample: _Sample, classes: ClassTable, shard: str, label_field: str) -> int:
    source, value = sample.label
    if source == "json":
        what = f"JSON field {label_field!r}"
    else:
        what = "the shard's folder name" + (f"; the sample's JSON has no {label_field!r} field" if label_field else "")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise InputError(shard, f"sample {sample.key!r}: {_bad_label(value)} ({what})")
    if isinstance(value, str):
        name = value.strip()
        k = classes.lookup.get(name)
        if k is not None:
            return k
        if not (source == "json" and name.isdigit()):
            raise InputError(shard, f"sample {sample.key!r}: label {_label_shown(name)} ({what}) is not a class of "
                                    f"{classes.source}")
        value = int(name)
    if not 0 <= value < len(classes):
        raise InputError(shard, f"sample {sample.key!r}: label {value} ({what}) is outside the class indices "
                                f"0..{len(classes) - 1} of {classes.source}")
    return int(value)


def _bad_label(value: object) -> str:
    if isinstance(value, str):
        return "empty label"
    kind = "true/false" if isinstance(value, bool) else type(value).__name__
    return f"label must be a class name or index, not {kind}"


def _label_shown(value: object) -> str:
    return str(value) if isinstance(value, int) else repr(jsonmeta.clean_text(value)[:80])


class _Lookup:
    """A class table with a name -> index dict (ClassTable.index is a list scan)."""

    def __init__(self, table: ClassTable):
        self.table, self.source = table, table.source
        self.lookup = {n: i for i, n in enumerate(table.names)}

    def __len__(self) -> int:
        return len(self.table)


def read_webdataset(pattern: str, classes: ClassTable | None = None, label_field: str = "label",
                    name: str | None = None, shards: list[str] | None = None) -> DatasetTable:
    """Read every shard of ``pattern`` (headers, JSON and captions; image bytes are skipped over)
    into a table whose ``paths`` are ``<shard>#<image member>``. ``shards``: read these of the
    pattern's shards only (rescore: the ones not recorded yet).

    Raises:
        InputError: a shard is missing or unreadable, a label is not a class (naming shard and key),
            a key is in two shards (naming both), a split is not train/val/test, or no sample has an image.
    """
    from ..progress import progress_bar

    shards = expand_pattern(pattern) if shards is None else list(shards)
    log = _Log()
    samples: list[_Sample] = []
    with progress_bar("webdataset: reading shards", len(shards)) as advance:
        for i, shard in enumerate(shards):
            samples += _read_shard(shard, i, label_field, log)
            advance(1)
    log.summary()
    if not samples:
        raise InputError(pattern, f"no sample with an image in {len(shards)} shard(s)")

    first_shard: dict[tuple[str, str], int] = {}
    for s in samples:
        k = first_shard.setdefault((s.scope, s.key), s.shard)
        if k != s.shard:
            where = f" (both labelled by the folder {s.scope!r})" if s.scope else ""
            raise InputError(shards[s.shard], f"key {s.key!r} is also in {shards[k]}{where}; a sample's key must be "
                                              "unique across shards")
    del first_shard

    if classes is None:
        names = set()
        for s in samples:
            source, value = s.label
            if isinstance(value, str) and value.strip() and not (source == "json" and value.strip().isdigit()):
                names.add(value.strip())
            elif isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip():
                raise InputError(shards[s.shard], f"sample {s.key!r}: label {_label_shown(value)} (JSON field "
                                                  f"{label_field!r}) is a class index; indices need a class table "
                                                  "(--classes)")
            else:
                raise InputError(shards[s.shard], f"sample {s.key!r}: {_bad_label(value)} (JSON field "
                                                  f"{label_field!r})")
        classes = ClassTable.from_names(sorted(names), source=pattern)
        given = False
    else:
        given = True
    lookup = _Lookup(classes)
    labels = np.fromiter((_label_index(s, lookup, shards[s.shard], label_field) for s in samples), np.int64,
                         len(samples))
    ids = [f"{s.scope}/{shard_stem(shards[s.shard])}/{s.key}" if s.scope else f"{shard_stem(shards[s.shard])}/{s.key}"
           for s in samples]
    texts = [s.text for s in samples]
    table = DatasetTable(
        name=name or dataset_name(pattern),
        classes=classes,
        ids=np.asarray(ids, dtype=str),
        labels=labels,
        splits=np.asarray([s.split for s in samples], dtype=str),
        paths=np.asarray([f"{shards[s.shard]}#{s.image}" for s in samples], dtype=str),
        side_text=np.asarray(texts, dtype=str) if any(texts) else None,
        provenance={"reader": "webdataset", "pattern": pattern, "shards": len(shards), "label_field": label_field,
                    "problems": dict(log.counts), "first_problems": log.first},
    )
    if given:  # new shards of a crawl (rescore) need not hold every class: make-prototypes says which lack images
        counts = np.bincount(table.labels[table.splits == "train"], minlength=len(classes))
        if (counts == 0).any():
            console.warn(f"{pattern}: {int((counts == 0).sum())} of {len(classes)} classes have no training image "
                         f"(e.g. {classes.names[int(np.flatnonzero(counts == 0)[0])]!r})")
    else:
        check_no_empty_class(table, pattern)
    return table


# -- images out of shards (extraction, thumbnails) ----------------------------------------------


def split_member_path(path: str) -> tuple[str, str] | None:
    """``(shard, member)`` of a ``<shard>.tar#<member>`` path; None for any other path."""
    m = _MEMBER_PATH.match(path)
    return (m.group(1), m.group(2)) if m else None


def archive_members(paths: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(shards, shard index per row, member name per row)`` of a table's ``<shard>#<member>`` paths.

    Raises:
        SinetError: a path does not name a shard member.
    """
    shards: dict[str, int] = {}
    of = np.empty(len(paths), dtype=np.int64)
    members = []
    for i, p in enumerate(paths):
        parts = split_member_path(str(p))
        if parts is None:
            raise SinetError(f"{p}: not a <shard>.tar#<member> path")
        of[i] = shards.setdefault(parts[0], len(shards))
        members.append(parts[1])
    return list(shards), of, np.asarray(members, dtype=object)


def read_members(shard: str, names: Collection[str]) -> Iterator[tuple[str, bytes | None, str]]:
    """``(member, bytes, "")`` for each of ``names`` found in the shard, in archive order, or
    ``(member, None, reason)`` when its bytes cannot be used. Corrupt headers are skipped over (the
    members behind them are then not found). Members not asked for are seeked over, not read.

    Raises:
        OSError: the shard cannot be opened or read.
    """
    wanted = set(names)

    def wants(name: str, size: int) -> bool:
        return name in wanted and size <= MAX_IMAGE_BYTES

    problems: list[str] = []
    try:
        with open_shard(shard) as f:
            for m in iter_members(f, shard, wants, problems.append):
                if m.name not in wanted:
                    continue
                if m.data is None:
                    yield m.name, None, f"{m.size} bytes, over the {MAX_IMAGE_BYTES}-byte limit for an image"
                else:
                    yield m.name, m.data, ""
                wanted.discard(m.name)
                if not wanted:
                    return
    except (tarfile.TarError, EOFError) as e:
        raise OSError(f"{shard}: {e}") from None
    if problems and wanted:
        raise OSError(problems[0])  # the members not found were most likely behind this


@lru_cache(maxsize=8)
def _member_offsets(shard: str) -> dict[str, tuple[int, int]]:
    """member -> (data offset, size) of a shard (its headers only), for opening single members."""
    out: dict[str, tuple[int, int]] = {}
    with open_shard(shard) as f:
        tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
        while (info := tar.next()) is not None:
            tar.members = []
            if info.isreg():
                out.setdefault(info.name, (info.offset_data, info.size))
    return out


def read_image_bytes(path: str) -> bytes:
    """The bytes of the member a ``<shard>.tar#<member>`` path names (the report's thumbnails).

    Raises:
        OSError: not such a path, the shard or member cannot be read, or the member is too large.
    """
    parts = split_member_path(path)
    if parts is None:
        raise OSError(f"{path}: not a <shard>.tar#<member> path")
    shard, member = parts
    try:
        found = _member_offsets(shard).get(member)
    except tarfile.TarError as e:
        raise OSError(f"{shard}: {e}") from None
    if found is None:
        raise OSError(f"{path}: no member {member!r} in {shard}")
    offset, size = found
    if size > MAX_IMAGE_BYTES:
        raise OSError(f"{path}: {size} bytes, over the {MAX_IMAGE_BYTES}-byte limit for an image")
    with open_shard(shard) as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member cut short ({len(data)} of {size} bytes)")
    return data


def image_source(path: str) -> str | io.BytesIO:
    """What ``PIL.Image.open`` takes for a stored path: the path itself for an image file, the
    member's bytes for a ``<shard>.tar#<member>`` path."""
    return io.BytesIO(read_image_bytes(path)) if split_member_path(path) is not None else path
