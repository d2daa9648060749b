"""Stage: the numbers behind ``sinet report``, computed from the scores of one dataset.

Pure computation over numpy arrays (no plotting, no HTML, no files): per-class estimated and
true noise rates, weight histograms and per-class weight quantiles, the nearest classes in a
class relation graph, the classes a page shows in detail, and per class the rows to show as
most suspect (lowest weight w_i of eq. 6) and most typical (smallest distance to the class
prototype). Everything is vectorized over N rows and C classes (one sort, no Python loop over
rows), so it stays fast for millions of images and thousands of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNKNOWN = -1  # clean label not known: left out of the true rate
OUTSIDE = -2  # open-set image (of no class): counts as noise


@dataclass
class ClassNoise:
    """Per-class noise rates over the training rows (all arrays have length C)."""

    n_train: np.ndarray  # training images labeled with the class
    n_low: np.ndarray  # of which have a low weight (the estimate's numerator)
    estimated: np.ndarray  # n_low / n_train (NaN for an empty class)
    n_known: np.ndarray  # training images of the class with a known clean label
    n_noisy: np.ndarray  # of which are truly mislabeled (clean label differs, or open-set)
    true: np.ndarray  # n_noisy / n_known (NaN where nothing is known)
    n_low_known: np.ndarray  # low-weight images with a known clean label
    n_low_noisy: np.ndarray  # low-weight images that are truly mislabeled


def find_rows(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Position of each needle id in ``haystack`` (-1 when absent): rows of one artifact matched by
    id to another's. One sort, no Python loop."""
    haystack = np.asarray(haystack).astype(str)
    needles = np.asarray(needles).astype(str)
    if len(haystack) == len(needles) and (haystack == needles).all():
        return np.arange(len(needles))
    if len(haystack) == 0:
        return np.full(len(needles), -1, dtype=np.int64)
    order = np.argsort(haystack, kind="stable")
    pos = np.minimum(np.searchsorted(haystack[order], needles), len(haystack) - 1)
    found = haystack[order][pos] == needles
    return np.where(found, order[pos], -1)


