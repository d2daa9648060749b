"""Readers for a TSV manifest and an ImageFolder tree."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..textio import read_text
from .table import SPLITS, ClassTable, DatasetTable

MANIFEST_COLUMNS = ("id", "path", "label", "split", "clean_label", "text")
ALLOW_OUTSIDE_ROOT_ENV = "SINET_ALLOW_OUTSIDE_ROOT"  # set by `sinet --allow-outside-root`
OUTSIDE_ROOT_HINT = "paths are resolved under the manifest's folder; pass sinet --allow-outside-root to read it anyway"


def outside_root(p: str, root: str) -> str | None:
    """Why manifest path ``p`` leaves the manifest's folder ``root``, else None: a relative path
    whose ``..`` climb above it, or an absolute path elsewhere (an absolute path into the folder,
    as ``find $PWD`` writes them, stays in). A lexical check: a symlink inside the folder is followed
    wherever it points (the folder's owner put it there; sinet export's ``images`` link is one)."""
    q = p.replace("\\", "/")
    if q.startswith("/"):
        for base in {os.path.abspath(root), os.path.realpath(root)}:
            if posixpath.normpath(q).startswith(base.rstrip("/") + "/"):
                return None
        return "is absolute, outside the manifest's folder"
    norm = posixpath.normpath(q)
    if norm == ".." or norm.startswith("../"):
        return "leaves the manifest's folder"
    return None


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _label_index(value: str, classes: ClassTable, path: Path, lineno: int, column: str) -> int:
    value = value.strip()
    if value in classes.names:
        return classes.names.index(value)
    try:
        idx = int(value)
    except ValueError:
        raise InputError(path, f"{column} {value!r} is not a class name or index", lineno) from None
    if not 0 <= idx < len(classes):
        raise InputError(path, f"{column} {idx} out of range 0..{len(classes) - 1}", lineno)
    return idx


def check_no_empty_class(table: DatasetTable, source: Path | str) -> None:
    """Every class needs training images: a prototype cannot be built from nothing."""
    counts = np.bincount(table.labels[table.splits == "train"], minlength=len(table.classes))
    empty = [table.classes.names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise InputError(source, f"class {empty[0]!r} has no training images" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))


def read_manifest(path: Path | str, classes: ClassTable | None = None, name: str | None = None,
                  allow_outside_root: bool | None = None) -> DatasetTable:
    """Read ``id path label split [clean_label] [text]`` (TSV with a header).

    Labels are class names or indices into ``classes``; without a class table the classes are the
    sorted distinct label names. Paths are resolved against the manifest's folder and must stay
    under it (:func:`outside_root`) unless ``allow_outside_root`` (None: the environment variable
    ``SINET_ALLOW_OUTSIDE_ROOT=1``, which ``sinet --allow-outside-root`` sets): a manifest from a
    crawl must not make sinet open /etc/passwd. Missing image files are not checked here:
    extraction logs and skips them.
    """
    path = Path(path)
    if allow_outside_root is None:
        allow_outside_root = os.environ.get(ALLOW_OUTSIDE_ROOT_ENV, "") not in ("", "0")
    text = read_text(path)
    lines = text.splitlines()
    if not lines:
        raise InputError(path, "empty manifest")
    header = lines[0].rstrip("\r").split("\t")
    missing = [c for c in ("id", "path", "label") if c not in header]
    if missing:
        raise InputError(path, f"header lacks column(s) {missing}; expected {', '.join(MANIFEST_COLUMNS)}", 1)
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if unknown:
        raise InputError(path, f"unknown column(s) {unknown}; expected {', '.join(MANIFEST_COLUMNS)}", 1)
    col = {c: i for i, c in enumerate(header)}
    rows: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise InputError(path, f"{len(fields)} fields, header has {len(header)}", lineno)
        rows.append((lineno, fields))
    if not rows:
        raise InputError(path, "no images")
    if classes is None:
        labels_seen = sorted({f[col["label"]].strip() for _, f in rows})
        if all(s.isdigit() for s in labels_seen):
            raise InputError(path, "integer labels need a class table (--classes)")
        classes = ClassTable.from_names(labels_seen, source=str(path))
    base = path.parent
    root = str(base)
    ids, paths, labels, splits, clean, texts = [], [], [], [], [], []
    seen: dict[str, int] = {}
    for lineno, f in rows:
        image_id = f[col["id"]].strip()
        if not image_id:
            raise InputError(path, "empty id", lineno)
        if image_id in seen:
            raise InputError(path, f"duplicate id {image_id!r} (first on line {seen[image_id]})", lineno)
        seen[image_id] = lineno
        p = f[col["path"]].strip()
        if not p:
            raise InputError(path, f"empty path for {image_id!r}", lineno)
        why = None if allow_outside_root else outside_root(p, root)
        if why:
            raise InputError(path, f"image path {p!r} of {image_id!r} {why}; {OUTSIDE_ROOT_HINT}", lineno)
        ids.append(image_id)
        paths.append(str(Path(p) if Path(p).is_absolute() else base / p))
        labels.append(_label_index(f[col["label"]], classes, path, lineno, "label"))
        split = f[col["split"]].strip() if "split" in col else "train"
        if split not in SPLITS:
            raise InputError(path, f"split {split!r} is not one of {', '.join(SPLITS)}", lineno)
        splits.append(split)
        if "clean_label" in col:
            v = f[col["clean_label"]].strip()
            clean.append(-1 if v == "" else _label_index(v, classes, path, lineno, "clean_label"))
        if "text" in col:
            texts.append(f[col["text"]])
    table = DatasetTable(
        name=name or path.stem,
        classes=classes,
        ids=np.asarray(ids),
        labels=np.asarray(labels),
        splits=np.asarray(splits),
        paths=np.asarray(paths),
        clean_labels=np.asarray(clean) if clean else None,
        side_text=np.asarray(texts, dtype=str) if texts else None,
        provenance={"reader": "manifest", "path": str(path)},
    )
    check_no_empty_class(table, path)
    return table


def read_imagefolder(root: Path | str, classes: ClassTable | None = None, name: str | None = None) -> DatasetTable:
    """``root/<class>/*.jpg`` (all train) or ``root/<split>/<class>/*.jpg`` with split in train/val/test."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLITS]
    layout = [(d.name, d) for d in split_dirs] if split_dirs else [("train", root)]
    class_dirs = sorted({c.name for _, d in layout for c in d.iterdir() if c.is_dir()})
    if classes is None:
        classes = ClassTable.from_names(class_dirs, source=str(root))
    ids, paths, labels, splits = [], [], [], []
    for split, d in layout:
        for cdir in sorted(c for c in d.iterdir() if c.is_dir()):
            if cdir.name not in classes.names:
                raise InputError(cdir, f"folder {cdir.name!r} is not a class of {classes.source}")
            label = classes.names.index(cdir.name)
            for f in sorted(cdir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    ids.append(f"{split}/{f.relative_to(d).as_posix()}")
                    paths.append(str(f))
                    labels.append(label)
                    splits.append(split)
    if not ids:
        raise InputError(root, "no images found")
    table = DatasetTable(
        name=name or root.name,
        classes=classes,
        ids=np.asarray(ids),
        labels=np.asarray(labels),
        splits=np.asarray(splits),
        paths=np.asarray(paths),
        provenance={"reader": "imagefolder", "path": str(root)},
    )
    check_no_empty_class(table, root)
    return table
