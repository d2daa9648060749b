"""The in-memory dataset table every reader produces, and the class table beside it."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..textio import read_text
from ..store import fingerprint_arrays

SPLITS = ("train", "val", "test")
UNKNOWN = -1  # clean label not known
OUTSIDE = -2  # clean label: the image belongs to none of the classes (open-set noise)
CLASS_COLUMNS = ("name", "synset", "description", "parent")


@dataclass
class ClassTable:
    """Class name, optional WordNet synset id, optional description, optional taxonomy parent."""

    names: list[str]
    synsets: list[str | None]
    descriptions: list[str | None]
    parents: list[str | None]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.synsets) == len(self.descriptions) == len(self.parents) == n):
            raise ValueError("class table columns differ in length")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if not name:
                raise InputError(self.source, f"class {i} has an empty name")
            if name in seen:
                raise InputError(self.source, f"duplicate class name {name!r} (classes {seen[name]} and {i})")
            seen[name] = i

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    @classmethod
    def from_names(cls, names: list[str], source: str = "<memory>") -> "ClassTable":
        n = len(names)
        return cls(list(names), [None] * n, [None] * n, [None] * n, source)

    @classmethod
    def from_tsv(cls, path: Path | str) -> "ClassTable":
        """Read ``name<TAB>synset<TAB>description<TAB>parent`` with a header; only ``name`` is required."""
        path = Path(path)
        text = read_text(path)
        rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
        if not rows:
            raise InputError(path, "empty class table")
        header = [h.strip().lower() for h in rows[0]]
        if "name" not in header:
            raise InputError(path, f"header must name the columns {', '.join(CLASS_COLUMNS)}; got {rows[0]}", 1)
        unknown = [h for h in header if h not in CLASS_COLUMNS]
        if unknown:
            raise InputError(path, f"unknown column(s) {unknown}; expected {', '.join(CLASS_COLUMNS)}", 1)
        cols: dict[str, list[str | None]] = {c: [] for c in CLASS_COLUMNS}
        seen: dict[str, int] = {}
        for lineno, row in enumerate(rows[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) > len(header):
                raise InputError(path, f"{len(row)} fields, header has {len(header)}", lineno)
            values = dict(zip(header, (c.strip() for c in row)))
            name = values.get("name", "")
            if not name:
                raise InputError(path, "empty class name", lineno)
            if name in seen:
                raise InputError(path, f"duplicate class name {name!r} (first on line {seen[name]})", lineno)
            seen[name] = lineno
            for c in CLASS_COLUMNS:
                cols[c].append(values.get(c) or None)
        if not cols["name"]:
            raise InputError(path, "no classes")
        return cls(
            [str(n) for n in cols["name"]], cols["synset"], cols["description"], cols["parent"], str(path)
        )

    def to_tsv(self, path: Path | str) -> None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("\t".join(CLASS_COLUMNS) + "\n")
            for row in zip(self.names, self.synsets, self.descriptions, self.parents):
                f.write("\t".join((v or "").replace("\t", " ") for v in row) + "\n")

    def fingerprint(self) -> str:
        return fingerprint_arrays(self.names, self.synsets, self.descriptions, self.parents)


@dataclass
class DatasetTable:
    """One row per image: id, path or pixels, noisy label, split, optional clean label and side text.

    ``clean_labels`` holds -1 where the true label is unknown. ``pixels`` (N x H x W[x3] uint8)
    replaces ``paths`` for datasets held in memory (the embedded demo). ``subset`` (optional, one
    string per row) names the part of a published dataset a row comes from, e.g. Clothing1M's
    ``noisy`` / ``clean`` training sets or WebVision's ``google/q0001`` source and query.
    """

    name: str
    classes: ClassTable
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: np.ndarray | None = None
    pixels: np.ndarray | None = None
    clean_labels: np.ndarray | None = None
    side_text: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    subset: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.ids = np.asarray(self.ids, dtype=str)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.splits = np.asarray(self.splits, dtype=str)
        if self.subset is not None:
            self.subset = np.asarray(self.subset, dtype=str)
        for name in ("labels", "splits", "paths", "pixels", "clean_labels", "side_text", "subset"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"dataset {self.name}: {name} has {len(value)} rows, ids has {n}")
        if self.paths is None and self.pixels is None:
            raise ValueError(f"dataset {self.name}: needs paths or pixels")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"dataset {self.name}: label outside 0..{len(self.classes) - 1}")
        uniq, counts = np.unique(self.ids, return_counts=True)
        if len(uniq) != n:
            raise ValueError(f"dataset {self.name}: duplicate image id {uniq[counts > 1][0]!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, mask: np.ndarray) -> "DatasetTable":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return replace(
            self,
            ids=self.ids[mask],
            labels=self.labels[mask],
            splits=self.splits[mask],
            paths=pick(self.paths),
            pixels=pick(self.pixels),
            clean_labels=pick(self.clean_labels),
            side_text=pick(self.side_text),
            subset=pick(self.subset),
        )

    def split(self, name: str) -> "DatasetTable":
        return self.take(self.splits == name)

    def noise_mask(self) -> np.ndarray | None:
        """True where the noisy label differs from the clean one (open-set rows included);
        None when no clean labels are known. Rows with an UNKNOWN clean label count as clean;
        use ``clean_labels != UNKNOWN`` to leave them out of a score."""
        if self.clean_labels is None:
            return None
        return (self.clean_labels != UNKNOWN) & (self.labels != self.clean_labels)

    def fingerprint(self) -> str:
        """Content hash of everything a stage reads from the table."""
        parts = [
            self.classes.fingerprint(),
            self.ids,
            self.labels,
            self.splits,
            self.paths,
            None if self.pixels is None else fingerprint_arrays(self.pixels),
            self.clean_labels,
            self.side_text,
        ]
        if self.subset is not None:  # appended only when present: older fingerprints stay valid
            parts.append(self.subset)
        return fingerprint_arrays(*parts)
