"""--score fused (docs/method.md, "Scoring beyond eq. 6"): hand-computed small cases; --score paper = eq. 6."""

import math

import faiss
import numpy as np

from sinet_cli import store
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


def test_cli_fused_is_default_probe_times_open_set(tmp_path, sinet):
    from test_score_noise import make_features, make_prototypes_artifact, read_scores

    data = make_features(tmp_path / "features.h5", 200)
    v = make_prototypes_artifact(tmp_path)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--probe-folds", "2", "--probe-epochs", "2")
    assert code == 0, err
    s, _, _ = read_scores(tmp_path)
    d = np.linalg.norm(data["features"].astype(np.float32) - v[data["labels"]], axis=1)
    np.testing.assert_allclose(s["weight_eq6"], np.maximum(0, 1.2 - d) ** 1.5, atol=3e-3)
    o = sn.open_set_factor(s["distance"], s["labels"], s["open_set_threshold"], 1.2, 1.5)
    np.testing.assert_allclose(s["open_set"], o, atol=1e-6)
    np.testing.assert_allclose(s["weight"], s["probe"] * o, atol=1e-6)
    assert s["probe_W"].shape == (2, 8, 3) and ((s["weight"] >= 0) & (s["weight"] <= 1)).all()
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper")
    assert code == 0, err
    p, _, _ = read_scores(tmp_path)
    np.testing.assert_array_equal(p["weight"], sn.noise_weight(p["distance"], 1.2, 1.5))
    # eq. 6 alone is the weight; a probe is fitted only for the noise estimate, flag and suggestion
    assert "share" not in p and "probe" not in p and "open_set" not in p and p["probe_W"].shape[1:] == (8, 3)
    assert {"flagged", "suggested_class", "suggested_confidence", "class_noise"} <= set(p)


def test_cli_fused_appends_new_rows_with_the_stored_probe(tmp_path, sinet):
    from test_score_noise import grow, make_features, make_prototypes_artifact, read_scores

    make_features(tmp_path / "features.h5", 200)
    make_prototypes_artifact(tmp_path)
    opts = ("--probe-folds", "2", "--probe-epochs", "2")
    assert sinet("score-noise", "--out", tmp_path, *opts)[0] == 0
    first, _, _ = read_scores(tmp_path)
    grown = grow(tmp_path, 200, 50)
    code, _, err = sinet("score-noise", "--out", tmp_path, *opts)
    assert code == 0 and "200 ids already scored, scoring 50 new" in err, err
    second, _, _ = read_scores(tmp_path)
    for k in ("weight", "probe", "open_set", "probe_W", "open_set_threshold"):  # old rows and the state untouched
        np.testing.assert_array_equal(second[k][: len(first[k])], first[k])
    # a new row: the averaged stored model (mean W, mean b), times its open-set factor
    g = grown["features"][200:].astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    lab = grown["labels"][200:]
    z = g @ first["probe_W"].mean(0) + first["probe_b"].mean(0)
    p = (np.exp(z) / np.exp(z).sum(1, keepdims=True))[np.arange(50), lab]
    np.testing.assert_allclose(second["probe"][200:], p, atol=1e-5)
    np.testing.assert_allclose(second["weight"][200:], p * second["open_set"][200:], atol=1e-5)
    # the estimate, its noise process and the flag threshold stay; new rows are judged by them
    for k in ("flagged", "suggested_class", "suggested_confidence"):
        np.testing.assert_array_equal(second[k][:200], first[k])
    for k in ("class_noise", "noise_transition", "outside_level", "relabel_probe_W"):
        np.testing.assert_array_equal(second[k], first[k])
    with store.open_artifact(tmp_path / "scores.h5", "scores") as a:
        info = a.json_attr("noise_estimate")
    # by hand (numpy, float64) from the stored state: outside every class by the round-2 model and the
    # distance (E2), the flag score of the round-1 model at the stored temperature (E5, E8), the
    # suggestion and its confidence (E9)
    p2 = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    far = second["distance"][200:] > second["open_set_threshold"][lab]
    u = (p2.max(1) < first["outside_level"][p2.argmax(1)]) & far
    z1 = g @ first["relabel_probe_W"].mean(0) + first["relabel_probe_b"].mean(0)
    p1 = np.exp(z1 / info["temperature"])
    p1 /= p1.sum(1, keepdims=True)
    T = first["noise_transition"]
    score = 1 - (p1 @ np.linalg.inv(T))[np.arange(50), lab] * T[lab, lab] / p1[np.arange(50), lab]
    flagged = u | (score > info["flag_threshold"])
    near = np.abs(score - info["flag_threshold"]) < 1e-4  # float32 streaming vs float64 here
    np.testing.assert_array_equal(second["flagged"][200:][~near], flagged[~near])
    post = p1 * T[:, lab].T
    conf = post / post.sum(1, keepdims=True)
    post[np.arange(50), lab] = -1
    sug = post.argmax(1)
    np.testing.assert_array_equal(second["suggested_class"][200:], sug)
    np.testing.assert_allclose(second["suggested_confidence"][200:], conf[np.arange(50), sug] * ~u, atol=1e-5)
    assert "estimated noise" in err