def _check_rows(labels: np.ndarray, num_classes: int, *others: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for o in others:
        if o is not None and len(o) != len(labels):
            raise ValueError(f"arrays differ in length: {len(o)} vs {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"label outside 0..{num_classes - 1}")
    return labels.astype(np.int64)


def is_low_weight(weight: np.ndarray, threshold: float) -> np.ndarray:
    """The report's noise rule: an image counts as suspected noise when ``w_i <= threshold``.

    With ``threshold = 0`` that is exactly the images eq. 6 gives weight 0 (distance to their
    class prototype >= alpha). A NaN weight (never scored) counts as low.
    """
    w = np.asarray(weight, dtype=np.float64)
    return ~(w > threshold)


def otsu_threshold(weight: np.ndarray, bins: int = 256) -> float:
    """The weight that best splits the weights into a low and a high group (Otsu's method: the
    cut of a ``bins``-bin histogram over [0, max w] with the largest between-group variance; the
    first such cut on ties). Returns the cut's upper bin edge: the low group is ``w <= t``.
    0.0 when every weight is equal (nothing to split)."""
    w = np.asarray(weight, dtype=np.float64)
    w = w[~np.isnan(w)]
    if len(w) == 0 or w.max() <= w.min():
        return 0.0
    top = float(w.max())
    counts = np.bincount(np.clip((w / top * bins).astype(np.int64), 0, bins - 1), minlength=bins).astype(np.float64)
    centers = (np.arange(bins) + 0.5) * top / bins
    n0 = np.cumsum(counts)[:-1]  # rows in the low group for a cut after bin k
    n1 = len(w) - n0
    s0 = np.cumsum(counts * centers)[:-1]
    m0 = s0 / np.maximum(n0, 1)
    m1 = (np.sum(counts * centers) - s0) / np.maximum(n1, 1)
    between = np.where((n0 > 0) & (n1 > 0), n0 * n1 * (m0 - m1) ** 2, -1.0)
    k = int(np.argmax(between))
    return float((k + 1) * top / bins)


def class_noise(
    labels: np.ndarray,
    weight: np.ndarray,
    num_classes: int,
    threshold: float = 0.0,
    clean_labels: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> ClassNoise:
    """Estimated noise rate per class (share of low-weight images) and, given clean labels, the
    true rate beside it.

    Args:
        labels: (N,) noisy labels in 0..C-1.
        weight: (N,) weights w_i (eq. 6).
        num_classes: C.
        threshold: low-weight threshold, see :func:`is_low_weight`.
        clean_labels: (N,) true labels; -1 unknown (left out), -2 open-set (counts as noise).
        rows: optional boolean mask of the rows to count (the train split).
    """
    labels = _check_rows(labels, num_classes, weight, clean_labels, rows)
    keep = np.ones(len(labels), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    lab = labels[keep]
    low = is_low_weight(np.asarray(weight)[keep], threshold)
    n_train = np.bincount(lab, minlength=num_classes)
    n_low = np.bincount(lab, weights=low, minlength=num_classes).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimated = np.where(n_train > 0, n_low / np.maximum(n_train, 1), np.nan)
    if clean_labels is None:
        n_known = n_noisy = n_low_known = n_low_noisy = np.zeros(num_classes, dtype=np.int64)
    else:
        clean = np.asarray(clean_labels, dtype=np.int64)[keep]
        known = clean != UNKNOWN
        noisy = known & (clean != lab)  # an open-set row (-2) never equals its label
        n_known = np.bincount(lab, weights=known, minlength=num_classes).astype(np.int64)
        n_noisy = np.bincount(lab, weights=noisy, minlength=num_classes).astype(np.int64)
        n_low_known = np.bincount(lab, weights=low & known, minlength=num_classes).astype(np.int64)
        n_low_noisy = np.bincount(lab, weights=low & noisy, minlength=num_classes).astype(np.int64)
    true = np.where(n_known > 0, n_noisy / np.maximum(n_known, 1), np.nan)
    return ClassNoise(n_train, n_low, estimated, n_known, n_noisy, true, n_low_known, n_low_noisy)


def rule_quality(noise: ClassNoise) -> tuple[float, float] | None:
    """(precision, recall) of the low-weight rule as a detector of the truly mislabeled images,
    over the rows with a known clean label; None when no clean label is known."""
    known, noisy, low = int(noise.n_known.sum()), int(noise.n_noisy.sum()), int(noise.n_low_known.sum())
    if known == 0:
        return None
    hit = int(noise.n_low_noisy.sum())
    return (hit / low if low else float("nan")), (hit / noisy if noisy else float("nan"))


def overall_rates(noise: ClassNoise) -> tuple[float, float | None]:
    """(estimated, true) noise rate over all classes together; true is None when unknown."""
    n = int(noise.n_train.sum())
    est = float(noise.n_low.sum() / n) if n else float("nan")
    known = int(noise.n_known.sum())
    return est, (float(noise.n_noisy.sum() / known) if known else None)


def noise_order(noise: ClassNoise) -> np.ndarray:
    """Class indices by decreasing estimated noise rate (ties: more images first, then index);
    empty classes last."""
    est = np.nan_to_num(noise.estimated, nan=-1.0)
    return np.lexsort((np.arange(len(est)), -noise.n_train, -est))


def weight_histogram(
    weight: np.ndarray, bins: int = 40, upper: float | None = None, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of weights on ``bins`` equal bins over [0, upper] (default: the largest weight).

    Returns ``(edges (bins+1,), counts)``: counts is (bins,), or (G, bins) when ``groups`` (N,
    ints 0..G-1, e.g. 0 = clean, 1 = noisy) splits the rows.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    w = np.asarray(weight, dtype=np.float64)
    w = np.where(np.isnan(w), 0.0, w)
    top = float(upper if upper is not None else (w.max() if len(w) else 1.0))
    top = top if top > 0 else 1.0
    edges = np.linspace(0.0, top, bins + 1)
    idx = np.clip(np.floor(w / top * bins).astype(np.int64), 0, bins - 1)
    if groups is None:
        return edges, np.bincount(idx, minlength=bins)
    g = np.asarray(groups, dtype=np.int64)
    if len(g) != len(w):
        raise ValueError(f"groups has {len(g)} rows, weight has {len(w)}")
    ng = int(g.max()) + 1 if len(g) else 1
    return edges, np.bincount(g * bins + idx, minlength=ng * bins).reshape(ng, bins)


def class_quantiles(
    values: np.ndarray, labels: np.ndarray, classes: np.ndarray, qs: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
) -> np.ndarray:
    """(len(classes), len(qs)) quantiles of ``values`` within each listed class (linear
    interpolation, as ``np.quantile``); NaN rows for classes without rows. One sort for all."""
    v = np.asarray(values, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    order = np.lexsort((v, lab))
    sv, sl = v[order], lab[order]
    start = np.searchsorted(sl, classes, side="left")
    stop = np.searchsorted(sl, classes, side="right")
    n = stop - start
    out = np.full((len(classes), len(qs)), np.nan)
    has = n > 0
    for j, q in enumerate(qs):
        pos = q * (n[has] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n[has] - 1)
        frac = pos - lo
        s = start[has]
        out[has, j] = sv[s + lo] * (1 - frac) + sv[s + hi] * frac
    return out


def nearest_classes(S: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other classes of each class in a relation graph (e.g. S_t, eq. 3).

    Returns ``(index (C, k'), similarity (C, k'))`` with k' = min(k, C-1), most similar first;
    ties go to the lower class index. The class itself is never its own neighbour.
    """
    S = np.asarray(S)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"relation graph must be C x C, got shape {S.shape}")
    c = S.shape[0]
    k = max(0, min(k, c - 1))
    if k == 0:
        return np.zeros((c, 0), dtype=np.int64), np.zeros((c, 0))
    s = np.array(S, dtype=np.float32)  # a copy; float32 keeps C = 5,000 at 100 MB
    s[np.isnan(s)] = -np.inf
    s[np.arange(c), np.arange(c)] = -np.inf
    # stable descending sort per row: sort ascending on -s, ties keep index order
    if c > 4 * k + 16:
        # partition first: the k-th largest value, then every column >= it (ties included)
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
        cand = s >= kth
        cand[np.arange(c), np.arange(c)] = False
        # rows hold at least k candidates; sort only candidates by (value desc, index asc)
        r, col = np.nonzero(cand)
        order = np.lexsort((col, -s[r, col], r))
        r, col = r[order], col[order]
        first = np.searchsorted(r, np.arange(c))
        rank = np.arange(len(r)) - first[r]
        take = rank < k
        idx = np.zeros((c, k), dtype=np.int64)
        idx[r[take], rank[take]] = col[take]
    else:
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(S, idx, axis=1)


def focus_classes(order: np.ndarray, neighbours: np.ndarray, limit: int = 60) -> np.ndarray:
    """Classes for a readable heat map of a large graph: the noisiest classes (``order``, most
    noisy first) each followed by its nearest neighbours, without repeats, at most ``limit``."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    seen: dict[int, None] = {}
    for c in np.asarray(order)[:limit]:
        for x in (int(c), *(int(n) for n in neighbours[c])):
            if len(seen) >= limit:
                break
            seen.setdefault(x, None)
        if len(seen) >= limit:
            break
    return np.asarray(list(seen), dtype=np.int64)


def extremes_per_class(
    labels: np.ndarray,
    primary: np.ndarray,
    classes: np.ndarray,
    k: int,
    secondary: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> list[np.ndarray]:
    """For each listed class, the row indices of its ``k`` rows with the smallest ``primary``
    (ties: smallest ``secondary``, then lowest row index), in that order.

    Most suspect images: ``primary = weight``, ``secondary = -distance`` (lowest weight, and
    among weight 0 the farthest from the prototype first). Most typical:
    ``primary = distance``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    lab = np.asarray(labels, dtype=np.int64)
    p = np.nan_to_num(np.asarray(primary, dtype=np.float64), nan=np.inf)
    s = np.zeros(len(lab)) if secondary is None else np.nan_to_num(np.asarray(secondary, np.float64), nan=np.inf)
    cand = np.arange(len(lab)) if rows is None else np.flatnonzero(np.asarray(rows, dtype=bool))
    order = cand[np.lexsort((cand, s[cand], p[cand], lab[cand]))]
    sl = lab[order]
    out = []
    for c in np.asarray(classes, dtype=np.int64):
        a = np.searchsorted(sl, c, side="left")
        b = np.searchsorted(sl, c, side="right")
        out.append(order[a : min(b, a + k)])
    return out


def flagged_per_class(labels: np.ndarray, flagged: np.ndarray, num_classes: int,
                      rows: np.ndarray | None = None) -> np.ndarray:
    """(C,) number of flagged rows (``flagged`` 0/1, score-noise's is-label-issue column) per
    given label, over ``rows`` (a boolean mask, e.g. the train split) or every row."""
    labels = _check_rows(labels, num_classes, flagged, rows)
    keep = np.ones(len(labels), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    hit = keep & (np.asarray(flagged) != 0)
    return np.bincount(labels[hit], minlength=num_classes).astype(np.int64)


def worst_rows(weight: np.ndarray, distance: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` most suspect rows among ``rows`` (a boolean mask; default every row):
    lowest weight first, among equal weights the farthest from its class prototype, then the
    lowest row index. NaN weights (never scored) come last."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    w = np.nan_to_num(np.asarray(weight, dtype=np.float64), nan=np.inf)
    d = np.nan_to_num(np.asarray(distance, dtype=np.float64), nan=-np.inf)
    if len(d) != len(w):
        raise ValueError(f"distance has {len(d)} rows, weight has {len(w)}")
    cand = np.arange(len(w)) if rows is None else np.flatnonzero(np.asarray(rows, dtype=bool))
    order = cand[np.lexsort((cand, -d[cand], w[cand]))]
    return order[:k]
