"""Reader for Clothing1M (Xiao et al., CVPR 2015) in its own, as-downloaded layout.

::

    ROOT/category_names_eng.txt        14 class names, one per line, in label order
    ROOT/noisy_label_kv.txt            images/x/yy/name.jpg <label 0..13>  (noisy web labels)
    ROOT/clean_label_kv.txt            images/x/yy/name.jpg <label 0..13>  (human labels)
    ROOT/noisy_train_key_list.txt      one relative image path per line
    ROOT/clean_{train,val,test}_key_list.txt
    ROOT/images/...

The annotation files may sit at ROOT or under ROOT/annotations/ (the latter wins when both hold a
file). Image paths are relative to ROOT (``images/...``); a path that does not start with
``images/`` is looked up under ROOT/images/. Missing image files are not checked here: extraction
logs and skips them.

The line-level helpers here (:func:`read_text_lines`, :func:`parse_path_label`) are shared with the
WebVision reader.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np

from .. import console
from ..errors import InputError
from ..textio import read_text_lines
from .demo import data_dir
from .manifest import check_no_empty_class
from .table import ClassTable, DatasetTable

ANNOTATION_DIRS = ("annotations", ".")
CATEGORY_FILE = "category_names_eng.txt"
NOISY_KV = "noisy_label_kv.txt"
CLEAN_KV = "clean_label_kv.txt"
NOISY_TRAIN_KEYS = "noisy_train_key_list.txt"
CLEAN_KEYS = {"train": "clean_train_key_list.txt", "val": "clean_val_key_list.txt", "test": "clean_test_key_list.txt"}

#: Ids of rows from the clean (human-labelled) training set: ``clean:images/x/yy/name.jpg``. The same
#: image can also be a noisy training row (id ``images/x/yy/name.jpg``), so the prefix keeps ids unique
#: and lets later stages (which see only ids) tell the two training sets apart.
CLEAN_ID_PREFIX = "clean:"
#: ``clean_as`` choices for the clean training set: ``train`` adds it as training rows marked
#: ``subset == "clean"`` (for ``--prototypes-from clean`` and the paper's Noise1M+Clean setting of
#: table 8); ``skip`` leaves it out (the plain 1M-noisy-images benchmark).
CLEAN_AS = ("train", "skip")


def clothing1m_classes() -> ClassTable:
    """The packaged 14-class table (WordNet 3.0 synsets, or a description and a parent synset)."""
    return ClassTable.from_tsv(data_dir() / "clothing1m_classes.tsv")


# --- line-level helpers (shared with webvision.py) -------------------------------------------------


def relative_image_path(raw: str, path: Path, lineno: int) -> str:
    """A relative POSIX image path; absolute paths and ``..`` components are refused."""
    rel = raw.strip()  # plain string work: pathlib costs seconds per million lines
    if not rel or rel[0] in "/\\" or (len(rel) > 1 and rel[1] == ":"):
        raise InputError(path, f"image path {rel!r} must be relative to the dataset folder", lineno)
    if ".." in rel and ".." in rel.replace("\\", "/").split("/"):
        raise InputError(path, f"image path {rel!r} must not contain '..'", lineno)
    if "//" in rel or "./" in rel or rel.endswith("/."):
        rel = posixpath.normpath(rel)
    return rel


def parse_label(value: str, num_classes: int, path: Path, lineno: int) -> int:
    try:
        label = int(value)
    except ValueError:
        raise InputError(path, f"label {value!r} is not an integer", lineno) from None
    if not 0 <= label < num_classes:
        raise InputError(path, f"label {label} out of range 0..{num_classes - 1}", lineno)
    return label


def parse_path_label(path: Path, num_classes: int) -> list[tuple[int, str, int]]:
    """``relative/path.jpg <label>`` lines -> ``(line number, path, label)``; duplicate paths are errors."""
    rows: list[tuple[int, str, int]] = []
    seen: dict[str, int] = {}
    for lineno, line in read_text_lines(path):
        fields = line.split()
        if len(fields) != 2:
            what = "missing the label column" if len(fields) == 1 else f"{len(fields)} fields"
            raise InputError(path, f"expected 'path label', {what}", lineno)
        rel = relative_image_path(fields[0], path, lineno)
        label = parse_label(fields[1], num_classes, path, lineno)
        if rel in seen:
            raise InputError(path, f"duplicate image {rel!r} (first on line {seen[rel]})", lineno)
        seen[rel] = lineno
        rows.append((lineno, rel, label))
    return rows


def parse_key_list(path: Path) -> list[tuple[int, str]]:
    """One relative image path per line -> ``(line number, path)``; duplicates are errors."""
    rows: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in read_text_lines(path):
        fields = line.split()
        if len(fields) != 1:
            raise InputError(path, f"expected one image path per line, got {len(fields)} fields", lineno)
        rel = relative_image_path(fields[0], path, lineno)
        if rel in seen:
            raise InputError(path, f"duplicate image {rel!r} (first on line {seen[rel]})", lineno)
        seen[rel] = lineno
        rows.append((lineno, rel))
    return rows


def find_file(root: Path, name: str, subdirs: tuple[str, ...]) -> Path | None:
    for sub in subdirs:
        candidate = root / sub / name
        if candidate.is_file():
            return candidate
    return None


# --- the reader ------------------------------------------------------------------------------------


def _class_table(root: Path, classes: ClassTable | None) -> ClassTable:
    category_file = find_file(root, CATEGORY_FILE, ANNOTATION_DIRS)
    names: list[str] | None = None
    if category_file is not None:
        names = []
        for lineno, line in read_text_lines(category_file):
            name = line.strip()
            if name in names:
                raise InputError(category_file, f"duplicate class name {name!r}", lineno)
            names.append(name)
        if not names:
            raise InputError(category_file, "no class names")
    if classes is not None:
        if names is not None and len(classes) != len(names):
            raise InputError(
                classes.source, f"{len(classes)} classes, but {category_file} names {len(names)} (labels index into it)"
            )
        return classes
    packaged = clothing1m_classes()
    if names is None or names == packaged.names:
        return packaged
    return match_packaged(names, packaged, str(category_file))


def match_packaged(names: list[str], packaged: ClassTable, source: str) -> ClassTable:
    """The class table of a category file's ``names`` (in its order, in its spelling): each name takes
    the synset, description and parent of the packaged row it is a spelling of (case, ``_`` / ``-`` /
    spaces and a plural ``-s``/``-es`` do not matter: ``T-shirt``, ``t_shirt``, ``Down Coat``, ``downcoat``,
    ``Dresses``); a name that matches no row has none, and build-graph looks it up in WordNet by name."""
    from stages.build_graph import same_name

    synsets: list[str | None] = []
    descriptions: list[str | None] = []
    parents: list[str | None] = []
    unmatched: list[str] = []
    for name in names:
        j = next((j for j, p in enumerate(packaged.names) if same_name(name, p)), None)
        if j is None:
            unmatched.append(name)
        synsets.append(None if j is None else packaged.synsets[j])
        descriptions.append(None if j is None else packaged.descriptions[j])
        parents.append(None if j is None else packaged.parents[j])
    if unmatched:
        shown = ", ".join(repr(n) for n in unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        console.warn(
            f"{source}: {shown} {'is' if len(unmatched) == 1 else 'are'} not in the packaged Clothing1M class table; "
            "build-graph looks them up in WordNet by name (or pass --classes with a synset column)"
        )
    return ClassTable(list(names), synsets, descriptions, parents, source)


def read_clothing1m(
    root: Path | str, classes: ClassTable | None = None, clean_as: str = "train", name: str | None = None
) -> DatasetTable:
    """Read Clothing1M from its own layout (see the module docstring).

    Rows, in this order:

    - noisy training images (``noisy_train_key_list``): split ``train``, subset ``noisy``, label from
      ``noisy_label_kv``, clean label from ``clean_label_kv`` where that image has one, else -1;
    - clean training images (``clean_train_key_list``, only with ``clean_as="train"``): split
      ``train``, subset ``clean``, id ``clean:<path>``, label = clean label;
    - ``clean_val_key_list`` as split ``val`` and ``clean_test_key_list`` as split ``test`` (subset
      ``clean``, label = clean label).

    Ids are the relative image paths. Without ``classes`` the packaged 14-class table is used.

    Args:
        root: the Clothing1M folder.
        classes: a class table in label order (14 rows), or None for the packaged one.
        clean_as: ``train`` or ``skip`` (see :data:`CLEAN_AS`).
        name: table name (default: the folder name).

    Raises:
        InputError: a missing or malformed annotation file, naming the file and line.
    """
    root = Path(root)
    if clean_as not in CLEAN_AS:
        raise ValueError(f"clean_as {clean_as!r}: choose one of {', '.join(CLEAN_AS)}")
    if not root.is_dir():
        raise InputError(root, "not a folder (expected the Clothing1M root)")
    class_table = _class_table(root, classes)
    n_classes = len(class_table)

    noisy_kv_path = find_file(root, NOISY_KV, ANNOTATION_DIRS)
    noisy_keys_path = find_file(root, NOISY_TRAIN_KEYS, ANNOTATION_DIRS)
    for fname, found in ((NOISY_KV, noisy_kv_path), (NOISY_TRAIN_KEYS, noisy_keys_path)):
        if found is None:
            raise InputError(root, f"no {fname} here or under annotations/ (not a Clothing1M folder?)")
    assert noisy_kv_path is not None and noisy_keys_path is not None
    noisy = {rel: label for _, rel, label in parse_path_label(noisy_kv_path, n_classes)}
    clean_kv_path = find_file(root, CLEAN_KV, ANNOTATION_DIRS)
    clean = {} if clean_kv_path is None else {rel: lab for _, rel, lab in parse_path_label(clean_kv_path, n_classes)}

    ids: list[str] = []
    rels: list[str] = []
    labels: list[int] = []
    clean_labels: list[int] = []
    splits: list[str] = []
    subsets: list[str] = []
    first_seen: dict[str, tuple[Path, int]] = {}  # id -> (file, line) of its first row
    counts: dict[str, int] = {}

    def add(image_id: str, rel: str, label: int, clean_label: int, split: str, subset: str, where: tuple[Path, int]):
        if image_id in first_seen:
            f, n = first_seen[image_id]
            raise InputError(where[0], f"image {rel!r} is listed twice (first at {f}:{n})", where[1])
        first_seen[image_id] = where
        ids.append(image_id)
        rels.append(rel)
        labels.append(label)
        clean_labels.append(clean_label)
        splits.append(split)
        subsets.append(subset)

    for lineno, rel in parse_key_list(noisy_keys_path):
        if rel not in noisy:
            raise InputError(noisy_keys_path, f"{rel!r} has no label in {noisy_kv_path}", lineno)
        add(rel, rel, noisy[rel], clean.get(rel, -1), "train", "noisy", (noisy_keys_path, lineno))
    counts["noisy_train"] = len(ids)

    for split in ("train", "val", "test"):
        keys_path = find_file(root, CLEAN_KEYS[split], ANNOTATION_DIRS)
        if keys_path is None or (split == "train" and clean_as == "skip"):
            counts[f"clean_{split}"] = 0
            continue
        if clean_kv_path is None:
            raise InputError(root, f"{keys_path.name} needs {CLEAN_KV} (here or under annotations/)")
        before = len(ids)
        for lineno, rel in parse_key_list(keys_path):
            if rel not in clean:
                raise InputError(keys_path, f"{rel!r} has no label in {clean_kv_path}", lineno)
            image_id = CLEAN_ID_PREFIX + rel if split == "train" else rel
            add(image_id, rel, clean[rel], clean[rel], split, "clean", (keys_path, lineno))
        counts[f"clean_{split}"] = len(ids) - before

    if not ids:
        raise InputError(noisy_keys_path, "no images")
    base = str(root).rstrip("/") + "/"
    paths = [base + rel if rel.startswith("images/") else base + "images/" + rel for rel in rels]
    table = DatasetTable(
        name=name or root.name,
        classes=class_table,
        ids=np.asarray(ids),
        labels=np.asarray(labels),
        splits=np.asarray(splits),
        paths=np.asarray(paths),
        clean_labels=np.asarray(clean_labels),
        subset=np.asarray(subsets),
        provenance={
            "reader": "clothing1m",
            "path": str(root),
            "annotations": str(noisy_kv_path.parent),
            "clean_as": clean_as,
            "clean_id_prefix": CLEAN_ID_PREFIX,
            "counts": counts,
        },
    )
    check_no_empty_class(table, noisy_keys_path)
    return table
