"""Stage: features + class relation graph -> visual prototypes (paper section 3.2, eq. 4-5).

Pure computation over streamed feature blocks. The caller passes a *row source*: a callable that
returns a fresh iterator of ``(start, block)`` pairs covering rows ``0..N-1`` in order, ``block``
a ``(B, D)`` array of L2-normalized features (float16 or float32). Rows whose label is negative
(other splits) are skipped. Every pass over the rows is one streamed read; the hot path (eq. 4)
is one ``B x D`` by ``D x C`` matrix product per block plus O(B x C) in-place work, so memory is
bounded by the block size whatever N is.

Passes:
  1. initial prototypes (one read): from stored classifier probabilities (top-k per class over
     all rows), or from a linear probe (softmax regression) fitted on a seeded subsample of at
     most ``probe_rows`` rows with the noisy labels;
  2. consistency p_i (eq. 4) of every labeled row against the initial prototypes;
  3. prototypes (eq. 5): p-weighted mean of the top-K rows of each class by p_i;
     with ``per_class > 1`` a capped sample of those rows is clustered (weighted k-means) and
     one more pass forms one eq.-5 prototype per cluster.
  ``rounds > 1`` repeats 2-3 with the previous round's class prototypes as initial prototypes.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

RowSource = Callable[[], Iterable[tuple[int, np.ndarray]]]
ProgressFn = Callable[[int], None]

PSI_KINDS = ("softmax", "l2")
WEIGHTINGS = ("consistency", "constant")
INIT_SOURCES = ("auto", "probs", "probe")
PROBE_FIELDS = ("probe_rows", "probe_epochs", "probe_lr", "probe_batch", "probe_scale")
L2_FLOOR = 1e-12  # psi = L2: squared entries are floored here before the log (zero similarities)


@dataclass
class PrototypeConfig:
    """Options of the stage; every field changes the output.

    ``init_topk`` and ``topk`` are a fraction of the class when <= 1, a count of images when > 1.
    """

    init_topk: float = 0.5
    topk: float = 0.5
    psi: str = "softmax"
    temperature: float = 0.1
    gamma: float = 1.0
    eps: float = 1e-3
    weighting: str = "consistency"
    per_class: int = 1
    rounds: int = 1
    probe_rows: int = 5000
    probe_epochs: int = 1
    probe_lr: float = 0.01
    probe_batch: int = 1024
    probe_scale: float = 10.0
    seed: int = 0
    kmeans_iters: int = 20
    kmeans_rows: int = 256  # cap of clustered rows per prototype (per class: per_class * this)
    init_source: str = "auto"  # what ranks the initial top-k: stored probs (auto: when given), or the probe
    prototypes_from: str = "all"  # the subset whose train rows the caller labels (the others get -1)

    def __post_init__(self) -> None:
        self.validate()

    def provenance(self, init_source: str) -> dict:
        """The params an artifact built with this config records: every field, ``init_source`` as
        resolved (``probs`` or ``probe``); the probe's options only when the probe ranked (they do
        not change the output otherwise); ``prototypes_from`` only when not ``all`` (artifacts from
        before that option stay current)."""
        params = dataclasses.asdict(self)
        params["init_source"] = init_source
        if self.prototypes_from == "all":
            del params["prototypes_from"]
        if init_source == "probs":
            for name in PROBE_FIELDS:
                del params[name]
        return params

    def resolve_init_source(self, have_probs: bool) -> str:
        """``probs`` or ``probe``: what ranks the initial top-k given whether probabilities are stored."""
        if self.init_source == "probs" and not have_probs:
            raise ValueError("--init-source probs: no probs are stored (extract with --probs, or use probe)")
        return "probs" if self.init_source == "probs" or (self.init_source == "auto" and have_probs) else "probe"

    def validate(self) -> None:
        if self.init_source not in INIT_SOURCES:
            raise ValueError(f"init_source {self.init_source!r}: choose one of {', '.join(INIT_SOURCES)}")
        if self.psi not in PSI_KINDS:
            raise ValueError(f"psi {self.psi!r}: choose one of {', '.join(PSI_KINDS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        for name in ("init_topk", "topk"):
            k = getattr(self, name)
            if not k > 0 or (k > 1 and k != int(k)):
                raise ValueError(f"{name} {k}: give a fraction in (0, 1] or a whole number of images > 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature}: must be > 0")
        if not self.eps > 0:
            raise ValueError(f"eps {self.eps}: must be > 0 (it keeps eq. 4 finite when KL = 0)")
        if not self.gamma > 0:
            raise ValueError(f"gamma {self.gamma}: must be > 0")
        if self.per_class < 1:
            raise ValueError(f"per_class {self.per_class}: need at least one prototype per class")
        if self.rounds < 1:
            raise ValueError(f"rounds {self.rounds}: need at least one round")
        if self.probe_rows < 1 or self.probe_epochs < 0:
            raise ValueError("probe_rows must be >= 1 and probe_epochs >= 0")


@dataclass
class PrototypeResult:
    prototypes: np.ndarray  # (P, D) float32, L2-normalized, P = C * per_class
    prototype_class: np.ndarray  # (P,) int64
    class_prototypes: np.ndarray  # (C, D) eq. 5 per class (the per_class == 1 prototype)
    initial_prototypes: np.ndarray  # (C, D) initial prototypes of round 1
    consistency: np.ndarray  # (N,) float32 p_i of the last round (NaN for unlabeled rows)
    selected: np.ndarray  # (N,) bool: among the top-K of its class in the last round
    init_source: str  # "probs" or "probe"
    empty_classes: list[int] = field(default_factory=list)
    probe: dict = field(default_factory=dict)  # probe rows, epochs, loss, train accuracy


# -- small helpers ---------------------------------------------------------------------------


SUB_ROWS = 16384  # rows per product at most: few, large ops (each op is a parallel region; on busy cores
# every region waits for a free core, so smaller sub-blocks only add waits; same values either way;
# bench/bench_make_prototypes.py)
SCRATCH_ELEMS = 1 << 24  # but the B x C scratch of eq. 4 stays under 64 MB of float32 for large C


POST_BYTES = 4 << 20  # eq. 4's cross term g_i . U_y runs on row pieces whose float32 gather of U is this size
# (it stays in cache between the ops that read it; each op is still a region large enough for every
# thread; bench/profile_make_prototypes.py times eq. 4's pass).


def _post_rows(dim: int) -> int:
    return max(256, POST_BYTES // (4 * max(dim, 1)))


def _sub_rows(num_classes: int) -> int:
    return max(1024, min(SUB_ROWS, SCRATCH_ELEMS // max(num_classes, 1)))

# softmax psi at T >= FAST_MIN_T: exp(s_v / T) <= e^20 needs no shift, and the float32 cancellation in
# H - cross + lse stays ~1e-6; below it the direct form sum P (log P - log_softmax) is used.
FAST_MIN_T = 0.05


class _Buffer:
    """A reusable float32 buffer: converting float16 blocks into it avoids a fresh allocation
    (and its page faults) per block."""

    def __init__(self, device: str):
        self.device = device
        self.buf: torch.Tensor | None = None

    def __call__(self, block: np.ndarray) -> torch.Tensor:
        b, d = block.shape
        if self.buf is None or self.buf.shape[0] < b or self.buf.shape[1] != d:
            self.buf = torch.empty((b, d), dtype=torch.float32, device=self.device)
        out = self.buf[:b]
        out.copy_(torch.from_numpy(np.ascontiguousarray(block)))
        return out


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    """features.h5 stores unit rows; check a few rows (cheap) and normalize the block only when
    they are not (features from elsewhere)."""
    head = g[:64].norm(dim=1)
    if len(head) and float((head - 1).abs().max()) > 1e-2:
        return _normalize(g)
    return g


def _index_add(sums: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sums[index[i]] += rows[i]`` (the per-class sums of eq. 5), on one thread on the CPU.

    torch runs ``index_add_`` as its expanded-index ``scatter_add_``, which on the CPU sorts the
    index in parallel: on few busy cores that sort waits for free cores and costs more than the
    additions (bench/bench_make_prototypes.py). One thread adds the rows in the same order: the
    same sums, bit for bit.
    """
    threads = torch.get_num_threads()
    if sums.device.type != "cpu" or threads == 1:
        return sums.index_add_(0, index, rows)
    torch.set_num_threads(1)
    try:
        return sums.index_add_(0, index, rows)
    finally:
        torch.set_num_threads(threads)


