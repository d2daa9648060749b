"""Stage: what ``sinet report`` and ``sinet summary`` show, computed from the scores of one dataset.

The numbers, over numpy arrays: per-class estimated and true noise rates, weight histograms and
per-class weight quantiles, the nearest classes in a class relation graph, the classes a page
shows in detail, and per class the rows to show as most suspect (lowest weight w_i of eq. 6) and
most typical (smallest distance to the class prototype); vectorized over N rows and C classes
(one sort, no Python loop over rows) so a page of millions of images and thousands of classes
needs no per-row work. Then the page itself (:func:`build_report`): its plots (matplotlib, Agg)
and thumbnails as PNG bytes and its content as plain dataclasses, which
``sinet_cli.report_html`` renders (escaping every string). No HDF5: the command reads the
artifacts into :class:`ReportData`.
"""

from __future__ import annotations

import io
import math
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

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


# -- the page: its configuration, its content and the one run function -------------------------
#
# build_report turns the arrays read from the artifacts into the content of one page: the rows of
# the class index, the image sections, the top suspects, the plots (matplotlib, Agg) as PNG bytes,
# the summary, rule and notes. sinet_cli.report_html renders it, escaping every string: ids,
# class names, paths and side text come from a crawl and must not inject markup.

HEATMAP_LABELED = 60  # at most this many classes per heat map: with names on both axes
BOX_CLASSES = 40  # classes in the per-class weight box plot and the noise-rate bars
PLOTS = ("noise-rate.png", "weights.png", "weights-by-class.png", "S_t.png", "S_w.png", "S_l.png")
NO_ESTIMATE = "no noise estimate in scores.h5 (rerun score-noise)"


def pct(x: float | None) -> str:
    """A rate as ``12.3%``; ``–`` when unknown."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x9b[0-?]*[ -/]*[@-~]")  # terminal escape sequences (CSI, OSC, 8-bit CSI)


def plain(text: object, limit: int | None = None) -> str:
    """A string from a crawl as one plain line: ANSI escape sequences dropped, other control
    characters become spaces, runs of spaces one, ``limit`` cuts it with an ellipsis. (The page
    escapes it for HTML; this keeps a title attribute to one readable line.)"""
    s = _ANSI.sub("", str(text))
    s = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in s)
    s = " ".join(s.split())
    if limit is not None and len(s) > limit:
        s = s[: max(0, limit - 1)] + "…"
    return s


def parse_low_weight(text: str | float) -> str | float:
    """``auto`` | a number >= 0 | ``qP`` with 0 <= P <= 1 -> "auto", a float, or "qP" normalized.

    Raises:
        ValueError: anything else.
    """
    s = str(text).strip().lower()
    if s == "auto":
        return "auto"
    try:
        if s.startswith("q"):
            p = float(s[1:])
            if not 0 <= p <= 1:
                raise ValueError
            return f"q{p:g}"
        v = float(s)
        if not v >= 0:
            raise ValueError
        return v
    except ValueError:
        raise ValueError(f"--low-weight {text!r}: expected auto, a weight >= 0 (e.g. 0.1) or qP with 0 <= P <= 1 "
                         "(e.g. q0.2)") from None


def resolve_low_weight(rule: str | float, w_train: np.ndarray) -> tuple[float, str]:
    """The numeric threshold T of a :func:`parse_low_weight` rule and the words the page states it with."""
    if rule == "auto":
        return otsu_threshold(w_train), "T from Otsu's method: the cut that best separates the training " \
            "weights into a low and a high group; --low-weight sets another rule"
    if isinstance(rule, str):
        p = float(rule[1:])
        w = w_train[~np.isnan(w_train)]
        return (float(np.quantile(w, p)) if len(w) else 0.0), f"T = the {p:g} quantile of the training weights"
    if rule == 0:
        return 0.0, "weight 0: the distance to the class prototype is at least alpha of eq. 6"
    return float(rule), "T set with --low-weight"


@dataclass(frozen=True)
class ReportConfig:
    """What one report page shows. ``asdict`` of it is the page's provenance params."""

    low_weight: str | float = "auto"  # which weights count as low: auto (Otsu), a number T, or qP
    max_classes: int = 50  # classes shown with images, the noisiest ones
    per_class: int = 8  # suspect and typical images per class
    thumb_size: int = 48  # pixels
    top_suspects: int = 50  # rows of the top-suspects table

    def __post_init__(self) -> None:
        object.__setattr__(self, "low_weight", parse_low_weight(self.low_weight))
        if self.max_classes < 0 or self.per_class < 0 or self.top_suspects < 0:
            raise ValueError("--max-classes, --per-class and --top-suspects must be >= 0")
        if not 8 <= self.thumb_size <= 256:
            raise ValueError(f"--thumb-size {self.thumb_size}: choose 8..256 pixels")

    def params(self) -> dict[str, Any]:
        return asdict(self)


