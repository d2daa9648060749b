"""The noise estimate, the flag and the relabel suggestion (docs/noise-estimate.md) on cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from stages import score_noise as sn

# eight rows, two classes: probabilities (p0, p1), labels, weights
P = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5],
              [0.2, 0.8], [0.1, 0.9], [0.6, 0.4], [0.45, 0.55]])
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
W = np.array([0.9, 0.7, 0.2, 0.4, 0.8, 0.85, 0.3, 0.5])


def test_outside_levels_and_rows_by_hand():
    # rho = (1/2, 1/2); t0 = (0.9 + 0.8 + 0.3 + 0.5) / 4 = 0.625, t1 = (0.8 + 0.9 + 0.4 + 0.55) / 4 = 0.6625
    levels = sn.outside_levels(P, Y, 2)
    np.testing.assert_allclose(levels, [(0.5 + 0.625) / 2, (0.5 + 0.6625) / 2])
    # p_max below the level of its class: row 3 (0.5 < 0.5625, argmax 0) and row 7 (0.55 < 0.58125)
    u = sn.outside_rows(P.max(1), P.argmax(1), levels)
    assert u.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


def test_confident_joint_calibration_and_posterior_by_hand():
    u = np.array([0, 0, 0, 1, 0, 0, 0, 1])
    # thresholds over the rows inside: t0 = (0.9 + 0.8 + 0.3) / 3, t1 = (0.8 + 0.9 + 0.4) / 3 = 0.7
    t = sn.confident_thresholds(P[u == 0], Y[u == 0], 2)
    np.testing.assert_allclose(t, [2.0 / 3, 0.7])
    g = sn.confident_guess(P, t, u)
    # rows 0, 1: class 0; row 2: p1 = 0.7 >= t1 -> 1; rows 3, 7: outside (2); rows 4, 5: 1; row 6: none (-1)
    assert g.tolist() == [0, 0, 1, 2, 1, 1, -1, 2]
    joint = sn.calibrated_joint(Y, g, 2)
    # counts: label 0 -> (2, 1, 1), label 1 -> (0, 2, 1); rows scaled to n_0 = n_1 = 4
    np.testing.assert_allclose(joint.dense(), [[2, 1, 1], [0, 8 / 3, 4 / 3]])
    # T[t, y] = Q[y, t] / sum_y Q[y, t]: T[0] = (1, 0), T[1] = (3/11, 8/11)
    r = sn.posterior_noise(P, Y, g, joint)
    by_hand = [1 - 0.9 / (0.9 + 0.1 * 3 / 11), 1 - 0.8 / (0.8 + 0.2 * 3 / 11), 1 - 0.3 / (0.3 + 0.7 * 3 / 11), 1.0,
               0.0, 0.0, 0.0, 1.0]  # labeled 1: only class 1 is ever labeled 1, so r = 0; outside rows: 1
    np.testing.assert_allclose(r, by_hand, atol=1e-12)
    e = sn.class_noise_rates(Y, r, 2)
    np.testing.assert_allclose(e, [np.mean(by_hand[:4]), 0.25])
    assert sn.overall_noise(e, np.array([4, 4])) == pytest.approx((np.mean(by_hand[:4]) + 0.25) / 2)
    # the class sizes of the whole split weight the overall rate
    assert sn.overall_noise(e, np.array([100, 300])) == pytest.approx(0.25 * np.mean(by_hand[:4]) + 0.75 * 0.25)


def test_estimate_noise_is_the_steps_together():
    est = sn.estimate_noise(P, Y, W, np.array([4, 4]))
    e0 = np.mean([3 / 102, 6 / 94, 7 / 18, 1.0])  # the posterior of class 0's rows, as fractions
    np.testing.assert_allclose(est.class_noise, [e0, 0.25])
    assert est.rows == 8 and est.outside == pytest.approx(0.25)
    # flags: round(4 x 0.3705) = 1 row of class 0 (lowest weight 0.2 -> cutoff (0.2 + 0.4) / 2),
    # round(4 x 0.25) = 1 of class 1 (0.3 -> cutoff (0.3 + 0.5) / 2)
    np.testing.assert_allclose(est.flag_cutoff, [0.3, 0.4])
    assert sn.flag_rows(W, Y, est.flag_cutoff).tolist() == [0, 0, 1, 0, 0, 0, 1, 0]


def test_calibrated_joint_raises_the_diagonal_and_skips_uncounted_rows():
    # labels (0, 0, 1), counted under (1, 1, none): the diagonal of both classes becomes 1
    j = sn.calibrated_joint(np.array([0, 0, 1]), np.array([1, 1, -1]), 2)
    np.testing.assert_allclose(j.dense(), [[2 / 3, 4 / 3, 0], [0, 1, 0]])


def test_posterior_counts_a_row_between_two_classes_as_likely_clean():
    # confident learning counts a row whose confident class is another as mislabeled; when class 1 is
    # rarely labeled 0, a row between 0 and 1 labeled 0 stays likely clean
    joint = sn.Joint(noisy=np.array([0, 0, 1]), true=np.array([0, 1, 1]), count=np.array([90.0, 10.0, 100.0]),
                     num_classes=2)
    r = sn.posterior_noise(np.array([[0.45, 0.55]]), np.array([0]), np.array([1]), joint)
    # T[0, 0] = 1, T[1, 0] = 10 / 110: r = 1 - 0.45 / (0.45 + 0.55 / 11)
    assert r[0] == pytest.approx(1 - 0.45 / (0.45 + 0.05)) and r[0] < 0.5


def test_flag_counts_follow_the_estimate(rng):
    labels = rng.integers(0, 4, 1000)
    w = rng.random(1000)
    e = np.array([0.0, 0.13, 0.5, np.nan])
    cut = sn.flag_cutoffs(w, labels, e)
    f = sn.flag_rows(w, labels, cut).astype(bool)
    for c in range(3):
        n = (labels == c).sum()
        assert f[labels == c].sum() == round(n * e[c])  # exactly the estimated count
        if f[labels == c].any():  # and they are the class's lowest weights
            assert w[(labels == c) & f].max() < w[(labels == c) & ~f].min()
    assert not f[labels == 3].any() and np.isnan(cut[3])  # no estimate: nothing flagged
    assert cut[0] == 0.0
    assert sn.flag_cutoffs(np.array([0.1, 0.2]), np.array([0, 0]), np.array([1.0]))[0] == np.inf
    # a new row is flagged when it ranks among the flagged of its class
    assert sn.flag_rows(np.array([cut[2] - 1e-9, cut[2] + 1e-9]), np.array([2, 2]), cut).tolist() == [1, 0]
    assert sn.flag_rows(np.array([0.5]), np.array([7]), cut).tolist() == [1]  # a label outside [0, C)
    # a tie across the count (weights of exactly 0): the whole tie is flagged, nothing above it
    tied = np.array([0.0, 0.0, 0.0, 0.2, 0.6], dtype=np.float32)
    f0 = sn.flag_cutoffs(tied, np.zeros(5, dtype=int), np.array([0.4]))  # k = 2, inside the tie
    assert sn.flag_rows(tied, np.zeros(5, dtype=int), f0).tolist() == [1, 1, 1, 0, 0]


def test_suggestion_and_confidence_by_hand():
    # row 0: class 2 is the likeliest other than the label, with p = 0.3; row 1: outside every class
    # (u = 1): confidence 0; row 2: the label has it all, the other class 0
    cls, conf = sn.suggest_relabel(np.array([2, 1, 0]), np.array([0.3, 0.1, 0.0]), np.array([0.0, 1.0, 0.0]))
    assert cls.tolist() == [2, 1, 0]
    np.testing.assert_allclose(conf, [0.3, 0.0, 0.0])


def test_score_block_gives_the_likeliest_other_class_of_both_probes():
    import faiss

    rng = np.random.default_rng(3)
    C, d, n = 4, 16, 50
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, C, n)
    probes = [sn.Probe(W=rng.standard_normal((2, d, C)).astype(np.float32), b=rng.standard_normal((2, C)).astype(np.float32),
                       sample_rows=np.array([3, 9]), sample_fold=np.array([0, 1])) for _ in range(2)]
    V = np.eye(C, d, dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(V)
    s = sn.score_block(x, y, V, sn.class_slots(np.arange(C), C), np.arange(C), index, probe=probes[0],
                       rows=np.arange(n), relabel_probe=probes[1])
    g = x / np.linalg.norm(x, axis=1, keepdims=True)
    for pr, (lp, oc, op) in zip(probes, [(s.label_probability, s.other_class, s.other_probability), s.relabel]):
        p = sn.probe_probabilities(pr, x, np.arange(n))
        z = g @ pr.W.mean(0) + pr.b.mean(0)  # rows outside the sample: the mean model
        z[3], z[9] = g[3] @ pr.W[0] + pr.b[0], g[9] @ pr.W[1] + pr.b[1]  # sample rows: their held-out fold's
        np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-4)
        np.testing.assert_allclose(lp, p[np.arange(n), y], rtol=1e-4)
        q = p.copy()
        q[np.arange(n), y] = -1
        assert (oc == q.argmax(1)).all() and (oc != y).all()
        np.testing.assert_allclose(op, q.max(1), rtol=1e-4)
