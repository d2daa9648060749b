"""Stage: train a classifier on noisily labeled images with per-image weights (SINet eq. 1, eq. 7, 3.4).

Two scales share one training loop:

* :func:`train_features` fits a head (linear, or a small MLP) on cached features g_i — CPU, seconds.
* :func:`train_images` trains / fine-tunes a full network on images, with random-resized-crop and
  flip augmentation, SGD with momentum and step decay, optional progressive resolution, and
  runs under ``torchrun`` (DDP) when a process group is initialized.

Targets are sparse per-image "mass" rows (:class:`Targets`): eq. 1 puts w_i on the noisy label
y_i; eq. 7 puts w_{i,c} on every class c; top-k label smoothing mixes the label with an initial
model's top-k predictions; label correction (mode ``correct``, eq. T3) moves a flagged image's
target to its suggested class; mode ``graph`` (eq. T4) spreads an image's doubt 1 - w_i over its
label's neighbours in S_t by eq. 7's weights. The loss of these modes is ``-sum_i sum_c T_{i,c} log
p_{i,c}`` divided by a *constant* (batch size x mean target mass over the training set, see
:func:`loss_normalizer`), so it stays an exact sum over images: a zero weight removes an image
exactly, DDP gradient averaging reproduces the single-process gradient, and the modes share one
learning rate. The semi-supervised modes (``fixmatch``, eq. S1; ``mixmatch``, eq. S2-S6) train the
flagged images as unlabeled data. Equations: docs/training-modes.md.

Every random draw is derived from (seed, epoch, rank, image): shuffling uses the permutation of
``DistributedSampler`` (seed + epoch), augmentation a generator per (seed, epoch, image, view),
MixMatch's mixing a generator per (seed, epoch, step, rank), dropout a generator reseeded at each epoch. A run killed after epoch k and resumed from its checkpoint
therefore ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

MODES = ("A", "B", "C", "oracle", "correct", "fixmatch", "mixmatch", "graph", "forward")
UNKNOWN, OUTSIDE = -1, -2  # clean-label codes of the dataset table: not known / belongs to no class
HEADS = ("linear", "mlp")
Progress = Callable[[int], None]
EpochCallback = Callable[[int, dict], None]


# --------------------------------------------------------------------------------------- targets


@dataclass
class Targets:
    """Per-image target mass, sparse: image i puts ``value[i, k]`` on class ``index[i, k]``.

    Eq. 1 is one entry per image, ``(y_i, w_i)``; eq. 7 is ``w_{i,c}`` for every class c. Repeated
    class indices in a row add up; zero values are inert.
    """

    index: np.ndarray  # (N, K) int64
    value: np.ndarray  # (N, K) float32

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        self.value = np.asarray(self.value, dtype=np.float32)
        if self.index.ndim == 1:
            self.index, self.value = self.index[:, None], self.value.reshape(-1, 1)
        if self.index.shape != self.value.shape or self.index.ndim != 2:
            raise ValueError(f"target index {self.index.shape} and value {self.value.shape} differ in shape")
        if not np.all(np.isfinite(self.value)) or (self.value < 0).any():
            raise ValueError("target weights must be finite and non-negative")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def mass(self) -> np.ndarray:
        """Total weight of each image (w_i for eq. 1, sum_c w_{i,c} for eq. 7)."""
        return self.value.astype(np.float64).sum(axis=1)

    def subset(self, rows: np.ndarray) -> "Targets":
        return Targets(self.index[rows], self.value[rows])

    def dense(self, num_classes: int, rows: np.ndarray | None = None) -> np.ndarray:
        idx, val = (self.index, self.value) if rows is None else (self.index[rows], self.value[rows])
        out = np.zeros((len(idx), num_classes), dtype=np.float32)
        np.add.at(out, (np.arange(len(idx))[:, None], idx), val)
        return out


def dense_targets(index: torch.Tensor, value: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) sparse rows -> (B, C) dense target masses."""
    out = torch.zeros(index.shape[0], num_classes, dtype=torch.float32, device=value.device)
    return out.scatter_add_(1, index, value.float())


def hard_targets(labels: np.ndarray, weights: np.ndarray | None = None) -> Targets:
    """Eq. 1's targets: weight w_i (1 when unweighted) on the label y_i."""
    labels = np.asarray(labels, dtype=np.int64)
    w = np.ones(len(labels), np.float32) if weights is None else np.asarray(weights, np.float32)
    if len(w) != len(labels):
        raise ValueError(f"{len(w)} weights for {len(labels)} labels")
    return Targets(labels[:, None], w[:, None])


def default_threshold(weights: np.ndarray) -> float:
    """Mode B's default: the median training weight, i.e. B keeps the more confident half."""
    return float(np.median(np.asarray(weights, dtype=np.float64)))


def subset_train_rows(splits: np.ndarray, subsets: np.ndarray | None, name: str = "all") -> np.ndarray:
    """Positions of the rows a phase trains on: split ``train``, and ``subsets == name`` unless
    ``name`` is ``all`` (e.g. Clothing1M's ``noisy`` and ``clean`` training sets, paper table 8).

    Raises:
        ValueError: ``name`` is not ``all`` but no subsets are recorded, or no train row has it.
    """
    train = np.asarray(splits) == "train"
    if name == "all":
        return np.flatnonzero(train)
    if subsets is None:
        raise ValueError("no subsets are recorded (only the Clothing1M and WebVision readers write them)")
    subsets = np.asarray(subsets).astype(str)
    rows = np.flatnonzero(train & (subsets == name))
    if len(rows) == 0:
        known = sorted(set(subsets[train].tolist()))
        listed = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
        raise ValueError(f"no train rows of subset {name!r} (train subsets here: {listed or 'none'})")
    return rows


def select_rows(
    mode: str,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    clean_labels: np.ndarray | None = None,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, labels and per-image weights each mode trains on (paper table 1).

    A: every image, unweighted. B: images with ``w > threshold``, unweighted. C: every image,
    weighted by w_i (SINet); so do correct, fixmatch, mixmatch and graph, whose targets are built
    from these rows afterwards. oracle: every image with its clean label, unweighted; every clean
    label must be known (``UNKNOWN`` = -1 is an error), images of no class (``OUTSIDE`` = -2) are
    left out.
    Returns ``(rows, labels[rows], w[rows])``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if mode == "A":
        return np.arange(n), labels, np.ones(n, np.float32)
    if mode == "oracle":
        clean = None if clean_labels is None else np.asarray(clean_labels, dtype=np.int64)
        if clean is None or (clean == UNKNOWN).any():
            unknown = n if clean is None else int((clean == UNKNOWN).sum())
            raise ValueError(f"mode oracle needs the clean label of every training image ({unknown} unknown)")
        rows = np.flatnonzero(clean >= 0)  # images of no class (OUTSIDE, open-set noise) are left out
        return rows, clean[rows], np.ones(len(rows), np.float32)
    if mode not in MODES or mode == "A":
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if weights is None:
        raise ValueError(f"mode {mode} needs per-image weights")
    w = np.asarray(weights, dtype=np.float32)
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} images")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if mode != "B":  # C and the modes beyond weighting start from every image and its w_i
        return np.arange(n), labels, w
    t = default_threshold(w) if threshold is None else float(threshold)
    rows = np.flatnonzero(w > t)
    if len(rows) == 0:
        raise ValueError(f"mode B: no image has a weight above the threshold {t:g} (max {w.max():g})")
    return rows, labels[rows], np.ones(len(rows), np.float32)


def class_distances(
    features: np.ndarray,
    prototypes: np.ndarray,
    prototype_class: np.ndarray,
    num_classes: int,
    chunk_rows: int = 65536,
) -> np.ndarray:
    """||v_c - g_i||_2 for every image i and class c; with several prototypes per class, the nearest.

    Classes without a prototype get ``inf`` (so their weight is 0).
    """
    protos = torch.from_numpy(np.asarray(prototypes, dtype=np.float32))
    pcls = np.asarray(prototype_class, dtype=np.int64)
    if len(pcls) != len(protos):
        raise ValueError(f"{len(pcls)} prototype classes for {len(protos)} prototypes")
    if len(pcls) and (pcls.min() < 0 or pcls.max() >= num_classes):
        raise ValueError(f"prototype class outside 0..{num_classes - 1}")
    out = np.empty((len(features), num_classes), dtype=np.float32)
    pcls_t = torch.from_numpy(pcls)
    for s in range(0, len(features), chunk_rows):
        g = torch.from_numpy(np.asarray(features[s : s + chunk_rows], dtype=np.float32))
        d = torch.cdist(g, protos)  # (b, P)
        per_class = torch.full((len(g), num_classes), float("inf"))
        per_class.scatter_reduce_(1, pcls_t.expand(len(g), -1), d, reduce="amin", include_self=True)
        out[s : s + len(g)] = per_class.numpy()
    return out


def prototype_class_weights(features: np.ndarray, prototypes: np.ndarray, prototype_class: np.ndarray,
                            num_classes: int, *, alpha: float = 1.2, beta: float = 1.5) -> np.ndarray:
    """Eq. 7's per-class weights ``w_{i,c} = max(0, alpha - ||v_c - g_i||_2)^beta`` (eq. 6 for every
    class c; the nearest of a class's prototypes). (N, C) float32."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha ({alpha}) and beta ({beta}) must be positive")
    d = class_distances(features, prototypes, prototype_class, num_classes)
    return (np.maximum(0.0, alpha - d) ** beta).astype(np.float32)  # eq. 7 weights w_{i,c}


def soft_targets(
    features: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    prototype_class: np.ndarray,
    num_classes: int,
    *,
    alpha: float = 1.2,
    beta: float = 1.5,
    mix: float = 0.0,
    keep: int | None = None,
) -> Targets:
    """Eq. 7's per-class weights, optionally mixed with the label.

    ``w_{i,c} = max(0, alpha - ||v_c - g_i||_2)^beta`` for every class c (eq. 6 applied to all
    classes), and the target row is ``(1 - mix) * w_{i,.} + mix * w_{i,y_i} * onehot(y_i)``:
    ``mix=0`` is eq. 7, ``mix=1`` is eq. 1 with eq. 6's weight. ``keep`` limits each row to its
    ``keep`` largest class weights (all classes when None or >= C) to bound memory for many classes.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"soft-target mix {mix} outside [0, 1]")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha ({alpha}) and beta ({beta}) must be positive")
    labels = np.asarray(labels, dtype=np.int64)
    w = prototype_class_weights(features, prototypes, prototype_class, num_classes, alpha=alpha, beta=beta)
    own = w[np.arange(len(w)), labels]
    if keep is None or keep >= num_classes:
        idx = np.broadcast_to(np.arange(num_classes), w.shape)
        val = w
    else:
        idx = np.argpartition(-w, keep - 1, axis=1)[:, :keep]
        val = np.take_along_axis(w, idx, axis=1)
    index = np.concatenate([idx, labels[:, None]], axis=1)
    value = np.concatenate([(1.0 - mix) * val, (mix * own)[:, None]], axis=1)
    return Targets(index, value)