# the page's content (sinet_cli.report_html renders it; every string is escaped there)


@dataclass
class Thumb:
    png: bytes
    caption: str
    title: str
    status: str = ""  # "noisy" / "clean" (true label known) or ""
    sub: str = ""  # a second caption line


@dataclass
class ClassRow:
    index: int
    name: str
    n_train: int
    n_low: int
    estimated: float
    true: float | None
    nearest: list[tuple[str, float]]
    detailed: bool = False
    n_flagged: int | None = None  # flagged training images (scores.h5 `flagged`), None when not recorded
    resolution: dict[str, str] | None = None  # graph.h5 `name_resolution` entry of the class


@dataclass
class Suspect:
    """One row of the top-suspects table; every string comes from the crawl and is escaped."""

    png: bytes
    id: str
    label: str
    suggested: str
    confidence: float | None
    weight: float
    text: str  # the image's side text (features.h5 side_text), "" when none
    readable: bool = True


@dataclass
class ClassSection:
    index: int
    name: str
    row: ClassRow
    suspects: list[Thumb]
    typical: list[Thumb]


@dataclass
class Page:
    title: str
    summary: list[tuple[str, str]]
    rule: str
    thumb_size: int
    plots: dict[str, tuple[bytes, str]]  # file name -> (png, caption)
    rows: list[ClassRow]
    sections: list[ClassSection]
    heatmap_note: str
    heatmaps_in_a_row: bool = False  # small heat maps: three side by side, scaled to fit
    metrics: list[dict[str, Any]] = field(default_factory=list)
    detection: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    has_truth: bool = False
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # what the page cannot say, and why
    suspects: list[Suspect] = field(default_factory=list)
    suspects_note: str = ""
    resolution: list[dict[str, str]] = field(default_factory=list)  # per class, in class order
    side_text: bool = False  # the dataset has side text: a column of the suspects table


@dataclass
class ReportData:
    """What a page is made from, read from the artifacts (one entry per scored row unless said)."""

    title: str  # the artifact folder's name
    names: np.ndarray  # C class names
    ids: np.ndarray
    labels: np.ndarray  # int64
    weight: np.ndarray  # float64, eq. 6 (or the fused score)
    distance: np.ndarray  # float64
    nearest: np.ndarray  # int64, nearest prototype's class
    S: dict[str, np.ndarray]  # S_t, S_w, S_l
    splits: np.ndarray | None = None
    clean: np.ndarray | None = None  # int64, UNKNOWN / OUTSIDE; None when no train row has one
    paths: np.ndarray | None = None  # image files (None: no paths)
    demo: tuple[np.ndarray, np.ndarray] | None = None  # (ids, pixels) of an embedded demo
    estimate: dict[str, Any] | None = None  # scores.h5 noise_estimate
    class_noise: np.ndarray | None = None  # scores.h5 class_noise (C,)
    flagged: np.ndarray | None = None
    suggested: np.ndarray | None = None
    confidence: np.ndarray | None = None
    side_text: np.ndarray | None = None
    resolution: list[dict[str, str]] | None = None  # graph.h5 name_resolution per class
    detection: dict[str, Any] = field(default_factory=dict)  # scores.h5 detection
    runs: list[dict[str, Any]] = field(default_factory=list)  # metrics.json runs, A/B/C/oracle order
    skipped: str | None = None  # why train skipped runs
    provenance: list[dict[str, Any]] = field(default_factory=list)
    resolution_line: str = ""  # how the class names were resolved, one line


