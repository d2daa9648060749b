"""Stage: what ``sinet export`` writes per scored image, and the decision rule of the cleaned manifest.

Decision rule (docs/noise-estimate.md): an image that is not flagged is kept with its label; a
flagged image whose suggestion has confidence >= ``relabel_at`` (default 0.5: the suggested class
is at least as likely as not the image's class) is kept with the suggested class; any other
flagged image is dropped. Plain functions over one block of rows at a time; the command streams
the blocks and writes the files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

DECISIONS = ("keep", "relabel", "drop")
COLUMNS = ("id", "path", "split", "label", "weight", "flagged", "suggested_class", "suggested_confidence",
           "class_noise", "decision")


@dataclass(frozen=True)
class ExportConfig:
    """How export decides and streams."""

    relabel_at: float = 0.5  # least suggestion confidence that relabels a flagged image (else it is dropped)
    chunk_rows: int = 65536  # rows per streamed block

    def __post_init__(self) -> None:
        if not 0.0 <= self.relabel_at <= 1.0 or self.chunk_rows < 1:
            raise ValueError(f"--relabel-at {self.relabel_at}: must be in [0, 1]; --chunk-rows >= 1")

    def params(self) -> dict[str, Any]:
        return asdict(self)


def decide(flagged: np.ndarray, confidence: np.ndarray, relabel_at: float) -> np.ndarray:
    """Per row 0 keep (not flagged), 1 relabel (flagged, suggestion confidence >= relabel_at), 2 drop."""
    f = np.asarray(flagged).astype(bool)
    sure = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=0.0) >= relabel_at
    return np.where(~f, 0, np.where(sure, 1, 2)).astype(np.int8)


@dataclass
class ExportBlock:
    """One block of rows: the images table's columns and the rows the cleaned manifest keeps."""

    columns: dict[str, Any]  # COLUMNS (+ side_text), ready for a pyarrow table
    decision: np.ndarray  # int8 per row, index into DECISIONS
    keep: np.ndarray  # bool per row: in the cleaned manifest
    new_label: np.ndarray  # class index per row in the manifest (the suggestion where relabeled)


def export_block(scores: Mapping[str, np.ndarray], ids: np.ndarray, paths: np.ndarray, splits: np.ndarray,
                 side_text: np.ndarray | None, classes: Sequence[str], class_noise: np.ndarray,
                 relabel_at: float) -> ExportBlock:
    """The export of one block of scored rows.

    Args:
        scores: the block's ``labels``, ``weight``, ``flagged``, ``suggested_class``,
            ``suggested_confidence`` (scores.h5).
        ids, paths, splits: per row (features.h5; "" paths for images held in memory).
        side_text: per row, or None when the dataset has none.
        classes: the C class names.
        class_noise: the estimated noise of each class (C,).
        relabel_at: see :func:`decide`.
    """
    names = np.asarray(classes, dtype=object)
    lab = np.asarray(scores["labels"], dtype=np.int64)
    valid = (lab >= 0) & (lab < len(names))
    sug = np.asarray(scores["suggested_class"], dtype=np.int64)
    sug_ok = (sug >= 0) & (sug < len(names))
    decision = decide(scores["flagged"], scores["suggested_confidence"], relabel_at)
    columns: dict[str, Any] = {
        "id": ids.tolist(), "path": paths.tolist(), "split": splits.tolist(),
        "label": np.where(valid, names[np.clip(lab, 0, len(names) - 1)], None).tolist(),
        "weight": np.asarray(scores["weight"], dtype=np.float64),
        "flagged": np.asarray(scores["flagged"]).astype(bool),
        "suggested_class": np.where(sug_ok, names[np.clip(sug, 0, len(names) - 1)], None).tolist(),
        "suggested_confidence": np.asarray(scores["suggested_confidence"], dtype=np.float64),
        "class_noise": np.where(valid, np.asarray(class_noise)[np.clip(lab, 0, len(names) - 1)], np.nan),
        "decision": np.asarray(DECISIONS, dtype=object)[decision].tolist(),
    }
    if side_text is not None:
        columns["side_text"] = side_text.tolist()
    # the cleaned manifest: kept rows, relabeled ones with the suggestion
    keep = (decision < 2) & valid & np.where(decision == 1, sug_ok, True)
    return ExportBlock(columns, decision, keep, np.where(decision == 1, sug, lab))


def common_root(paths: Sequence[str] | np.ndarray, root: str | None) -> str | None:
    """The deepest folder holding every path of ``paths`` and ``root`` so far."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in np.asarray(paths).tolist() if p}
    if root is not None:
        folders.add(root)
    return os.path.commonpath(sorted(folders)) if folders else root


def relative_image_paths(paths: Sequence[str], root: str) -> list[str]:
    """The manifest's image paths: ``images/`` + each path relative to ``root`` (the ``images``
    symlink of the export folder points there)."""
    return ["images/" + Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in paths]
