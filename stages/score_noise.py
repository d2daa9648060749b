"""Stage: prototypes + features -> noise weights (paper section 3.3, eq. 6) and detection metrics.

Pure computation over one block of rows at a time, so the caller can stream any N with bounded
memory: :func:`score_block` gives, per row, the distance to the nearest prototype of its labeled
class, the weight w_i (eq. 6), and the nearest prototype of any class (a suggested relabel,
found with a FAISS index over the prototypes). :func:`suspect_order` ranks rows worst first;
:func:`roc_auc` and :func:`average_precision` score detection against a known noise mask (numpy
only, tie-aware, equal to scikit-learn's definitions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class BlockScores:
    distance: np.ndarray  # (B,) ||v_c - g_i||_2 to the nearest prototype of the labeled class c
    weight: np.ndarray  # (B,) eq. 6
    nearest_class: np.ndarray  # (B,) class of the nearest prototype of any class
    nearest_distance: np.ndarray  # (B,) its Euclidean distance


def noise_weight(distance: np.ndarray, alpha: float = 1.2, beta: float = 1.5) -> np.ndarray:
    """w = max(0, alpha - d)^beta (eq. 6); rows with an unknown distance (NaN) get 0."""
    d = np.asarray(distance, dtype=np.float64)
    w = np.maximum(0.0, alpha - np.where(np.isnan(d), np.inf, d)) ** beta  # eq. 6
    return w.astype(np.float32)


def class_slots(prototype_class: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, m) indices of each class's prototypes, padded by repeating a class's own prototypes.

    Raises ValueError when a class has no prototype.
    """
    pc = np.asarray(prototype_class, dtype=np.int64)
    counts = np.bincount(pc, minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"prototype_class holds class {pc.max()}, but there are {num_classes} classes")
    if (counts == 0).any():
        raise ValueError(f"class {int(np.flatnonzero(counts == 0)[0])} has no prototype")
    m = int(counts.max())
    order = np.argsort(pc, kind="stable")
    first = np.searchsorted(pc[order], np.arange(num_classes))
    j = np.arange(m)[None, :] % counts[:, None]
    return order[first[:, None] + j]


SUB_ROWS = 4096