def topk_smoothed_targets(
    labels: np.ndarray,
    weights: np.ndarray,
    smooth: np.ndarray,
    pred_index: np.ndarray,
    pred_prob: np.ndarray,
    mix: float,
) -> Targets:
    """Top-k label smoothing (sec. 3.4): ``(1 - mix) * onehot(y_i) + mix * topk(p_i) / sum topk(p_i)``.

    Applied to the rows where ``smooth`` is True (the images the initial model was not trained on);
    the other rows keep their one-hot label. Each row is then scaled by its weight w_i.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"top-k mix {mix} outside [0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    p = np.asarray(pred_prob, dtype=np.float64)
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    m = np.where(np.asarray(smooth, bool), mix, 0.0)
    index = np.concatenate([labels[:, None], np.asarray(pred_index, np.int64)], axis=1)
    value = np.concatenate([(1.0 - m)[:, None], m[:, None] * p], axis=1) * w[:, None]
    return Targets(index, value.astype(np.float32))


# -------------------------------------------------------------- modes beyond weighting (docs/training-modes.md)


def suspect_flags(weights: np.ndarray, labels: np.ndarray, nearest_class: np.ndarray | None = None,
                  flag_below: float = 0.5) -> np.ndarray:
    """The flag score-noise's suspect list uses, for scores.h5 files without a stored ``flagged``
    column: ``w_i <= flag_below`` or the nearest prototype belongs to another class (eq. T1)."""
    w = np.asarray(weights, dtype=np.float64)
    flagged = w <= flag_below  # eq. T1
    if nearest_class is not None:
        flagged |= np.asarray(nearest_class) != np.asarray(labels)
    return flagged


def probe_probabilities(features: np.ndarray, probe_W: np.ndarray, probe_b: np.ndarray) -> np.ndarray:
    """p(c | g_i) of the K-fold linear probe stored in scores.h5, by the folds' mean model:
    ``softmax((g_i / |g_i|) mean_k W_k + mean_k b_k)`` (the same averaged model score-noise applies to
    rows outside its sample). Returns (N, C) float32."""
    W = torch.as_tensor(np.asarray(probe_W, dtype=np.float32)).mean(0)
    b = torch.as_tensor(np.asarray(probe_b, dtype=np.float32)).mean(0)
    out = np.empty((len(features), W.shape[1]), dtype=np.float32)
    for s in range(0, len(features), 65536):
        x = torch.as_tensor(np.asarray(features[s : s + 65536], dtype=np.float32))
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        out[s : s + len(x)] = torch.softmax(x @ W + b, dim=1).numpy()
    return out


def prototype_probabilities(class_weights: np.ndarray) -> np.ndarray:
    """Eq. 7's per-class weights w_{i,c} normalized over the classes, a class distribution per image
    (all zero where every w_{i,c} is 0)."""
    w = np.asarray(class_weights, dtype=np.float64)
    s = w.sum(axis=1, keepdims=True)
    return np.where(s > 0, w / np.where(s > 0, s, 1.0), 0.0).astype(np.float32)


def relabel_suggestions(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Suggested class and confidence when scores.h5 stores none (eq. T2):
    ``s_i = argmax_{c != y_i} p_{i,c}``, ``q_i = p_{i,s_i} / (1 - p_{i,y_i})`` (the share of s_i among
    the classes other than the label: how sure the suggestion is once the label is taken to be wrong)."""
    p = np.asarray(probs, dtype=np.float64).copy()
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(p))
    p_label = p[rows, labels]
    p[rows, labels] = -1.0
    s = p.argmax(axis=1)
    rest = 1.0 - p_label
    q = np.where(rest > 1e-12, p[rows, s] / np.maximum(rest, 1e-12), 0.0)  # eq. T2
    return s.astype(np.int64), np.clip(q, 0.0, 1.0).astype(np.float32)


def corrected_targets(labels: np.ndarray, weights: np.ndarray, flagged: np.ndarray, suggested: np.ndarray,
                      confidence: np.ndarray, *, min_confidence: float = 0.5, soft: bool = True) -> tuple[Targets, np.ndarray]:
    """Label correction (mode ``correct``, eq. T3): a flagged image whose suggested class s_i differs
    from its label and whose confidence q_i >= ``min_confidence`` trains on s_i,

        hard: T_i = q_i * onehot(s_i)
        soft: T_i = w~_i * onehot(y_i) + (1 - w~_i) * q_i * onehot(s_i),   w~_i = min(1, w_i)

    every other image as in mode C: T_i = w_i * onehot(y_i) (eq. 1).
    Returns the targets and the mask of corrected images.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"correction confidence {min_confidence} outside [0, 1]")
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    s = np.asarray(suggested, dtype=np.int64)
    q = np.asarray(confidence, dtype=np.float32)
    if not (len(w) == len(y) == len(s) == len(q) == len(flagged)):
        raise ValueError("labels, weights, flags and suggestions differ in length")
    fix = np.asarray(flagged, bool) & (s != y) & (s >= 0) & (q >= min_confidence)
    wt = np.minimum(w, 1.0)
    index = np.stack([y, np.where(fix, s, y)], axis=1)
    if soft:  # eq. T3, soft
        value = np.stack([np.where(fix, wt, w), np.where(fix, (1.0 - wt) * q, 0.0)], axis=1)
    else:  # eq. T3, hard
        value = np.stack([np.where(fix, 0.0, w), np.where(fix, q, 0.0)], axis=1)
    return Targets(index, value.astype(np.float32)), fix


def conditional_confidence(confidence: np.ndarray, wrong_label: np.ndarray) -> np.ndarray:
    """The suggestion's confidence once the label is taken to be wrong (eq. T2c):

        c_i = q_i / r_i  (clipped to [0, 1]),   r_i = min(1, max(0, f_i))

    q_i: score-noise's posterior that the suggested class is the image's class (E9), f_i: its
    unclipped probability that the label is wrong (E5, scores.h5 ``flag_score``; NaN counts as 0). The posterior q_i also
    counts the chance that the label is right, so under uniform flips it rarely reaches 1/2 even
    when the suggestion is the likeliest wrong-label explanation by far; c_i is its share among the
    classes other than the label, the quantity eq. T2 gives directly. 0 where r_i = 0."""
    q = np.asarray(confidence, dtype=np.float64)
    r = np.clip(np.nan_to_num(np.asarray(wrong_label, dtype=np.float64), nan=0.0, posinf=1.0), 0.0, 1.0)
    c = np.where(r > 1e-12, q / np.maximum(r, 1e-12), 0.0)  # eq. T2c
    return np.clip(c, 0.0, 1.0).astype(np.float32)


def cleaned_targets(labels: np.ndarray, flagged: np.ndarray, suggested: np.ndarray, confidence: np.ndarray, *,
                    min_confidence: float = 0.5) -> tuple[Targets, np.ndarray]:
    """Training on the cleaned labels (mode ``correct``, the default ``--correct-target cleaned``,
    eq. T3c): every image is kept, relabeled or dropped,

        keep     (not flagged):                                     T_i = onehot(y_i)
        relabel  (flagged, s_i != y_i, c_i >= ``min_confidence``):   T_i = onehot(s_i)
        drop     (flagged otherwise, e.g. outside every class):      T_i = 0

    c_i: the suggestion's confidence given that the label is wrong (eq. T2c, or eq. T2's q_i). The
    decisions are hard: score-noise's flag already says which labels are wrong, and a kept image
    trains at full weight (eq. 1's w_i < 1 on clean images only thins the data).
    Returns the targets and the mask of relabeled images.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"correction confidence {min_confidence} outside [0, 1]")
    y = np.asarray(labels, dtype=np.int64)
    fl = np.asarray(flagged, bool)
    s = np.asarray(suggested, dtype=np.int64)
    c = np.asarray(confidence, dtype=np.float32)
    if not (len(y) == len(fl) == len(s) == len(c)):
        raise ValueError("labels, flags and suggestions differ in length")
    fix = fl & (s != y) & (s >= 0) & (c > 0) & (c >= min_confidence)
    value = np.where(fl, np.where(fix, 1.0, 0.0), 1.0).astype(np.float32)  # eq. T3c
    return Targets(np.where(fix, s, y)[:, None], value[:, None]), fix


def distribution_targets(labels: np.ndarray, weights: np.ndarray, probs: np.ndarray, *,
                         keep: int | None = None) -> Targets:
    """Label correction by the whole suggestion distribution (``correct --correct-target
    distribution``, eq. T3d): every image keeps w_i on its label and spreads its doubt 1 - w~_i over
    the other classes by P's share of each among them (eq. T2's q for every class, not only the likeliest):

        T_i = w_i onehot(y_i) + (1 - w~_i) sum_{c != y_i} P_ic / (1 - P_{i,y_i}) onehot(c),   w~_i = min(1, w_i)

    ``keep``: only the ``keep`` likeliest other classes (renormalized), to bound memory for many
    classes (all when None or >= C - 1). Where P puts everything on the label, the doubt is dropped.
    """
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    p = np.asarray(probs, dtype=np.float64).copy()
    n, C = p.shape
    p[np.arange(n), y] = 0.0
    k = C if keep is None or keep >= C - 1 else int(keep)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(p, idx, axis=1)
    total = val.sum(axis=1, keepdims=True)
    share = np.where(total > 1e-12, val / np.where(total > 1e-12, total, 1.0), 0.0)
    doubt = (1.0 - np.minimum(w, 1.0))[:, None]
    index = np.concatenate([y[:, None], idx], axis=1)
    value = np.concatenate([w[:, None], doubt * share], axis=1)  # eq. T3d
    return Targets(index, value.astype(np.float32))


def transition_matrix(probs: np.ndarray, labels: np.ndarray, num_classes: int,
                      neighbours: np.ndarray | None = None, hard: bool = True) -> np.ndarray:
    """The noise transition matrix for forward correction (mode ``forward``, eq. F1), estimated from
    class probabilities P (the probe's) and the noisy labels by counting each image in the row of its
    likeliest class (``hard``; confident learning's count without its thresholds) or spread over P:

        C_jk = sum_i [argmax_c P_ic = j] [y_i = k]   (hard)   or   sum_i P_ij [y_i = k]   (soft)
        T_jk = C_jk / sum_k' C_jk'                   (row j: where class j's labels go)

    (On the demos' probe the soft count smears the probe's own uncertainty into T: its diagonal came
    out at 0.41 against a true 0.60 under 40% uniform flips, the hard count's at 0.51.)

    With ``neighbours`` (C, K) from S_t, a class's labels may only go to itself or its graph
    neighbours: T_jk = 0 for k outside {j} u N(j), rows renormalized (side information as the prior
    of which confusions exist). A class no image is likely to belong to keeps the identity row.
    """
    P = np.asarray(probs, dtype=np.float64)
    if hard:
        P = np.eye(num_classes)[P.argmax(axis=1)]
    y = np.asarray(labels, dtype=np.int64)
    Cm = np.zeros((num_classes, num_classes))
    np.add.at(Cm.T, y, P)  # Cm[:, k] += P_i for every image i labeled k  (eq. F1)
    if neighbours is not None:
        allowed = np.eye(num_classes, dtype=bool)
        nb = np.asarray(neighbours, dtype=np.int64)
        allowed[np.repeat(np.arange(num_classes), nb.shape[1]), nb.ravel()] = True
        Cm = np.where(allowed, Cm, 0.0)
    rows = Cm.sum(axis=1, keepdims=True)
    T = np.where(rows > 0, Cm / np.where(rows > 0, rows, 1.0), np.eye(num_classes))
    return T.astype(np.float32)


