"""Stage: prototypes + features -> noise weights (paper section 3.3, eq. 6) and detection metrics.

Pure computation over one block of rows at a time, so the caller can stream any N with bounded
memory: :func:`score_block` gives, per row, the distance to the nearest prototype of its labeled
class, the weight w_i (eq. 6), and the nearest prototype of any class (found with a FAISS index
over the prototypes). The default score goes beyond eq. 6 (docs/method.md, "Scoring beyond
eq. 6"): :func:`fit_two_round_probe` fits a reweighted out-of-fold linear probe
and the open-set thresholds on a sample, and :func:`fused_weight` multiplies the probe's
p(label | x), :func:`open_set_factor` and, with captions, :func:`caption_factor`.
:func:`estimate_noise` estimates each class's noise rate without clean labels from the probe's
out-of-fold probabilities on its sample (rows of no class; the noise process T read from the labels
of anchor images; each row's probability of a wrong label by Bayes under T; docs/noise-estimate.md)
and the threshold of the flag (:func:`flag_rows`); :func:`suggest_relabel` gives each row's likeliest
other class under T, and :func:`noise_model_outputs` both inside :func:`score_block`'s product.
:func:`suspect_order` ranks the flagged rows worst first;
:func:`roc_auc` and :func:`average_precision` score detection against a known noise mask (numpy
only, tie-aware, equal to scikit-learn's definitions).
"""

from __future__ import annotations

import dataclasses
import math
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
    label_probability: np.ndarray | None = None  # (B,) p(label | x) under a probe, when one is given
    other_class: np.ndarray | None = None  # (B,) the probe's likeliest class other than the label
    other_probability: np.ndarray | None = None  # (B,) its p(class | x)
    # under relabel_probe with a NoiseModel: (flag score s_i, suggested class, its confidence)
    relabel: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


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


SUB_BYTES = 4 << 20  # a float32 sub-block stays in cache from its conversion through its norm and product
PRODUCT_ELEMS = 1 << 24  # the per-sub-block rows x prototypes product stays under 64 MB of float32


