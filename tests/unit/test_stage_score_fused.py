"""stages.score_noise's default score (docs/method.md, "Scoring beyond eq. 6"): hand-computed small
cases of the probe, the open-set factor, the caption factor; paper = eq. 6. Imports no sinet_cli module."""

import math

import faiss
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


def test_fused_weight_and_caption_factor_by_hand():
    c = sn.caption_factor(np.array([0.0, 0.8, np.nan, 1.0]), floor=0.5)
    assert np.allclose(c, [0.5, 0.9, 1.0, 1.0])  # 0.5 + 0.5 t; no caption: 1
    w = sn.fused_weight(np.array([0.8, 0.5, 0.9, 0.0]), np.array([1.0, 0.5, 1.0, 1.0]), c)
    assert np.allclose(w, [0.8 * 0.5, 0.5 * 0.5 * 0.9, 0.9, 0.0])
    assert np.allclose(sn.fused_weight(np.array([0.6]), np.array([0.5])), [0.3])


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
    # a sample row by the model of its held-out fold, by hand
    g = x / np.linalg.norm(x, axis=1, keepdims=True)
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    k = probe.sample_fold[7]
    assert np.isclose(p[7], softmax(g[7:8] @ probe.W[k] + probe.b[k])[0, y_noisy[7]], rtol=1e-4)
    # a row outside the sample by the averaged model (mean W, mean b)
    q = sn.probe_label_probability(probe, x[:1], y_noisy[:1], np.array([10_000]))
    ref = softmax(g[:1] @ probe.W.mean(0) + probe.b.mean(0))[0, y_noisy[0]]
    assert np.isclose(q[0], ref, rtol=1e-4)


def test_probe_probability_of_float16_rows_across_sub_blocks():
    # D=1024: 1,024-row pieces; 2,100 rows of float16, 30 of them in the sample (by their fold's model)
    rng = np.random.default_rng(1)
    C, d, n = 4, 1024, 2100
    W = rng.standard_normal((3, d, C)).astype(np.float32)
    b = rng.standard_normal((3, C)).astype(np.float32)
    sample = np.sort(rng.choice(n, 30, replace=False))
    probe = sn.Probe(W=W, b=b, sample_rows=sample, sample_fold=np.arange(30) % 3)
    x16 = rng.standard_normal((n, d)).astype(np.float16)
    y = rng.integers(0, C, n)
    y[5] = C  # outside [0, C): 0
    p = sn.probe_label_probability(probe, x16, y, np.arange(n))
    g = x16.astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(1, keepdims=True)

    ref = softmax(g @ W.mean(0) + b.mean(0))
    fold = np.full(n, -1)
    fold[sample] = probe.sample_fold
    for k in range(3):
        ref[fold == k] = softmax(g[fold == k] @ W[k] + b[k])
    want = np.where(y < C, ref[np.arange(n), np.minimum(y, C - 1)], 0.0)
    np.testing.assert_allclose(p, want, rtol=1e-4, atol=1e-6)
    # score_block computes the same in its product with the prototypes (the mean model's columns appended)
    V = rng.standard_normal((6, d)).astype(np.float32)
    pc = np.arange(6) % C
    index = faiss.IndexFlatIP(d)
    index.add(V)
    s = sn.score_block(x16, y, V, sn.class_slots(pc, C), pc, index, probe=probe, rows=np.arange(n))
    np.testing.assert_allclose(s.label_probability, want, rtol=1e-4, atol=1e-6)
    plain = sn.score_block(x16, y, V, sn.class_slots(pc, C), pc, index)
    assert plain.label_probability is None
    np.testing.assert_array_equal(s.distance, plain.distance)
    np.testing.assert_array_equal(s.nearest_class, plain.nearest_class)


def test_text_share_by_hand():
    t = np.array([[1.0, 0.0]])
    e = np.array([[1.0, 0.0], [0.0, 2.0]])
    ts = sn.text_share(t, e, np.array([0]), 0.5)
    assert np.isclose(ts[0], math.exp(2) / (math.exp(2) + 1.0))


def test_paper_mode_is_eq6():
    d = np.array([0.0, 0.7, 1.2, 2.0, np.nan])
    assert np.allclose(sn.noise_weight(d, 1.2, 1.5), [1.2**1.5, 0.5**1.5, 0.0, 0.0, 0.0], atol=1e-6)


def test_open_set_thresholds_by_hand():
    d = np.array([0.2, 0.4, 0.6, 1.1, 0.3, 0.5, np.nan, 0.9])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    agree = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)
    t = sn.open_set_thresholds(d, y, agree, 3, quantile=0.5, min_rows=2)
    # class 0: agreed rows 0.2, 0.4, 0.6 -> median 0.4; class 1: agreed non-NaN rows 0.3 and 0.9 ->
    # median 0.6; class 2: no rows -> inf
    assert np.allclose(t[:2], [0.4, 0.6]) and np.isinf(t[2])
    # fewer agreed rows than min_rows: all of the class's rows (0.2, 0.4, 0.6, 1.1 -> 0.5)
    t3 = sn.open_set_thresholds(d, y, np.array([1, 0, 0, 0, 1, 1, 1, 1], bool), 3, quantile=0.5, min_rows=2)
    assert np.isclose(t3[0], 0.5)


