"""stages.score_noise: eq. 6 against a hand-computed case, the nearest prototype, the detection metrics
against scikit-learn, the suspect order. Imports no sinet_cli module."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from stages import score_noise as sn

# -- eq. 6 on a 3-class, 6-image case ------------------------------------------------------------
# prototypes e1, e2, e3; numbers from a plain-math reference (no numpy, no sinet code):
#   row 1: g = (.6, .8, 0), label 0: d = ||e1 - g|| = sqrt(.16 + .64) = .894427,
#          w = (1.2 - .894427)^1.5 = .305573^1.5 = .168916; nearest: e2 at sqrt(.36 + .04) = .632456
#   row 5: g = e2, label 0: d = sqrt(2) = 1.414214 > alpha -> w = 0; nearest: e2 at 0
V = np.eye(3, dtype=np.float32)
PC = np.array([0, 1, 2])
G = np.array([(1, 0, 0), (0.6, 0.8, 0), (0, 0.6, 0.8), (0.8, 0, 0.6), (0, 0, 1), (0, 1, 0)], dtype=np.float32)
L = np.array([0, 0, 1, 2, 2, 0])


def flat_index(v: np.ndarray):
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(np.ascontiguousarray(v, dtype=np.float32))
    return index


def test_eq6_hand_computed():
    s = sn.score_block(G, L, V, sn.class_slots(PC, 3), PC, flat_index(V), alpha=1.2, beta=1.5)
    np.testing.assert_allclose(s.distance, [0, 0.894427, 0.894427, 0.894427, 0, 1.414214], atol=1e-5)
    np.testing.assert_allclose(s.weight, [1.314534, 0.168916, 0.168916, 0.168916, 1.314534, 0], atol=1e-5)
    assert s.nearest_class.tolist() == [0, 1, 2, 0, 2, 1]
    np.testing.assert_allclose(s.nearest_distance, [0, 0.632456, 0.632456, 0.632456, 0, 0], atol=1e-3)


def test_eq6_alpha_beta_hand_computed():
    s = sn.score_block(G.astype(np.float16), L, V, sn.class_slots(PC, 3), PC, flat_index(V), alpha=1.0, beta=2.0)
    np.testing.assert_allclose(s.weight, [1.0, 0.011146, 0.011146, 0.011146, 1.0, 0], atol=1e-4)


def test_eq6_nearest_prototype_of_the_class_with_two_per_class():
    # class 0 has a second prototype (.6, .8, 0): row 1 sits on it (d = 0, w = 1.2^1.5 = 1.314534),
    # row 5 (e2) is .632456 from it: w = (1.2 - .632456)^1.5 = .427563
    V2 = np.array([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.6, 0.8, 0)], dtype=np.float32)
    PC2 = np.array([0, 1, 2, 0])
    slots = sn.class_slots(PC2, 3)
    assert slots.tolist() == [[0, 3], [1, 1], [2, 2]]
    s = sn.score_block(G, L, V2, slots, PC2, flat_index(V2))
    np.testing.assert_allclose(s.distance[[1, 5, 2]], [0, 0.632456, 0.894427], atol=1e-3)
    np.testing.assert_allclose(s.weight[[1, 5, 2]], [1.314534, 0.427563, 0.168916], atol=1e-3)


def test_eq6_l2_index_and_unknown_labels():
    index = faiss.IndexFlatL2(3)
    index.add(V)
    s = sn.score_block(G, np.array([0, 0, 1, 2, 2, -1]), V, sn.class_slots(PC, 3), PC, index)
    np.testing.assert_allclose(s.nearest_distance, [0, 0.632456, 0.632456, 0.632456, 0, 0], atol=1e-3)
    assert np.isnan(s.distance[5]) and s.weight[5] == 0


def test_eq6_any_other_faiss_index_is_searched_and_agrees_with_the_flat_product(rng):
    # score_block computes the nearest prototype itself for an exact flat index; any other index
    # (here the flat one wrapped in an id map) goes through FAISS's search: both must agree
    v = rng.standard_normal((40, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    g = rng.standard_normal((300, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    pc = np.arange(40) % 20
    labels = rng.integers(0, 20, 300)
    wrapped = faiss.IndexIDMap(faiss.IndexFlatIP(16))
    wrapped.add_with_ids(v, np.arange(40, dtype=np.int64))
    assert sn._flat_metric(flat_index(v)) == "ip" and sn._flat_metric(wrapped) is None
    a = sn.score_block(g, labels, v, sn.class_slots(pc, 20), pc, flat_index(v))
    b = sn.score_block(g, labels, v, sn.class_slots(pc, 20), pc, wrapped)
    assert (a.nearest_class == b.nearest_class).all()
    np.testing.assert_allclose(a.nearest_distance, b.nearest_distance, atol=1e-5)
    np.testing.assert_allclose(a.distance, b.distance, atol=1e-6)
    # and the own-class distance is the brute-force minimum over the class's prototypes
    brute = [min(np.linalg.norm(g[i] - v[j]) for j in np.flatnonzero(pc == labels[i])) for i in range(300)]
    np.testing.assert_allclose(a.distance, brute, atol=1e-5)


def test_score_block_across_sub_blocks_of_float16_rows_matches_brute_force(rng):
    # D=1024: 1,024-row float32 sub-blocks, so 2,500 rows are three pieces (the last partial)
    d, n = 1024, 2500
    assert sn._sub_rows(d, 16) == 1024
    v = rng.standard_normal((10, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    g16 = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float16)
    pc = np.arange(10) % 5
    labels = rng.integers(-1, 6, n)  # -1 and 5 are outside [0, 5)
    g = g16.astype(np.float64)
    dists = np.linalg.norm(g[:, None, :] - v[None].astype(np.float64), axis=2)  # (n, 10)
    own = np.array([dists[i, pc == labels[i]].min() if 0 <= labels[i] < 5 else np.nan for i in range(n)])
    wrapped = faiss.IndexIDMap(faiss.IndexFlatIP(d))
    wrapped.add_with_ids(v, np.arange(10, dtype=np.int64))
    for index in (flat_index(v), wrapped):
        s = sn.score_block(g16, labels, v, sn.class_slots(pc, 5), pc, index)
        np.testing.assert_allclose(s.distance, own, atol=1e-5)
        np.testing.assert_array_equal(s.nearest_class, pc[dists.argmin(1)])
        np.testing.assert_allclose(s.nearest_distance, dists.min(1), atol=1e-5)
    np.testing.assert_array_equal(s.weight, sn.noise_weight(s.distance))


def test_noise_weight_clips_at_alpha():
    w = sn.noise_weight(np.array([0.0, 0.2, 1.2, 2.0, np.nan]), alpha=1.2, beta=1.5)
    np.testing.assert_allclose(w, [1.2**1.5, 1.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_class_slots_requires_a_prototype_per_class():
    with pytest.raises(ValueError, match="class 2 has no prototype"):
        sn.class_slots(np.array([0, 1, 1]), 3)


# -- detection metrics ---------------------------------------------------------------------------


def test_roc_auc_and_ap_match_sklearn(rng):
    metrics = pytest.importorskip("sklearn.metrics")
    for trial in range(5):
        y = rng.random(300) < 0.3
        s = np.round(rng.random(300) + 0.5 * y, 1 if trial % 2 else 6)  # with and without ties
        assert sn.roc_auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        assert sn.average_precision(y, s) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)


def test_metrics_hand_cases():
    assert sn.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert sn.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    # ranking 1, 0, 1: AP = 1/2 * 1 + 1/2 * 2/3
    assert sn.average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 1 / 3)
    assert np.isnan(sn.roc_auc([1, 1], [0.1, 0.2]))
    # NaN (an unknown distance) ranks lowest, tied with other NaNs: (0 + 1/2) / 2 negatives
    assert sn.roc_auc([1, 0, 0], [np.nan, 0.5, np.nan]) == 0.25
    # float32 scores keep their order and ties (no float64 copy); AP by hand: thresholds .9 (tp 1,
    # fp 0) and .5 (a tie of one positive and one negative: tp 2, fp 1): 1/2 * 1 + 1/2 * 2/3
    s32 = np.array([0.9, 0.5, 0.5, 0.1], dtype=np.float32)
    assert sn.average_precision([1, 1, 0, 0], s32) == pytest.approx(0.5 + 1 / 3)
    assert sn.roc_auc([1, 1, 0, 0], s32) == pytest.approx((2 * 3 + 1) / 8)


def test_noise_mask_unknown_and_openset():
    known, noisy = sn.noise_mask(np.array([0, 1, 2, 2]), np.array([0, 2, -1, -2]))
    assert known.tolist() == [True, True, False, True] and noisy.tolist() == [False, True, False, True]


def test_suspect_order_and_top_suspects_agree(rng):
    n = 500
    w = np.where(rng.random(n) < 0.3, 0.0, rng.random(n)).astype(np.float32)
    d = rng.random(n).astype(np.float32)
    flagged = (rng.random(n) < 0.4).astype(np.int8)
    full = sn.suspect_order(w, d, flagged)
    assert sorted(full.tolist()) == np.flatnonzero(flagged).tolist()  # exactly the flagged rows
    assert (np.diff(w[full]) >= 0).all()
    ties = np.diff(w[full]) == 0
    assert (np.diff(d[full])[ties] <= 0).all()  # equal weight: the farther first
    top = sn.TopSuspects(40)
    for s in range(0, n, 64):  # streamed in blocks, pruned as it goes
        sl = slice(s, s + 64)
        top.add(np.arange(n)[sl], w[sl], d[sl], flagged[sl], ids=np.arange(n)[sl].astype(str))
    assert top.result()["row"].tolist() == full[:40].tolist()