class _Buffer:
    """A reusable float32 buffer: float16 blocks are converted into it without a fresh allocation."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def __call__(self, block: np.ndarray) -> torch.Tensor:
        b, d = block.shape
        if self.buf is None or self.buf.shape[0] < b or self.buf.shape[1] != d:
            self.buf = torch.empty((b, d), dtype=torch.float32)
        out = self.buf[:b]
        out.copy_(torch.from_numpy(np.ascontiguousarray(block)))
        return out


_BUFFER = _Buffer()


def score_block(
    features: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    slots: np.ndarray,
    prototype_class: np.ndarray,
    index: Any,
    alpha: float = 1.2,
    beta: float = 1.5,
) -> BlockScores:
    """Score one block of rows against the prototypes.

    Args:
        features: (B, D) features g_i (float16 or float32).
        labels: (B,) labeled class c of each row; a label outside [0, C) gets distance NaN, w = 0.
        prototypes: (P, D) float32 prototypes v.
        slots: (C, m) prototype rows of each class (:func:`class_slots`).
        prototype_class: (P,) class of each prototype.
        index: a FAISS index over ``prototypes`` (inner product or L2) for the nearest prototype.
        alpha, beta: shift and contrast of eq. 6.
    """
    import faiss

    g = _BUFFER(features)  # float32 view of a reused buffer
    labels = np.asarray(labels, dtype=np.int64)
    C = slots.shape[0]
    valid = (labels >= 0) & (labels < C)
    lab = torch.as_tensor(np.where(valid, labels, 0))
    V = torch.as_tensor(prototypes)
    vv = (V * V).sum(1)
    S = torch.as_tensor(slots)
    gg = torch.empty(len(g))
    d2 = torch.empty(len(g))
    tmp = torch.empty((min(SUB_ROWS, len(g)), g.shape[1]))
    for i in range(0, len(g), SUB_ROWS):  # sub-blocks: temporaries stay small (no page faults)
        gs, ls = g[i : i + SUB_ROWS], lab[i : i + SUB_ROWS]
        n = len(gs)
        gg[i : i + n] = torch.linalg.vector_norm(gs, dim=1).square_()
        for j in range(slots.shape[1]):
            # own class: ||v - g||^2 = |g|^2 + |v|^2 - 2 g.v, minimized over the class's m prototypes
            pj = S[:, j].index_select(0, ls)
            dot = torch.index_select(V, 0, pj, out=tmp[:n]).mul_(gs).sum(1)
            dj = vv.index_select(0, pj).sub_(dot.mul_(2.0)).add_(gg[i : i + n])
            d2[i : i + n] = dj if j == 0 else torch.minimum(d2[i : i + n], dj)
    dist = d2.clamp_min_(0.0).sqrt_().numpy()
    dist = np.where(valid, dist, np.nan).astype(np.float32)
    # nearest prototype of any class: one FAISS search (a BLAS product inside)
    score, idx = index.search(g.numpy(), 1)
    idx = idx[:, 0]
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        nd2 = gg.numpy() + vv.numpy()[idx] - 2.0 * score[:, 0]
    else:  # METRIC_L2 returns squared distances
        nd2 = score[:, 0]
    return BlockScores(
        distance=dist,
        weight=noise_weight(dist, alpha, beta),
        nearest_class=np.asarray(prototype_class)[idx].astype(np.int64),
        nearest_distance=np.sqrt(np.maximum(nd2, 0.0)).astype(np.float32),
    )


def suspect_order(
    weight: np.ndarray,
    distance: np.ndarray,
    labels: np.ndarray,
    nearest_class: np.ndarray,
    limit: int = 0,
) -> np.ndarray:
    """Row indices of the suspects, worst first: rows with w = 0 or whose nearest prototype is of
    another class, by increasing weight then decreasing distance; at most ``limit`` (0: all)."""
    weight = np.asarray(weight)
    distance = np.asarray(distance, dtype=np.float64)
    flagged = np.flatnonzero((weight <= 0) | (np.asarray(nearest_class) != np.asarray(labels)))
    d = np.where(np.isnan(distance[flagged]), np.inf, distance[flagged])
    order = flagged[np.lexsort((-d, weight[flagged]))]
    return order[:limit] if limit > 0 else order


class TopSuspects:
    """The ``limit`` worst suspects seen so far, in bounded memory (at most 2 x limit + one block).

    A row outside the current worst ``limit`` can never re-enter (later rows only push it down),
    so pruning is exact. Keeps each row's columns (ids, paths, ...) as numpy arrays.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.cols: dict[str, list[np.ndarray]] = {}
        self.size = 0

    def add(self, row: np.ndarray, weight: np.ndarray, distance: np.ndarray, labels: np.ndarray,
            nearest_class: np.ndarray, **extra: np.ndarray) -> None:
        weight = np.asarray(weight)
        flagged = (weight <= 0) | (np.asarray(nearest_class) != np.asarray(labels))
        if not flagged.any():
            return
        cols = {"row": row, "weight": weight, "distance": distance, "labels": labels,
                "nearest_class": nearest_class, **extra}
        for k, v in cols.items():
            self.cols.setdefault(k, []).append(np.asarray(v)[flagged])
        self.size += int(flagged.sum())
        if self.size > 2 * self.limit:
            self._prune()

    def _order(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        c = {k: np.concatenate(v) for k, v in self.cols.items()}
        d = np.where(np.isnan(c["distance"]), np.inf, c["distance"].astype(np.float64))
        return c, np.lexsort((c["row"], -d, c["weight"]))

    def _prune(self) -> None:
        c, order = self._order()
        keep = order[: self.limit]
        self.cols = {k: [v[keep]] for k, v in c.items()}
        self.size = len(keep)

    def result(self) -> dict[str, np.ndarray]:
        """The kept columns, worst first."""
        if not self.cols:
            return {}
        c, order = self._order()
        keep = order[: self.limit]
        return {k: v[keep] for k, v in c.items()}


# -- detection metrics (numpy; scikit-learn is only a dev dependency) --------------------------


def _threshold_counts(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true / false positives at each distinct score threshold, highest first."""
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each tie group
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the positives ``y_true`` (ties count one half)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tps, fps = _threshold_counts(y, s)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))  # trapezoids: ties are diagonal


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's definition)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def noise_mask(labels: np.ndarray, clean_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(known, noisy): a clean label of -1 is unknown; -2 (open-set, no class) counts as noisy."""
    labels = np.asarray(labels)
    clean = np.asarray(clean_labels)
    known = clean != -1
    return known, known & (labels != clean)


def detection_metrics(labels: np.ndarray, clean_labels: np.ndarray, suspicion: np.ndarray,
                      rows: np.ndarray | None = None) -> dict[str, float] | None:
    """ROC-AUC and AP of ``suspicion`` (higher = likelier mislabeled) against the true noise mask,
    over ``rows`` (a boolean mask, e.g. the train split) with a known clean label."""
    known, noisy = noise_mask(labels, clean_labels)
    if rows is not None:
        known = known & np.asarray(rows, dtype=bool)
    if known.sum() == 0:
        return None
    y, s = noisy[known], np.asarray(suspicion, dtype=np.float64)[known]
    return {
        "roc_auc": roc_auc(y, s),
        "average_precision": average_precision(y, s),
        "noise_rate": float(y.mean()),
        "rows": int(known.sum()),
    }