def _sub_rows(dim: int, width: int) -> int:
    """Rows per sub-block: its float32 copy is at most SUB_BYTES (converted, normed and multiplied
    while still in cache, instead of a whole block converted first and read back from memory for
    each step; bench/bench_score_noise.py), and its product with ``width`` columns at most
    PRODUCT_ELEMS."""
    return max(256, min(SUB_BYTES // (4 * max(dim, 1)), PRODUCT_ELEMS // max(width, 1)))


def _flat_metric(index: Any) -> str | None:
    """"ip" or "l2" when ``index`` is an exact flat FAISS index (the kind make-prototypes writes),
    whose search is the product with every prototype that :func:`score_block` already computes
    for the own-class distance; None for any other index (searched with FAISS)."""
    import faiss

    if type(index).__name__ not in ("IndexFlatIP", "IndexFlatL2", "IndexFlat"):
        return None
    return "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"


def _padded_columns(m: torch.Tensor) -> torch.Tensor:
    """``m`` (D x P) with zero columns appended up to a multiple of 16 when P < 64, for the right
    operand of a product whose extra columns the caller slices off. BLAS works in column panels,
    and a ragged last panel goes through its slower edge code (bench/bench_score_noise.py runs C=14)."""
    width = m.shape[1] if m.shape[1] >= 64 else -(-m.shape[1] // 16) * 16
    out = torch.zeros((m.shape[0], width), dtype=m.dtype)
    out[:, : m.shape[1]] = m
    return out


class _Buffer:
    """A reusable float32 buffer: float16 sub-blocks are converted into it without a fresh
    allocation (a fresh buffer of that size page-faults on every block; bench/bench_score_noise.py)."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def __call__(self, block: np.ndarray) -> torch.Tensor:
        block = np.ascontiguousarray(block)
        if block.dtype == np.float32:
            return torch.from_numpy(block)  # already float32: no copy
        b, d = block.shape
        if self.buf is None or self.buf.shape[0] < b or self.buf.shape[1] != d:
            self.buf = torch.empty((b, d), dtype=torch.float32)
        out = self.buf[:b]
        out.copy_(torch.from_numpy(block))
        return out


_BUFFER = _Buffer()


def _rows_on(block: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 rows of ``block`` on ``device``: on the CPU in the reused buffer, elsewhere copied
    as stored (float16 moves half the bytes) and converted there."""
    if device.type == "cpu":
        return _BUFFER(block)
    return torch.from_numpy(np.ascontiguousarray(block)).to(device).float()


def score_block(
    features: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    slots: np.ndarray,
    prototype_class: np.ndarray,
    index: Any,
    alpha: float = 1.2,
    beta: float = 1.5,
    probe: Probe | None = None,
    rows: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    relabel_probe: Probe | None = None,
    noise_model: NoiseModel | None = None,
) -> BlockScores:
    """Score one block of rows against the prototypes.

    Args:
        features: (B, D) features g_i (float16 or float32).
        labels: (B,) labeled class c of each row; a label outside [0, C) gets distance NaN, w = 0.
        prototypes: (P, D) float32 prototypes v.
        slots: (C, m) prototype rows of each class (:func:`class_slots`).
        prototype_class: (P,) class of each prototype.
        index: a FAISS index over ``prototypes`` (inner product or L2) for the nearest prototype.
            An exact flat index is not searched: the product with every prototype, computed for
            the own-class distance anyway, gives the same nearest prototype.
        alpha, beta: shift and contrast of eq. 6.
        probe: also give ``label_probability``, p(label | x) under this probe (as
            :func:`probe_label_probability`), from the same product: the probe's averaged model
            is appended to the prototypes' columns, so each row is converted and normed once.
        rows: (B,) row positions of the block (the probe's sample rows get their fold's model).
        relabel_probe: (with ``probe`` and ``noise_model``) the round-1 probe of the same classes, whose
            flag score, suggested class and confidence (:func:`noise_model_outputs`) come as ``relabel``,
            its averaged model's columns appended to the same product.
        noise_model: the estimate's transition matrix and temperature (:class:`NoiseModel`).
        device: where the products run. On a GPU the block is one piece (the CPU's cache-sized
            sub-blocks do not apply); the probe's held-out rows and a non-flat FAISS index's
            search stay on the CPU.
    """
    dev = torch.device(device)
    features = np.asarray(features)
    labels = np.asarray(labels, dtype=np.int64)
    C = slots.shape[0]
    valid = (labels >= 0) & (labels < C)
    lab = torch.as_tensor(np.where(valid, labels, 0)).to(dev)
    V = torch.as_tensor(prototypes).to(dev)
    vv = (V * V).sum(1)
    S = torch.as_tensor(slots).to(dev)
    metric = _flat_metric(index)  # exact flat index: its search is the same product, done here
    B, P = len(features), len(V)
    if relabel_probe is not None and (probe is None or noise_model is None):
        raise ValueError("relabel_probe needs probe and noise_model")
    probes = [p for p in (probe, relabel_probe) if p is not None]
    models = [None, noise_model]  # _out_of_fold takes them as given; the block's products on the device
    on_dev = [None, noise_model.on(dev) if noise_model is not None else None]
    outs: list = []
    logits = None
    if probes:  # [prototypes | each probe's mean W]: one product for all
        Cp = probe.W.shape[2]
        VT = _padded_columns(torch.cat([V.t().cpu(), *(torch.as_tensor(p.W.mean(0)) for p in probes)], 1)).to(dev)
        probe_bs = [torch.as_tensor(p.b.mean(0)).to(dev) for p in probes]
        lab_p = torch.as_tensor(np.where((labels >= 0) & (labels < Cp), labels, 0)).to(dev)
        outs = [(torch.empty(B, device=dev), torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, device=dev))
                for _ in probes]
        # the round-1 probe's logits of the whole block: its noise-model outputs run after the sub-blocks, in
        # pieces of GATHER_CELLS (a few large ops instead of a dozen small ones per sub-block: each op has a
        # fixed cost; bench/bench_score_noise.py)
        logits = torch.empty((B, Cp), device=dev) if len(probes) > 1 else None
    else:
        VT = _padded_columns(V.t().cpu()).to(dev)  # few prototypes: zero columns, sliced off after the product
    width = VT.shape[1]
    gg = torch.empty(B, device=dev)
    d2 = torch.empty(B, device=dev)
    nd2 = torch.empty(B, device=dev)
    idx = torch.empty(B, dtype=torch.int64, device=dev)
    step = _sub_rows(features.shape[1] if features.ndim == 2 else 1, width) if dev.type == "cpu" else max(B, 1)
    prod_buf = torch.empty((min(step, B), width), device=dev)
    if metric is None:
        import faiss

        inner = index.metric_type == faiss.METRIC_INNER_PRODUCT
    for i in range(0, B, step):  # sub-blocks: converted, normed and multiplied while in cache
        gs, ls = _rows_on(features[i : i + step], dev), lab[i : i + step]
        n = len(gs)
        gg[i : i + n] = torch.linalg.vector_norm(gs, dim=1).square_()
        full = torch.mm(gs, VT, out=prod_buf[:n])
        prod = full[:, :P]  # g . v for every prototype: one product
        if probes:
            scale = gg[i : i + n].rsqrt().clamp_max_(1e12)
            for j, (o, b_) in enumerate(zip(outs, probe_bs)):
                xW = full[:, P + j * Cp : P + (j + 1) * Cp]
                if j == 1:
                    torch.addcmul(b_, xW, scale[:, None], out=logits[i : i + n])
                else:
                    o[0][i : i + n], o[1][i : i + n], o[2][i : i + n] = _probe_probability(
                        gs, scale, lab_p[i : i + n], xW, b_)
        # own class: ||v - g||^2 = |g|^2 + |v|^2 - 2 g.v, minimized over the class's m prototypes
        own = S.index_select(0, ls)  # (n, m) prototype rows of each row's class
        d2[i : i + n] = (vv[own] - 2.0 * prod.gather(1, own)).amin(1).add_(gg[i : i + n])
        if metric == "ip":  # nearest by inner product (unit prototypes: the nearest in L2 too)
            score, idx[i : i + n] = prod.max(1)
            nd2[i : i + n] = gg[i : i + n] + vv[idx[i : i + n]] - 2.0 * score
        elif metric == "l2":
            key, idx[i : i + n] = (vv - 2.0 * prod).min(1)
            nd2[i : i + n] = key.add_(gg[i : i + n])
        else:  # any other FAISS index (IVF, HNSW, ...): its own search
            score_np, idx_np = index.search(np.ascontiguousarray(gs.cpu().numpy()), 1)
            idx[i : i + n] = torch.as_tensor(idx_np[:, 0]).to(dev)
            found = torch.as_tensor(score_np[:, 0]).to(dev)
            # METRIC_L2 returns squared distances
            nd2[i : i + n] = gg[i : i + n] + vv[idx[i : i + n]] - 2.0 * found if inner else found
    if logits is not None:
        piece = max(1, GATHER_CELLS // max(Cp, 1))
        for i in range(0, B, piece):
            outs[1][0][i : i + piece], outs[1][1][i : i + piece], outs[1][2][i : i + piece] = noise_model_outputs(
                logits[i : i + piece], lab_p[i : i + piece], on_dev[1])
    dist = d2.clamp_min_(0.0).sqrt_().cpu().numpy()
    dist = np.where(valid, dist, np.nan).astype(np.float32)
    idx = idx.cpu().numpy()
    nd2 = nd2.cpu().numpy()
    results = []
    for p_, o, m_ in zip(probes, outs, models):
        label_p, other_c, other_p = (t.cpu().numpy() for t in o)
        _out_of_fold(p_, features, lab_p.cpu(), np.arange(B) if rows is None else rows, label_p, other_c, other_p, m_)
        if m_ is None:  # p(label | x): 0 for a label outside the classes
            label_p = np.where((labels >= 0) & (labels < Cp), label_p, 0.0)
        results.append((label_p.astype(np.float32), other_c.astype(np.int64), other_p.astype(np.float32)))
    return BlockScores(
        distance=dist,
        weight=noise_weight(dist, alpha, beta),
        nearest_class=np.asarray(prototype_class)[idx].astype(np.int64),
        nearest_distance=np.sqrt(np.maximum(nd2, 0.0)).astype(np.float32),
        label_probability=results[0][0] if results else None,
        other_class=results[0][1] if results else None,
        other_probability=results[0][2] if results else None,
        relabel=results[1] if len(results) > 1 else None,
    )


# -- scoring beyond eq. 6 ("fused", the default of score-noise) -------------------------------


def class_similarity(features: np.ndarray, prototypes: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(B, C) cosine of each row to each class: the best over the class's prototypes."""
    g = torch.as_tensor(np.asarray(features, dtype=np.float32))
    g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-12)
    V = torch.as_tensor(np.asarray(prototypes, dtype=np.float32))
    V = V / torch.linalg.vector_norm(V, dim=1, keepdim=True).clamp_min(1e-12)
    sim = g @ V.t()  # (B, P)
    return sim[:, torch.as_tensor(slots)].amax(2).numpy()  # (B, C, m) -> (B, C)


def labeled_share(sim: np.ndarray, labels: np.ndarray, temperature: float,
                  background: float | None = None) -> np.ndarray:
    """The labeled class's share of a softmax over similarities, with an optional background column:

    a_i = exp(s_iy / T) / (sum_k exp(s_ik / T) + exp(b / T)).

    Rows with a label outside [0, C) get 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: must be > 0")
    z = np.asarray(sim, dtype=np.float64) / temperature
    labels = np.asarray(labels, dtype=np.int64)
    C = z.shape[1]
    valid = (labels >= 0) & (labels < C)
    m = z.max(1)
    if background is not None:
        m = np.maximum(m, background / temperature)
    e = np.exp(z - m[:, None])
    den = e.sum(1) + (np.exp(background / temperature - m) if background is not None else 0.0)
    own = e[np.arange(len(z)), np.where(valid, labels, 0)]
    return np.where(valid, own / den, 0.0).astype(np.float32)


@dataclass
class Probe:
    """K linear softmax classifiers, each fitted without one fold of a sample (out-of-fold)."""

    W: np.ndarray  # (K, D, C)
    b: np.ndarray  # (K, C)
    sample_rows: np.ndarray  # (n,) row positions of the sample, sorted
    sample_fold: np.ndarray  # (n,) fold of each sample row


def fit_probe(x: np.ndarray, y: np.ndarray, rows: np.ndarray, num_classes: int, *, folds: int = 5,
              epochs: int = 10, lr: float = 0.05, batch_size: int = 256, seed: int = 0,
              sample_weight: np.ndarray | None = None, init: Probe | None = None,
              device: str | torch.device = "cpu") -> Probe:
    """Out-of-fold softmax regression on a sample (``rows`` = its positions, ``x`` its features).

    Regularized like scikit-learn's LogisticRegression(C=1): loss = sum_i s_i CE_i / sum_i s_i +
    ||W||^2 / (2 n), with n the rows of the fold's training part and s_i the sample weights (1 when
    not given). Mini-batch Adam on the closed-form gradient, learning rate decayed to 0 on a cosine
    (it reaches the optimum of L-BFGS in 10 epochs where a constant rate needs many more).

    Args:
        sample_weight: (n,) weights s_i >= 0 of the sample rows (round 2 of :func:`fit_reweighted_probe`).
        init: start each fold's model from this probe's (same folds: same ``rows`` and ``seed``).
        device: where the sample and the models live. The mini-batch order comes from a seeded
            generator on the CPU, so every device takes the same steps (equal up to rounding).
    """
    dev = torch.device(device)
    if folds < 2:
        raise ValueError(f"folds {folds}: need at least 2 for out-of-fold probabilities")
    y = np.asarray(y, dtype=np.int64)
    if len(y) < folds:
        raise ValueError(f"{len(y)} sample rows for {folds} folds")
    sw = np.ones(len(y), dtype=np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    if sw.shape != y.shape or not np.isfinite(sw).all() or (sw < 0).any():
        raise ValueError("sample_weight: need one finite weight >= 0 per sample row")
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % folds
    order = np.argsort(rows, kind="stable")
    if init is not None and (init.W.shape[0] != folds or not np.array_equal(init.sample_fold, fold[order])):
        raise ValueError("init: a probe fitted on other rows or folds")
    X = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(dev)
    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min(1e-12)
    Y = torch.as_tensor(y).to(dev)
    gen = torch.Generator().manual_seed(seed)
    # the K fold models train side by side on shared mini-batches: one product (B x D) x (D x K*C)
    # for all of them, each model masking out its held-out fold's rows (so every model still sees
    # exactly its own training rows, once per epoch). At these sizes the per-step overhead and
    # the shape of the products, not the arithmetic, set the time. Adam is elementwise, so each
    # model follows only its own gradient.
    K, D, n = folds, X.shape[1], len(y)
    member = torch.as_tensor(fold)[:, None] != torch.arange(K)[None, :]  # (n, K): row i trains model k
    sizes = member.sum(0).to(torch.float32)
    train_w = torch.stack([torch.as_tensor(sw / max(float(sw[member[:, k].numpy()].mean()), 1e-12))
                           for k in range(K)], 1) * member  # (n, K): mean 1 over each model's rows, 0 held out
    member, train_w = member.to(dev), train_w.to(dev)
    lam = (1.0 / sizes).view(1, K, 1).to(dev)
    if init is None:
        W, b = torch.zeros((D, K, num_classes), device=dev), torch.zeros((K, num_classes), device=dev)
    else:
        W = torch.tensor(init.W).permute(1, 0, 2).contiguous().to(dev)
        b = torch.tensor(init.b).to(dev)
    flat = W.view(D, K * num_classes)
    # Adam's moments and gradient in buffers allocated once: at C=1,000 each step goes over the
    # 5 x 512 x 1,000 weights several times, and fresh temporaries per op would allocate and fault in
    # that much memory again at every step (bench/bench_score_noise.py --with-1000-classes).
    # (torch.optim.Adam(fused=True) is not used: its first step imports torch._dynamo, which costs
    # every process start-up time and memory; tests/unit/test_stage_score_fused.py checks it stays unimported.)
    mW, vW, mb, vb = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)
    gW, sW, gb, sb = torch.empty_like(W), torch.empty_like(W), torch.empty_like(b), torch.empty_like(b)
    step, total = 0, epochs * -(-n // batch_size)
    minus_one = torch.full((1, K, 1), -1.0, device=dev)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            # index_select, not X[idx]: advanced indexing takes torch's general (slower) gather path
            xb, yb = X.index_select(0, idx), Y.index_select(0, idx)
            grad = torch.softmax((xb @ flat).view(len(idx), K, num_classes) + b, dim=2)
            grad.scatter_add_(2, yb.view(-1, 1, 1).expand(-1, K, 1), minus_one.expand(len(idx), K, 1))
            tw = train_w.index_select(0, idx)  # (B, K)
            grad *= (tw / member.index_select(0, idx).sum(0).clamp_min(1))[..., None]
            torch.mm(xb.t(), grad.view(len(idx), K * num_classes), out=gW.view(D, K * num_classes))
            gW.add_(torch.mul(W, lam, out=sW))  # + W / n_k: the L2 term of each fold's model
            torch.sum(grad, 0, out=gb)
            rate = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            step += 1
            # p -= rate * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - 0.9^t), v_hat = v / (1 - 0.999^t),
            # as rate sqrt(c2) / c1 * m / (sqrt(v) + eps sqrt(c2)) with c1, c2 the two corrections
            c1, c2 = 1 - 0.9**step, math.sqrt(1 - 0.999**step)
            for p_, g_, m_, v_, s_ in ((W, gW, mW, vW, sW), (b, gb, mb, vb, sb)):
                m_.lerp_(g_, 0.1)  # 0.9 m + 0.1 g
                v_.mul_(0.999).addcmul_(g_, g_, value=0.001)
                torch.sqrt(v_, out=s_).add_(1e-8 * c2)
                p_.addcdiv_(m_, s_, value=-rate * c2 / c1)
    return Probe(W=np.ascontiguousarray(W.permute(1, 0, 2).cpu().numpy()), b=b.cpu().numpy(),
                 sample_rows=np.asarray(rows)[order],
                 sample_fold=fold[order])


def open_set_thresholds(distance: np.ndarray, labels: np.ndarray, agree: np.ndarray, num_classes: int,
                        quantile: float = 0.99, min_rows: int = 5) -> np.ndarray:
    """(C,) t_c: the ``quantile`` of the own-prototype distances of the rows labeled c that the
    out-of-fold probe agrees with (``agree``: p(label | x) >= 0.5), i.e. how far a likely-clean
    image of class c lies from its prototype. Classes with fewer than ``min_rows`` such rows use all
    their rows; classes with none get +inf (no open-set evidence is taken from them)."""
    d = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    agree = np.asarray(agree, dtype=bool)
    ok = ~np.isnan(d)
    t = np.full(num_classes, np.inf)
    for c in range(num_classes):
        own = ok & (labels == c)
        pick = own & agree
        if pick.sum() < min_rows:
            pick = own
        if pick.any():
            t[c] = np.quantile(d[pick], quantile)
    return t


def open_set_factor(distance: np.ndarray, labels: np.ndarray, thresholds: np.ndarray,
                    alpha: float = 1.2, beta: float = 1.5) -> np.ndarray:
    """o_i = min(1, w(d_i) / w(t_c)) with w eq. 6 and t_c = :func:`open_set_thresholds` of the
    labeled class c: 1 up to the distance of a likely-clean image, then falling with eq. 6 to 0 at
    alpha. An image from outside every class lies far from all prototypes, where o is small; a
    class without a threshold (t = inf) gives o = 1; a t_c at or past alpha gives 1 up to t_c and 0
    beyond. Rows with an unknown distance or label get 0."""
    d = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    t = np.asarray(thresholds, dtype=np.float64)
    valid = (labels >= 0) & (labels < len(t)) & ~np.isnan(d)
    tc = t[np.where(valid, labels, 0)]
    w_d = np.asarray(noise_weight(np.where(valid, d, np.nan), alpha, beta), dtype=np.float64)  # eq. 6
    w_t = np.asarray(noise_weight(np.where(np.isfinite(tc), tc, 0.0), alpha, beta), dtype=np.float64)  # eq. 6
    o = np.where(d <= tc, 1.0, np.where(w_t > 0, np.minimum(1.0, w_d / np.maximum(w_t, 1e-300)), 0.0))
    return np.where(valid, o, 0.0).astype(np.float32)


def _probe_probability(x: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, xW: torch.Tensor,
                       b: np.ndarray,
                       model: NoiseModel | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(y | x) of a linear softmax probe from the unnormalized product ``xW`` = x W (B x C) and
    ``scale`` = 1 / |x|: (x / |x|) W + b, the normalization applied to the B x C logits instead of
    the B x D rows. Also the likeliest class other than y and its probability; with one class, y
    itself. With ``model`` (the round-1 probe of an estimate) the three are instead the flag score,
    the suggested class and its confidence (:func:`noise_model_outputs`)."""
    z = torch.addcmul(torch.as_tensor(b), xW, scale[:, None])
    if model is not None:
        return noise_model_outputs(z, y, model)
    lse = torch.logsumexp(z, 1)
    own = z.gather(1, y[:, None])[:, 0]
    if z.shape[1] > 1:
        z.scatter_(1, y[:, None], float("-inf"))  # the label's column is read: the rest is for the other class
    top, other = z.max(1)
    return torch.exp(own - lse), other, torch.exp(top - lse)


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12)


def _out_of_fold(probe: Probe, features: np.ndarray, lab: torch.Tensor, rows: np.ndarray, out: np.ndarray,
                 other: np.ndarray | None = None, other_p: np.ndarray | None = None,
                 model: NoiseModel | None = None) -> None:
    """Overwrite ``out`` (and ``other``, ``other_p``) at the sample rows among ``rows`` with p(label | x)
    (the likeliest other class and its probability; with ``model`` the flag score, suggested class and
    confidence) of the fold model that did not see them."""
    rows = np.asarray(rows)
    if len(probe.sample_rows) == 0 or len(rows) == 0:
        return
    pos = np.minimum(np.searchsorted(probe.sample_rows, rows), len(probe.sample_rows) - 1)
    where = np.flatnonzero(probe.sample_rows[pos] == rows)
    fold = probe.sample_fold[pos[where]]
    C = probe.W.shape[2]
    for k in np.unique(fold):
        sel = where[fold == k]
        x = _BUFFER(features[sel])
        xW = (x @ _padded_columns(torch.as_tensor(probe.W[k])))[:, :C]
        p, oc, op = _probe_probability(x, _inverse_norms(x), lab[torch.as_tensor(sel)], xW, probe.b[k],
                                       model.on(torch.device("cpu")) if model is not None else None)
        out[sel] = p.numpy()
        if other is not None:
            other[sel], other_p[sel] = oc.numpy(), op.numpy()


def probe_label_probability(probe: Probe, features: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                            device: str | torch.device = "cpu") -> np.ndarray:
    """p(label | x) under the probe: a sample row by the model that did not see it (out-of-fold),
    any other row by the K models' average (W = mean_k W_k, b = mean_k b_k: one product per row
    instead of K; for linear models this is the softmax of the mean logits). Labels outside
    [0, C) get 0. :func:`score_block` computes the same in its own product when given the probe.
    ``device``: where the rows' product runs (the held-out rows' fold models run on the CPU)."""
    dev = torch.device(device)
    features = np.asarray(features)
    C = probe.W.shape[2]
    labels = np.asarray(labels, dtype=np.int64)
    valid = (labels >= 0) & (labels < C)
    lab = torch.as_tensor(np.where(valid, labels, 0))
    lab_dev = lab.to(dev)
    mean_WT = _padded_columns(torch.as_tensor(probe.W.mean(0))).to(dev)
    mean_b = torch.as_tensor(probe.b.mean(0)).to(dev)
    out = np.empty(len(labels), dtype=np.float32)
    # float32 in score_block's reused buffer, in cache-sized pieces (on a GPU in pieces of 64k rows)
    step = _sub_rows(features.shape[1], mean_WT.shape[1]) if dev.type == "cpu" else 65536
    for i in range(0, len(labels), step):
        x = _rows_on(features[i : i + step], dev)
        out[i : i + step] = _probe_probability(x, _inverse_norms(x), lab_dev[i : i + step], (x @ mean_WT)[:, :C],
                                               mean_b)[0].cpu().numpy()
    _out_of_fold(probe, features, lab, rows, out)
    return np.where(valid, out, 0.0).astype(np.float32)


def fit_two_round_probe(x: np.ndarray, y: np.ndarray, rows: np.ndarray, num_classes: int, distance: np.ndarray,
                        *, alpha: float = 1.2, beta: float = 1.5, folds: int = 5, epochs: int = 10,
                        quantile: float = 0.99, seed: int = 0,
                        device: str | torch.device = "cpu") -> tuple[Probe, Probe, np.ndarray]:
    """The probe of ``--score fused`` and the open-set thresholds, from a sample of rows.

    Round 1 fits :func:`fit_probe` on the noisy labels; its out-of-fold p1_i = p(y_i | x_i) says
    which rows it agrees with (:func:`open_set_thresholds` over the sample's own-prototype
    ``distance``). Round 2 continues each fold's model for ceil(epochs / 2) epochs with sample
    weights p1_i, so rows the first round found mislabeled pull the classifier less toward their
    wrong class. Open-set rows keep their (small) weight on purpose: the probe learns that their
    region of feature space carries no consistent label.

    Returns:
        (round-1 probe, round-2 probe, (C,) thresholds t_c).
    """
    first = fit_probe(x, y, rows, num_classes, folds=folds, epochs=epochs, seed=seed, device=device)
    p1 = probe_label_probability(first, x, y, rows, device=device)
    thresholds = open_set_thresholds(distance, y, p1 >= 0.5, num_classes, quantile)
    second = fit_probe(x, y, rows, num_classes, folds=folds, epochs=max(1, -(-epochs // 2)), seed=seed,
                       sample_weight=p1, init=first, device=device)
    return first, second, thresholds


def fit_reweighted_probe(x: np.ndarray, y: np.ndarray, rows: np.ndarray, num_classes: int, distance: np.ndarray,
                         **kwargs: Any) -> tuple[Probe, np.ndarray]:
    """(round-2 probe, thresholds) of :func:`fit_two_round_probe` (same arguments)."""
    _, second, thresholds = fit_two_round_probe(x, y, rows, num_classes, distance, **kwargs)
    return second, thresholds


def probe_probabilities(probe: Probe, features: np.ndarray, rows: np.ndarray,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """(B, C) p(k | x) of every class under the probe: a sample row by the fold model that did not see
    it, any other row by the models' mean (as :func:`probe_label_probability`). The full vectors the
    noise estimate counts with (:func:`confident_guess`, :func:`posterior_noise`)."""
    dev = torch.device(device)
    features = np.asarray(features)
    rows = np.asarray(rows)
    C = probe.W.shape[2]
    mean_WT = _padded_columns(torch.as_tensor(probe.W.mean(0))).to(dev)
    mean_b = torch.as_tensor(probe.b.mean(0)).to(dev)
    out = np.empty((len(features), C), dtype=np.float32)

    def softmax(x: torch.Tensor, WT: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        z = torch.addcmul(b, (x @ WT)[:, :C], _inverse_norms(x)[:, None])
        return torch.softmax(z, 1).cpu().numpy()

    step = _sub_rows(features.shape[1], mean_WT.shape[1]) if dev.type == "cpu" else 65536
    for i in range(0, len(features), step):
        out[i : i + step] = softmax(_rows_on(features[i : i + step], dev), mean_WT, mean_b)
    if len(probe.sample_rows) and len(rows):
        pos = np.minimum(np.searchsorted(probe.sample_rows, rows), len(probe.sample_rows) - 1)
        where = np.flatnonzero(probe.sample_rows[pos] == rows)
        fold = probe.sample_fold[pos[where]]
        for k in np.unique(fold):
            sel = where[fold == k]
            out[sel] = softmax(_BUFFER(features[sel]), _padded_columns(torch.as_tensor(probe.W[k])),
                               torch.as_tensor(probe.b[k]))
    return out


# -- the noise estimate, the flag and the relabel suggestion (docs/noise-estimate.md) ----------
# Equation numbers E1-E9 are those of docs/noise-estimate.md.

ANCHOR_SHARE = 0.25  # anchors: the upper quartile of the rows the probe assigns to a class (E3)
GATHER_CELLS = 1 << 22  # rows x classes of one gathered block of T columns (16 MB of float32)


def outside_levels(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) l_k = (rho_k + t_k) / 2 (E1): halfway between class k's share of the labels rho_k (what the
    probe gives k where labels are random, as for an image of no class) and its average
    self-confidence t_k (:func:`confident_thresholds`, what it gives a typical image labeled k)."""
    labels = np.asarray(labels, dtype=np.int64)
    ok = (labels >= 0) & (labels < num_classes)
    rho = np.bincount(labels[ok], minlength=num_classes) / max(int(ok.sum()), 1)
    t = confident_thresholds(probs, labels, num_classes)
    return np.where(np.isfinite(t), 0.5 * (rho + t), 0.0)  # eq. E1


def confident_thresholds(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) t_j = mean of p_j(x_i) over the rows labeled j: the average self-confidence of class j
    (Northcutt et al. 2021, eq. 2). A class without rows gets +inf."""
    p = np.asarray(probs)  # only the labels' column is read: no full float64 copy
    labels = np.asarray(labels, dtype=np.int64)
    ok = (labels >= 0) & (labels < num_classes)
    own = p[np.flatnonzero(ok), labels[ok]].astype(np.float64)
    sums = np.bincount(labels[ok], weights=own, minlength=num_classes)
    counts = np.bincount(labels[ok], minlength=num_classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def far_from_class(distance: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """d_i > t_{y_i}: the row lies farther from its labeled class's prototype than the open-set
    threshold t_c (:func:`open_set_thresholds`: the 0.99 quantile for the images of c the probe
    agrees with), i.e. where :func:`open_set_factor` is below 1. An unknown distance or a label
    outside the classes counts as far; a class without a threshold (inf) never does."""
    d = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    t = np.asarray(thresholds, dtype=np.float64)
    valid = (labels >= 0) & (labels < len(t))
    return ~(valid & (d <= t[np.where(valid, labels, 0)]))  # NaN compares False: far


def outside_rows(top_probability: np.ndarray, top_class: np.ndarray, levels: np.ndarray,
                 far: np.ndarray | None = None) -> np.ndarray:
    """u_i (E2) = 1 when the probe's largest probability p_k (k its likeliest class) lies below l_k
    (:func:`outside_levels`: nearer to random labels than to a typical image of k, as for an image of
    no class, whose crawl label the probe cannot learn) and the row is far from its labeled class's
    prototype (``far``, :func:`far_from_class`); else 0. Either signal alone also fires on clean images
    of look-alike classes (their probability spread over a few classes) or on mislabeled ones (far
    from the prototype of the wrong class); an image of no class shows both."""
    lv = np.asarray(levels, dtype=np.float64)
    k = np.clip(np.asarray(top_class, dtype=np.int64), 0, len(lv) - 1)
    low = np.asarray(top_probability, dtype=np.float64) < lv[k]
    if far is not None:
        low &= np.asarray(far, dtype=bool)
    return low.astype(np.float32)  # eq. E2


def anchor_counts(probs: np.ndarray, labels: np.ndarray, num_classes: int,
                  share: float | None = None) -> np.ndarray:
    """(C, C) K[t, y] (E3): the labels of class t's anchor rows, i.e. of the ceil(share * |R_t|) rows of
    R_t = {i: argmax_k p_ik = t} with the largest p_it. The probe is out-of-fold, so it never saw an
    anchor's own label: the labels of the images it is surest are of class t are a sample of what the
    crawl calls such images (the anchor points of Patrini et al. 2017 and Xia et al. 2019, read through
    their labels instead of the probe's probabilities, which regularization pulls toward the middle).
    ``share`` None: ANCHOR_SHARE, the upper quartile (read at the call: bench/label_issues.py varies it)."""
    share = ANCHOR_SHARE if share is None else share
    if not 0 < share <= 1:
        raise ValueError(f"share {share}: must be in (0, 1]")
    p = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    C = num_classes
    ok = (labels >= 0) & (labels < C)
    rows_ok = np.flatnonzero(ok)
    labels = labels[ok]
    top = p[rows_ok].argmax(1) if len(rows_ok) else np.zeros(0, dtype=np.int64)
    conf = p[rows_ok, top].astype(np.float64)
    order = np.lexsort((-conf, top))  # by class, then most confident first
    bounds = np.searchsorted(top[order], np.arange(C + 1))
    counts = np.zeros((C, C))
    for t in np.flatnonzero(np.diff(bounds) > 0):
        rows = order[bounds[t] : bounds[t + 1]]
        k = int(math.ceil(share * len(rows)))
        counts[t] = np.bincount(labels[rows[:k]], minlength=C)  # eq. E3
    return counts


def _golden_max(f, lo: float, hi: float, steps: int = 80) -> float:
    """The argmax of a unimodal f on [lo, hi] by golden-section search."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def transition_matrix(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """The noise process T[t, y] (the chance that an image of class t is labeled y) from the anchor
    counts K (:func:`anchor_counts`), and the Gamma-Poisson prior strength alpha (E4).

    Off the diagonal, K[t, y] ~ Poisson(m_t lambda_ty) (m_t: class t's anchors) with
    lambda_ty ~ Gamma(alpha, rate alpha / lambda_bar), lambda_bar = sum_{t != y} K_ty / sum_t m_t (C - 1);
    alpha maximizes the marginal (negative binomial) likelihood of the counts (empirical Bayes, no free
    parameter), and

        T[t, y] = (K_ty + alpha) / (m_t + alpha / lambda_bar)      (y != t),    T[t, t] = 1 - sum_{y != t} T[t, y]

    Where the counts look like one common rate (uniform flips) alpha is large and every off-diagonal
    cell gets about lambda_bar; where a few cells stand out (look-alike classes) it is small and T
    follows them. A class without anchors gets the common rate; a row whose off-diagonal sum would
    pass 1 is scaled to 1."""
    K = np.asarray(counts, dtype=np.float64)
    C = K.shape[0]
    m = K.sum(1)
    off = ~np.eye(C, dtype=bool)
    Koff = np.where(off, K, 0.0)
    total = float((m * (C - 1)).sum())
    lam_bar = float(Koff.sum()) / total if total > 0 else 0.0
    if lam_bar <= 0.0:  # no anchor carries another label: no noise seen
        return np.eye(C), float("inf")
    E = m * lam_bar  # expected count of each off-diagonal cell of row t under the common rate
    t_nz, y_nz = np.nonzero(Koff)
    k_nz = torch.as_tensor(Koff[t_nz, y_nz], dtype=torch.float64)
    E_nz = E[t_nz]
    zeros = (C - 1) * np.ones(C) - np.bincount(t_nz, minlength=C)  # zero cells per row

    def loglik(log_alpha: float) -> float:  # sum of log NB(K | alpha, E) over the off-diagonal cells
        a = math.exp(log_alpha)
        with np.errstate(divide="ignore"):
            zero_part = float((zeros * a * np.log(a / (a + E))).sum())
        nz = (torch.lgamma(k_nz + a) - math.lgamma(a)).numpy() + a * np.log(a / (a + E_nz)) \
            + k_nz.numpy() * np.log(E_nz / (a + E_nz))
        return zero_part + float(nz.sum())

    alpha = math.exp(_golden_max(loglik, math.log(1e-4), math.log(1e8)))
    T = np.where(off, (K + alpha) / (m[:, None] + alpha / lam_bar), 0.0)  # eq. E4
    s = T.sum(1)
    T /= np.maximum(s, 1.0)[:, None]
    T[np.arange(C), np.arange(C)] = 1.0 - T.sum(1)
    return T, alpha


def invert_transition(T: np.ndarray) -> np.ndarray:
    """T^-1 (the pseudo-inverse where T is singular)."""
    try:
        return np.linalg.inv(np.asarray(T, dtype=np.float64))
    except np.linalg.LinAlgError:
        return np.linalg.pinv(np.asarray(T, dtype=np.float64))


def _label_columns(probs: np.ndarray, labels: np.ndarray, M: np.ndarray) -> np.ndarray:
    """(p_i M)_{y_i} = sum_k p_ik M[k, y_i] per row, gathering the columns M[:, y_i] block by block."""
    p = np.asarray(probs)
    MT = np.ascontiguousarray(np.asarray(M, dtype=np.float64).T)
    out = np.empty(len(p))
    step = max(1, GATHER_CELLS // max(p.shape[1], 1))
    for i in range(0, len(p), step):
        out[i : i + step] = np.einsum("ij,ij->i", p[i : i + step].astype(np.float64), MT[labels[i : i + step]])
    return out


def wrong_label_score(probs: np.ndarray, labels: np.ndarray, T: np.ndarray, T_inv: np.ndarray) -> np.ndarray:
    """The probability that each row's label is wrong under the noise process T, unclipped (E5):

        q_i = p_i T^-1                      (the class probabilities before the labels' noise: p = q T)
        s_i = 1 - q_{i,y_i} T[y_i, y_i] / p_{i,y_i}

    i.e. 1 - P(true class = y | x, label y) by Bayes. Without clipping q to the simplex s can pass
    [0, 1] (beyond 1: the probe's p_y lies below what T lets a class-y image have); the estimate
    clips, the flag ranks the raw value. A label outside the classes gets +inf."""
    p = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    C = p.shape[1]
    valid = (labels >= 0) & (labels < C)
    lab = np.where(valid, labels, 0)
    q_y = _label_columns(p, lab, T_inv)
    p_y = p[np.arange(len(p)), lab].astype(np.float64)
    s = 1.0 - q_y * np.asarray(T)[lab, lab] / np.maximum(p_y, 1e-300)  # eq. E5
    return np.where(valid, s, np.inf)


def class_noise_rates(labels: np.ndarray, row_noise: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) estimated noise rate of each class (E6): the mean of r_i over the rows labeled c; NaN for a
    class without rows."""
    labels = np.asarray(labels, dtype=np.int64)
    r = np.asarray(row_noise, dtype=np.float64)
    ok = (labels >= 0) & (labels < num_classes) & ~np.isnan(r)
    s = np.bincount(labels[ok], weights=r[ok], minlength=num_classes)
    n = np.bincount(labels[ok], minlength=num_classes)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)  # eq. E6


def overall_noise(class_noise: np.ndarray, class_rows: np.ndarray) -> float:
    """sum_c N_c e_c / sum_c N_c (E6) over the classes with an estimate e_c (N_c: the class's rows in the
    whole split, of which the estimate saw a uniform sample); NaN when there is none."""
    e = np.asarray(class_noise, dtype=np.float64)
    n = np.asarray(class_rows, dtype=np.float64)
    ok = ~np.isnan(e) & (n > 0)
    return float((e[ok] * n[ok]).sum() / n[ok].sum()) if ok.any() else float("nan")


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / tau): probabilities at temperature tau (E7), row by row, in the dtype of ``probs``
    (float32 stays float32: the estimate's matrices are the largest it holds)."""
    p = np.asarray(probs)
    out = np.empty(p.shape, dtype=p.dtype if p.dtype.kind == "f" else np.float64)
    tiny = np.finfo(out.dtype).tiny
    step = max(1, GATHER_CELLS // max(p.shape[1], 1))
    for i in range(0, len(p), step):
        z = np.log(np.maximum(p[i : i + step].astype(out.dtype), tiny)) / out.dtype.type(temperature)
        z -= z.max(1, keepdims=True)
        np.exp(z, out=z)
        out[i : i + step] = z / z.sum(1, keepdims=True)
    return out


def probe_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """tau minimizing the labels' mean negative log-likelihood under softmax(log p / tau) (E7): one
    temperature that calibrates the out-of-fold probe to the crawl's labels, i.e. to the posterior
    of the noisy label that the noise process acts on (searched over [0.05, 20] in log tau)."""
    p = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    ok = (labels >= 0) & (labels < p.shape[1])
    if not ok.any():
        return 1.0
    logp = np.log(np.maximum(p[ok], np.finfo(p.dtype).tiny if p.dtype.kind == "f" else 1e-300))
    own = logp[np.arange(int(ok.sum())), labels[ok]].astype(np.float64)
    top = logp.max(1).astype(np.float64)

    def loglik(log_tau: float) -> float:  # mean log softmax(log p / tau)_y
        inv = 1.0 / math.exp(log_tau)
        lse = np.log(np.exp((logp - top[:, None].astype(logp.dtype)) * logp.dtype.type(inv)).sum(1, dtype=np.float64))
        return float(((own - top) * inv - lse).mean())

    return math.exp(_golden_max(loglik, math.log(0.05), math.log(20.0), steps=50))  # eq. E7


def flag_threshold(score: np.ndarray, expected: int) -> float:
    """theta (E8): the ``expected`` rows of largest flag score lie above it, halfway between the
    expected-th and the next largest score (a tie across the count lies just below the tied value, so
    the whole tie is flagged). expected <= 0 gives +inf (none), expected >= the rows gives -inf (all)."""
    s = np.sort(np.asarray(score, dtype=np.float64))[::-1]
    k = int(expected)
    if k <= 0 or len(s) == 0:
        return float("inf")
    if k >= len(s):
        return float("-inf")
    hi, lo = s[k - 1], s[k]  # hi >= lo
    if hi == lo:
        return float(np.nextafter(lo, -np.inf))
    return float(0.5 * (hi + lo)) if np.isfinite(hi) else float(np.nextafter(lo, np.inf))


def flag_rows(score: np.ndarray, outside: np.ndarray, threshold: float) -> np.ndarray:
    """flagged_i = u_i or s_i > theta (E8), 0/1: every row outside every class, and every other row
    whose flag score (:func:`wrong_label_score` under the round-1 probe) passes the threshold."""
    s = np.asarray(score, dtype=np.float64)
    return ((np.asarray(outside) > 0) | (s > threshold)).astype(np.int8)


def suggest_relabel(probs: np.ndarray, labels: np.ndarray, T: np.ndarray,
                    outside: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The relabel suggestion and its confidence (E9), by Bayes under the noise process T:

        s_i = argmax_{t != y_i} p_it T[t, y_i]
        confidence_i = (1 - u_i) p_{i,s_i} T[s_i, y_i] / sum_t p_it T[t, y_i]

    the likeliest class other than the label given the image and its label (a flagged row's label is
    taken to be wrong), and the probability that it is the image's class; 0 for an image counted
    outside every class. Where labels flip between look-alike classes, T makes the partner of the
    label the likely answer; under uniform flips every other class is weighted alike."""
    p = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    C = p.shape[1]
    valid = (labels >= 0) & (labels < C)
    lab = np.where(valid, labels, 0)
    TT = np.ascontiguousarray(np.asarray(T, dtype=np.float64).T)
    cls = np.empty(len(p), dtype=np.int64)
    conf = np.empty(len(p))
    step = max(1, GATHER_CELLS // max(C, 1))
    for i in range(0, len(p), step):
        post = p[i : i + step].astype(np.float64) * TT[lab[i : i + step]]  # p_it T[t, y_i]
        den = post.sum(1)
        if C > 1:
            post[np.arange(len(post)), lab[i : i + step]] = -np.inf
        cls[i : i + step] = post.argmax(1)
        conf[i : i + step] = post[np.arange(len(post)), cls[i : i + step]] / np.maximum(den, 1e-300)  # eq. E9
    if outside is not None:
        conf = conf * (1.0 - np.asarray(outside, dtype=np.float64))
    return cls, np.clip(conf, 0.0, 1.0).astype(np.float32)


@dataclass
class NoiseModel:
    """What a row's flag score and suggestion need (E7-E9): the noise process T, its inverse and the
    round-1 probe's temperature."""

    transition: np.ndarray  # (C, C) T[t, y]
    inverse: np.ndarray  # (C, C) T^-1
    temperature: float

    def on(self, device: torch.device) -> NoiseModel:
        """The same with float32 tensors on ``device``, transposed for row gathers (cached)."""
        cache = self.__dict__.setdefault("_on", {})
        key = str(device)
        if key not in cache:
            cache[key] = NoiseModel(
                transition=torch.as_tensor(np.ascontiguousarray(self.transition.T), dtype=torch.float32).to(device),
                inverse=torch.as_tensor(np.ascontiguousarray(self.inverse.T), dtype=torch.float32).to(device),
                temperature=self.temperature)
        return cache[key]


def noise_model_outputs(logits: torch.Tensor, labels: torch.Tensor,
                        model: NoiseModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of the round-1 probe's logits z: the flag score (E5 at temperature tau, unclipped), the
    suggested class and its confidence (E9, before the outside factor), in torch (``model`` from
    :meth:`NoiseModel.on`: T and T^-1 transposed). The same as :func:`wrong_label_score` and
    :func:`suggest_relabel` on p = softmax(z / tau)."""
    # softmax(z / tau) written out as four in-place ops: torch.softmax is slow over rows of only a dozen
    # classes (bench/bench_score_noise.py, C=14)
    p = logits.mul(1.0 / model.temperature)
    p = p.sub_(p.amax(1, keepdim=True)).exp_()
    p = p.div_(p.sum(1, keepdim=True))  # eq. E7
    y = labels[:, None]
    p_y = p.gather(1, y)[:, 0]
    q_y = (p * model.inverse.index_select(0, labels)).sum(1)  # (p T^-1)_y
    t_col = model.transition.index_select(0, labels)  # T[:, y] per row
    score = 1.0 - q_y * t_col.gather(1, y)[:, 0] / p_y.clamp_min(1e-30)  # eq. E5
    post = p.mul_(t_col)  # p_t T[t, y]
    den = post.sum(1)
    if post.shape[1] > 1:
        post.scatter_(1, y, float("-inf"))
    best, cls = post.max(1)
    return score, cls, (best / den.clamp_min(1e-30)).clamp_(0.0, 1.0)  # eq. E9


@dataclass
class NoiseEstimate:
    """What :func:`estimate_noise` finds on a sample, and what a later row is flagged with."""

    class_noise: np.ndarray  # (C,) estimated noise rate of each class (NaN: no rows)
    overall: float  # over the whole split (class rates weighted by the split's class sizes)
    transition: np.ndarray  # (C, C) T (:func:`transition_matrix`)
    temperature: float  # tau of the round-1 probe (:func:`probe_temperature`)
    flag_threshold: float  # theta (:func:`flag_threshold`)
    outside_level: np.ndarray  # (C,) :func:`outside_levels`
    rows: int  # rows the estimate was made on
    outside: float  # share of them counted outside every class
    alpha: float = float("nan")  # the Gamma-Poisson prior strength of T's off-diagonal

    def model(self) -> NoiseModel:
        return NoiseModel(transition=self.transition, inverse=invert_transition(self.transition),
                          temperature=self.temperature)


def estimate_noise(probs: np.ndarray, labels: np.ndarray, far: np.ndarray, class_rows: np.ndarray,
                   relabel_probs: np.ndarray) -> NoiseEstimate:
    """The noise estimate and the flag threshold from a uniform sample of rows (docs/noise-estimate.md).

    Args:
        probs: (n, C) out-of-fold class probabilities of the sample rows under the round-2 probe
            (:func:`probe_probabilities`).
        labels: (n,) their labels.
        far: (n,) :func:`far_from_class` of each row (its distance beyond its class's open-set threshold).
        class_rows: (C,) rows of each class in the whole split (weights of :func:`overall_noise`).
        relabel_probs: (n, C) the same rows' out-of-fold probabilities under the round-1 probe (the flag
            ranking and the suggestion).

    Steps: rows of no class (E1, E2); the noise process T from the anchors' labels (E3, E4); each row's
    probability of a wrong label r_i (E5, clipped to [0, 1], 1 outside every class), whose class means
    are the noise rates (E6); the round-1 probe's temperature (E7) and the threshold above which its
    flag score puts round(sum_i r_i) rows of the sample (E8).
    """
    p = np.asarray(probs)  # float32 stays float32: the two n x C matrices are what the estimate holds
    labels = np.asarray(labels, dtype=np.int64)
    C = p.shape[1]
    levels = outside_levels(p, labels, C)
    u = outside_rows(p.max(1), p.argmax(1), levels, far) > 0
    T, alpha = transition_matrix(anchor_counts(p[~u], labels[~u], C))
    T_inv = invert_transition(T)
    r = np.clip(wrong_label_score(p, labels, T, T_inv), 0.0, 1.0)
    r[u] = 1.0
    e = class_noise_rates(labels, r, C)
    tau = probe_temperature(relabel_probs, labels)
    score = wrong_label_score(tempered(relabel_probs, tau), labels, T, T_inv)
    score[u] = np.inf
    theta = flag_threshold(score, int(round(float(r.sum()))))
    return NoiseEstimate(class_noise=e, overall=overall_noise(e, class_rows), transition=T, temperature=tau,
                         flag_threshold=theta, outside_level=levels, rows=len(labels),
                         outside=float(u.mean()) if len(u) else 0.0, alpha=alpha)


def text_share(text_embeddings: np.ndarray, label_embeddings: np.ndarray, labels: np.ndarray,
               temperature: float = 0.05) -> np.ndarray:
    """The labeled class's share of softmax_k(cos(t_i, e_k) / T): agreement of an image's side text
    t_i (title, tags) with its label, against the class description embeddings e_k."""
    t = np.asarray(text_embeddings, dtype=np.float64)
    e = np.asarray(label_embeddings, dtype=np.float64)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return labeled_share(t @ e.T, labels, temperature)


def caption_factor(share: np.ndarray, floor: float = 0.5) -> np.ndarray:
    """c_i = floor + (1 - floor) * t_i: a caption is taken as evidence with probability 1 - floor and
    as unrelated to the image otherwise (web titles often are), so a caption naming another class
    can lower a weight by at most the factor ``floor``. Rows without a caption (NaN) get 1."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor {floor}: must be in [0, 1]")
    t = np.asarray(share, dtype=np.float64)
    return np.where(np.isnan(t), 1.0, floor + (1.0 - floor) * np.clip(np.nan_to_num(t), 0.0, 1.0)).astype(np.float32)


def fused_weight(label_probability: np.ndarray, open_set: np.ndarray, caption: np.ndarray | None = None) -> np.ndarray:
    """w_i = q_i * o_i [* c_i]: p(label | x) of the probe (or the prototype share), times the
    open-set factor (:func:`open_set_factor`), times the caption factor (:func:`caption_factor`)."""
    w = np.asarray(label_probability, dtype=np.float64) * np.asarray(open_set, dtype=np.float64)
    if caption is not None:
        w = w * np.asarray(caption, dtype=np.float64)
    return np.clip(w, 0.0, 1.0).astype(np.float32)


def suspect_order(weight: np.ndarray, distance: np.ndarray, flagged: np.ndarray, limit: int = 0) -> np.ndarray:
    """Row indices of the flagged rows, worst first: by increasing weight then decreasing distance; at
    most ``limit`` (0: all)."""
    weight = np.asarray(weight)
    distance = np.asarray(distance, dtype=np.float64)
    rows = np.flatnonzero(np.asarray(flagged).astype(bool))
    d = np.where(np.isnan(distance[rows]), np.inf, distance[rows])
    order = rows[np.lexsort((-d, weight[rows]))]
    return order[:limit] if limit > 0 else order


class TopSuspects:
    """The ``limit`` worst flagged rows seen so far, in bounded memory (at most 2 x limit + one block).

    A row outside the current worst ``limit`` can never re-enter (later rows only push it down),
    so pruning is exact. Keeps each row's columns (ids, paths, ...) as numpy arrays.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.cols: dict[str, list[np.ndarray]] = {}
        self.size = 0

    def add(self, row: np.ndarray, weight: np.ndarray, distance: np.ndarray, flagged: np.ndarray,
            **extra: np.ndarray) -> None:
        flagged = np.asarray(flagged).astype(bool)
        if not flagged.any():
            return
        cols = {"row": row, "weight": weight, "distance": distance, **extra}
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


def _split_sorted(score: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores of the positive rows and of the negative rows, each sorted ascending (float32
    stays float32: the same order and ties in half the memory); NaN ranks lowest."""
    s = np.asarray(score)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    out = []
    for mask in (positive, negative):
        part = s[mask]  # a copy, sorted in place: no N-length index array
        part[np.isnan(part)] = -np.inf
        part.sort()
        out.append(part)
    return out[0], out[1]


QUERY_ROWS = 1 << 20  # positives per searchsorted call: its index arrays stay bounded


def _auc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC-AUC from sorted positive and negative scores: the probability that a positive scores
    above a negative, ties counting one half (the Mann-Whitney U / (n_pos n_neg), which is the
    trapezoidal area under the ROC curve with ties as diagonal steps), in exact integer counts."""
    below = ties = 0
    for i in range(0, len(pos), QUERY_ROWS):
        q = pos[i : i + QUERY_ROWS]
        lo = np.searchsorted(neg, q, side="left")
        below += int(lo.sum())
        ties += int((np.searchsorted(neg, q, side="right") - lo).sum())
    return (2 * below + ties) / (2.0 * len(pos) * len(neg))


def _ap_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds, highest first (scikit-learn's
    definition), from sorted positive and negative scores. Recall moves only at thresholds that
    positives hold: at each, tp = #positives >= t, fp = #negatives >= t."""
    n_pos = len(pos)
    last = np.r_[np.flatnonzero(np.diff(pos)), n_pos - 1]  # each distinct positive score's last index
    first = np.r_[0, last[:-1] + 1]
    tps = (n_pos - first).astype(np.float64)
    fps = (len(neg) - np.searchsorted(neg, pos[last], side="left")).astype(np.float64)
    return float(np.sum((last - first + 1) / n_pos * (tps / (tps + fps))))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the positives ``y_true`` (ties count one half)."""
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return _auc_sorted(*_split_sorted(score, y, ~y))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's definition)."""
    y = np.asarray(y_true).astype(bool)
    if not y.any():
        return float("nan")
    return _ap_sorted(*_split_sorted(score, y, ~y))


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
        known &= np.asarray(rows, dtype=bool)
    n_pos, n_known = int(noisy[known].sum()), int(known.sum())
    if n_known == 0:
        return None
    n_neg = n_known - n_pos
    # one split and sort for both metrics
    pos, neg = _split_sorted(suspicion, known & noisy, known & ~noisy)
    return {
        "roc_auc": _auc_sorted(pos, neg) if n_pos and n_neg else float("nan"),
        "average_precision": _ap_sorted(pos, neg) if n_pos else float("nan"),
        "noise_rate": n_pos / n_known,
        "rows": n_known,
    }


# -- the default score, composed (score-noise and stages.api.find_label_issues both run these) -----

SCORE_MODES = ("fused", "paper")  # docs/method.md "Scoring beyond eq. 6"
NOISE_ESTIMATE = "anchor-transition+posterior"  # the noise estimate's method (docs/noise-estimate.md)
THRESHOLD_SAMPLE_ROWS = 20000  # probe_rows 0: rows sampled for the open-set thresholds
ESTIMATE_CELLS = 1 << 24  # rows x classes of each of the estimate's two probability matrices (64 MB of float32)


@dataclass
class ScoreConfig:
    """Options of the score; :meth:`params` are the ones that change the output (provenance).

    Attributes:
        alpha: shift alpha of eq. 6: distances >= alpha get weight 0 (paper table 4).
        beta: contrast beta of eq. 6 (paper table 5).
        score: ``"fused"`` (p(label | x) of a reweighted out-of-fold probe times an open-set factor
            from eq. 6's distance, and with side text the caption's class share) or ``"paper"``
            (eq. 6 alone; the estimate, flags and suggestions still come from the probe).
        open_set_quantile: t_c is this quantile of the own-prototype distances of class c's rows the
            probe agrees with (:func:`open_set_thresholds`).
        temperature: probe_rows 0: softmax temperature over cosine similarities (the prototype
            share that replaces the probe).
        background: probe_rows 0: cosine of the share's background column; None: 1 - alpha^2 / 2,
            where eq. 6 reaches 0 (resolved on construction).
        probe_rows: sample of labeled train rows the probe is fitted and the noise estimate made on
            (0: no probe, no estimate, flag or suggestion).
        probe_folds: folds of the out-of-fold probe.
        probe_epochs: epochs of the probe's first round (the second runs half as many).
        image_text: fuse each image's side text with its labeled class (None: decided by the caller
            from whether side text exists; resolve it before :meth:`params`).
        text_temperature: softmax temperature over cos(text, class).
        text_floor: the caption factor is floor + (1 - floor) x the caption's class share.
    """

    alpha: float = 1.2
    beta: float = 1.5
    score: str = "fused"
    open_set_quantile: float = 0.99
    temperature: float = 0.02
    background: float | None = None
    probe_rows: int = 20000
    probe_folds: int = 5
    probe_epochs: int = 10
    image_text: bool | None = None
    text_temperature: float = 0.05
    text_floor: float = 0.5

    def __post_init__(self) -> None:
        if not self.alpha > 0 or not self.beta > 0:
            raise ValueError(f"alpha {self.alpha} / beta {self.beta}: both must be > 0")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score {self.score!r}: choose one of {', '.join(SCORE_MODES)}")
        if self.probe_rows < 0 or self.probe_folds < 2 or self.probe_epochs < 1:
            raise ValueError("probe_rows must be >= 0, probe_folds >= 2, probe_epochs >= 1")
        if self.score == "fused":
            if not self.temperature > 0 or not self.text_temperature > 0:
                raise ValueError("temperature / text_temperature must be > 0")
            if not 0 < self.open_set_quantile <= 1:
                raise ValueError(f"open_set_quantile {self.open_set_quantile}: must be in (0, 1]")
            if self.image_text and not 0 <= self.text_floor <= 1:
                raise ValueError(f"text_floor {self.text_floor}: must be in [0, 1]")
        elif self.image_text:
            raise ValueError("image_text applies to score 'fused' only")
        if self.background is None:
            self.background = 1.0 - self.alpha**2 / 2.0

    @property
    def fits_state(self) -> bool:
        """Whether a run fits anything on a sample (a probe, or the open-set thresholds)."""
        return self.score == "fused" or self.probe_rows > 0

    def params(self) -> dict[str, Any]:
        """The fields that change the output (``dataclasses.asdict`` less those the mode ignores),
        plus the noise estimate's method when there is a probe."""
        p = dataclasses.asdict(self)
        p["image_text"] = bool(self.image_text)
        unused: set[str] = set()
        if self.score == "paper":
            unused |= {"temperature", "background", "image_text", "text_temperature", "text_floor"}
            if self.probe_rows == 0:
                unused |= {"probe_rows", "probe_folds", "probe_epochs", "open_set_quantile"}
        elif not self.image_text:
            unused |= {"text_temperature", "text_floor"}
        for k in unused:
            del p[k]
        if self.probe_rows > 0:
            p["noise_estimate"] = NOISE_ESTIMATE
        return p

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> ScoreConfig:
        """The config a recorded :meth:`params` describes (a record without ``score`` is an eq. 6 run),
        with ``overrides`` applied."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in names}
        if params and "score" not in params:
            kwargs["score"] = "paper"
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)


@dataclass
class ScoreState:
    """What a run fits on its sample and then scores every row with.

    Attributes:
        thresholds: (C,) open-set thresholds t_c (None: nothing fitted).
        probe1: the round-1 out-of-fold probe (the flag ranking and the suggestion).
        probe: the round-2 (reweighted) probe (the fused weight's p(label | x) and the estimate).
        estimate: the noise estimate (None without a probe).
        noise_model: the estimate's noise process, as the rows are scored with it.
        external: the probes' probabilities come from the caller (``pred_probs``): probe and probe1
            are None and every row's probabilities are passed to :func:`score_rows`.
        train_rows: labeled train rows the sample was drawn from.
    """

    thresholds: np.ndarray | None = None
    probe1: Probe | None = None
    probe: Probe | None = None
    estimate: NoiseEstimate | None = None
    noise_model: NoiseModel | None = None
    external: bool = False
    train_rows: int = 0

    @property
    def has_probe(self) -> bool:
        return self.probe is not None or self.external


def sample_rows(labels: np.ndarray, train: np.ndarray, num_classes: int,
                config: ScoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rows a run fits on: a seeded uniform sample of at most ``probe_rows`` labeled train rows
    (THRESHOLD_SAMPLE_ROWS without a probe), and the (C,) count of labeled train rows per class.

    Raises:
        ValueError: too few labeled train rows for the probe's folds.
    """
    labels = np.asarray(labels, dtype=np.int64)
    cand = np.flatnonzero((labels >= 0) & (labels < num_classes) & np.asarray(train, dtype=bool))
    if config.probe_rows > 0 and len(cand) < 2 * config.probe_folds:
        raise ValueError(f"only {len(cand)} labeled train rows: too few for a {config.probe_folds}-fold probe "
                         "(probe_rows 0 scores without one)")
    size = config.probe_rows if config.probe_rows > 0 else THRESHOLD_SAMPLE_ROWS
    rows = np.sort(np.random.default_rng(0).choice(cand, min(size, len(cand)), replace=False))
    return rows, np.bincount(labels[cand], minlength=num_classes)


def fit_score_state(x: np.ndarray, y: np.ndarray, rows: np.ndarray, class_rows: np.ndarray,
                    prototypes: np.ndarray, slots: np.ndarray, prototype_class: np.ndarray, index: Any,
                    config: ScoreConfig, *, pred_probs: np.ndarray | None = None,
                    device: str | torch.device = "cpu") -> ScoreState:
    """Fit a run's state on its sample (:func:`sample_rows`): the two-round out-of-fold probe and the
    open-set thresholds (:func:`fit_two_round_probe`), then on a uniform subsample of at most
    ESTIMATE_CELLS / C rows the noise estimate, its noise process and the flag threshold
    (:func:`estimate_noise`). Without a probe (``probe_rows`` 0) only the thresholds, from the rows
    whose prototype share says their label is the likelier one.

    Args:
        x: (n, D) features of the sample rows; y: (n,) their labels; rows: (n,) their positions.
        class_rows: (C,) labeled train rows per class (the estimate's weights).
        prototypes, slots, prototype_class, index: as :func:`score_block`.
        config: the score's options.
        pred_probs: (n, C) out-of-sample class probabilities of the sample rows from the caller: they
            stand in for both rounds of the probe (no probe is fitted).
        device: where the products and the probe's fit run.
    """
    C = slots.shape[0]
    y = np.asarray(y, dtype=np.int64)
    distance = score_block(x, y, prototypes, slots, prototype_class, index, config.alpha, config.beta,
                           device=device).distance
    if pred_probs is None and config.probe_rows == 0:
        share = labeled_share(class_similarity(x, prototypes, slots), y, config.temperature, config.background)
        return ScoreState(thresholds=open_set_thresholds(distance, y, share >= 0.5, C, config.open_set_quantile),
                          train_rows=int(np.sum(class_rows)))
    probe1 = probe = None
    if pred_probs is None:
        probe1, probe, thresholds = fit_two_round_probe(
            x, y, rows, C, distance, alpha=config.alpha, beta=config.beta, folds=config.probe_folds,
            epochs=config.probe_epochs, quantile=config.open_set_quantile, device=device)
    else:
        pred_probs = np.asarray(pred_probs, dtype=np.float32)
        agree = pred_probs[np.arange(len(y)), y] >= 0.5
        thresholds = open_set_thresholds(distance, y, agree, C, config.open_set_quantile)
    keep = min(len(rows), max(ESTIMATE_CELLS // max(C, 1), 2 * config.probe_folds))
    sub = np.sort(np.random.default_rng(1).choice(len(rows), keep, replace=False)) if keep < len(rows) else \
        np.arange(len(rows))
    if pred_probs is None:
        probs = probe_probabilities(probe, x[sub], rows[sub], device=device)
        relabel_probs = probe_probabilities(probe1, x[sub], rows[sub], device=device)
    else:
        probs = relabel_probs = pred_probs[sub]
    estimate = estimate_noise(probs, y[sub], far_from_class(distance[sub], y[sub], thresholds), class_rows,
                              relabel_probs)
    return ScoreState(thresholds=thresholds, probe1=probe1, probe=probe, estimate=estimate,
                      noise_model=estimate.model(), external=pred_probs is not None,
                      train_rows=int(np.sum(class_rows)))


def estimate_record(estimate: NoiseEstimate, train_rows: int) -> dict[str, Any]:
    """The estimate's numbers and the scalars later rows are flagged with, as plain floats (what
    score-noise records as scores.h5's ``noise_estimate`` attribute)."""
    return {"overall": float(estimate.overall), "method": NOISE_ESTIMATE, "rows": int(estimate.rows),
            "outside": float(estimate.outside), "train_rows": int(train_rows),
            "temperature": float(estimate.temperature), "flag_threshold": float(estimate.flag_threshold),
            "transition_alpha": float(estimate.alpha)}


def text_shares(encoder: Any, text: np.ndarray, label_embeddings: np.ndarray, labels: np.ndarray,
                temperature: float = 0.05) -> np.ndarray:
    """The caption's class share t_i of each row (:func:`text_share`; NaN where the side text is blank).

    Args:
        encoder: a sentence encoder with ``encode(texts, normalize_embeddings=True, batch_size=...)``
            (sentence-transformers), the one the label embeddings were made with.
    """
    text = np.asarray(text).astype(str)
    labels = np.asarray(labels, dtype=np.int64)
    has = np.char.str_len(np.char.strip(text)) > 0
    ts = np.full(len(labels), np.nan, dtype=np.float32)
    if has.any():
        emb = encoder.encode(text[has].tolist(), normalize_embeddings=True, batch_size=256)
        ts[has] = text_share(np.asarray(emb, dtype=np.float32), label_embeddings, labels[has], temperature)
    return ts


def probability_outputs(probs: np.ndarray, labels: np.ndarray, model: NoiseModel | None) -> dict[str, Any]:
    """What :func:`score_block` computes from a probe, from given class probabilities instead:
    p(label | x) (0 for a label outside the classes), the likeliest other class and its probability,
    and with ``model`` the flag score, suggested class and confidence (:func:`noise_model_outputs` on
    log p, i.e. on softmax(log p / tau) as the estimate tempers them)."""
    p = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    C = p.shape[1]
    valid = (labels >= 0) & (labels < C)
    lab = np.where(valid, labels, 0)
    own = p[np.arange(len(p)), lab]
    rest = p.copy()
    if C > 1:
        rest[np.arange(len(p)), lab] = -np.inf
    other = rest.argmax(1)
    out: dict[str, Any] = {"label_probability": np.where(valid, own, 0.0).astype(np.float32),
                           "other_class": other.astype(np.int64),
                           "other_probability": rest[np.arange(len(p)), other].astype(np.float32)}
    if model is not None:
        logits = torch.as_tensor(np.log(np.maximum(p, np.finfo(np.float32).tiny)))
        score, cls, conf = noise_model_outputs(logits, torch.as_tensor(lab), model.on(torch.device("cpu")))
        out["relabel"] = (score.numpy().astype(np.float32), cls.numpy().astype(np.int64),
                          conf.numpy().astype(np.float32))
    return out


def flag_and_suggest(s: BlockScores, labels: np.ndarray, estimate: NoiseEstimate | None,
                     thresholds: np.ndarray | None) -> dict[str, np.ndarray]:
    """flagged, suggested_class and suggested_confidence of scored rows (docs/noise-estimate.md): outside
    every class by the round-2 probe and the distance (E2), the flag score, suggestion and confidence
    under the round-1 probe (E8, E9; ``s.relabel``). A label outside the classes is flagged. Without an
    estimate nothing is flagged and the suggestion is the nearest prototype's class, with confidence 0
    (nothing measured it)."""
    labels = np.asarray(labels, dtype=np.int64)
    if estimate is None or s.relabel is None:
        return {"flagged": np.zeros(len(labels), dtype=np.int8), "suggested_class": s.nearest_class,
                "suggested_confidence": np.zeros(len(labels), dtype=np.float32)}
    p_label, p_other = s.label_probability, s.other_probability
    top_class = np.where(p_label >= p_other, labels, s.other_class)
    u = outside_rows(np.maximum(p_label, p_other), top_class, estimate.outside_level,
                     far_from_class(s.distance, labels, thresholds))  # eq. E2
    score, suggested, confidence = s.relabel
    invalid = (labels < 0) | (labels >= len(estimate.outside_level))
    score = np.where((u > 0) | invalid, np.inf, score).astype(np.float32)  # flagged whatever the threshold
    return {"flagged": flag_rows(score, u, estimate.flag_threshold), "flag_score": score,
            "suggested_class": suggested, "suggested_confidence": (confidence * (1.0 - u)).astype(np.float32)}


def score_rows(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, state: ScoreState,
               config: ScoreConfig, prototypes: np.ndarray, slots: np.ndarray, prototype_class: np.ndarray,
               index: Any, *, text_share: np.ndarray | None = None, pred_probs: np.ndarray | None = None,
               device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Score a block of rows with a fitted state: the per-row columns of a run.

    Always ``weight``, ``distance``, ``nearest_class``, ``nearest_distance`` (eq. 6 via
    :func:`score_block`) and ``flagged``, ``suggested_class``, ``suggested_confidence``
    (:func:`flag_and_suggest`; ``flag_score`` with an estimate). With score ``fused`` also ``probe``
    (or ``share`` without a probe), ``text_share`` (when given), ``open_set``, and ``weight_eq6``:
    ``weight`` is then the fused weight q_i o_i [c_i] (:func:`fused_weight`).

    Args:
        features: (B, D) features; labels: (B,) their labels; rows: (B,) their positions (a probe's
            sample rows are scored by the fold model that did not see them).
        state: :func:`fit_score_state` (or a stored state).
        config: the score's options.
        prototypes, slots, prototype_class, index: as :func:`score_block`.
        text_share: (B,) the caption's class share of each row (:func:`text_shares`; NaN: no caption).
        pred_probs: (B, C) the caller's class probabilities of these rows (``state.external``).
        device: where the products run.
    """
    labels = np.asarray(labels, dtype=np.int64)
    estimate = state.estimate
    if state.external:
        if pred_probs is None:
            raise ValueError("the state was fitted on pred_probs: give the rows' pred_probs")
        s = score_block(features, labels, prototypes, slots, prototype_class, index, config.alpha, config.beta,
                        rows=rows, device=device)
        s = dataclasses.replace(s, **probability_outputs(pred_probs, labels, state.noise_model if estimate else None))
    else:
        s = score_block(features, labels, prototypes, slots, prototype_class, index, config.alpha, config.beta,
                        probe=state.probe, rows=rows, device=device,
                        relabel_probe=state.probe1 if estimate else None, noise_model=state.noise_model)
    out = {"weight": s.weight, "distance": s.distance, "nearest_class": s.nearest_class,
           "nearest_distance": s.nearest_distance}
    if config.score == "fused":
        if state.has_probe:
            q = out["probe"] = s.label_probability
        else:  # the prototype share stands in for the probe (probe_rows 0)
            sim = class_similarity(features, prototypes, slots)
            q = out["share"] = labeled_share(sim, labels, config.temperature, config.background)
        if text_share is not None:
            out["text_share"] = text_share
        out["open_set"] = open_set_factor(s.distance, labels, state.thresholds, config.alpha, config.beta)
        caption = caption_factor(text_share, config.text_floor) if text_share is not None else None
        out["weight_eq6"] = s.weight
        out["weight"] = fused_weight(q, out["open_set"], caption)
    out.update(flag_and_suggest(s, labels, estimate, state.thresholds))
    return out