def test_cli_fused_without_probe_uses_the_prototype_share(tmp_path, sinet):
    from test_score_noise import make_features, make_prototypes_artifact, read_scores

    make_features(tmp_path / "features.h5", 120)
    make_prototypes_artifact(tmp_path)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--probe-rows", "0")
    assert code == 0, err
    s, _, _ = read_scores(tmp_path)
    assert "probe" not in s and "probe_W" not in s
    np.testing.assert_allclose(s["weight"], s["share"] * s["open_set"], atol=1e-6)


def test_probe_fit_does_not_import_torch_dynamo():
    # torch.optim.Adam(fused=True)'s first step imports torch._dynamo: 2.4 s and ~150 MB more in
    # every score-noise process. The probe's Adam runs on plain tensor ops; a fresh interpreter
    # checks that nothing on the path pulls it in.
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


class _WordEncoder:
    """A stand-in sentence encoder: one-hot on the first class word a text contains."""

    words = ("c0", "c1", "c2")

    def encode(self, texts, normalize_embeddings=True, batch_size=256):
        out = np.full((len(texts), 3), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for k, w in enumerate(self.words):
                if w in t:
                    out[i, k] = 1.0
                    break
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_cli_side_text_is_on_by_default_and_off_with_the_switch(tmp_path, sinet, monkeypatch):
    import sinet_cli.sideinfo
    from sinet_cli import store
    from test_score_noise import make_features, make_prototypes_artifact, read_scores

    monkeypatch.setattr(sinet_cli.sideinfo, "load_text_encoder", lambda folder=None: _WordEncoder())
    data = make_features(tmp_path / "features.h5", 120)
    text = [f"a photo of c{c}" if i % 4 else "" for i, c in enumerate(data["clean_labels"])]
    store.write_artifact(tmp_path / "features.h5", "features", {**data, "side_text": text}, {"text": 1}, {})
    make_prototypes_artifact(tmp_path)
    S = np.eye(3, dtype=np.float32)
    graph = {"classes": ["c0", "c1", "c2"], "S_w": S, "S_l": S, "S_t": S}
    store.write_artifact(tmp_path / "graph.h5", "graph", {**graph, "label_embeddings": np.eye(3, dtype=np.float32)},
                         {}, {})
    opts = ("--probe-folds", "2", "--probe-epochs", "2")

    def run(*extra):
        code, _, err = sinet("score-noise", "--out", tmp_path, *opts, *extra)
        assert code == 0, err
        s, _, _ = read_scores(tmp_path)
        return s, store.read_provenance(tmp_path / "scores.h5")["params"], err

    s, params, _ = run()  # side text and label embeddings: on
    assert params["image_text"] is True and "text_share" in s
    has = np.arange(120) % 4 != 0
    assert np.isnan(s["text_share"][~has]).all()  # blank side text: no caption factor
    agree = data["labels"] == data["clean_labels"]  # the caption names the true class
    assert ((s["text_share"][has] > 0.5) == agree[has]).all()
    np.testing.assert_allclose(s["weight"], s["probe"] * s["open_set"] * sn.caption_factor(s["text_share"]), atol=1e-6)
    s, params, _ = run("--no-image-text")
    assert params["image_text"] is False and "text_share" not in s
    # graph.h5 without label embeddings: said once, scored without
    store.write_artifact(tmp_path / "graph.h5", "graph", graph, {}, {})
    s, params, err = run()
    assert params["image_text"] is False and "text_share" not in s
    assert err.count("no label_embeddings") == 1 and "warning" in err
    # asked for explicitly: an error naming the file
    code, _, err = sinet("score-noise", "--out", tmp_path, "--image-text")
    assert code == 1 and "graph.h5: no label_embeddings" in err
    # blank side text only: off, nothing said
    store.write_artifact(tmp_path / "features.h5", "features", {**data, "side_text": [" "] * 120}, {"text": 2}, {})
    s, params, err = run()
    assert params["image_text"] is False and "warning" not in err
