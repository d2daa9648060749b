"""Reader for WebVision 1.0 / 2.0 (Li et al., 2017) in its own layout, and Mini-WebVision.

::

    ROOT/info/synsets.txt                 n01440764 tench, Tinca tinca      (one line per class, in order)
    ROOT/info/train_filelist_google.txt   google/q0001/000001.jpg 0
    ROOT/info/train_filelist_flickr.txt   flickr/q0001/000001.jpg 0
    ROOT/info/val_filelist.txt            val_images_256/ILSVRC2012_val_00000001.JPEG 65   (or a bare file name)
    ROOT/info/queries_synsets_map.txt     <query index> <class index>     (optional; 1-based classes as shipped)
    ROOT/google/q0001.json                per-query metadata: [{"id", "title", "description", "tags"...}, ...]
    ROOT/flickr/q0001.json                (also google_json/, flickr_json/ or metadata/google/ ...)

The ``info`` files may also sit directly in ROOT. Image paths are relative to ROOT; a bare val file
name is looked up under ``val_images_256/`` (or ``val_images/``). Ids are the paths relative to ROOT.
Missing image files are not checked here: extraction logs and skips them.

Per-image side text is ``title. description. tags`` from the query's JSON record whose id (or URL
file stem) equals the image's file stem, else the record at the image's position. The JSON is
untrusted: see :mod:`.jsonmeta`. A file that cannot be used is logged and skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import console
from ..errors import InputError, SinetError
from . import jsonmeta
from .clothing1m import find_file, parse_path_label, read_text_lines, relative_image_path
from .manifest import check_no_empty_class
from .table import ClassTable, DatasetTable

INFO_DIRS = ("info", ".")
SOURCES = ("google", "flickr")
VAL_IMAGE_DIRS = ("val_images_256", "val_images")
MINI_CLASSES = 50
WNID = re.compile(r"n\d{8}")
QUERY = re.compile(r"q(\d+)")


def metadata_candidates(root: Path, source: str, query: str) -> list[Path]:
    """Where a query's JSON metadata may be, in the order tried."""
    name = f"{query}.json"
    return [
        root / source / name,
        root / f"{source}_json" / name,
        root / "metadata" / source / name,
        root / "meta" / source / name,
    ]


def read_synsets(path: Path) -> ClassTable:
    """``wnid name[, other names]`` per line -> classes named by their first name (``name (wnid)``
    where two classes share a first name, e.g. the two ``crane`` synsets)."""
    wnids: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in read_text_lines(path):
        fields = line.strip().split(None, 1)
        wnid = fields[0]
        if not WNID.fullmatch(wnid):
            raise InputError(path, f"{wnid!r} is not a WordNet id like n01440764", lineno)
        if wnid in seen:
            raise InputError(path, f"duplicate synset {wnid} (first on line {seen[wnid]})", lineno)
        seen[wnid] = lineno
        wnids.append(wnid)
        names.append((fields[1].split(",")[0].strip() if len(fields) > 1 else "") or wnid)
    if not wnids:
        raise InputError(path, "no classes")
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    names = [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(names, wnids)]
    k = len(names)
    return ClassTable(names, list(wnids), [None] * k, [None] * k, str(path))


def read_query_map(path: Path, num_classes: int) -> dict[int, int]:
    """``query_index class_index`` per line -> {query: 0-based class}. The class column is 1-based
    as WebVision ships it, unless it contains a 0."""
    raw: list[tuple[int, int, int]] = []
    seen: dict[int, int] = {}
    for lineno, line in read_text_lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise InputError(path, f"expected 'query_index class_index', got {len(fields)} field(s)", lineno)
        try:
            query, cls = int(fields[0]), int(fields[1])
        except ValueError:
            raise InputError(path, f"{line.strip()!r}: indices must be integers", lineno) from None
        if query in seen:
            raise InputError(path, f"duplicate query {query} (first on line {seen[query]})", lineno)
        seen[query] = lineno
        raw.append((lineno, query, cls))
    offset = 0 if any(c == 0 for _, _, c in raw) else 1
    out: dict[int, int] = {}
    for lineno, query, cls in raw:
        if not 0 <= cls - offset < num_classes:
            raise InputError(path, f"class {cls} out of range {offset}..{num_classes - 1 + offset}", lineno)
        out[query] = cls - offset
    return out


