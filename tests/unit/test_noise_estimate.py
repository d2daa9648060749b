"""The noise estimate, the flag and the relabel suggestion (docs/noise-estimate.md, E1-E9) on cases
computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages import score_noise as sn

# eight rows, two classes: probabilities (p0, p1), labels
P = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5],
              [0.2, 0.8], [0.1, 0.9], [0.6, 0.4], [0.45, 0.55]])
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_outside_needs_both_a_low_probability_and_a_far_image():
    # rho = (1/2, 1/2); t0 = (0.9 + 0.8 + 0.3 + 0.5) / 4 = 0.625, t1 = (0.8 + 0.9 + 0.4 + 0.55) / 4 = 0.6625
    levels = sn.outside_levels(P, Y, 2)
    np.testing.assert_allclose(levels, [(0.5 + 0.625) / 2, (0.5 + 0.6625) / 2])  # E1
    # p_max below the level of its class: row 3 (0.5 < 0.5625, argmax 0) and row 7 (0.55 < 0.58125)
    low = sn.outside_rows(P.max(1), P.argmax(1), levels)
    assert low.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    # E2: only row 3 is also far from its class's prototype
    far = np.array([0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert sn.outside_rows(P.max(1), P.argmax(1), levels, far).tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_far_from_class_by_hand():
    d = np.array([0.5, 0.9, np.nan, 0.3, 0.2, 0.1])
    labels = np.array([0, 0, 1, 1, 2, 5])
    t = np.array([0.6, 0.25, np.inf])
    # near; beyond t0; unknown distance; beyond t1; class without a threshold; label outside the classes
    assert sn.far_from_class(d, labels, t).tolist() == [False, True, True, True, False, True]


def test_anchor_counts_are_the_labels_of_the_most_confident_quarter():
    p = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.5, 0.2, 0.3],  # argmax 0
                  [0.2, 0.7, 0.1], [0.03, 0.95, 0.02],  # argmax 1
                  [0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4],  # argmax 2
                  [0.9, 0.05, 0.05]])  # a label outside the classes: left out
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 7])
    # a quarter: ceil(4/4) = 1 row of class 0 (row 0, label 0), ceil(2/4) = 1 of class 1 (row 5, label 0),
    # ceil(3/4) = 1 of class 2 (row 7, label 2)
    np.testing.assert_array_equal(sn.anchor_counts(p, labels, 3), [[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    # a half: rows 0, 1 (labels 0, 1); row 5 (0); rows 7, 6 (2, 2)
    np.testing.assert_array_equal(sn.anchor_counts(p, labels, 3, share=0.5), [[1, 1, 0], [1, 0, 0], [0, 0, 2]])
    # a class no row is likeliest to be has no anchors
    assert sn.anchor_counts(p[:4], labels[:4], 3)[1:].sum() == 0
    with pytest.raises(ValueError):
        sn.anchor_counts(p, labels, 3, share=0.0)


def _nb_loglik(K, alpha):
    """sum over the off-diagonal cells of log NB(K | alpha, E_t = m_t lambda_bar), without log K!"""
    C = len(K)
    m = K.sum(1)
    off = ~np.eye(C, dtype=bool)
    lam_bar = K[off].sum() / (m.sum() * (C - 1))
    total = 0.0
    for t in range(C):
        E = m[t] * lam_bar
        for y in range(C):
            if t != y:
                k = K[t, y]
                total += (math.lgamma(k + alpha) - math.lgamma(alpha) + alpha * math.log(alpha / (alpha + E))
                          + (k * math.log(E / (alpha + E)) if k else 0.0))
    return total


def test_transition_matrix_by_empirical_bayes_by_hand():
    # one confused pair (0 -> 1) and a stray label: one cell stands out, alpha is finite
    K = np.array([[10.0, 6, 0], [0, 16, 0], [1, 0, 15]])
    T, alpha = sn.transition_matrix(K)
    assert 0 < alpha < 10
    ll = _nb_loglik(K, alpha)  # E4: alpha maximizes the marginal likelihood
    assert ll >= _nb_loglik(K, alpha * 1.05) - 1e-9 and ll >= _nb_loglik(K, alpha / 1.05) - 1e-9
    lam_bar = 7 / 96  # 7 off-diagonal labels among 48 anchors x 2 other classes
    by_hand = (K + alpha) / (K.sum(1)[:, None] + alpha / lam_bar)
    np.fill_diagonal(by_hand, 0)
    np.fill_diagonal(by_hand, 1 - by_hand.sum(1))
    np.testing.assert_allclose(T, by_hand, rtol=1e-12)
    np.testing.assert_allclose(T.sum(1), 1)
    # counts exactly at the common rate (K_ty = m_t lambda_bar): alpha runs to its bound, every
    # off-diagonal cell gets lambda_bar = 10 / 100
    K2 = np.array([[16.0, 2, 2], [1, 8, 1], [2, 2, 16]])
    T2, alpha2 = sn.transition_matrix(K2)
    assert alpha2 > 1e6
    np.testing.assert_allclose(T2, [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], atol=1e-6)
    # no anchor carries another label: no noise
    T3, alpha3 = sn.transition_matrix(np.diag([5.0, 3.0]))
    np.testing.assert_array_equal(T3, np.eye(2)) and math.isinf(alpha3)
    # a class without anchors gets the common rate
    T4, _ = sn.transition_matrix(np.array([[9.0, 1, 0], [0, 0, 0], [0, 1, 9]]))
    np.testing.assert_allclose(T4[1], [0.05, 0.9, 0.05], atol=1e-6)  # lambda_bar = 2 / 40


def test_wrong_label_score_by_hand():
    T = np.array([[0.8, 0.2], [0.1, 0.9]])
    T_inv = sn.invert_transition(T)
    np.testing.assert_allclose(T_inv, np.array([[9, -2], [-1, 8]]) / 7)
    p = np.array([[0.6, 0.4], [0.2, 0.8], [0.2, 0.8], [0.5, 0.5]])
    s = sn.wrong_label_score(p, np.array([0, 0, 1, 3]), T, T_inv)
    # E5: q = p T^-1. Row 0: q = (5/7, 2/7), s = 1 - (5/7)(0.8) / 0.6; row 1: q = (1/7, 6/7), s = 1 - (1/7)(0.8) / 0.2;
    # row 2, labeled 1: s = 1 - (6/7)(0.9) / 0.8; row 3: a label outside the classes
    np.testing.assert_allclose(s[:3], [1 / 21, 3 / 7, 1 / 28])
    assert s[3] == np.inf


def test_class_rates_by_hand():
    r = np.array([0.1, 0.3, 1.0, 0.0, 0.5, np.nan])
    labels = np.array([0, 0, 0, 1, 1, 1])
    e = sn.class_noise_rates(labels, r, 3)  # E6
    np.testing.assert_allclose(e[:2], [1.4 / 3, 0.25])
    assert np.isnan(e[2])
    # the class sizes of the whole split weight the overall rate; a class without an estimate is left out
    assert sn.overall_noise(e, np.array([100, 300, 50])) == pytest.approx(0.25 * 1.4 / 3 + 0.75 * 0.25)


def test_probe_temperature_calibrates_to_the_labels():
    # every row p = (0.9, 0.1), 70 of 100 labeled 0: the calibrated p0 is 0.7, so 9^(1/tau) = 7/3 (E7)
    p = np.tile([0.9, 0.1], (100, 1))
    labels = np.r_[np.zeros(70, int), np.ones(30, int)]
    tau = sn.probe_temperature(p, labels)
    assert tau == pytest.approx(math.log(9) / math.log(7 / 3), rel=1e-6)
    np.testing.assert_allclose(sn.tempered(p, tau)[0], [0.7, 0.3], rtol=1e-6)
    # an over-confident probe is softened (tau > 1), an under-confident one sharpened (tau < 1)
    assert sn.probe_temperature(np.tile([0.6, 0.4], (100, 1)), labels) < 1


def test_flag_threshold_and_flags_by_hand():
    s = np.array([0.9, 0.1, 0.5, np.inf, 0.3])
    assert sn.flag_threshold(s, 3) == pytest.approx(0.4)  # sorted: inf, 0.9, 0.5 | 0.3
    assert sn.flag_threshold(s, 1) == np.nextafter(0.9, np.inf)  # above 0.9, below the outside row
    assert sn.flag_threshold(s, 0) == np.inf and sn.flag_threshold(s, 5) == -np.inf
    tied = np.array([0.5, 0.5, 0.5, 0.1])
    th = sn.flag_threshold(tied, 2)  # a tie across the count: the whole tie is flagged
    assert sn.flag_rows(tied, np.zeros(4), th).tolist() == [1, 1, 1, 0]
    # E8: outside rows always, the others above the threshold
    u = np.array([0, 0, 0, 1, 0])
    assert sn.flag_rows(np.array([0.9, 0.1, 0.5, 0.2, 0.3]), u, 0.4).tolist() == [1, 0, 1, 1, 0]


def test_suggestion_weighs_the_classes_by_how_often_they_carry_the_label():
    T = np.array([[0.7, 0.3, 0.0], [0.3, 0.7, 0.0], [0.05, 0.05, 0.9]])
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]])
    cls, conf = sn.suggest_relabel(p, np.array([0, 2, 0]), T, np.array([0.0, 0.0, 1.0]))
    # row 0, labeled 0: p_t T[t, 0] = (0.14, 0.09, 0.025): class 1, the label's look-alike, although class 2
    # has the larger p; confidence 0.09 / 0.255 (E9). Row 1: only class 2 is ever labeled 2: the
    # likeliest other is class 0 with confidence 0. Row 2: outside every class: confidence 0
    assert cls.tolist() == [1, 0, 1]
    np.testing.assert_allclose(conf, [0.09 / 0.255, 0.0, 0.0], rtol=1e-6)


def _random_model(rng, C):
    T = rng.random((C, C)) * 0.1 + np.eye(C) * 2
    T /= T.sum(1, keepdims=True)
    return sn.NoiseModel(transition=T, inverse=sn.invert_transition(T), temperature=0.7)


def test_noise_model_outputs_match_the_numpy_functions():
    rng = np.random.default_rng(5)
    C, n = 5, 40
    model = _random_model(rng, C)
    z = rng.standard_normal((n, C)) * 2
    y = rng.integers(0, C, n)
    score, cls, conf = sn.noise_model_outputs(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(y),
                                              model.on(torch.device("cpu")))
    p = sn.tempered(np.exp(z) / np.exp(z).sum(1, keepdims=True), model.temperature)
    np.testing.assert_allclose(score.numpy(), sn.wrong_label_score(p, y, model.transition, model.inverse),
                               rtol=1e-5, atol=1e-4)
    c2, conf2 = sn.suggest_relabel(p, y, model.transition)
    np.testing.assert_array_equal(cls.numpy(), c2)
    np.testing.assert_allclose(conf.numpy(), conf2, atol=1e-5)


def test_score_block_gives_the_estimates_outputs_of_the_round_1_probe():
    import faiss

    rng = np.random.default_rng(3)
    C, d, n = 4, 16, 50
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, C, n)
    probes = [sn.Probe(W=rng.standard_normal((2, d, C)).astype(np.float32),
                       b=rng.standard_normal((2, C)).astype(np.float32),
                       sample_rows=np.array([3, 9]), sample_fold=np.array([0, 1])) for _ in range(2)]
    model = _random_model(rng, C)
    V = np.eye(C, d, dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(V)
    args = (x, y, V, sn.class_slots(np.arange(C), C), np.arange(C), index)
    s = sn.score_block(*args, probe=probes[0], rows=np.arange(n), relabel_probe=probes[1], noise_model=model)
    g = x / np.linalg.norm(x, axis=1, keepdims=True)
    for k, pr in enumerate(probes):
        p = sn.probe_probabilities(pr, x, np.arange(n))
        z = g @ pr.W.mean(0) + pr.b.mean(0)  # rows outside the sample: the mean model
        z[3], z[9] = g[3] @ pr.W[0] + pr.b[0], g[9] @ pr.W[1] + pr.b[1]  # sample rows: their held-out fold's
        np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-4)
        if k == 0:  # round 2: p(label | x) and the likeliest other class
            np.testing.assert_allclose(s.label_probability, p[np.arange(n), y], rtol=1e-4)
            q = p.copy()
            q[np.arange(n), y] = -1
            assert (s.other_class == q.argmax(1)).all()
            np.testing.assert_allclose(s.other_probability, q.max(1), rtol=1e-4)
        else:  # round 1: the flag score (E5 at the temperature), the suggestion and its confidence (E9)
            pt = sn.tempered(p, model.temperature)
            score, cls, conf = s.relabel
            np.testing.assert_allclose(score, sn.wrong_label_score(pt, y, model.transition, model.inverse),
                                       rtol=1e-5, atol=1e-4)
            c2, conf2 = sn.suggest_relabel(pt, y, model.transition)
            np.testing.assert_array_equal(cls, c2)
            np.testing.assert_allclose(conf, conf2, atol=1e-5)
    with pytest.raises(ValueError):
        sn.score_block(*args, probe=probes[0], relabel_probe=probes[1])  # no noise model


def test_estimate_noise_is_the_steps_together(rng):
    C, n = 3, 300
    p2 = rng.dirichlet(np.ones(C) * 0.5, n)
    p1 = rng.dirichlet(np.ones(C) * 0.5, n)
    y = rng.integers(0, C, n)
    far = rng.random(n) < 0.5
    est = sn.estimate_noise(p2, y, far, np.array([1000, 2000, 3000]), p1)
    levels = sn.outside_levels(p2, y, C)
    u = sn.outside_rows(p2.max(1), p2.argmax(1), levels, far) > 0
    T, alpha = sn.transition_matrix(sn.anchor_counts(p2[~u], y[~u], C))
    r = np.clip(sn.wrong_label_score(p2, y, T, sn.invert_transition(T)), 0, 1)
    r[u] = 1
    e = sn.class_noise_rates(y, r, C)
    tau = sn.probe_temperature(p1, y)
    s = sn.wrong_label_score(sn.tempered(p1, tau), y, T, sn.invert_transition(T))
    s[u] = np.inf
    np.testing.assert_allclose(est.transition, T)
    np.testing.assert_allclose(est.class_noise, e)
    assert est.overall == pytest.approx((1000 * e[0] + 2000 * e[1] + 3000 * e[2]) / 6000)
    assert est.temperature == pytest.approx(tau) and est.alpha == pytest.approx(alpha)
    assert est.flag_threshold == sn.flag_threshold(s, int(round(r.sum())))
    assert est.rows == n and est.outside == pytest.approx(u.mean())
    # the flags of the sample: the estimated count (E8)
    assert sn.flag_rows(s, u, est.flag_threshold).sum() == int(round(r.sum()))


def test_estimate_recovers_a_known_noise_process():
    # the probe's probabilities are the exact noisy posterior p = P T of images whose clean class
    # posterior P is sharp for 60% of them and spread for the rest; labels are drawn from p
    rng = np.random.default_rng(11)
    C, n = 3, 30000
    T_true = np.array([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
    t = rng.integers(0, C, n)
    P_clean = np.eye(C)[t]
    spread = rng.random(n) < 0.4
    P_clean[spread] = 0.6 * P_clean[spread] + 0.4 * rng.dirichlet(np.ones(C), int(spread.sum()))
    p = P_clean @ T_true
    labels = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    truth = 1 - (P_clean[np.arange(n), labels] * T_true[labels, labels] / p[np.arange(n), labels]).mean()
    est = sn.estimate_noise(p, labels, np.zeros(n, dtype=bool), np.bincount(labels, minlength=C), p)
    # about 2,500 anchors a class: a share's standard error is at most 0.01
    np.testing.assert_allclose(est.transition, T_true, atol=0.035)
    assert est.overall == pytest.approx(truth, abs=0.015)
    assert est.outside == 0  # nothing is far: nothing counted outside every class