def _add_weighted_class_sums(sums: torch.Tensor, y: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> None:
    """``sums[c] += sum_{i: y_i = c} w_i rows_i`` (eq. 5's numerator) as one sparse product A @ rows.

    A is the C x B matrix with A[y_i, i] = w_i in CSR form, its rows' entries in row order (a
    stable sort by class), so every class adds its rows in the same order as ``index_add_``. The
    product runs on every thread without the parallel sort that makes ``index_add_`` slow (see
    :func:`_index_add`), so it scales with cores (bench/profile_make_prototypes.py times eq. 5's pass).
    """
    order = torch.argsort(y, stable=True)
    crow = torch.zeros(sums.shape[0] + 1, dtype=torch.int64, device=y.device)
    torch.cumsum(torch.bincount(y, minlength=sums.shape[0]), 0, out=crow[1:])
    with warnings.catch_warnings():  # torch flags sparse CSR as beta at construction
        warnings.simplefilter("ignore", UserWarning)
        A = torch.sparse_csr_tensor(crow, order, w[order].to(rows.dtype), size=(sums.shape[0], len(y)),
                                    check_invariants=False)
        sums.add_(A @ rows)


@contextmanager
def _threads(n: int, device: torch.device | str):
    """Run the block with ``n`` torch threads on the CPU (nothing changes on a GPU).

    Elementwise work on a few MB (the probe's Adam updates, its B x C softmax) is one short
    parallel region per op: with few threads on busy cores each region waits for a free core, so
    the waits outweigh the work split (bench/profile_make_prototypes.py). The values are the same
    bit for bit: these ops compute every element the same way on any number
    of threads (checked against the parallel run for the probe's reductions too)."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SERIAL_SMALL_OPS_MAX_THREADS = 2  # at most this many torch threads: the small ops run on one (see _small_ops)


def _small_ops(device: torch.device | str):
    """The thread count for the stage's small elementwise work (block copies, the probe's Adam
    steps and softmax, eq. 4's per-row terms): one thread when torch has at most
    ``SERIAL_SMALL_OPS_MAX_THREADS``, else all of them.

    With few threads on busy cores each small parallel region waits for a free core (see
    :func:`_threads`); with many cores the work split pays. bench/profile_make_prototypes.py
    (``--all-threads``) compares the two on the machine at hand. The values are the same either way.
    """
    threads = torch.get_num_threads()
    return _threads(1 if threads <= SERIAL_SMALL_OPS_MAX_THREADS else threads, device)


def resolve_k(k: float, counts: np.ndarray) -> np.ndarray:
    """Per-class number of images for a top-k given as a fraction (<= 1) or a count (> 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    if k <= 1:
        ks = np.ceil(k * counts - 1e-9).astype(np.int64)
        return np.where(counts > 0, np.maximum(ks, 1), 0)
    return np.minimum(counts, int(k))


def class_topk(labels: np.ndarray, score: np.ndarray, k_per_class: np.ndarray) -> np.ndarray:
    """Mask of the ``k_per_class[c]`` highest-scoring rows of every class c (labels < 0 ignored).

    Vectorized: one lexsort by (label, -score); the rank inside a class is the position minus the
    class's first position. NaN scores rank last; ties keep row order.
    """
    labels = np.asarray(labels)
    idx = np.flatnonzero(labels >= 0)
    mask = np.zeros(len(labels), dtype=bool)
    if len(idx) == 0:
        return mask
    s = np.asarray(score, dtype=np.float64)[idx]
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((-s, labels[idx]))
    sorted_labels = labels[idx][order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - first
    mask[idx[order[rank < k_per_class[sorted_labels]]]] = True
    return mask


def psi_table(S_t: np.ndarray, psi: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """psi(s_t^c) for every row c of S_t, and its negative entropy H_c = sum_j P_cj log P_cj.

    softmax: P = softmax(S_t / T) per row. l2: P = (s / ||s||_2)^2, a distribution because the
    squares of a unit vector sum to 1 (the sign of negative similarities is lost).
    """
    S = torch.as_tensor(np.asarray(S_t, dtype=np.float32))
    if psi == "softmax":
        logP = torch.log_softmax(S / temperature, dim=1)
    else:
        sq = S.pow(2)
        logP = torch.log((sq / sq.sum(1, keepdim=True).clamp_min(L2_FLOOR)).clamp_min(L2_FLOOR))
    P = logP.exp()
    H = (P * logP).sum(1)
    return P, H


def kl_to_prototypes(
    g: torch.Tensor,
    y: torch.Tensor,
    V0n: torch.Tensor,
    P: torch.Tensor,
    H: torch.Tensor,
    psi: str,
    temperature: float,
    U: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(psi(s_t^{y_i}) || psi(s_v^i)) for a block of unit rows g, s_v^i = cos(g_i, V0) (eq. 4).

    softmax: KL = H_y - sum_c P_yc s_v,c / T + logsumexp_c(s_v,c / T), H_c = sum_j P_cj log P_cj.
    Since s_v = g V0^T, the middle term is g . U_y with U = P V0 / T, so the B x C work is one
    product, one in-place exp and one row sum.
    """
    if psi == "softmax":
        if temperature >= FAST_MIN_T:  # |s_v| <= 1: exp(s_v / T) <= e^20, no shift needed
            if U is None:
                U = (P @ V0n) / temperature
            cross = (g * U.index_select(0, y)).sum(1)  # sum_c P_yc s_v,c / T
            lse = torch.mm(g, (V0n / temperature).t()).exp_().sum(1).log_()
            return H[y] - cross + lse
        logq = torch.log_softmax(g @ V0n.t() / temperature, dim=1)  # direct form: precise at small T
        return H[y] - (P.index_select(0, y) * logq).sum(1)
    # psi = l2: q = s_v^2 / ||s_v||^2, floored before the log
    sv = g @ V0n.t()
    sq = sv.pow_(2)
    logq = (sq / sq.sum(1, keepdim=True).clamp_min(L2_FLOOR)).clamp_min_(L2_FLOOR).log_()
    return H[y] - (P[y] * logq).sum(1)


def consistency_from_kl(kl: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """p_i = 1 / (KL + eps)^gamma (eq. 4); KL is clamped at 0 against round-off."""
    return 1.0 / (kl.clamp_min(0.0) + eps).pow(gamma)  # eq. 4


def consistency_scores(
    source: RowSource,
    labels: np.ndarray,
    V0: np.ndarray,
    S_t: np.ndarray,
    *,
    psi: str = "softmax",
    temperature: float = 0.1,
    gamma: float = 1.0,
    eps: float = 1e-3,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """p_i (eq. 4) of every row with a label >= 0 against initial prototypes V0 (C x D); NaN elsewhere."""
    labels = np.asarray(labels)
    V0n = _normalize(torch.as_tensor(np.asarray(V0, dtype=np.float32))).to(device)
    P, H = psi_table(S_t, psi, temperature)
    P, H = P.to(device), H.to(device)
    U = (P @ V0n) / temperature if psi == "softmax" else None
    VT = (V0n / temperature).t().contiguous() if psi == "softmax" else None
    p = np.full(len(labels), np.nan, dtype=np.float32)
    buf = _Buffer(device)
    sub = _sub_rows(V0n.shape[0])
    fast = VT is not None and temperature >= FAST_MIN_T
    threads = torch.get_num_threads()
    if fast:  # scratch for the hot path, allocated once
        z = torch.empty((sub, V0n.shape[0]), device=device)
        post = _post_rows(V0n.shape[1])
        ug = torch.empty((post, V0n.shape[1]), device=device)
    for start, block in source():
        b = len(block)
        lab = labels[start : start + b]
        keep = lab >= 0
        if keep.any():
            with _small_ops(device):  # O(B x D) copies (see _small_ops)
                rows = block if keep.all() else block[keep]
                g_all = _unit_rows(buf(rows))
                y_all = torch.as_tensor(lab[keep], device=device)
                kl = torch.empty(len(rows), device=device)
            for i in range(0, len(rows), sub):
                g, y = g_all[i : i + sub], y_all[i : i + sub]
                if fast:
                    # eq. 4 hot path: KL = H_y - g . U_y + log sum_c exp(g . v_c / T)
                    n = len(g)
                    with _threads(threads, device):  # the product and the B x C exp: every thread
                        zb = torch.mm(g, VT, out=z[:n])
                        lse = zb.exp_().sum(1).log_()  # one large region each: no wait for a busy core
                        for j in range(0, n, post):  # the cross term in cache-sized pieces
                            gj, yj = g[j : j + post], y[j : j + post]
                            ub = torch.index_select(U, 0, yj, out=ug[: len(yj)]).mul_(gj)
                            kl[i + j : i + j + len(yj)] = (torch.index_select(H, 0, yj).sub_(ub.sum(1))
                                                           .add_(lse[j : j + post]))
                else:
                    kl[i : i + sub] = kl_to_prototypes(g, y, V0n, P, H, psi, temperature, U)
            with _small_ops(device):
                p[start : start + b][keep] = consistency_from_kl(kl, gamma, eps).cpu().numpy()
        if progress:
            progress(b)
    return p


def weighted_class_means(
    source: RowSource,
    labels: np.ndarray,
    weights: np.ndarray,
    num_classes: int,
    *,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """sum_i w_i g_i / sum_i w_i per class over the rows with w_i > 0 (eq. 5); also the weight sums."""
    labels = np.asarray(labels)
    w_all = np.asarray(weights, dtype=np.float32)
    sums = None
    wsum = np.zeros(num_classes, dtype=np.float64)
    buf = _Buffer(device)
    for start, block in source():
        b = len(block)
        w = w_all[start : start + b]
        lab = labels[start : start + b]
        keep = (lab >= 0) & (w > 0)
        if sums is None:
            sums = torch.zeros((num_classes, block.shape[1]), dtype=torch.float32, device=device)
        if keep.any():
            with _small_ops(device):  # the O(B x D) copy (see _small_ops)
                g_all = _unit_rows(buf(block[keep]))
                w_t = torch.as_tensor(w[keep], device=device)
                y_t = torch.as_tensor(lab[keep], device=device)
            _add_weighted_class_sums(sums, y_t, w_t, g_all)  # eq. 5's sums: every thread
            wsum += np.bincount(lab[keep], weights=w[keep], minlength=num_classes)
        if progress:
            progress(b)
    if sums is None:
        raise ValueError("the row source yielded no rows")
    means = sums.double().cpu().numpy() / np.maximum(wsum, 1e-300)[:, None]
    return means.astype(np.float32), wsum


# -- initial prototypes -------------------------------------------------------------------------


def subsample(labels: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """A seeded, class-stratified random subset of at most about ``rows`` labeled rows (sorted).

    Each class keeps ceil(rows * n_c / n) of its rows (at least min(n_c, 2)), so small classes
    are not lost.
    """
    labels = np.asarray(labels)
    labeled = labels >= 0
    n = int(labeled.sum())
    if n <= rows:
        return np.flatnonzero(labeled)
    counts = np.bincount(labels[labeled], minlength=int(labels.max()) + 1)
    quota = np.minimum(counts, np.maximum(np.ceil(rows * counts / n).astype(np.int64), 2))
    key = np.random.default_rng(seed).random(len(labels))
    return np.flatnonzero(class_topk(labels, key, quota))


def gather_rows(source: RowSource, positions: np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
    """The features of rows ``positions`` (sorted) in one streamed pass, as float32."""
    positions = np.asarray(positions)
    out: np.ndarray | None = None
    for start, block in source():
        b = len(block)
        lo, hi = np.searchsorted(positions, [start, start + b])
        if out is None:
            out = np.empty((len(positions), block.shape[1]), dtype=np.float32)
        if hi > lo:
            out[lo:hi] = block[positions[lo:hi] - start]
        if progress:
            progress(b)
    if out is None:
        raise ValueError("the row source yielded no rows")
    return out


def fit_linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 256,
    scale: float = 10.0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[np.ndarray, dict]:
    """Softmax regression on features ``x`` and noisy labels ``y``; returns p(y_i | x_i) and stats.

    Initialized as the nearest-class-mean classifier (W_c = scale * normalized class mean, b = 0),
    so ``epochs = 0`` is that closed-form linear classifier; each epoch is one seeded shuffled
    pass of mini-batch Adam over the rows.
    """
    threads = torch.get_num_threads()

    def mm(a: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:  # the products: on every thread
        with _threads(threads, device):
            return a @ b_

    with _small_ops(device):  # everything else (see _small_ops)
        gen = torch.Generator().manual_seed(seed)
        X = _normalize(torch.as_tensor(x, dtype=torch.float32)).to(device)
        Y = torch.as_tensor(y, dtype=torch.long).to(device)
        means = _index_add(torch.zeros((num_classes, X.shape[1]), device=device), Y, X)
        W = scale * _normalize(means)
        b = torch.zeros(num_classes, device=device)
        # Adam on the closed-form gradient of the mean cross-entropy (no autograd: cheap and import-free)
        b1, b2, adam_eps = 0.9, 0.999, 1e-8
        mW, vW, mb, vb = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)
        scratch = {id(W): (torch.empty_like(W), torch.empty_like(W)), id(b): (torch.empty_like(b), torch.empty_like(b))}
        step = 0
        loss_value = float("nan")
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=gen).to(device)
            total = 0.0
            for i in range(0, len(X), batch_size):
                idx = perm[i : i + batch_size]
                xb, yb = X.index_select(0, idx), Y.index_select(0, idx)  # not X[idx]: torch's slower general gather
                logp = torch.log_softmax(mm(xb, W.t()) + b, dim=1)
                total -= float(logp.gather(1, yb[:, None]).sum())
                grad = logp.exp_()  # softmax - onehot, divided by the batch size
                grad[torch.arange(len(yb), device=device), yb] -= 1.0
                grad /= len(yb)
                gW, gb = mm(grad.t(), xb), grad.sum(0)
                step += 1
                for p_, g_, m_, v_ in ((W, gW, mW, vW), (b, gb, mb, vb)):
                    m_.mul_(b1).add_(g_, alpha=1 - b1)
                    v_.mul_(b2).addcmul_(g_, g_, value=1 - b2)
                    mh, vh = scratch[id(p_)]  # bias-corrected moments, in reused buffers
                    torch.div(m_, 1 - b1**step, out=mh)
                    torch.div(v_, 1 - b2**step, out=vh).sqrt_().add_(adam_eps)
                    p_.addcdiv_(mh, vh, value=-lr)
            loss_value = total / max(len(X), 1)
        logits = mm(X, W.t()) + b
        logp = torch.log_softmax(logits, dim=1)
        conf = logp.gather(1, Y[:, None]).squeeze(1).exp()
        acc = float((logits.argmax(1) == Y).float().mean()) if len(X) else float("nan")
    stats = {"rows": int(len(X)), "epochs": epochs, "loss": loss_value, "train_accuracy_noisy": acc}
    return conf.cpu().numpy().astype(np.float32), stats


def initial_prototypes(
    source: RowSource,
    labels: np.ndarray,
    num_classes: int,
    cfg: PrototypeConfig,
    *,
    confidence: np.ndarray | None = None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, dict]:
    """Per class, the mean feature of its top-k rows by classification confidence in the label.

    ``confidence`` (N,): p(y_i | x_i) from stored probabilities, ranked over all rows. Without it a
    linear probe is fitted on a seeded class-stratified subsample of ``cfg.probe_rows`` rows and
    the top-k is taken within that subsample (the probe must stay cheap next to eq. 4's pass).
    """
    labels = np.asarray(labels)
    if confidence is not None:
        counts = np.bincount(labels[labels >= 0], minlength=num_classes)
        sel = class_topk(labels, confidence, resolve_k(cfg.init_topk, counts))
        means, _ = weighted_class_means(source, labels, sel.astype(np.float32), num_classes,
                                        device=device, progress=progress)
        return means, {"source": "probs", "rows": int((labels >= 0).sum())}
    pos = subsample(labels, cfg.probe_rows, cfg.seed)
    x = gather_rows(source, pos, progress)
    y = labels[pos]
    conf, stats = fit_linear_probe(x, y, num_classes, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                                   batch_size=cfg.probe_batch, scale=cfg.probe_scale, seed=cfg.seed,
                                   device=device)
    counts = np.bincount(y, minlength=num_classes)
    sel = class_topk(y, conf, resolve_k(cfg.init_topk, counts))
    sums = torch.zeros((num_classes, x.shape[1]), dtype=torch.float64)
    _index_add(sums, torch.as_tensor(y[sel]), torch.as_tensor(x[sel], dtype=torch.float64))
    means = sums.numpy() / np.maximum(np.bincount(y[sel], minlength=num_classes), 1)[:, None]
    return means.astype(np.float32), {"source": "probe", **stats}


# -- several prototypes per class -------------------------------------------------------------


def _cluster_classes(
    source: RowSource,
    labels: np.ndarray,
    p: np.ndarray,
    selected: np.ndarray,
    num_classes: int,
    cfg: PrototypeConfig,
    device: str,
    progress: ProgressFn | None,
) -> tuple[np.ndarray, np.ndarray]:
    """per_class eq.-5 prototypes per class: weighted k-means on a capped sample of each class's
    selected rows, then every selected row joins its nearest centroid of its class and each
    cluster's prototype is the p-weighted mean of its rows. Returns (C*m, D) and the weight sums."""
    import faiss

    m = cfg.per_class
    cap = m * cfg.kmeans_rows
    counts = np.bincount(labels[selected], minlength=num_classes)
    key = np.random.default_rng(cfg.seed + 1).random(len(labels))
    sample_mask = class_topk(np.where(selected, labels, -1), key, np.minimum(counts, cap))
    pos = np.flatnonzero(sample_mask)
    x = gather_rows(source, pos, progress)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ys = labels[pos]
    order = np.argsort(ys, kind="stable")
    bounds = np.searchsorted(ys[order], np.arange(num_classes + 1))
    d = x.shape[1]
    centroids = np.zeros((num_classes, m, d), dtype=np.float32)
    for c in range(num_classes):  # one small k-means per class (not the hot path)
        rows = order[bounds[c] : bounds[c + 1]]
        xc = np.ascontiguousarray(x[rows])
        if len(xc) == 0:
            continue
        if len(xc) <= m:
            centroids[c] = xc[np.arange(m) % len(xc)]
            continue
        w = p[pos[rows]] if cfg.weighting == "consistency" else None
        km = faiss.Kmeans(d, m, niter=cfg.kmeans_iters, seed=cfg.seed, verbose=False, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=cfg.kmeans_rows)
        km.train(xc, weights=None if w is None else np.ascontiguousarray(w, dtype=np.float32))
        centroids[c] = km.centroids
    cents = _normalize(torch.as_tensor(centroids)).to(device)  # (C, m, D)
    sums = torch.zeros((num_classes * m, d), device=device)
    wsum = np.zeros(num_classes * m, dtype=np.float64)
    weights = p if cfg.weighting == "consistency" else np.ones_like(p)
    buf = _Buffer(device)
    for start, block in source():
        b = len(block)
        keep = selected[start : start + b]
        if keep.any():
            g = _normalize(buf(block[keep]))
            y = torch.as_tensor(labels[start : start + b][keep], device=device)
            w = torch.as_tensor(weights[start : start + b][keep].astype(np.float32), device=device)
            slot = torch.empty(len(g), dtype=torch.long, device=device)
            for i in range(0, len(g), 2048):  # (b, m, D) gathers stay small
                sims = torch.einsum("bd,bmd->bm", g[i : i + 2048], cents[y[i : i + 2048]])
                slot[i : i + 2048] = y[i : i + 2048] * m + sims.argmax(1)
            _index_add(sums, slot, g * w[:, None])
            wsum += np.bincount(slot.cpu().numpy(), weights=w.cpu().numpy(), minlength=num_classes * m)
        if progress:
            progress(b)
    protos = sums.double().cpu().numpy() / np.maximum(wsum, 1e-300)[:, None]
    empty = wsum == 0  # a centroid nobody joined: keep the centroid itself
    protos[empty] = centroids.reshape(-1, d)[empty]
    return protos.astype(np.float32), wsum


# -- the stage --------------------------------------------------------------------------------


def prototypes_from_consistency(
    source: RowSource,
    labels: np.ndarray,
    p: np.ndarray,
    num_classes: int,
    k_per_class: np.ndarray,
    *,
    weighting: str = "consistency",
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """v_c = sum p_i g_i / sum p_i over the top-K rows of class c by p_i, L2-normalized (eq. 5);
    ``weighting="constant"`` averages the same rows (table 3). Returns (C x D, selected mask)."""
    selected = class_topk(labels, p, k_per_class)
    w = np.where(selected, p if weighting == "consistency" else 1.0, 0.0).astype(np.float32)
    w[selected & ~(w > 0)] = np.finfo(np.float32).tiny  # p underflowed to 0: still a member
    means, _ = weighted_class_means(source, labels, w, num_classes, device=device, progress=progress)  # eq. 5
    return _normalize(torch.as_tensor(means)).numpy(), selected


def count_passes(cfg: PrototypeConfig) -> int:
    """How many streamed passes over the rows :func:`make_prototypes` makes (for progress bars)."""
    return 1 + cfg.rounds * (2 + (2 if cfg.per_class > 1 else 0))


def make_prototypes(
    source: RowSource,
    labels: np.ndarray,
    S_t: np.ndarray,
    cfg: PrototypeConfig | None = None,
    *,
    confidence: np.ndarray | None = None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> PrototypeResult:
    """Visual prototypes of every class (section 3.2).

    Args:
        source: callable returning an iterator of ``(start, features_block)`` over rows 0..N-1.
        labels: (N,) noisy labels; rows with a negative label (other splits) are ignored.
        S_t: (C, C) class relation graph (eq. 3).
        cfg: options (top-k sizes, psi, temperature, gamma, eps, weighting, per_class, rounds, probe).
        confidence: (N,) classifier probability of the labeled class, when stored; else a probe.
        device: torch device for the products.
        progress: called with the number of rows of each block of every pass.
    """
    cfg = cfg or PrototypeConfig()
    cfg.validate()
    labels = np.asarray(labels).astype(np.int64)
    S_t = np.asarray(S_t, dtype=np.float32)
    C = S_t.shape[0]
    if S_t.shape != (C, C):
        raise ValueError(f"S_t has shape {S_t.shape}, expected a square C x C matrix")
    if labels.max(initial=-1) >= C:
        raise ValueError(f"label {labels.max()} out of range for {C} classes")
    if confidence is not None and len(confidence) != len(labels):
        raise ValueError(f"confidence has {len(confidence)} rows, labels {len(labels)}")
    counts = np.bincount(labels[labels >= 0], minlength=C)
    if counts.sum() == 0:
        raise ValueError("no labeled rows to build prototypes from")
    empty = [int(c) for c in np.flatnonzero(counts == 0)]

    V0, probe = initial_prototypes(source, labels, C, cfg, confidence=confidence, device=device, progress=progress)
    first_V0 = V0
    k_sel = resolve_k(cfg.topk, counts)
    for _ in range(cfg.rounds):
        p = consistency_scores(source, labels, V0, S_t, psi=cfg.psi, temperature=cfg.temperature,
                               gamma=cfg.gamma, eps=cfg.eps, device=device, progress=progress)
        class_protos, selected = prototypes_from_consistency(
            source, labels, p, C, k_sel, weighting=cfg.weighting, device=device, progress=progress)
        if cfg.per_class > 1:
            protos, _ = _cluster_classes(source, labels, p, selected, C, cfg, device, progress)
            protos = _normalize(torch.as_tensor(protos)).numpy()
        else:
            protos = class_protos
        V0 = class_protos
    return PrototypeResult(
        prototypes=np.ascontiguousarray(protos, dtype=np.float32),
        prototype_class=np.repeat(np.arange(C, dtype=np.int64), cfg.per_class),
        class_prototypes=np.ascontiguousarray(class_protos, dtype=np.float32),
        initial_prototypes=_normalize(torch.as_tensor(first_V0)).numpy(),
        consistency=p,
        selected=selected,
        init_source=probe["source"],
        empty_classes=empty,
        probe=probe,
    )