@dataclass
class ReportResult:
    page: Page
    classes_tsv: str
    threshold: float
    estimated: float  # overall estimated noise
    true: float | None  # overall true noise (clean labels known)


def _fig_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def plot_noise_rates(noise: ClassNoise, order: np.ndarray, names: np.ndarray, has_truth: bool,
                     estimate_label: str = "estimated (low weight)") -> bytes:
    """PNG: the noisiest classes' estimated (and true) noise rates, beside every class's."""
    import matplotlib.pyplot as plt

    top = order[: min(BOX_CLASSES, len(order))]
    wide = len(names) > len(top)
    fig, axes = plt.subplots(1, 2 if wide or has_truth else 1, figsize=(11 if (wide or has_truth) else 6,
                                                                         max(3.0, 0.2 * len(top) + 1.2)),
                             squeeze=False)
    ax = axes[0, 0]
    y = np.arange(len(top))[::-1]
    ax.barh(y, 100 * np.nan_to_num(noise.estimated[top]), color="#4c72b0", height=0.7, label=estimate_label)
    if has_truth:
        ax.plot(100 * noise.true[top], y, "o", color="#d62728", ms=4, label="true (clean labels)")
    ax.set_yticks(y, [_short(str(names[c])) for c in top], fontsize=8)
    ax.set_xlabel("noise rate (%)")
    ax.set_title(f"{'the ' + str(len(top)) + ' noisiest' if wide else 'all'} classes", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 100)
    if wide or has_truth:
        ax2 = axes[0, 1]
        if has_truth:
            known = ~np.isnan(noise.true) & ~np.isnan(noise.estimated)
            ax2.scatter(100 * noise.true[known], 100 * noise.estimated[known], s=8 if known.sum() > 200 else 18,
                        alpha=0.6, color="#4c72b0")
            ax2.plot([0, 100], [0, 100], "--", color="#999", lw=1)
            ax2.set_xlabel("true noise rate (%)")
            ax2.set_ylabel("estimated noise rate (%)")
            ax2.set_title(f"every class ({int(known.sum())})", fontsize=10)
            ax2.set_xlim(0, 100)
            ax2.set_ylim(0, 100)
        else:
            est = noise.estimated[~np.isnan(noise.estimated)]
            ax2.hist(100 * est, bins=20, range=(0, 100), color="#4c72b0")
            ax2.set_xlabel("estimated noise rate (%)")
            ax2.set_ylabel("classes")
            ax2.set_title(f"every class ({len(est)})", fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def plot_weights(weight: np.ndarray, noisy: np.ndarray | None, threshold: float) -> bytes:
    """PNG: the histogram of the weights, split by the truth when ``noisy`` is known."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    upper = float(np.nanmax(weight)) if len(weight) else 1.0
    if noisy is not None:
        edges, counts = weight_histogram(weight, 40, upper, groups=noisy.astype(np.int64))
        counts = np.vstack([counts, np.zeros((2 - len(counts), counts.shape[1]), dtype=counts.dtype)])
        width = np.diff(edges)
        ax.bar(edges[:-1], counts[0], width, align="edge", color="#2ca02c", alpha=0.8, label="correctly labeled")
        ax.bar(edges[:-1], counts[1], width, bottom=counts[0], align="edge", color="#d62728", alpha=0.8,
               label="mislabeled")
        ax.legend(fontsize=8)
    else:
        edges, counts = weight_histogram(weight, 40, upper)
        ax.bar(edges[:-1], counts, np.diff(edges), align="edge", color="#4c72b0")
    if threshold > 0:
        ax.axvline(threshold, color="#333", ls="--", lw=1)
    n0 = int(np.sum(~(np.asarray(weight) > 0)))
    ax.set_title(f"weights of {len(weight)} training images ({n0} with w = 0)", fontsize=10)
    ax.set_xlabel("weight w (scores.h5)")
    ax.set_ylabel("images")
    fig.tight_layout()
    return _fig_png(fig)


def plot_weights_by_class(weight: np.ndarray, labels: np.ndarray, classes: np.ndarray, names: np.ndarray,
                          threshold: float) -> bytes:
    """PNG: per class a box of its weights (quartiles, 5th-95th percentile whiskers)."""
    import matplotlib.pyplot as plt

    q = class_quantiles(weight, labels, classes)
    stats = [{"whislo": r[0], "q1": r[1], "med": r[2], "q3": r[3], "whishi": r[4], "label": _short(str(names[c]))}
             for c, r in zip(classes, q) if not np.isnan(r).any()][::-1]
    fig, ax = plt.subplots(figsize=(5.4, max(3.0, 0.2 * len(stats) + 1.2)))
    if stats:
        ax.bxp(stats, orientation="horizontal", showfliers=False, widths=0.6, patch_artist=True,
               boxprops={"facecolor": "#c6d4e8"}, medianprops={"color": "#d62728"})
        ax.tick_params(axis="y", labelsize=8)
    if threshold > 0:
        ax.axvline(threshold, color="#333", ls="--", lw=1)
    ax.set_xlabel("weight w (box: quartiles, whiskers: 5th-95th percentile)")
    ax.set_title(f"weights per class ({'the ' + str(len(stats)) + ' noisiest' if len(names) > len(stats) else 'all'})",
                 fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def plot_heatmap(S: np.ndarray, subset: np.ndarray, names: np.ndarray, title: str) -> bytes:
    """PNG: the heat map of ``S`` over the classes ``subset``."""
    import matplotlib.pyplot as plt

    M = np.asarray(S, dtype=np.float32)[np.ix_(subset, subset)]
    n = len(subset)
    side = min(11.0, max(3.0, 0.17 * n + 1.6))
    fig, ax = plt.subplots(figsize=(side + 0.6, side))
    im = ax.imshow(M, cmap="viridis", interpolation="nearest")
    labels = [_short(str(names[c]), 18) for c in subset]
    fs = 8 if n <= 25 else 6
    ax.set_xticks(np.arange(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(n), labels, fontsize=fs)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _fig_png(fig)  # bbox_inches="tight" fits the labels: no tight_layout pass over 120 labels


# -- thumbnails ---------------------------------------------------------------------------------


def png_bytes(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def placeholder(size: int) -> bytes:
    """A grey square with a cross: an image that could not be read."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 225)
    d = ImageDraw.Draw(img)
    d.line((6, 6, size - 7, size - 7), fill=150, width=2)
    d.line((6, size - 7, size - 7, 6), fill=150, width=2)
    return png_bytes(img)


def thumbnail_from_pixels(pixels: np.ndarray, size: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    return png_bytes(img.resize((size, size), Image.Resampling.BICUBIC))


def thumbnail_from_path(path: str, size: int) -> bytes | None:
    """Open and downscale an image file; None when it cannot be read (never fatal)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():  # PIL warns above its limit, and still decodes: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:  # refused from the header, as extract-features does
                return None
            img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
            img = ImageOps.exif_transpose(img)
            img = img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            if img.mode == "RGB":  # 256-colour palette: a third of the bytes, invisible at thumbnail size
                img = img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
            return png_bytes(img)
    except Exception:  # missing, truncated, not an image, decompression bomb: all only a placeholder
        return None


class ThumbSource:
    """Thumbnails of rows by path (datasets of image files) or by id (the embedded demos)."""

    def __init__(self, size: int, paths: np.ndarray | None, demo: Any = None):
        self.size = size
        self.paths = paths
        self.demo = demo  # (ids, pixels) of the embedded demo, or None
        self._placeholder: bytes | None = None
        self.missing = 0

    def placeholder(self) -> bytes:
        if self._placeholder is None:
            self._placeholder = placeholder(self.size)
        return self._placeholder

    def get(self, rows: np.ndarray, ids: np.ndarray) -> list[tuple[bytes, bool]]:
        """(png, ok) per row."""
        out: list[tuple[bytes, bool]] = []
        demo_pos = find_rows(self.demo[0], ids) if self.demo is not None else None
        for k, r in enumerate(rows):
            png = None
            if self.paths is not None and self.paths[r]:
                png = thumbnail_from_path(str(self.paths[r]), self.size)
            elif demo_pos is not None and demo_pos[k] >= 0:
                png = thumbnail_from_pixels(self.demo[1][demo_pos[k]], self.size)
            if png is None:
                self.missing += 1
            out.append((png or self.placeholder(), png is not None))
        return out


# -- the per-class table ------------------------------------------------------------------------


def classes_tsv(names: np.ndarray, noise: ClassNoise, order: np.ndarray, near_idx: np.ndarray,
                flagged: np.ndarray | None = None, resolution: list[dict[str, str]] | None = None) -> str:
    """The per-class numbers as TSV; ``flagged``, ``synset`` and ``name_source`` are empty when
    scores.h5 / graph.h5 do not record them."""
    def clean(s: str) -> str:
        return str(s).replace("\t", " ").replace("\n", " ").replace("\r", " ")

    lines = ["class\ttrain_images\tlow_weight\testimated_noise\ttrue_noise\tnearest_classes\tflagged\tsynset\t"
             "name_source"]
    for c in order:
        true = "" if np.isnan(noise.true[c]) else f"{noise.true[c]:.4f}"
        est = "" if np.isnan(noise.estimated[c]) else f"{noise.estimated[c]:.4f}"
        res = resolution[c] if resolution is not None else {}
        lines.append(f"{clean(names[c])}\t{noise.n_train[c]}\t{noise.n_low[c]}\t{est}\t{true}\t"
                     + ",".join(clean(names[n]) for n in near_idx[c])
                     + f"\t{'' if flagged is None else flagged[c]}\t{clean(res.get('synset', ''))}\t"
                       f"{clean(res.get('source', ''))}")
    return "\n".join(lines) + "\n"


# -- the run function ---------------------------------------------------------------------------


def build_report(config: ReportConfig, data: ReportData) -> ReportResult:
    """The content of one report page: per-class noise (estimated, and true where clean labels are
    known), the image sections of the noisiest classes, the top suspects, the plots and the
    per-class TSV.

    Args:
        config: what the page shows.
        data: the arrays and records read from the artifacts.

    Returns:
        The page (rendered by ``sinet_cli.report_html``), classes.tsv and the overall rates.
    """
    import matplotlib

    matplotlib.use("Agg")
    names, ids, labels, weight, distance = data.names, data.ids, data.labels, data.weight, data.distance
    C = len(names)
    train = (data.splits == "train") if data.splits is not None else np.ones(len(ids), dtype=bool)
    clean, flagged, confidence, side_text = data.clean, data.flagged, data.confidence, data.side_text
    estimate, class_est = data.estimate, data.class_noise
    has_truth = clean is not None
    suggest = data.suggested if data.suggested is not None else data.nearest

    threshold, rule_text = resolve_low_weight(config.low_weight, weight[train])
    noise = class_noise(labels, weight, C, threshold, clean, train)
    est_all, true_all = overall_rates(noise)
    if class_est is not None:  # the per-class rates shown are the calibrated ones
        noise = replace(noise, estimated=np.where(noise.n_train > 0, class_est, np.nan))
        n = noise.n_train
        known = ~np.isnan(noise.estimated)
        est_all = float((noise.estimated[known] * n[known]).sum() / n[known].sum()) if n[known].sum() else est_all
    if estimate is not None:
        est_all = float(estimate["overall"])
    flagged_counts = None if flagged is None else flagged_per_class(labels, flagged, C, train)
    order = noise_order(noise)
    order = order[noise.n_train[order] > 0] if (noise.n_train > 0).any() else order
    near_idx, near_sim = nearest_classes(data.S["S_t"], 3)

    # thumbnails: image files when the rows have paths, else the embedded demo's pixels
    thumbs = ThumbSource(config.thumb_size, data.paths, data.demo)
    detailed = order[:config.max_classes]
    suspect_rows = extremes_per_class(labels, weight, detailed, config.per_class, secondary=-distance, rows=train)
    typical_rows = extremes_per_class(labels, distance, detailed, config.per_class, rows=train)

    def suggestion(r: int, long: bool = False, bare: bool = False) -> str:
        s = int(suggest[r])
        name = str(names[s]) if 0 <= s < C else "none"
        if confidence is None or bare:
            return name
        return f"{name} ({confidence[r]:.0%}{' confidence' if long else ''})"

    def thumb_list(rows: np.ndarray, kind: str) -> list[Thumb]:
        out = []
        for r, (png, ok) in zip(rows, thumbs.get(rows, ids[rows])):
            status = ""
            truth = ""
            if has_truth and clean[r] != UNKNOWN:
                status = "noisy" if clean[r] != labels[r] else "clean"
                truth = "; true: " + (str(names[clean[r]]) if 0 <= clean[r] < C else "none (open-set)")
            if kind == "suspect":
                caption = f"→{suggestion(r)}"
                sub = f"w {weight[r]:.2f}" + (" ⚑" if flagged is not None and flagged[r] else "")
            else:
                caption, sub = f"d {distance[r]:.2f}", ""
            text = f"; text: {plain(side_text[r], 200)}" if side_text is not None and side_text[r] else ""
            title = (f"{ids[r]}: label {names[labels[r]]}, suggested {suggestion(r, True)}, "
                     f"w {weight[r]:.3f}, d {distance[r]:.3f}{truth}{text}{'' if ok else ' (image unreadable)'}")
            out.append(Thumb(png, caption, title, status, sub))
        return out

    shown = set(int(c) for c in detailed)
    full_order = noise_order(noise)
    rows = [ClassRow(
        index=int(c), name=str(names[c]), n_train=int(noise.n_train[c]), n_low=int(noise.n_low[c]),
        estimated=float(noise.estimated[c]), true=None if np.isnan(noise.true[c]) else float(noise.true[c]),
        nearest=[(str(names[n]), float(s)) for n, s in zip(near_idx[c], near_sim[c])], detailed=int(c) in shown,
        n_flagged=None if flagged_counts is None else int(flagged_counts[c]),
        resolution=None if data.resolution is None else data.resolution[c]) for c in full_order]
    by_class = {r.index: r for r in rows}
    sections = [ClassSection(int(c), str(names[c]), by_class[int(c)], thumb_list(s, "suspect"),
                             thumb_list(t, "typical"))
                for c, s, t in zip(detailed, suspect_rows, typical_rows)]

    plots, heat_note, subset = _plots(noise, order, near_idx, data, train, threshold, class_est is not None)
    rule = _rule_text(noise, estimate, class_est, threshold, rule_text, has_truth)
    metrics = [m for m in data.runs if not m.get("skipped")]
    summary = [("artifacts", data.title), ("classes", str(C)),
               ("training images", f"{int(noise.n_train.sum())} scored"),
               ("estimated noise (all classes)", pct(est_all)
                + ("" if estimate is None else f" ({plain(estimate.get('method', '?'), 80)})"))]
    if flagged is not None:
        summary.append(("flagged (suspected mislabeled)",
                        f"{int((train & (flagged != 0)).sum())} of {int(train.sum())} training images"))
    if has_truth:
        summary.append(("true noise (all classes)", pct(true_all)))
    if data.resolution is not None:
        summary.append(("class names", data.resolution_line))
    # what this page cannot say, and why
    unknown = []
    if estimate is None and class_est is None:
        unknown.append(f"{NO_ESTIMATE[0].upper()}{NO_ESTIMATE[1:]}: the estimated rates here are the share of "
                       "low-weight images.")
    if not has_truth:
        unknown.append("No clean labels: no ROC-AUC/AP of the detection against the truth, no true noise rate.")
    if data.skipped:
        unknown.append(data.skipped[0].upper() + data.skipped[1:] + ".")
    elif not metrics:
        unknown.append("No accuracy: no model was trained and evaluated (metrics.json has no evaluated run).")
    pool = train & (flagged != 0) if flagged is not None else train
    top_rows = worst_rows(weight, distance, config.top_suspects, pool)
    suspects = [Suspect(png, str(ids[r]), str(names[labels[r]]), suggestion(r, bare=True),
                        None if confidence is None else float(confidence[r]), float(weight[r]),
                        "" if side_text is None else str(side_text[r]), ok)
                for r, (png, ok) in zip(top_rows, thumbs.get(top_rows, ids[top_rows]))]
    suspects_note = (f"The {len(top_rows)} most suspect of the {int(pool.sum())} flagged training images "
                     "(score-noise's is-label-issue flag; all of them in suspects.tsv), lowest weight first."
                     if flagged is not None else
                     f"The {len(top_rows)} lowest-weight training images (scores.h5 has no flagged column: "
                     "rerun score-noise).")
    suspects_note += (" Suggested: score-noise's suggested class and its confidence." if data.suggested is not None
                      else " Suggested: the class of the nearest prototype.")
    notes = []
    if data.splits is None:
        notes.append("No split information (no splits in scores.h5 or features.h5): every scored image is "
                     "counted as a training image.")
    if thumbs.missing:
        notes.append(f"{thumbs.missing} thumbnail(s) could not be read and show a crossed placeholder.")
    if data.paths is None and data.demo is None:
        notes.append("No image source (no paths and not an embedded demo): thumbnails are placeholders.")
    page = Page(
        title=f"sinet report: {data.title}", summary=summary, rule=rule, thumb_size=config.thumb_size, plots=plots,
        rows=rows, sections=sections, heatmap_note=heat_note, heatmaps_in_a_row=len(subset) <= 25, metrics=metrics,
        detection={k: v for k, v in data.detection.items() if isinstance(v, dict)}, provenance=data.provenance,
        has_truth=has_truth, notes=notes, unknown=unknown, suspects=suspects, suspects_note=suspects_note,
        resolution=data.resolution or [], side_text=side_text is not None)
    tsv = classes_tsv(names, noise, full_order, near_idx, flagged_counts, data.resolution)
    return ReportResult(page, tsv, threshold, est_all, true_all)


def _plots(noise: ClassNoise, order: np.ndarray, near_idx: np.ndarray, data: ReportData, train: np.ndarray,
           threshold: float, calibrated: bool) -> tuple[dict[str, tuple[bytes, str]], str, np.ndarray]:
    """The page's plots (file name -> (png, caption)), the heat maps' note and their classes."""
    names, C = data.names, len(data.names)
    has_truth = data.clean is not None
    w_train, l_train = data.weight[train], data.labels[train]
    noisy_train = None
    if has_truth:
        c_tr = data.clean[train]
        known = c_tr != UNKNOWN
        noisy_train = (c_tr != l_train)[known]
        w_hist = w_train[known]
    else:
        w_hist = w_train
    if C <= HEATMAP_LABELED:
        subset = np.arange(C)
        heat_note = f"All {C} classes, names on both axes."
    else:
        subset = focus_classes(order, near_idx, HEATMAP_LABELED)
        heat_note = (f"{C} classes are too many to read: the heat maps show {len(subset)} of them, the noisiest "
                     "classes each followed by its nearest classes (S_t).")
    plots = {
        "noise-rate.png": (plot_noise_rates(noise, order, names, has_truth,
                                            "estimated" if calibrated else "estimated (low weight)"),
                           "Estimated noise rate per class" + (" beside the true rate" if has_truth else "")),
        "weights.png": (plot_weights(w_hist, noisy_train, threshold),
                        "Distribution of the weights of the training images"
                        + (" (with a known clean label), split by the truth" if has_truth else "")),
        "weights-by-class.png": (plot_weights_by_class(w_train, l_train, order[:BOX_CLASSES], names, threshold),
                                 "Weights per class, noisiest first"),
    }
    for k, desc in (("S_t", "S_t = S_l + S_w (eq. 3)"), ("S_w", "S_w: hierarchy"), ("S_l", "S_l: label text (eq. 2)")):
        plots[f"{k}.png"] = (plot_heatmap(data.S[k], subset, names, desc), f"Class relation graph {desc}")
    return plots, heat_note, subset


def _rule_text(noise: ClassNoise, estimate: dict[str, Any] | None, class_est: np.ndarray | None, threshold: float,
               rule_text: str, has_truth: bool) -> str:
    """How the page's noise rates are defined, in words."""
    quality = rule_quality(noise)
    if class_est is not None or estimate is not None:
        method = str((estimate or {}).get("method", "score-noise's estimate"))
        rows_est = (estimate or {}).get("rows")
        lead = (f"Estimated noise rate = {method} (scores.h5 "
                f"{' and '.join(n for n, x in (('noise_estimate', estimate), ('class_noise', class_est)) if x is not None)}"
                f"{f', over {rows_est} training images' if isinstance(rows_est, int) else ''})"
                + ("" if class_est is not None else "; per class: the share of its training images with a low "
                   "weight") + ". Low weight: w ≤ ")
    else:
        lead = "Estimated noise rate of a class = share of its training images with a low weight: w ≤ "
    return (f"{lead}{threshold:.4g} ({rule_text})."
            + (f" On the images with a known clean label, {pct(quality[0])} of the low-weight images are "
               f"mislabeled and they hold {pct(quality[1])} of the mislabeled ones." if quality else "")
            + (" True noise rate = share of its training images (with a known clean label) whose clean "
               "label differs from the given one; open-set images count as noise." if has_truth else ""))


# -- the numbers of ``sinet summary`` -----------------------------------------------------------


def noisiest_classes(labels: np.ndarray, train: np.ndarray, num_classes: int, flagged: np.ndarray | None = None,
                     class_noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Classes noisiest first: by ``class_noise`` (score-noise's estimate), else by the flagged
    share of their training images; ties by more training images, then by index.

    Returns:
        (class order, training images per class, flagged training images per class or None).
    """
    C = num_classes
    n_train = np.bincount(labels[train], minlength=C)
    flagged_counts = None if flagged is None else flagged_per_class(labels, flagged, C, train)
    key = class_noise if class_noise is not None else (
        flagged_counts / np.maximum(n_train, 1) if flagged_counts is not None else np.zeros(C))
    order = np.lexsort((np.arange(C), -n_train, -np.nan_to_num(key, nan=-1.0)))
    return order, n_train, flagged_counts


@dataclass
class Accuracy:
    """The evaluated runs of one model (mode, and what it trained on) over its seeds."""

    model: str
    top1: list[float]  # per seed, percent
    top5: list[float]
    n_train: Any
    seeds: list[Any]
    eval_labels: set[str]  # what the runs were evaluated against (clean_labels, labels)


def accuracies(runs: Mapping[str, Mapping[str, Any]]) -> list[Accuracy]:
    """metrics.json's runs grouped by model, A/B/C/oracle order; runs not evaluated are left out."""
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for entry in runs.values():
        label = entry["mode"] + ("" if entry.get("on", "features") == "features" else f" ({entry['on']})")
        by_mode.setdefault(label, []).append(entry)
    order = {"A": 0, "B": 1, "C": 2, "oracle": 3}
    out = []
    for label in sorted(by_mode, key=lambda m: (order.get(m.split()[0], 9), m)):
        entries = [e for e in by_mode[label] if e.get("top1") is not None]
        if entries:
            out.append(Accuracy(label, [e["top1"] for e in entries], [e["top5"] for e in entries],
                                entries[0].get("n_train", ""), [e.get("seed", "?") for e in entries],
                                {str(e.get("eval_labels", "clean_labels")) for e in entries}))
    return out