def test_open_set_factor_is_eq6_relative_to_the_threshold_by_hand():
    t = np.array([0.5, np.inf, 1.3])
    d = np.array([0.3, 0.5, 0.8, 1.25, 2.0, 0.9, np.nan, 1.35, 0.4])
    y = np.array([0, 0, 0, 0, 1, 0, 0, 2, 5])
    o = sn.open_set_factor(d, y, t, alpha=1.2, beta=1.5)
    w = lambda x: max(0.0, 1.2 - x) ** 1.5  # noqa: E731  eq. 6
    expect = [1.0, 1.0, w(0.8) / w(0.5), 0.0, 1.0, w(0.9) / w(0.5), 0.0, 0.0, 0.0]
    # d <= t: 1; past t: eq. 6 relative to eq. 6 at t; past alpha: 0; t = inf: 1; t past alpha:
    # 0 beyond t; NaN distance or a label outside [0, C): 0
    assert np.allclose(o, expect, atol=1e-6)


def test_probe_sample_weight_is_scale_free_and_zero_weight_rows_do_not_pull():
    rng = np.random.default_rng(1)
    C, n = 3, 90
    y = np.repeat(np.arange(C), n // C)
    x = (np.eye(3, 8)[y] * 2 + rng.normal(size=(n, 8))).astype(np.float32)
    y_noisy = y.copy()
    y_noisy[:9] = (y[:9] + 1) % C
    rows = np.arange(n)
    plain = sn.fit_probe(x, y_noisy, rows, C, folds=3, epochs=15)
    scaled = sn.fit_probe(x, y_noisy, rows, C, folds=3, epochs=15, sample_weight=np.full(n, 3.0))
    np.testing.assert_allclose(scaled.W, plain.W, atol=1e-5)  # weights are normalized to mean 1
    sw = np.ones(n)
    sw[:9] = 0.0
    clean = sn.fit_probe(x, y_noisy, rows, C, folds=3, epochs=15, sample_weight=sw)
    g = x / np.linalg.norm(x, axis=1, keepdims=True)
    p_wrong = lambda pr: np.mean([  # noqa: E731  mean p(noisy label) of the flipped rows under all K models
        (np.exp(z) / np.exp(z).sum(1, keepdims=True))[np.arange(9), y_noisy[:9]]
        for z in (g[:9] @ pr.W[k] + pr.b[k] for k in range(3))])
    assert p_wrong(clean) < p_wrong(plain)
    try:
        sn.fit_probe(x, y_noisy, rows, C, folds=3, epochs=1, seed=5, init=plain)
    except ValueError as e:
        assert "other rows or folds" in str(e)
    else:
        raise AssertionError("a probe with other folds was accepted as init")


def test_reweighted_probe_thresholds_come_from_round_one():
    rng = np.random.default_rng(2)
    C, n = 3, 120
    y = np.repeat(np.arange(C), n // C)
    x = (np.eye(3, 8)[y] * 2 + rng.normal(size=(n, 8))).astype(np.float32)
    d = rng.uniform(0.2, 1.0, n)
    rows = np.arange(n)
    probe, t = sn.fit_reweighted_probe(x, y, rows, C, d, folds=3, epochs=8, quantile=0.9)
    first = sn.fit_probe(x, y, rows, C, folds=3, epochs=8)
    p1 = sn.probe_label_probability(first, x, y, rows)
    np.testing.assert_allclose(t, sn.open_set_thresholds(d, y, p1 >= 0.5, C, 0.9))
    second = sn.fit_probe(x, y, rows, C, folds=3, epochs=4, sample_weight=p1, init=first)
    np.testing.assert_allclose(probe.W, second.W, atol=1e-6)


def test_probe_fit_does_not_import_torch_dynamo():
    # torch.optim.Adam(fused=True)'s first step imports torch._dynamo, which adds start-up time and
    # memory to every score-noise process. The probe's Adam runs on plain tensor ops; a fresh
    # interpreter checks that nothing on the path pulls it in.
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from stages import score_noise as sn\n"
            "x = np.random.default_rng(0).random((60, 8)).astype(np.float32)\n"
            "y = np.arange(60) % 3\n"
            "p = sn.fit_reweighted_probe(x, y, np.arange(60), 3, np.zeros(60, np.float32), folds=3, epochs=2)\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# -- what --image-text reads of a row: its side text, nothing else ---------------------------------


class _Encoder:
    """Stub sentence encoder: one-hot of the first class word a text contains."""

    words = ("cat", "dog", "bird")

    def encode(self, texts, normalize_embeddings=True, batch_size=256):
        out = np.full((len(texts), 3), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for k, w in enumerate(self.words):
                if w in t:
                    out[i, k] = 1.0
                    break
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_image_text_sees_only_side_text():
    # rows as score-noise reads them: no clean labels among them, only features, side_text (and labels)
    side_text = np.array(["a photo of a cat", "dog for sale", "a photo of a cat", ""])
    labels = np.array([0, 1, 2, 0])  # row 2 is labeled bird, its caption says cat
    t = sn.text_shares(_Encoder(), side_text, np.eye(3, dtype=np.float32), labels, 0.05)
    assert t[0] > 0.99 and t[1] > 0.99 and t[2] < 0.01 and np.isnan(t[3])
