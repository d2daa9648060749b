"""--score fused (README "Scoring beyond eq. 6"): hand-computed small cases; --score paper = eq. 6."""

import math

import numpy as np

from stages import score_noise as sn


def test_labeled_share_with_background_by_hand():
    sim = np.array([[0.9, 0.5], [0.1, 0.2]])
    T, b = 0.1, 0.28
    a = sn.labeled_share(sim, np.array([0, 1]), T, b)
    e = lambda x: math.exp(x / T)  # noqa: E731
    assert np.allclose(a, [e(0.9) / (e(0.9) + e(0.5) + e(0.28)), e(0.2) / (e(0.1) + e(0.2) + e(0.28))], rtol=1e-5)
    # no background: a plain softmax share; a label outside [0, C) gets 0
    a2 = sn.labeled_share(sim, np.array([1, 5]), T)
    assert np.allclose(a2, [e(0.5) / (e(0.9) + e(0.5)), 0.0], rtol=1e-5)


def test_fused_weight_is_geometric_mean_and_skips_missing():
    w = sn.fused_weight([np.array([0.25, 0.5, 0.0]), np.array([1.0, np.nan, 0.9])])
    assert np.allclose(w, [0.5, 0.5, 0.0])


def test_class_similarity_takes_best_prototype_of_each_class():
    V = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    slots = sn.class_slots(np.array([0, 1, 1]), 2)
    sim = sn.class_similarity(np.array([[0.8, 0.6]], dtype=np.float32), V, slots)
    assert np.allclose(sim, [[0.8, 0.96]], atol=1e-6)


def test_probe_is_out_of_fold_for_sample_rows():
    rng = np.random.default_rng(0)
    C, n = 3, 60
    centers = np.eye(3, 8) * 4
    y = np.repeat(np.arange(C), n // C)
    x = (centers[y] + rng.normal(size=(n, 8))).astype(np.float32)
    y_noisy = y.copy()
    y_noisy[:5] = (y[:5] + 1) % C  # five flips
    probe = sn.fit_probe(x, y_noisy, np.arange(n), C, folds=3, epochs=30, lr=0.05)
    p = sn.probe_label_probability(probe, x, y_noisy, np.arange(n))
    assert p[:5].max() < np.median(p[5:])  # the flipped rows have the lowest p(label | x)
    # a row outside the sample is scored by the mean of the K models
    q = sn.probe_label_probability(probe, x[:1], y_noisy[:1], np.array([10_000]))
    g = x[:1] / np.linalg.norm(x[:1])
    ref = np.mean([np.exp(g @ probe.W[k] + probe.b[k])[0, y_noisy[0]] / np.exp(g @ probe.W[k] + probe.b[k]).sum()
                   for k in range(3)])
    assert np.isclose(q[0], ref, rtol=1e-4)


def test_text_share_by_hand():
    t = np.array([[1.0, 0.0]])
    e = np.array([[1.0, 0.0], [0.0, 2.0]])
    ts = sn.text_share(t, e, np.array([0]), 0.5)
    assert np.isclose(ts[0], math.exp(2) / (math.exp(2) + 1.0))


def test_paper_mode_is_eq6():
    d = np.array([0.0, 0.7, 1.2, 2.0, np.nan])
    assert np.allclose(sn.noise_weight(d, 1.2, 1.5), [1.2**1.5, 0.5**1.5, 0.0, 0.0, 0.0], atol=1e-6)


def test_cli_fused_keeps_eq6_and_paper_equals_eq6(tmp_path, sinet):
    from test_score_noise import make_features, make_prototypes_artifact, read_scores

    data = make_features(tmp_path / "features.h5", 200)
    v = make_prototypes_artifact(tmp_path)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "fused", "--probe-folds", "2",
                         "--probe-epochs", "2")
    assert code == 0, err
    s, _, _ = read_scores(tmp_path)
    d = np.linalg.norm(data["features"].astype(np.float32) - v[data["labels"]], axis=1)
    np.testing.assert_allclose(s["weight_eq6"], np.maximum(0, 1.2 - d) ** 1.5, atol=3e-3)
    np.testing.assert_allclose(s["weight"], sn.fused_weight([s["share"], s["probe"]]), atol=1e-6)
    assert ((s["weight"] >= 0) & (s["weight"] <= 1)).all()
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper")
    assert code == 0, err
    p, _, _ = read_scores(tmp_path)
    np.testing.assert_array_equal(p["weight"], sn.noise_weight(p["distance"], 1.2, 1.5))
    assert "share" not in p