def _query_of(rel: str) -> str | None:
    for part in rel.split("/")[:-1]:
        if QUERY.fullmatch(part):
            return part
    return None


def _stem(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name[1:] else name


def read_webvision(
    root: Path | str,
    classes: ClassTable | None = None,
    *,
    sources: tuple[str, ...] = SOURCES,
    num_classes: int | None = None,
    name: str | None = None,
    max_json_bytes: int | None = None,
) -> DatasetTable:
    """Read WebVision (1.0 or 2.0) from its own layout (see the module docstring).

    Train rows come from ``train_filelist_<source>.txt`` for each of ``sources`` (split ``train``,
    subset ``<source>/<query>``, clean label -1); val rows from ``val_filelist.txt`` (split ``val``,
    subset ``val``, clean label = label). Classes come from ``synsets.txt``: name = first name,
    synset = wnid, no description (the graph builder takes the WordNet gloss).

    Args:
        root: the WebVision folder.
        classes: a class table with one row per line of ``synsets.txt`` (or per kept class), or None.
        sources: which training lists to read.
        num_classes: keep only the first ``num_classes`` classes (Mini-WebVision: 50).
        name: table name (default: the folder name).
        max_json_bytes: size limit of one metadata file (default :data:`jsonmeta.MAX_JSON_BYTES`).

    Raises:
        InputError: a missing or malformed list file, naming the file and line.
        SinetError: metadata files exist but none could be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the WebVision root)")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources {sources!r}: choose from {', '.join(SOURCES)}")
    synsets_path = find_file(root, "synsets.txt", INFO_DIRS)
    if synsets_path is None:
        raise InputError(root, "no info/synsets.txt (not a WebVision folder?)")
    full = read_synsets(synsets_path)
    n_all = len(full)
    keep = n_all if num_classes is None else num_classes
    if not 0 < keep <= n_all:
        raise InputError(synsets_path, f"{n_all} classes; cannot keep the first {keep}")
    class_table = _kept_classes(full, keep) if classes is None else _check_user_classes(classes, n_all, keep, synsets_path)

    map_path = find_file(root, "queries_synsets_map.txt", INFO_DIRS)
    query_map = read_query_map(map_path, n_all) if map_path is not None else None

    ids: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    subsets: list[str] = []
    paths: list[str] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    counts: dict[str, int] = {}
    base = str(root).rstrip("/") + "/"

    def add(rel: str, label: int, split: str, subset: str, where: Path, lineno: int) -> None:
        if rel in first_seen:
            f, n = first_seen[rel]
            raise InputError(where, f"image {rel!r} is listed twice (first at {f}:{n})", lineno)
        first_seen[rel] = (where, lineno)
        ids.append(rel)
        labels.append(label)
        splits.append(split)
        subsets.append(subset)
        paths.append(base + rel)

    lists_read = 0
    for source in sources:
        list_path = find_file(root, f"train_filelist_{source}.txt", INFO_DIRS)
        if list_path is None:
            console.warn(f"{root}: no info/train_filelist_{source}.txt; no {source} training images")
            continue
        lists_read += 1
        before = len(ids)
        for lineno, rel, label in parse_path_label(list_path, n_all):
            query = _query_of(rel)
            if query_map is not None and query is not None:
                q = int(QUERY.fullmatch(query).group(1))  # type: ignore[union-attr]
                if q not in query_map:
                    raise InputError(list_path, f"query folder {query} is not in {map_path}", lineno)
                if query_map[q] != label:
                    raise InputError(
                        list_path, f"label {label} disagrees with {map_path} (query {query} -> class {query_map[q]})", lineno
                    )
            if label < keep:
                add(rel, label, "train", f"{source}/{query}" if query else source, list_path, lineno)
        counts[f"train_{source}"] = len(ids) - before
    if not lists_read:
        raise InputError(root, f"no info/train_filelist_{{{','.join(sources)}}}.txt (not a WebVision folder?)")
    n_train = len(ids)

    val_path = find_file(root, "val_filelist.txt", INFO_DIRS)
    if val_path is not None:
        val_dir = next((d for d in VAL_IMAGE_DIRS if (root / d).is_dir()), VAL_IMAGE_DIRS[0])
        for lineno, rel, label in parse_path_label(val_path, n_all):
            rel = rel if "/" in rel else relative_image_path(f"{val_dir}/{rel}", val_path, lineno)
            if label < keep:
                add(rel, label, "val", "val", val_path, lineno)
    counts["val"] = len(ids) - n_train

    table = DatasetTable(
        name=name or root.name,
        classes=class_table,
        ids=np.asarray(ids),
        labels=np.asarray(labels),
        splits=np.asarray(splits),
        paths=np.asarray(paths),
        clean_labels=np.where(np.asarray(splits) == "val", np.asarray(labels), -1),
        side_text=_side_text(root, ids, subsets, max_json_bytes),
        subset=np.asarray(subsets),
        provenance={
            "reader": "webvision",
            "path": str(root),
            "sources": list(sources),
            "classes_kept": keep,
            "classes_total": n_all,
            "counts": counts,
        },
    )
    check_no_empty_class(table, root)
    return table


def read_mini_webvision(
    root: Path | str,
    classes: ClassTable | None = None,
    *,
    include_flickr: bool = False,
    num_classes: int = MINI_CLASSES,
    max_json_bytes: int | None = None,
) -> DatasetTable:
    """Mini-WebVision: the first 50 classes of WebVision 1.0, Google images only as in the
    literature (``include_flickr`` adds the Flickr ones); val keeps those classes' images."""
    table = read_webvision(
        root,
        classes,
        sources=SOURCES if include_flickr else ("google",),
        num_classes=num_classes,
        name=f"mini-{Path(root).name}",
        max_json_bytes=max_json_bytes,
    )
    table.provenance["reader"] = "mini-webvision"
    return table


def _kept_classes(full: ClassTable, keep: int) -> ClassTable:
    return ClassTable(
        full.names[:keep], full.synsets[:keep], full.descriptions[:keep], full.parents[:keep], full.source
    )


def _check_user_classes(classes: ClassTable, n_all: int, keep: int, synsets_path: Path) -> ClassTable:
    if len(classes) == keep:
        return classes
    if len(classes) == n_all:
        return _kept_classes(classes, keep)
    raise InputError(
        classes.source,
        f"{len(classes)} classes, but {synsets_path} has {n_all}" + (f" (keeping {keep})" if keep != n_all else ""),
    )


def _side_text(root: Path, ids: list[str], subsets: list[str], max_json_bytes: int | None) -> np.ndarray | None:
    """Per-image side text from the per-query JSON files; None when there are none at all."""
    by_query: dict[str, list[int]] = {}
    for i, sub in enumerate(subsets):
        if "/" in sub:
            by_query.setdefault(sub, []).append(i)
    texts = [""] * len(ids)
    found = loaded = 0
    first_error = ""
    for sub, rows in by_query.items():
        source, query = sub.split("/", 1)
        path = next((p for p in metadata_candidates(root, source, query) if p.is_file()), None)
        if path is None:
            continue
        found += 1
        try:
            entries = jsonmeta.entries_of(jsonmeta.load_json(path, max_json_bytes))
        except jsonmeta.MetadataError as e:
            console.warn(f"skipped side text of query {sub}: {e}")
            first_error = first_error or str(e)
            continue
        loaded += 1
        stems = [_stem(ids[i]) for i in rows]
        for i, text in zip(rows, jsonmeta.side_texts(stems, entries)):
            texts[i] = text
    if found == 0:
        if by_query:
            console.warn(f"{root}: no per-query JSON metadata (e.g. google/q0001.json); no side text")
        return None
    if loaded == 0:
        raise SinetError(f"no metadata file could be read ({found} tried); first: {first_error}")
    missing = sum(1 for i, t in enumerate(texts) if not t and "/" in subsets[i])
    if missing:
        console.info(f"{root}: {missing} of {sum(map(len, by_query.values()))} training images have no side text")
    out = np.empty(len(texts), dtype=object)  # object: a fixed-width unicode array would be N x longest text
    out[:] = texts
    return out