def graph_neighbours(similarity: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` classes most similar to each class in S_t (itself excluded), most similar first;
    ties by class index. Returns (C, min(k, C - 1)) int64."""
    S = np.asarray(similarity, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S_t must be square, got {S.shape}")
    if k < 1:
        raise ValueError(f"need k >= 1 graph neighbours, got {k}")
    C = len(S)
    S = S.copy()
    np.fill_diagonal(S, -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")
    return order[:, : min(k, C - 1)].astype(np.int64)


def graph_targets(labels: np.ndarray, weights: np.ndarray, class_weights: np.ndarray,
                  neighbours: np.ndarray) -> Targets:
    """Eq. 7 over S_t (mode ``graph``, eq. T4): the label keeps w_i, the doubt 1 - w~_i goes to the
    label's graph neighbours N(y_i) in proportion to eq. 7's per-class weights w_{i,c}:

        T_i = w_i * onehot(y_i) + (1 - w~_i) * sum_{c in N(y_i)} w_{i,c} / sum_{c' in N(y_i)} w_{i,c'} * onehot(c)

    w~_i = min(1, w_i); where every neighbour's w_{i,c} is 0 the doubt is dropped (T_i = w_i onehot(y_i)).
    """
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    cw = np.asarray(class_weights, dtype=np.float64)
    nb = np.asarray(neighbours, dtype=np.int64)[y]  # (N, K)
    nw = np.take_along_axis(cw, nb, axis=1)
    total = nw.sum(axis=1, keepdims=True)
    share = np.where(total > 0, nw / np.where(total > 0, total, 1.0), 0.0)
    doubt = (1.0 - np.minimum(w, 1.0))[:, None]
    index = np.concatenate([y[:, None], nb], axis=1)
    value = np.concatenate([w[:, None], doubt * share], axis=1)  # eq. T4
    return Targets(index, value.astype(np.float32))


def neighbour_classes(labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Each image's label followed by the label's graph neighbours: the classes top-k smoothing
    restricted to the graph may put mass on. (N, 1 + K) int64."""
    y = np.asarray(labels, dtype=np.int64)
    return np.concatenate([y[:, None], np.asarray(neighbours, dtype=np.int64)[y]], axis=1)


# ------------------------------------------------------------------------------------------ loss


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, norm: float) -> torch.Tensor:
    """Eq. 1: ``sum_i w_i * CE(y_i, G(x_i))``, divided by the constant ``norm``."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (weights.float() * ce).sum() / norm  # eq. 1


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, norm: float) -> torch.Tensor:
    """Eq. 7: ``-sum_i sum_c w_{i,c} log p_{i,c}`` (p = softmax), divided by the constant ``norm``.

    With one-hot rows scaled by w_i this is exactly eq. 1.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return -(targets * logp).sum() / norm  # eq. 7


def loss_normalizer(targets: Targets, batch_size: int) -> float:
    """The constant the summed loss is divided by: ``batch_size * mean_i(mass_i)`` over the training set.

    A constant (not the batch's own sum of weights) keeps the loss a plain sum over images, as in
    eq. 1: an image with w_i = 0 contributes exactly nothing, and the per-rank losses of DDP add up
    to the single-process loss. Dividing by the mean weight makes the expected gradient scale of
    weighted training (C, eq. 7) equal to unweighted training (A, B), so all modes share a learning
    rate; for A and B (w = 1) it is the usual batch mean.
    """
    m = float(targets.mass.mean()) if len(targets) else 0.0
    if not m > 0:
        raise ValueError("every training weight is zero: nothing to train on")
    return float(batch_size) * m


# ------------------------------------------------------------------ semi-supervised (eq. S1-S6)

SEMI_MODES = ("fixmatch", "mixmatch")


@dataclass
class SemiConfig:
    """Semi-supervised use of the flagged images: they lose their labels and become unlabeled data
    (docs/training-modes.md). SINet's flags decide the split once, instead of DivideMix's per-epoch
    loss GMM.

    ``fixmatch``: pseudo-labels from a weakly augmented view, trained on a strongly augmented one
    (eq. S1). ``mixmatch``: DivideMix's MixMatch step with its label refinement (eq. S2-S6).
    """

    method: str
    lambda_u: float | None = None  # weight of the unlabeled loss; default FixMatch's 1, DivideMix's 25 (CIFAR-10)
    confidence: float = 0.95  # fixmatch: pseudo-label threshold tau (FixMatch's)
    temperature: float = 0.5  # mixmatch: sharpening temperature T (MixMatch's, DivideMix's)
    mix_alpha: float = 4.0  # mixmatch: lambda ~ Beta(alpha, alpha) (DivideMix, CIFAR)
    rampup: float = 0.1  # mixmatch: lambda_u rises linearly over this share of the epochs

    def __post_init__(self) -> None:
        if self.method not in SEMI_MODES:
            raise ValueError(f"unknown semi-supervised method {self.method!r}; choose {' or '.join(SEMI_MODES)}")
        if self.lambda_u is None:
            self.lambda_u = 1.0 if self.method == "fixmatch" else 25.0
        if self.lambda_u < 0:
            raise ValueError(f"unlabeled loss weight {self.lambda_u} must be >= 0")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"pseudo-label confidence {self.confidence} outside [0, 1]")
        if self.temperature <= 0 or self.mix_alpha <= 0:
            raise ValueError("sharpening temperature and mixup alpha must be positive")
        if not 0.0 <= self.rampup <= 1.0:
            raise ValueError(f"ramp-up share {self.rampup} outside [0, 1]")

    @property
    def views(self) -> tuple[str, ...]:
        """Augmented views each training image is drawn in: weak + strong (FixMatch), two weak (MixMatch)."""
        return ("weak", "strong") if self.method == "fixmatch" else ("weak", "weak")

    def params(self) -> dict[str, float]:
        """The knobs that apply to this method (recorded in metrics.json and provenance)."""
        if self.method == "fixmatch":
            return {"lambda_u": self.lambda_u, "pseudo_confidence": self.confidence}
        return {"lambda_u": self.lambda_u, "sharpen_temperature": self.temperature, "mix_alpha": self.mix_alpha,
                "rampup": self.rampup}


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, targets: torch.Tensor,
                  unlabeled: torch.Tensor, *, lambda_u: float, confidence: float,
                  norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. S1 (FixMatch with SINet's split):

        L = [ -sum_i sum_c T_ic log p_c(weak(x_i))
              + lambda_u sum_{i in U} 1[max_c q_ic >= tau] * -log p_{argmax q_i}(strong(x_i)) ] / norm,
        q_i = softmax(weak(x_i)) without gradient.

    ``logits_weak`` (B, C) for every row, ``targets`` (B, C) dense (zero on unlabeled rows),
    ``unlabeled`` (B,) weights u_i (1 for an unlabeled image, 0 for a labeled one or padding),
    ``logits_strong`` (U, C) for the rows with u_i > 0, in order. Returns the loss and the number of
    unlabeled rows whose pseudo-label passed tau.
    """
    logp = F.log_softmax(logits_weak.float(), dim=1)
    sup = -(targets * logp).sum()
    rows = torch.nonzero(unlabeled > 0).squeeze(1)
    q = torch.softmax(logits_weak.detach().float()[rows], dim=1)
    conf, pseudo = q.max(dim=1)
    mask = (conf >= confidence).float() * unlabeled[rows].float()
    ce_u = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
    unsup = (mask * ce_u).sum()
    return (sup + lambda_u * unsup) / norm, (mask > 0).sum()  # eq. S1


def label_guess(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """Eq. S2: pbar_i = (softmax(G(x'_i)) + softmax(G(x''_i))) / 2 over two weak views."""
    return (torch.softmax(logits_1.float(), dim=1) + torch.softmax(logits_2.float(), dim=1)) / 2  # eq. S2


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. S4: Sharpen(p, T)_c = p_c^(1/T) / sum_c' p_c'^(1/T)."""
    pt = p.clamp_min(0).pow(1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True).clamp_min(1e-12)  # eq. S4


def mixmatch_targets(guess: torch.Tensor, targets: torch.Tensor, unlabeled: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Eq. S2-S4: DivideMix's label refinement with SINet's weight as the clean probability.

    ``guess`` p-bar_i (eq. S2: the mean softmax over the two weak views), ``targets`` T_i (B, C) with
    mass m_i = sum_c T_ic <= 1 (w_i on the label in mode mixmatch): a labeled row's refined target is
    Sharpen(T_i + (1 - m_i) p-bar_i) (eq. S3: w_i y_i + (1 - w_i) p-bar_i), an unlabeled row's
    Sharpen(p-bar_i).
    """
    mass = targets.sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    refined = targets + (1.0 - mass) * guess  # eq. S3
    base = torch.where(unlabeled[:, None] > 0, guess, refined)
    return sharpen(base, temperature)


def mixup(x: torch.Tensor, t: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. S5: x~ = l' x + (1 - l') x[perm], t~ = l' t + (1 - l') t[perm], l' = max(l, 1 - l)."""
    lp = max(lam, 1.0 - lam)
    return lp * x + (1.0 - lp) * x[perm], lp * t + (1.0 - lp) * t[perm]  # eq. S5


def mixmatch_loss(logits: torch.Tensor, mixed: torch.Tensor, unlabeled: torch.Tensor, valid: torch.Tensor,
                  prior: torch.Tensor, *, lambda_u: float, labeled_norm: float,
                  unlabeled_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. S6 (DivideMix's loss on a mixed batch):

        L = L_x + lambda_u L_u + R
        L_x = -sum_{i labeled} sum_c t~_ic log p_ic / labeled_norm
        L_u =  sum_{i unlabeled} sum_c (p_ic - t~_ic)^2 / C / unlabeled_norm
        R   =  sum_c pi_c log(pi_c / mean_i p_ic)            (the prior penalty)

    A row counts as labeled or unlabeled by its own image (the larger share l' >= 1/2 of the mix);
    ``valid`` = 0 leaves a (padding) row out of all three terms. Returns (L, L_x, L_u).
    """
    p = torch.softmax(logits.float(), dim=1)
    logp = F.log_softmax(logits.float(), dim=1)
    u = (unlabeled > 0).float() * valid.float()
    lab = (unlabeled <= 0).float() * valid.float()
    l_x = -(lab[:, None] * mixed * logp).sum() / labeled_norm
    l_u = (u[:, None] * (p - mixed) ** 2).sum() / p.shape[1] / unlabeled_norm
    mean_p = (valid.float()[:, None] * p).sum(0) / valid.float().sum().clamp_min(1.0)
    pos = prior > 0
    reg = (prior[pos] * torch.log(prior[pos] / mean_p[pos].clamp_min(1e-12))).sum()
    return l_x + lambda_u * l_u + reg, l_x.detach(), l_u.detach()  # eq. S6


def forward_loss(logits: torch.Tensor, targets: torch.Tensor, transition: torch.Tensor, norm: float) -> torch.Tensor:
    """Eq. F2 (forward correction, Patrini et al. 2017): the network's clean-class probabilities p_i
    pass through the noise transition T before the cross-entropy with the noisy label,

        L = - sum_i sum_k T~_ik log (p_i T)_k / norm,

    T~_ik the target rows (onehot(y_i) in mode forward)."""
    p = torch.softmax(logits.float(), dim=1)
    q = (p @ transition.to(p.device, torch.float32)).clamp_min(1e-12)
    return -(targets * torch.log(q)).sum() / norm  # eq. F2


# ----------------------------------------------------------------------------------- objectives


@dataclass
class Batch:
    """One (per-process) training batch. ``x2`` is the second augmented view (semi-supervised modes),
    ``unlabeled`` u_i (1: an unlabeled image, 0: labeled or padding), ``valid`` 0 for DDP padding."""

    x: torch.Tensor
    t_index: torch.Tensor
    t_value: torch.Tensor
    x2: torch.Tensor | None = None
    unlabeled: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def to(self, device: str) -> "Batch":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.x), mv(self.t_index), mv(self.t_value), mv(self.x2), mv(self.unlabeled), mv(self.valid))


class Supervised:
    """Eq. 1 / eq. 7 (and the target-only modes: B, correct, graph, top-k smoothing): soft cross-entropy
    over the target rows divided by the constant :func:`loss_normalizer`."""

    views: tuple[str, ...] = ("weak",)

    def __init__(self, targets: Targets, batch_size: int, num_classes: int):
        self.norm = loss_normalizer(targets, batch_size)
        self.mass_mean = float(targets.mass.mean())
        self.num_classes = num_classes
        self.stats: dict[str, torch.Tensor] = {}

    def __call__(self, net: nn.Module, b: Batch, epoch: int, step: int) -> torch.Tensor:
        targets = dense_targets(b.t_index, b.t_value, self.num_classes)
        return soft_cross_entropy(net(b.x), targets, self.norm)  # eq. 7 (eq. 1 for one-hot rows)

    def epoch_stats(self) -> dict[str, float]:
        return {}


class Forward(Supervised):
    """Eq. F2 over a batch: the targets are the noisy labels, the network's output passes through T."""

    def __init__(self, targets: Targets, batch_size: int, num_classes: int, transition: np.ndarray):
        super().__init__(targets, batch_size, num_classes)
        T = np.asarray(transition, dtype=np.float32)
        if T.shape != (num_classes, num_classes) or not np.all(np.isfinite(T)) or (T < 0).any():
            raise ValueError(f"transition matrix must be a non-negative {num_classes} x {num_classes} matrix")
        self.transition = torch.from_numpy(T)

    def __call__(self, net: nn.Module, b: Batch, epoch: int, step: int) -> torch.Tensor:
        targets = dense_targets(b.t_index, b.t_value, self.num_classes)
        return forward_loss(net(b.x), targets, self.transition, self.norm)  # eq. F2


class FixMatch(Supervised):
    """Eq. S1 over a batch: one forward of every weak view and the unlabeled rows' strong views."""

    def __init__(self, targets: Targets, unlabeled: np.ndarray, batch_size: int, num_classes: int, cfg: SemiConfig):
        self.views = cfg.views
        self.cfg = cfg
        u = np.asarray(unlabeled, bool)
        mass = targets.mass + u  # a labeled image counts w_i, an unlabeled one 1
        if not mass.mean() > 0:
            raise ValueError("every training weight is zero and no image is unlabeled: nothing to train on")
        self.norm = float(batch_size) * float(mass.mean())
        self.mass_mean = float(mass.mean())
        self.num_classes = num_classes
        self.n_unlabeled = int(u.sum())
        self.passed = torch.zeros((), dtype=torch.float64)

    def __call__(self, net: nn.Module, b: Batch, epoch: int, step: int) -> torch.Tensor:
        rows = torch.nonzero(b.unlabeled > 0).squeeze(1)
        n = len(b.x)
        logits = net(torch.cat([b.x, b.x2[rows]]))
        targets = dense_targets(b.t_index, b.t_value, self.num_classes)
        loss, passed = fixmatch_loss(logits[:n], logits[n:], targets, b.unlabeled, lambda_u=self.cfg.lambda_u,
                                     confidence=self.cfg.confidence, norm=self.norm)
        self.passed = self.passed.to(passed.device) + passed.double()
        return loss

    def epoch_stats(self) -> dict[str, float]:
        """Share of the unlabeled images whose pseudo-label passed tau this epoch (all processes)."""
        passed = self.passed.clone()
        self.passed = torch.zeros((), dtype=torch.float64, device=passed.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(passed)
        return {"pseudo_labeled": float(passed) / max(self.n_unlabeled, 1)}


class MixMatch(Supervised):
    """Eq. S2-S6 over a batch: label guess from two weak views (no gradient), refinement, sharpening,
    mixup within the batch, one forward of the mixed views. Mixing partners and lambda are drawn from a
    generator seeded by (seed, epoch, step, rank), so a resumed run replays them."""

    def __init__(self, targets: Targets, unlabeled: np.ndarray, batch_size: int, num_classes: int, cfg: SemiConfig,
                 epochs: int, seed: int, rank: int = 0):
        self.views = cfg.views
        self.cfg = cfg
        u = np.asarray(unlabeled, bool)
        if len(u) == 0:
            raise ValueError("no training images")
        rho_u = float(u.mean())
        self.labeled_norm = float(batch_size) * max(1.0 - rho_u, 1e-12)
        self.unlabeled_norm = float(batch_size) * max(rho_u, 1e-12)
        self.norm, self.mass_mean = float(batch_size), 1.0  # history: mean loss per image
        self.num_classes = num_classes
        # the prior of the penalty R: the label distribution of the weighted training set
        y = targets.index[:, 0]
        w = np.where(u, 0.0, targets.mass)
        prior = np.bincount(y, weights=w, minlength=num_classes).astype(np.float64)
        if not prior.sum() > 0:
            prior = np.ones(num_classes)
        self.prior = torch.as_tensor(prior / prior.sum(), dtype=torch.float32)
        self.ramp_epochs = max(1, round(cfg.rampup * epochs)) if cfg.rampup > 0 else 0
        self.seed, self.rank = seed, rank
        self.sums = torch.zeros(3, dtype=torch.float64)

    def lambda_u_at(self, epoch: int) -> float:
        """lambda_u, rising linearly to its value over the first ``rampup`` share of the epochs."""
        if self.ramp_epochs == 0:
            return float(self.cfg.lambda_u)
        return float(self.cfg.lambda_u) * min(1.0, (epoch + 1) / self.ramp_epochs)

    def __call__(self, net: nn.Module, b: Batch, epoch: int, step: int) -> torch.Tensor:
        n = len(b.x)
        valid = b.valid if b.valid is not None else torch.ones(n, device=b.x.device)
        with torch.no_grad():
            logits = net(torch.cat([b.x, b.x2])).float()
            guess = label_guess(logits[:n], logits[n:])  # eq. S2
            targets = dense_targets(b.t_index, b.t_value, self.num_classes)
            t = mixmatch_targets(guess, targets, b.unlabeled, self.cfg.temperature)
        rng = np.random.default_rng(_mix_seed(self.seed, epoch, step, self.rank))
        lam = float(rng.beta(self.cfg.mix_alpha, self.cfg.mix_alpha))
        perm = torch.from_numpy(rng.permutation(n)).to(b.x.device)
        x_mix, t_mix = mixup(b.x, t, lam, perm)
        loss, l_x, l_u = mixmatch_loss(net(x_mix), t_mix, b.unlabeled, valid, self.prior.to(b.x.device),
                                       lambda_u=self.lambda_u_at(epoch), labeled_norm=self.labeled_norm,
                                       unlabeled_norm=self.unlabeled_norm)
        one = torch.ones((), dtype=torch.float64, device=l_x.device)
        self.sums = self.sums.to(l_x.device) + torch.stack([l_x.double(), l_u.double(), one])
        return loss

    def epoch_stats(self) -> dict[str, float]:
        """Mean L_x and L_u over this epoch's steps (all processes), and the epoch's lambda_u."""
        s = self.sums.clone()
        self.sums = torch.zeros(3, dtype=torch.float64, device=s.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(s)
        steps = max(float(s[2]), 1.0)
        return {"loss_x": float(s[0]) / steps, "loss_u": float(s[1]) / steps}


# ----------------------------------------------------------------------------------------- models


def build_head(kind: str, in_dim: int, num_classes: int, *, dropout: float = 0.25, hidden: int = 512,
               seed: int = 0) -> nn.Module:
    """Classifier on pooled features: dropout (the paper's 0.25 after pooling), then linear or MLP."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout {dropout} outside [0, 1)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, num_classes))


class ImageClassifier(nn.Module):
    """A timm backbone, its adaptive pooling, dropout after pooling (sec. 3.4) and a new linear classifier.

    The pooling makes the classifier independent of the input size, so a model trained at one
    resolution can be fine-tuned at a larger one (adaptive spatial resolution, sec. 3.4).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, dropout: float = 0.25, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = nn.Linear(int(backbone.num_features), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.fc(self.dropout(pooled))


# ------------------------------------------------------------------------------------ config / ckpt


@dataclass
class TrainConfig:
    """Optimization settings. Defaults follow the paper (sec. 3.4): SGD, momentum 0.9, lr 0.1 decayed
    x0.1 at 30/60/80/90 % of the epochs."""

    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    lr_steps: tuple[int, ...] = (30, 60, 80, 90)  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    seed: int = 0
    # images only
    image_size: int = 224
    finetune_size: int = 0  # > 0: fine-tune at this size after `epochs` (adaptive resolution)
    finetune_epochs: int = 0
    finetune_lr: float | None = None  # default: the lr of the last main epoch
    min_crop: float = 0.08  # random-resized-crop minimum area fraction

    def __post_init__(self) -> None:
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("need lr > 0, weight decay >= 0 and 0 <= momentum < 1")
        if any(s < 1 for s in self.lr_steps):
            raise ValueError(f"lr steps must be epochs >= 1, got {list(self.lr_steps)}")
        if self.finetune_epochs < 0 or (self.finetune_epochs and self.finetune_size < 1):
            raise ValueError("fine-tuning needs a positive --finetune-size")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min crop {self.min_crop} outside (0, 1]")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    def lr_at(self, epoch: int) -> float:
        """Step decay over the main epochs (0-based ``epoch``); fine-tuning epochs use ``finetune_lr``."""
        main = self.lr * self.lr_gamma ** sum(epoch >= s for s in self.lr_steps)
        if epoch < self.epochs:
            return main
        if self.finetune_lr is not None:
            return self.finetune_lr
        return self.lr * self.lr_gamma ** sum(self.epochs - 1 >= s for s in self.lr_steps)

    def size_at(self, epoch: int) -> int:
        return self.image_size if epoch < self.epochs or not self.finetune_epochs else self.finetune_size


def finetune_config(cfg: TrainConfig, epochs: int, lr: float | None = None, image_size: int | None = None) -> TrainConfig:
    """Settings of a fine-tuning phase that continues a finished main phase on other rows (e.g.
    Clothing1M's clean set after the weighted noisy training, paper table 8).

    ``epochs`` epochs at the constant learning rate ``lr`` (default: the lr of the last main epoch,
    so the fine-tuning does not undo the decay), input size ``image_size`` (default: the main
    phase's final size); every other setting, the seed included, is the main phase's.
    """
    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    if lr is not None and lr <= 0:
        raise ValueError(f"fine-tuning lr must be > 0, got {lr}")
    last = cfg.total_epochs - 1
    return TrainConfig(
        epochs=epochs, lr=cfg.lr_at(last) if lr is None else float(lr), momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, lr_steps=(), lr_gamma=cfg.lr_gamma, seed=cfg.seed,
        image_size=cfg.size_at(last) if image_size is None else int(image_size), min_crop=cfg.min_crop,
    )


def scaled_lr_steps(epochs: int, fractions: Sequence[float] = (0.3, 0.6, 0.8, 0.9)) -> tuple[int, ...]:
    """The paper's decay points (30, 60, 80, 90 of 100 epochs) scaled to ``epochs``."""
    steps = sorted({max(1, round(f * epochs)) for f in fractions})
    return tuple(s for s in steps if s < epochs)


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """``torch.save`` of tensors and plain values to ``<path>.partial``, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``), or None when absent."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]}); delete it to restart") from None


def checkpoint_epoch(path: Path | str, run_key: str) -> int | None:
    """Epochs done by the checkpoint at ``path`` when it belongs to ``run_key``; None when absent or foreign."""
    state = load_checkpoint(path)
    if state is None or state.get("run_key") != run_key:
        return None
    return int(state["epoch"])


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


# ---------------------------------------------------------------------------------- training loop


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0  # epochs restored from the checkpoint


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _fit(
    net: nn.Module,
    module: nn.Module,
    cfg: TrainConfig,
    batches: Callable[[int], Iterable[Batch]],
    objective: Supervised,
    *,
    n_train: int,
    device: str,
    checkpoint: Path | None,
    run_key: str,
    progress: Progress | None,
    on_epoch_end: EpochCallback | None,
) -> TrainResult:
    rank, world = _dist()
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cfg.lr_at(e) / cfg.lr)
    history: list[dict[str, float]] = []
    start = 0
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None and state.get("run_key") == run_key:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
        start = int(state["epoch"])
        history = list(state.get("history", []))
    for epoch in range(start, cfg.total_epochs):
        # dropout draws from the global generator: reseed it per (seed, epoch, rank) so an epoch
        # replays identically after a resume
        torch.manual_seed(_mix_seed(cfg.seed, epoch, rank))
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step, batch in enumerate(batches(epoch)):
            batch = batch.to(device)
            loss = objective(net, batch, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * objective.norm
            if progress:
                progress(len(batch.x))
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        # mean (weighted) loss per image, comparable across world sizes
        history.append({"epoch": epoch + 1, "lr": lr, "loss": float(loss_sum) / (n_train * objective.mass_mean),
                        **objective.epoch_stats()})
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, {
                "run_key": run_key,
                "epoch": epoch + 1,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "history": history,
            })
        if world > 1:
            torch.distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history[-1])
    return TrainResult(module, history, start)


def make_objective(targets: Targets, num_classes: int, batch_size: int, cfg: TrainConfig,
                   semi: SemiConfig | None = None, unlabeled: np.ndarray | None = None,
                   rank: int = 0, transition: np.ndarray | None = None) -> Supervised:
    """The loss a run minimizes: eq. 1/7 over ``targets``; with ``transition`` eq. F2 (forward
    correction); with ``semi`` eq. S1 (fixmatch) / eq. S2-S6 (mixmatch), the images marked
    ``unlabeled`` as unlabeled data."""
    if transition is not None:
        return Forward(targets, batch_size, num_classes, transition)
    if semi is None:
        return Supervised(targets, batch_size, num_classes)
    if unlabeled is None or len(unlabeled) != len(targets):
        raise ValueError("semi-supervised training needs an unlabeled mask with one entry per image")
    if semi.method == "fixmatch":
        return FixMatch(targets, unlabeled, batch_size, num_classes, semi)
    return MixMatch(targets, unlabeled, batch_size, num_classes, semi, cfg.total_epochs, cfg.seed, rank)


def feature_views(x: torch.Tensor, views: Sequence[str], g: torch.Generator) -> list[torch.Tensor]:
    """Augmented views of cached features for the semi-supervised modes (the feature-space stand-in
    for image augmentation): ``weak`` drops 10 % of the dimensions, ``strong`` 50 % and adds Gaussian
    noise of half the row's RMS; kept dimensions are rescaled to keep the expectation."""
    out = []
    for v in views:
        p = 0.1 if v == "weak" else 0.5
        keep = (torch.rand(x.shape, generator=g) >= p).to(x.dtype).to(x.device)
        y = x * keep / (1.0 - p)
        if v == "strong":
            rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
            y = y + 0.5 * rms * torch.randn(x.shape, generator=g).to(x.device, x.dtype)
        out.append(y)
    return out


def train_features(
    features: np.ndarray,
    targets: Targets,
    num_classes: int,
    cfg: TrainConfig,
    *,
    head: str = "linear",
    hidden: int = 512,
    dropout: float = 0.25,
    device: str = "cpu",
    checkpoint: Path | str | None = None,
    run_key: str = "",
    progress: Progress | None = None,
    on_epoch_end: EpochCallback | None = None,
    model: nn.Module | None = None,
    semi: SemiConfig | None = None,
    unlabeled: np.ndarray | None = None,
    transition: np.ndarray | None = None,
) -> TrainResult:
    """Fit a head on cached features (one row per training image, aligned with ``targets``).

    Resumes from ``checkpoint`` when it holds a run with the same ``run_key``; writes it after every
    epoch. ``on_epoch_end(epoch, stats)`` runs after the checkpoint is written. ``model``: continue
    training this head (e.g. the result of a main phase, for fine-tuning) instead of a new one; the
    optimizer starts afresh. ``semi``: train the rows marked ``unlabeled`` as unlabeled data
    (eq. S1-S6), the augmented views made by :func:`feature_views`. ``transition``: forward
    correction through this noise transition matrix (eq. F2).
    """
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature rows for {len(targets)} targets")
    if len(features) == 0:
        raise ValueError("no training images")
    x_all = torch.from_numpy(np.asarray(features, dtype=np.float32))
    t_index = torch.from_numpy(targets.index)
    t_value = torch.from_numpy(targets.value)
    u_all = torch.zeros(len(targets)) if unlabeled is None else torch.from_numpy(np.asarray(unlabeled, np.float32))
    if model is None:
        model = build_head(head, x_all.shape[1], num_classes, dropout=dropout, hidden=hidden, seed=cfg.seed)
    model = model.to(device)
    x_all = x_all.to(device)
    n = len(x_all)
    objective = make_objective(targets, num_classes, cfg.batch_size, cfg, semi, unlabeled, transition=transition)

    def batches(epoch: int) -> Iterator[Batch]:
        g = torch.Generator()
        g.manual_seed(cfg.seed + epoch)  # the permutation DistributedSampler draws
        perm = torch.randperm(n, generator=g)
        ga = torch.Generator()
        ga.manual_seed(_mix_seed(cfg.seed, epoch, 1))  # feature views: their own stream
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            x = x_all[idx.to(device)]
            if semi is None:
                yield Batch(x, t_index[idx], t_value[idx])
            else:
                x1, x2 = feature_views(x, objective.views, ga)
                yield Batch(x1, t_index[idx], t_value[idx], x2, u_all[idx], torch.ones(len(idx)))

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # a head's ops are too small to gain from threads; they only add contention
    try:
        return _fit(model, model, cfg, batches, objective, n_train=n, device=device,
                    checkpoint=Path(checkpoint) if checkpoint else None, run_key=run_key, progress=progress,
                    on_epoch_end=on_epoch_end)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def predict_features(model: nn.Module, features: np.ndarray, *, batch_size: int = 4096, device: str = "cpu") -> np.ndarray:
    """Logits (N, C) of a head over cached features."""
    model.eval()
    out = []
    for s in range(0, len(features), batch_size):
        x = torch.from_numpy(np.asarray(features[s : s + batch_size], dtype=np.float32)).to(device)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def restrict_classes(p: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``p`` (B, C) with every class outside the row's ``allowed`` (B, m) class indices set to 0
    (top-k smoothing restricted to the label's graph neighbours)."""
    if allowed is None:
        return p
    keep = torch.zeros_like(p).scatter_(1, allowed.to(p.device).long(), 1.0)
    return p * keep


def topk_predictions(logits: np.ndarray | torch.Tensor, k: int,
                     allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax probabilities of the k most likely classes, most likely first; with
    ``allowed`` (N, m) only among each row's allowed classes (the others get probability 0)."""
    lg = torch.as_tensor(logits).float()
    p = restrict_classes(torch.softmax(lg, dim=1), None if allowed is None else torch.as_tensor(allowed))
    val, idx = p.topk(min(k, p.shape[1]), dim=1)
    return idx.numpy(), val.numpy()


def topk_accuracy(pred_index: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Share of images whose label is among the first k predicted classes, for each k (in %)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no images to evaluate")
    return {f"top{k}": float(100.0 * (pred_index[:, :k] == labels[:, None]).any(axis=1).mean()) for k in ks}


# ---------------------------------------------------------------------------------------- images


class ImageSource:
    """Images by dataset position: decoded files (``paths``) or in-memory ``pixels`` (N x H x W[x3])."""

    def __init__(self, paths: Sequence[str] | None = None, pixels: np.ndarray | None = None):
        if paths is None and pixels is None:
            raise ValueError("an image source needs paths or pixels")
        self.paths, self.pixels = paths, pixels

    def load_uint8(self, pos: int, short_side: int, interpolation: str = "bicubic") -> torch.Tensor:
        """Image ``pos`` as uint8 (H, W, C), C = 1 (grayscale pixels) or 3. A file whose shorter side
        is longer than ``short_side`` is resized (PIL, ``interpolation``) so that side is
        ``short_side``, the long side truncated as torchvision's Resize does (timm's eval transform)."""
        if self.pixels is not None:
            arr = torch.from_numpy(np.ascontiguousarray(self.pixels[pos]))
        else:
            from PIL import Image

            path = self.paths[pos]
            resample = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if min(im.size) > short_side:
                        if im.width <= im.height:
                            size = (short_side, int(short_side * im.height / im.width))
                        else:
                            size = (int(short_side * im.width / im.height), short_side)
                        im = im.resize(size, resample)
                    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {str(e)[:120]})") from None
        return arr.unsqueeze(-1) if arr.ndim == 2 else arr

    def load(self, pos: int, short_side: int) -> torch.Tensor:
        """Image ``pos`` as float (3, H, W) in [0, 1]; files are resized so the shorter side is ``short_side``."""
        x = self.load_uint8(pos, short_side).permute(2, 0, 1).float().div_(255.0)
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def crop_flip_params(h: int, w: int, min_scale: float, g: torch.Generator,
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int, bool]:
    """Random-resized-crop box (area in [min_scale, 1] of h x w, aspect in ``ratio``; the whole image
    after 10 misses) and a horizontal flip, all drawn from ``g``: ``(top, left, height, width, flip)``."""
    area = h * w

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    ch, cw, top, left = h, w, 0, 0
    for _ in range(10):
        target = area * u(min_scale, 1.0)
        aspect = math.exp(u(math.log(ratio[0]), math.log(ratio[1])))
        cw_, ch_ = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw_ <= w and 0 < ch_ <= h:
            ch, cw = ch_, cw_
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            break
    return top, left, ch, cw, float(torch.rand((), generator=g)) < 0.5


def random_resized_crop_flip(img: torch.Tensor, size: int, min_scale: float, g: torch.Generator,
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized-crop (area in [min_scale, 1], aspect in ``ratio``) to size x size, then a random
    horizontal flip; all draws from ``g`` (:func:`crop_flip_params`)."""
    _, h, w = img.shape
    top, left, ch, cw, flip = crop_flip_params(h, w, min_scale, g, ratio)
    crop = img[:, top : top + ch, left : left + cw]
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        out = out.flip(-1)
    return out.clamp_(0, 1)


def crop_flip_batch(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`random_resized_crop_flip` for a batch of equal-size images (B, C, H, W) in [0, 1] at once,
    ``params`` (B, 5) = (top, left, height, width, flip) from :func:`crop_flip_params`.

    The crop is resampled by ``roi_align`` (bilinear at the bin centres; a bin larger than a pixel
    averages ceil(bin) x ceil(bin) samples), which equals the bilinear resize where the crop is enlarged
    and approximates its antialiased filter where it is shrunk.
    """
    from torchvision.ops import roi_align

    p = params.to(images.device, torch.float32)
    boxes = torch.stack([torch.arange(len(p), device=p.device, dtype=torch.float32), p[:, 1], p[:, 0],
                         p[:, 1] + p[:, 3], p[:, 0] + p[:, 2]], dim=1)
    out = roi_align(images.float(), boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = p[:, 4] > 0
    out[flip] = out[flip].flip(-1)
    return out.clamp_(0, 1)


# FixMatch's strong augmentation (RandAugment with random magnitudes, then Cutout), batched on tensors.
# Equalize and PIL's exact resampling are left out; the geometric ops act first, then the photometric ones.
STRONG_OPS = ("identity", "autocontrast", "brightness", "contrast", "color", "sharpness", "posterize",
              "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def strong_params(g: torch.Generator) -> torch.Tensor:
    """One image's strong augmentation, drawn from ``g``: two ops of :data:`STRONG_OPS` (uniform), each
    with a magnitude m ~ U(0, 1) and a sign, then a Cutout square of side U(0, 0.5) x size at a uniform
    centre: ``(op1, m1, sign1, op2, m2, sign2, centre_x, centre_y, side)``."""
    ops = torch.randint(0, len(STRONG_OPS), (2,), generator=g)
    r = torch.rand(7, generator=g)
    sign = torch.where(r[2:4] < 0.5, -1.0, 1.0)
    return torch.stack([ops[0].float(), r[0], sign[0], ops[1].float(), r[1], sign[1], r[4], r[5], 0.5 * r[6]])


def apply_strong(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply :func:`strong_params` rows to a batch (B, 3, H, W) in [0, 1] (before normalization)."""
    B, _, H, W = x.shape
    p = params.to(x.device, torch.float32)
    eye = torch.eye(3, device=x.device).repeat(B, 1, 1)
    theta = eye.clone()
    for k in (0, 1):
        op, m, sg = p[:, 3 * k].long(), p[:, 3 * k + 1], p[:, 3 * k + 2]
        t = eye.clone()
        ang = sg * m * math.radians(30.0)
        rot = op == STRONG_OPS.index("rotate")
        t[rot, 0, 0], t[rot, 0, 1] = torch.cos(ang[rot]), -torch.sin(ang[rot])
        t[rot, 1, 0], t[rot, 1, 1] = torch.sin(ang[rot]), torch.cos(ang[rot])
        sx, sy = op == STRONG_OPS.index("shear_x"), op == STRONG_OPS.index("shear_y")
        t[sx, 0, 1] = (sg * m * 0.3)[sx]
        t[sy, 1, 0] = (sg * m * 0.3)[sy]
        tx, ty = op == STRONG_OPS.index("translate_x"), op == STRONG_OPS.index("translate_y")
        t[tx, 0, 2] = (sg * m * 0.3 * 2)[tx]  # up to 30 % of the side (normalized coordinates span 2)
        t[ty, 1, 2] = (sg * m * 0.3 * 2)[ty]
        theta = theta @ t
    geo = torch.zeros(B, dtype=torch.bool, device=x.device)
    for k in (0, 1):
        for name in _GEOMETRIC:
            geo |= p[:, 3 * k].long() == STRONG_OPS.index(name)
    if geo.any():
        grid = F.affine_grid(theta[geo, :2], [int(geo.sum()), x.shape[1], H, W], align_corners=False)
        # pixels moved in from outside are grey (0.5), as RandAugment fills with 128
        x = x.clone()
        x[geo] = F.grid_sample(x[geo] - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
    gray_w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    smooth = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    for k in (0, 1):
        op, m, sg = p[:, 3 * k].long(), p[:, 3 * k + 1], p[:, 3 * k + 2]
        f = (1.0 + sg * 0.9 * m).view(B, 1, 1, 1)  # enhance factor in [0.1, 1.9]
        mv = m.view(B, 1, 1, 1)

        def pick(name: str) -> torch.Tensor:
            return (op == STRONG_OPS.index(name)).view(B, 1, 1, 1)

        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        auto = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        gray = (x * gray_w).sum(1, keepdim=True)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), smooth.expand(3, 1, 3, 3), groups=3)
        q = torch.pow(2.0, torch.round(4 * mv))  # posterize: keep 8 - round(4 m) bits
        x = torch.where(pick("autocontrast"), auto, x)
        x = torch.where(pick("brightness"), x * f, x)
        x = torch.where(pick("contrast"), mean + (x - mean) * f, x)
        x = torch.where(pick("color"), gray + (x - gray) * f, x)
        x = torch.where(pick("sharpness"), blur + (x - blur) * f, x)
        x = torch.where(pick("posterize"), torch.floor(x * 255.0 / q) * q / 255.0, x)
        x = torch.where(pick("solarize"), torch.where(x >= 1.0 - mv, 1.0 - x, x), x)
        x = x.clamp(0, 1)
    ys = torch.arange(H, device=x.device, dtype=torch.float32).view(1, H, 1) + 0.5
    xs = torch.arange(W, device=x.device, dtype=torch.float32).view(1, 1, W) + 0.5
    half = (p[:, 8] * min(H, W) / 2).view(B, 1, 1)
    cut = ((xs - (p[:, 6] * W).view(B, 1, 1)).abs() < half) & ((ys - (p[:, 7] * H).view(B, 1, 1)).abs() < half)
    return torch.where(cut[:, None], torch.full_like(x, 0.5), x)


def _view_generator(seed: int, epoch: int, j: int, view: int) -> torch.Generator:
    """The generator of image ``j``'s view ``view`` in ``epoch``: the same on any rank and after a resume
    (view 0 keeps the seeding of single-view training)."""
    g = torch.Generator()
    g.manual_seed(_mix_seed(seed, epoch, j) if view == 0 else _mix_seed(seed, epoch, j, view))
    return g


class TrainImages(Dataset):
    """Augmented training images with their targets; the weights travel inside each sample.

    Item ``i >= len(self)`` is padding added by :class:`PaddedDistributedSampler`: the image
    ``i - len(self)`` with zero weight, so padding never changes the loss. Each item is a dict: one
    cropped view per entry of ``views`` (``x``, ``x2``; in [0, 1], normalized by :func:`finish_views`
    after a strong view's ops are applied batched), the strong views' :func:`strong_params` (``p2``),
    the target row, ``unlabeled`` and ``valid``.
    """

    def __init__(self, source: ImageSource, positions: np.ndarray, targets: Targets, mean: Sequence[float],
                 std: Sequence[float], min_crop: float, seed: int, views: Sequence[str] = ("weak",),
                 unlabeled: np.ndarray | None = None):
        if len(positions) != len(targets):
            raise ValueError(f"{len(positions)} images for {len(targets)} targets")
        self.source, self.positions, self.targets = source, np.asarray(positions), targets
        self.mean, self.std = tuple(mean), tuple(std)
        self.min_crop, self.seed, self.views = min_crop, seed, tuple(views)
        self.unlabeled = None if unlabeled is None else np.asarray(unlabeled, np.float32)
        self.epoch, self.size = 0, 224

    def set_epoch(self, epoch: int, size: int) -> None:
        self.epoch, self.size = epoch, size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pad = i >= len(self.positions)
        j = i - len(self.positions) if pad else i
        img = self.source.load(int(self.positions[j]), short_side=math.ceil(self.size / 0.875))
        item: dict[str, torch.Tensor] = {}
        for v, kind in enumerate(self.views):
            g = _view_generator(self.seed, self.epoch, j, v)  # same augmentation on any rank / after resume
            key = "x" if v == 0 else f"x{v + 1}"
            item[key] = random_resized_crop_flip(img, self.size, self.min_crop, g)
            if kind == "strong":
                item[f"p{v + 1}"] = strong_params(g)
        value = torch.from_numpy(self.targets.value[j])
        item["t_index"] = torch.from_numpy(self.targets.index[j])
        item["t_value"] = value * 0 if pad else value
        u = 0.0 if self.unlabeled is None or pad else float(self.unlabeled[j])
        item["unlabeled"] = torch.tensor(u)
        item["valid"] = torch.tensor(0.0 if pad else 1.0)
        return item


def finish_views(item: dict[str, torch.Tensor], views: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 device: str) -> Batch:
    """A collated :class:`TrainImages` batch (or :class:`PixelBatches`' dict) -> :class:`Batch` on
    ``device``: strong views get their ops (:func:`apply_strong`), every view is normalized."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    xs = []
    for v, kind in enumerate(views):
        x = item["x" if v == 0 else f"x{v + 1}"].to(device, non_blocking=True)
        if kind == "strong":
            x = apply_strong(x, item[f"p{v + 1}"])
        xs.append((x - m) / s)
    return Batch(xs[0], item["t_index"].to(device), item["t_value"].to(device), xs[1] if len(xs) > 1 else None,
                 item["unlabeled"].to(device), item["valid"].to(device))


class PixelBatches:
    """Training batches of in-memory pixels (all images the same size) augmented batch-wise on the
    training device (:func:`crop_flip_batch`, :func:`apply_strong`): the per-image crop boxes, flips and
    strong ops are :class:`TrainImages`' (the same generators), without a DataLoader."""

    def __init__(self, ds: TrainImages, device: str):
        px = torch.from_numpy(np.ascontiguousarray(ds.source.pixels))
        px = px[:, None] if px.ndim == 3 else px.permute(0, 3, 1, 2)
        self.ds, self.device = ds, device
        self.pixels = px.to(device)

    def batch(self, items: Sequence[int]) -> dict[str, torch.Tensor]:
        ds, n = self.ds, len(self.ds)
        js = [i - n if i >= n else i for i in items]
        imgs = self.pixels[torch.as_tensor(ds.positions[js], device=self.device)].float().div_(255.0)
        _, _, h, w = imgs.shape
        out: dict[str, torch.Tensor] = {}
        for v, kind in enumerate(ds.views):
            gens = [_view_generator(ds.seed, ds.epoch, j, v) for j in js]
            boxes = torch.tensor([crop_flip_params(h, w, ds.min_crop, g) for g in gens], dtype=torch.float32)
            x = crop_flip_batch(imgs, boxes, ds.size)
            out["x" if v == 0 else f"x{v + 1}"] = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            if kind == "strong":
                out[f"p{v + 1}"] = torch.stack([strong_params(g) for g in gens])
        pad = torch.tensor([i >= n for i in items])
        out["t_index"] = torch.from_numpy(ds.targets.index[js])
        out["t_value"] = torch.from_numpy(ds.targets.value[js]) * (~pad)[:, None].float()
        u = torch.zeros(len(js)) if ds.unlabeled is None else torch.from_numpy(ds.unlabeled[js])
        out["unlabeled"] = u * (~pad).float()
        out["valid"] = (~pad).float()
        return out


class PaddedDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (same permutation: seed + epoch) whose padding is marked, not duplicated.

    The plain sampler repeats images to give every rank as many samples; here a repeated image ``j``
    is emitted as ``j + N`` and :class:`TrainImages` returns it with zero weight, so the summed loss
    over all ranks equals the single-process loss exactly.
    """

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        indices += [indices[i % n] + n for i in range(self.total_size - n)]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def train_images(
    model: nn.Module,
    source: ImageSource,
    positions: np.ndarray,
    targets: Targets,
    num_classes: int,
    cfg: TrainConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    workers: int = 0,
    checkpoint: Path | str | None = None,
    run_key: str = "",
    progress: Progress | None = None,
    on_epoch_end: EpochCallback | None = None,
    semi: SemiConfig | None = None,
    unlabeled: np.ndarray | None = None,
    transition: np.ndarray | None = None,
) -> TrainResult:
    """Train ``model`` (images -> logits, e.g. :class:`ImageClassifier`) on the images at ``positions``.

    Under an initialized process group (``torchrun``) the model is wrapped in DDP and each rank
    reads its share through :class:`PaddedDistributedSampler`; ``cfg.batch_size`` is the global
    batch and must be divisible by the world size. Epochs ``>= cfg.epochs`` run at
    ``cfg.finetune_size`` (progressive resolution). In-memory pixels are augmented batch-wise on
    ``device`` (:class:`PixelBatches`), files by ``workers`` DataLoader processes. ``semi``: the
    images marked ``unlabeled`` are unlabeled data (eq. S1-S6). ``transition``: forward correction
    through this noise transition matrix (eq. F2).
    """
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    if len(positions) == 0:
        raise ValueError("no training images")
    local_bs = cfg.batch_size // world
    model = model.to(device)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    # per rank; DDP's gradient mean over ranks -> batch_size * mean w
    objective = make_objective(targets, num_classes, local_bs, cfg, semi, unlabeled, rank, transition)
    views = objective.views
    ds = TrainImages(source, positions, targets, mean, std, cfg.min_crop, cfg.seed, views, unlabeled)
    sampler = PaddedDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    pixels = PixelBatches(ds, device) if source.pixels is not None else None

    def batches(epoch: int) -> Iterator[Batch]:
        ds.set_epoch(epoch, cfg.size_at(epoch))
        sampler.set_epoch(epoch)
        if pixels is not None:
            order = list(sampler)
            for s in range(0, len(order), local_bs):
                yield finish_views(pixels.batch(order[s : s + local_bs]), views, mean, std, device)
            return
        for item in DataLoader(ds, batch_size=local_bs, sampler=sampler, num_workers=workers, drop_last=False,
                               pin_memory=device.startswith("cuda")):
            yield finish_views(item, views, mean, std, device)

    return _fit(net, model, cfg, batches, objective, n_train=len(positions), device=device,
                checkpoint=Path(checkpoint) if checkpoint else None, run_key=run_key, progress=progress,
                on_epoch_end=on_epoch_end)


@torch.no_grad()
def predict_images_topk(
    model: nn.Module,
    source: ImageSource,
    positions: np.ndarray,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    k: int = 5,
    decode_size: int,
    decode_interpolation: str = "bicubic",
    batch_size: int = 256,
    device: str = "cpu",
    progress: Progress | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes and probabilities for the images at ``positions`` (eval transform, no augmentation);
    with ``allowed`` (N, m) only among each image's allowed classes (:func:`restrict_classes`).

    ``transform`` maps one uint8 image ``(1, H, W, C)`` to the model's input ``(1, 3, s, s)``
    (extract-features' ``Preprocess``: timm's eval transform); files are decoded with their shorter
    side at most ``decode_size`` (``decode_interpolation``), in-memory pixels as they are.

    Under a process group each rank predicts every world-th image and the results are summed
    across ranks, so every rank returns the full arrays.
    """
    rank, world = _dist()
    model = model.to(device).eval()
    n = len(positions)
    mine = np.arange(rank, n, world)
    # class index + 1 (0 = no prediction, e.g. k > C), so that a sum over ranks merges the shards
    idx_all = torch.zeros((n, k), dtype=torch.int64, device=device)
    val_all = torch.zeros((n, k), dtype=torch.float32, device=device)
    for s in range(0, len(mine), batch_size):
        rows = mine[s : s + batch_size]
        # one image at a time: files differ in size (each is resized and cropped by the transform)
        x = torch.cat([transform(source.load_uint8(int(positions[r]), decode_size, decode_interpolation)[None])
                       for r in rows])
        logits = model(x.to(device)).float()
        p = torch.softmax(logits, dim=1)
        if allowed is not None:
            p = restrict_classes(p, torch.from_numpy(np.asarray(allowed)[rows]))
        kk = min(k, p.shape[1])
        v, i = p.topk(kk, dim=1)
        rows_t = torch.from_numpy(rows).to(device)
        idx_all[rows_t, :kk] = i + 1
        val_all[rows_t, :kk] = v
        if progress:
            progress(len(rows))
    if world > 1:
        torch.distributed.all_reduce(idx_all)
        torch.distributed.all_reduce(val_all)
    return idx_all.cpu().numpy() - 1, val_all.cpu().numpy()


# -- a whole training run: options, the mode's plan, the phases ----------------------------------

DEFAULT_ALPHA, DEFAULT_BETA = 1.2, 1.5  # eq. 6 defaults (tables 4-5), used when scores.h5 does not record them
CORRECT_TARGETS = ("cleaned", "soft", "hard", "distribution")


@dataclass
class TrainOptions:
    """Every option of a training run (``sinet train``), validated together; the optimization
    settings of its phases come from :meth:`configs`, the recorded params from :meth:`provenance`."""

    # what is trained, on what (docs/training-modes.md)
    mode: str = "C"
    on: str = "features"
    suffix: str = ""
    threshold: float | None = None
    train_subset: str = "all"
    # targets: eq. 7, top-k smoothing, correction, semi-supervised, graph, forward
    soft_targets: bool = False
    soft_mix: float = 0.0
    soft_keep: int = 16
    alpha: float | None = None
    beta: float | None = None
    topk_smoothing: int = 0
    topk_mix: float = 0.5
    topk_epochs: int | None = None
    correct_target: str = "cleaned"
    min_confidence: float = 0.5
    lambda_u: float | None = None
    pseudo_confidence: float = 0.95
    sharpen: float = 0.5
    mix_alpha: float = 4.0
    rampup: float = 0.1
    graph_neighbours: int = 3
    topk_neighbours: int = 0
    transition_neighbours: int = 0
    # the model and its optimization
    head: str = "linear"
    hidden: int = 512
    dropout: float = 0.25
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    lr_steps: tuple[int, ...] | None = None  # None: the paper's, scaled to epochs
    lr_gamma: float = 0.1
    seed: int = 0
    # images (--on images) and fine-tuning
    backbone: str = ""
    random_init: bool = False
    image_size: int = 224
    min_crop: float = 0.08
    workers: int = 2
    finetune_subset: str | None = None
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    finetune_size: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"--mode {self.mode!r}: choose one of {', '.join(MODES)}"),
            (self.on in ("features", "images"), f"--on {self.on!r}: choose features or images"),
            (not self.soft_targets or self.mode == "C",
             "--soft-targets replaces mode C's eq. 1 by eq. 7: use it with --mode C"),
            (self.topk_smoothing >= 0, "--topk-smoothing must be >= 0"),
            (not self.topk_smoothing or self.mode in ("A", "C"), "--topk-smoothing smooths the labels of the "
             f"non-confident images: use --mode A or C, not {self.mode}"),
            (not (self.topk_smoothing and self.soft_targets),
             "--topk-smoothing and --soft-targets both replace the targets: choose one"),
            (self.topk_neighbours >= 0 and (not self.topk_neighbours or self.topk_smoothing),
             "--topk-neighbours K restricts --topk-smoothing: give both, K >= 1"),
            (self.correct_target in CORRECT_TARGETS,
             f"--correct-target {self.correct_target!r}: choose cleaned, soft, hard or distribution"),
            (self.graph_neighbours >= 1, "--graph-neighbours must be >= 1"),
            (self.transition_neighbours >= 0, "--transition-neighbours must be >= 0"),
            (not self.suffix or self.suffix.replace("-", "").replace("_", "").isalnum(),
             f"--suffix {self.suffix!r}: letters, digits, - and _ only"),
            (self.finetune_subset is None or self.finetune_epochs >= 1, f"--finetune-subset {self.finetune_subset}: "
             "give the fine-tuning length with --finetune-epochs N"),
            (self.on != "features" or not self.finetune_size, "--finetune-size applies to --on images"),
            (self.on != "features" or not self.finetune_epochs or self.finetune_subset is not None,
             "--finetune-epochs on features needs --finetune-subset (what to fine-tune on)"),
            (self.on != "images" or not self.finetune_epochs or self.finetune_subset is not None
             or self.finetune_size >= 1,
             "--finetune-epochs needs --finetune-size (progressive resolution) or --finetune-subset"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.configs()  # the optimization settings validate themselves
        self.semi()

    @property
    def run(self) -> str:
        """The run's name: its folder train-<run>/ and its key in metrics.json."""
        return self.mode + (f"-{self.suffix}" if self.suffix else "")

    @property
    def needs_scores(self) -> bool:
        return self.mode not in ("A", "oracle") or self.topk_smoothing > 0

    def configs(self) -> tuple[TrainConfig, TrainConfig | None]:
        """The main phase's settings and the fine-tuning phase's (None without --finetune-subset).
        With --finetune-subset the fine-tuning is a phase of its own on other rows; without it,
        progressive resolution stays inside the main loop."""
        in_loop = self.finetune_subset is None
        cfg = TrainConfig(
            epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
            batch_size=self.batch_size, lr_steps=scaled_lr_steps(self.epochs) if self.lr_steps is None
            else self.lr_steps, lr_gamma=self.lr_gamma, seed=self.seed, image_size=self.image_size,
            finetune_size=self.finetune_size if in_loop else 0, finetune_epochs=self.finetune_epochs if in_loop else 0,
            finetune_lr=self.finetune_lr if in_loop else None, min_crop=self.min_crop)
        ft = None if in_loop else finetune_config(cfg, self.finetune_epochs, self.finetune_lr, self.finetune_size or None)
        return cfg, ft

    def initial_config(self, cfg: TrainConfig) -> TrainConfig:
        """The top-k smoothing's initial model: same settings, its own epochs, no fine-tuning phase."""
        n = self.topk_epochs or cfg.epochs
        steps = scaled_lr_steps(n) if self.lr_steps is None else tuple(s for s in cfg.lr_steps if s < n)
        return dataclasses.replace(cfg, epochs=n, lr_steps=steps, finetune_epochs=0, finetune_size=0)

    def semi(self) -> "SemiConfig | None":
        if self.mode not in SEMI_MODES:
            return None
        return SemiConfig(self.mode, lambda_u=self.lambda_u, confidence=self.pseudo_confidence,
                          temperature=self.sharpen, mix_alpha=self.mix_alpha, rampup=self.rampup)

    def provenance(self, threshold: float | None) -> dict[str, Any]:
        """The params a run records (``threshold``: the one applied), before the mode's own choices
        (:func:`plan_mode`) and eq. 7's alpha, beta. Options recorded only when set (train_subset)
        keep runs from before them current."""
        o = dataclasses.asdict(self)
        keys = ["on", "mode", "seed", "epochs", "lr", "momentum", "weight_decay", "batch_size", "lr_gamma", "dropout",
                "topk_smoothing"]
        params = {k: o[k] for k in keys}
        params.update(threshold=threshold, lr_steps=list(self.configs()[0].lr_steps))
        if self.topk_smoothing:
            params.update(topk_mix=self.topk_mix, topk_epochs=self.topk_epochs or self.epochs)
        if self.train_subset != "all":
            params["train_subset"] = self.train_subset
        if self.on == "features":
            params.update(head=self.head, hidden=self.hidden if self.head == "mlp" else None)
        else:
            tuned = bool(self.finetune_epochs)
            params.update({k: o[k] for k in ("backbone", "random_init", "image_size", "finetune_epochs", "min_crop")})
            params.update(finetune_size=self.finetune_size if tuned else 0, finetune_lr=self.finetune_lr if tuned else None)
        if self.finetune_subset is not None:
            params.update({k: o[k] for k in ("finetune_subset", "finetune_epochs", "finetune_lr")})
        return params

    def eq6(self, scores_params: dict) -> tuple[float, float]:
        """eq. 6's alpha and beta for eq. 7: the options', else scores.h5's, else the defaults."""
        a = self.alpha if self.alpha is not None else float(scores_params.get("alpha", DEFAULT_ALPHA))
        b = self.beta if self.beta is not None else float(scores_params.get("beta", DEFAULT_BETA))
        return a, b


SCORE_ROW_COLUMNS = ("flagged", "suggested_class", "suggested_confidence", "nearest_class", "flag_score")
SCORE_PROBE = ("probe_W", "probe_b")


def flags_of(extra: dict, w: np.ndarray, y: np.ndarray, scores_params: dict,
             threshold: float | None = None) -> tuple[np.ndarray, str]:
    """Which training images are flagged: w <= ``threshold`` when given; else scores.h5's ``flagged``
    when stored; else the suspect rule of score-noise (w <= 0.5 with the default score, w = 0 with
    eq. 6 alone, or a nearer prototype of another class). Returns the mask and where it came from."""
    if threshold is not None:
        return np.asarray(w) <= threshold, f"w <= {threshold:g}"
    if "flagged" in extra:
        return extra["flagged"].astype(bool), "scores.h5 flagged"
    below = 0.5 if scores_params.get("score") == "fused" else 0.0
    return suspect_flags(w, y, extra.get("nearest_class"), below), f"w <= {below:g} or a nearer prototype"


@dataclass
class ModePlan:
    """What a mode beyond weighting needs besides w (docs/training-modes.md)."""

    flagged: np.ndarray | None = None  # eq. T1 (or scores.h5's flags)
    suggestion: tuple[np.ndarray, np.ndarray] | None = None  # (s_i, q_i), eq. T2 (or scores.h5's)
    distribution: np.ndarray | None = None  # P (N, C) for --correct-target distribution and mode forward
    class_weights: np.ndarray | None = None  # eq. 7's w_ic for mode graph
    neighbours: np.ndarray | None = None  # S_t neighbours of every class
    unlabeled: np.ndarray | None = None  # the semi-supervised modes' unlabeled images (set by mode_targets)


def plan_mode(opts: TrainOptions, *, y: np.ndarray, w: np.ndarray, score_extra: dict, scores_params: dict,
              params: dict, features_of_rows: Callable[[], np.ndarray], eq7_weights: Callable[[], np.ndarray],
              neighbours_of: Callable[[int], np.ndarray]) -> ModePlan:
    """Flags, suggestions, eq. 7 weights and graph neighbours a mode needs, each from the first source
    that has it; records the choices (and the mode's knobs) in ``params``. The callables load what
    only some modes need (the rows' features, eq. 7's weights, S_t's neighbours)."""
    mode, plan, semi = opts.mode, ModePlan(), opts.semi()
    if mode in ("correct", *SEMI_MODES):
        plan.flagged, params["flags"] = flags_of(score_extra, w, y, scores_params, opts.threshold)
    have_probe = all(k in score_extra for k in SCORE_PROBE)

    def probe() -> np.ndarray:
        return probe_probabilities(features_of_rows(), score_extra["probe_W"], score_extra["probe_b"])

    def distribution() -> np.ndarray:
        params["suggestions"] = "scores.h5 probe" if have_probe else "prototypes (eq. 7)"
        return probe() if have_probe else prototype_probabilities(eq7_weights())

    if mode in ("correct", *SEMI_MODES):  # the semi-supervised modes split by the cleaned decisions (T3c)
        cleaned = mode in SEMI_MODES or opts.correct_target == "cleaned"
        if mode == "correct":
            params["correct_target"] = opts.correct_target
        if mode == "correct" and opts.correct_target == "distribution":  # the probe's distribution, else eq. 7's
            params["soft_keep"] = opts.soft_keep
            plan.distribution = distribution()
        else:
            params["min_confidence"] = opts.min_confidence
            if "suggested_class" in score_extra and "suggested_confidence" in score_extra:
                s, q = score_extra["suggested_class"], score_extra["suggested_confidence"]
                params["suggestions"] = "scores.h5 suggested_class"
                if cleaned and "flag_score" in score_extra:
                    q = conditional_confidence(q, score_extra["flag_score"])  # eq. T2c
                    params["suggestions"] += " (confidence given a wrong label, eq. T2c)"
                plan.suggestion = (s, q)
            else:
                plan.suggestion = relabel_suggestions(distribution(), y)  # eq. T2
    if semi is not None:
        params.update(semi.params())
    if mode == "forward":  # eq. F1 from the probe's probabilities (else eq. 7's), over S_t neighbours if asked
        plan.distribution = distribution()
        params["transition_neighbours"] = opts.transition_neighbours
        if opts.transition_neighbours:
            plan.neighbours = neighbours_of(opts.transition_neighbours)
    if mode == "graph":
        plan.neighbours = neighbours_of(opts.graph_neighbours)
        plan.class_weights = eq7_weights()
        params["graph_neighbours"] = opts.graph_neighbours
    if opts.topk_neighbours:
        plan.neighbours = neighbours_of(opts.topk_neighbours)
        params["topk_neighbours"] = opts.topk_neighbours
    return plan


def mode_targets(opts: TrainOptions, plan: ModePlan, targets: Targets, *, y: np.ndarray, w: np.ndarray,
                 clean: np.ndarray | None) -> tuple[Targets, dict]:
    """The targets of the mode (``targets`` as built for C / eq. 7 otherwise) and its ``mode_stats``,
    with how well the moved labels match the true ones where ``clean`` labels are known (the demos)."""
    mode = opts.mode
    stats: dict[str, Any] = {}
    if plan.flagged is not None:
        stats["flagged"] = int(plan.flagged.sum())
    known = None if clean is None else clean >= 0
    if mode == "correct" and plan.distribution is not None:
        targets = distribution_targets(y, w, plan.distribution, keep=opts.soft_keep)  # eq. T3d
        moved = float(targets.value[:, 1:].sum())
        stats["moved_mass"] = moved
        if known is not None and moved > 0:
            on_true = targets.value[:, 1:] * (targets.index[:, 1:] == clean[:, None]) * known[:, None]
            stats["moved_right"] = float(on_true.sum() / moved)
    elif mode == "correct":
        if opts.correct_target == "cleaned":
            targets, fixed = cleaned_targets(y, plan.flagged, *plan.suggestion,
                                             min_confidence=opts.min_confidence)  # eq. T3c
            stats["dropped"] = int((plan.flagged & ~fixed).sum())
        else:
            targets, fixed = corrected_targets(y, w, plan.flagged, *plan.suggestion,
                                               min_confidence=opts.min_confidence,
                                               soft=opts.correct_target == "soft")  # eq. T3
        stats["corrected"] = int(fixed.sum())
        if known is not None and (fixed & known).any():
            sel = fixed & known
            stats["corrected_right"] = float(np.mean(plan.suggestion[0][sel] == clean[sel]))
    elif mode == "graph":
        targets = graph_targets(y, w, plan.class_weights, plan.neighbours)  # eq. T4
    elif mode in SEMI_MODES:
        # labeled: the kept and the relabeled images (T3c); unlabeled: the dropped ones
        targets, fixed = cleaned_targets(y, plan.flagged, *plan.suggestion, min_confidence=opts.min_confidence)
        plan.unlabeled = plan.flagged & ~fixed
        stats["corrected"] = int(fixed.sum())
        stats["unlabeled"] = int(plan.unlabeled.sum())
    elif mode == "forward":
        targets = hard_targets(y)  # every image, its noisy label: T carries the noise (eq. F2)
    return targets, stats


def forward_transition(opts: TrainOptions, plan: ModePlan, y: np.ndarray, num_classes: int,
                       clean: np.ndarray | None, stats: dict) -> np.ndarray | None:
    """Mode forward's transition matrix (eq. F1); in ``stats`` its diagonal and, where the true labels
    are known, the true one's (the demos)."""
    if opts.mode != "forward":
        return None
    T = transition_matrix(plan.distribution, y, num_classes, plan.neighbours)
    stats["transition_diagonal"] = [round(float(v), 4) for v in np.diag(T)]
    if clean is not None and (clean >= 0).any():
        k = clean >= 0
        true = np.zeros((num_classes, num_classes))
        np.add.at(true, (clean[k], y[k]), 1.0)
        true = true / np.maximum(true.sum(axis=1, keepdims=True), 1.0)
        stats["true_transition_diagonal"] = [round(float(v), 4) for v in np.diag(true)]
        stats["transition_error"] = float(np.abs(T - true).sum(axis=1).mean())  # mean L1 per row
    return T


def init_distributed(device: str) -> tuple[str, int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); returns the
    device of this process, its rank and the world size."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def leave_distributed(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Phases:
    """What :func:`run_features` / :func:`run_images` train: the rows, their targets, the phases'
    settings and checkpoints."""

    targets: Targets
    cfg: TrainConfig
    ft_cfg: TrainConfig | None
    checkpoint: Path
    run_key: str  # the main phase's (without the fine-tuning options: changing them resumes after it)
    ft_key: str
    init_key: str  # top-k smoothing's initial model's
    topk_init: Path  # the top-k smoothing's initial model's checkpoint
    ft_checkpoint: Path
    confident: np.ndarray | None = None  # top-k smoothing: the rows the initial model trains on
    allowed: np.ndarray | None = None  # top-k smoothing over S_t: the classes each row may take
    semi: "SemiConfig | None" = None
    unlabeled: np.ndarray | None = None
    transition: np.ndarray | None = None
    mode_stats: dict = field(default_factory=dict)
    targets_used: Targets | None = None  # what the main run of a head on features trained on (after top-k smoothing)

    def __post_init__(self) -> None:
        if self.targets_used is None:
            self.targets_used = self.targets


Bar = Callable[[str, int], Any]  # (description, total) -> context manager yielding a progress callback


def run_features(opts: TrainOptions, ph: Phases, y: np.ndarray, w: np.ndarray, x: np.ndarray, num_classes: int,
                 finetune: tuple[np.ndarray, np.ndarray] | None, x_val: np.ndarray | None, *, device: str,
                 bar: Bar, run: str) -> tuple[TrainResult, np.ndarray | None, TrainResult | None]:
    """The phases of a head on cached features: top-k smoothing's initial model (when asked), the
    main run, fine-tuning on ``finetune = (features, labels)``, then the top-5 predictions on ``x_val``."""
    targets = ph.targets
    if opts.topk_smoothing:
        init_cfg = opts.initial_config(ph.cfg)
        conf = ph.confident
        with bar("train top-k initial model", init_cfg.total_epochs * int(conf.sum())) as adv:
            init = train_features(x[conf], hard_targets(y[conf]), num_classes, init_cfg, head=opts.head,
                                  hidden=opts.hidden, dropout=opts.dropout, device=device, checkpoint=ph.topk_init,
                                  run_key=ph.init_key, progress=adv)
        pi, pp = topk_predictions(predict_features(init.model, x, device=device), opts.topk_smoothing, ph.allowed)
        targets = topk_smoothed_targets(y, w, ~conf, pi, pp, opts.topk_mix)
        ph.targets_used = targets
    with bar(f"train {run}", ph.cfg.total_epochs * len(y)) as adv:
        result = train_features(x, targets, num_classes, ph.cfg, head=opts.head, hidden=opts.hidden,
                                dropout=opts.dropout, device=device, checkpoint=ph.checkpoint, run_key=ph.run_key,
                                progress=adv, semi=ph.semi, unlabeled=ph.unlabeled, transition=ph.transition)
    ft_result = None
    if ph.ft_cfg is not None:
        ft_x, ft_y = finetune
        with bar(f"fine-tune {run} on {opts.finetune_subset}", ph.ft_cfg.total_epochs * len(ft_y)) as adv:
            ft_result = train_features(ft_x, hard_targets(ft_y), num_classes, ph.ft_cfg, device=device,
                                       checkpoint=ph.ft_checkpoint, run_key=ph.ft_key, progress=adv,
                                       model=result.model)
        result.model = ft_result.model
    val_pred = None
    if x_val is not None and len(x_val):
        val_pred, _ = topk_predictions(predict_features(result.model, x_val, device=device), 5)
    return result, val_pred, ft_result


def run_images(opts: TrainOptions, ph: Phases, net: nn.Module, preprocess_for: Callable[[int], Any],
               source: "ImageSource", positions: np.ndarray, va: np.ndarray, y: np.ndarray, w: np.ndarray,
               num_classes: int, finetune: tuple[np.ndarray, np.ndarray] | None, *, device: str, bar: Bar,
               ) -> tuple[TrainResult, np.ndarray | None, TrainResult | None]:
    """The phases of a full network on images (DDP under torchrun): top-k smoothing's initial model
    (when asked), the main run, fine-tuning on ``finetune = (positions, labels)``, then the top-5
    predictions on the val rows ``va``. ``net`` is the backbone (no classifier), ``preprocess_for(size)``
    its preprocessing at an input size."""
    import copy

    cfg = ph.cfg
    model = ImageClassifier(net, num_classes, dropout=opts.dropout, seed=cfg.seed)
    pp = preprocess_for(cfg.image_size)
    eval_pp = preprocess_for(cfg.size_at(cfg.total_epochs - 1) if ph.ft_cfg is None else ph.ft_cfg.image_size)
    targets = ph.targets
    if opts.topk_smoothing:
        conf = ph.confident
        init_cfg = opts.initial_config(cfg)
        init_model = copy.deepcopy(model)
        with bar("train top-k initial model", init_cfg.total_epochs * int(conf.sum())) as adv:
            train_images(init_model, source, positions[conf], hard_targets(y[conf]), num_classes, init_cfg,
                         mean=pp.mean, std=pp.std, device=device, workers=opts.workers, checkpoint=ph.topk_init,
                         run_key=ph.init_key, progress=adv)
        eval_init = preprocess_for(init_cfg.image_size)
        pi, pv = predict_images_topk(init_model, source, positions, eval_init, k=opts.topk_smoothing,
                                     decode_size=eval_init.resize, decode_interpolation=eval_init.interpolation,
                                     device=device, allowed=ph.allowed)
        targets = topk_smoothed_targets(y, w, ~conf, pi, pv, opts.topk_mix)
    with bar("train", cfg.total_epochs * len(positions)) as adv:
        result = train_images(model, source, positions, targets, num_classes, cfg, mean=pp.mean, std=pp.std,
                              device=device, workers=opts.workers, checkpoint=ph.checkpoint, run_key=ph.run_key,
                              progress=adv, semi=ph.semi, unlabeled=ph.unlabeled, transition=ph.transition)
    ft_result = None
    if ph.ft_cfg is not None:
        ft_pos, ft_y = finetune
        with bar("fine-tune", ph.ft_cfg.total_epochs * len(ft_pos)) as adv:
            ft_result = train_images(result.model, source, ft_pos, hard_targets(ft_y), num_classes, ph.ft_cfg,
                                     mean=pp.mean, std=pp.std, device=device, workers=opts.workers,
                                     checkpoint=ph.ft_checkpoint, run_key=ph.ft_key, progress=adv)
        result.model = ft_result.model
    val_pred = None
    if len(va):
        val_pred, _ = predict_images_topk(result.model, source, va, eval_pp, k=5, decode_size=eval_pp.resize,
                                          decode_interpolation=eval_pp.interpolation, device=device)
    return result, val_pred, ft_result


def evaluation(val_pred: np.ndarray | None, labels_val: np.ndarray, clean_val: np.ndarray | None
               ) -> tuple[dict[str, Any], str]:
    """Top-1/top-5 on the val rows against the clean label where known, else the given one (val
    images of no class left out), and which labels that was: clean_labels, labels or mixed."""
    stats: dict[str, Any] = {"top1": None, "top5": None}
    if val_pred is None:
        return stats, "none"
    c_val = clean_val if clean_val is not None else np.full(len(labels_val), UNKNOWN)
    y_val = np.where(c_val >= 0, c_val, labels_val)
    keep = c_val != OUTSIDE
    n_clean = int((c_val >= 0).sum())
    eval_labels = "clean_labels" if n_clean == keep.sum() else ("labels" if n_clean == 0 else "mixed")
    if keep.any():
        stats = topk_accuracy(val_pred[keep], y_val[keep], ks=(1, 5))
    return stats, eval_labels
