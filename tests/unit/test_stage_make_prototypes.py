"""stages.make_prototypes: eq. 4 and eq. 5 against hand-computed cases, selection, probe, rounds, thread
handling. Imports no sinet_cli module (the command: tests/cli/test_make_prototypes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stages import make_prototypes as mp

# -- the 3-class, 6-image case -------------------------------------------------------------------
# Hand-computed numbers below come from a plain-math reference (lists and math.exp/log, no numpy
# and no sinet code); the derivation of the first row is written out.
S_T = np.array([[2, 0.5, 0], [0.5, 2, 0.5], [0, 0.5, 2]], dtype=np.float32)
G = np.array([(1, 0, 0), (0.6, 0.8, 0), (0, 1, 0), (0, 0.8, 0.6), (0, 0, 1), (1, 0, 0)], dtype=np.float32)
L = np.array([0, 0, 1, 1, 2, 2])
V0 = np.eye(3, dtype=np.float32)


def source_of(x: np.ndarray, chunk: int = 4):
    return lambda: ((s, x[s : s + chunk]) for s in range(0, len(x), chunk))


def test_eq4_softmax_hand_computed():
    # row 0: g = e1, label 0. s_t = (2, .5, 0): softmax = (e^2, e^.5, 1)/10.037777 = (.736122, .164252, .099624)
    # s_v = (1, 0, 0): softmax = (e, 1, 1)/4.718282 = (.576117, .211942, .211942)
    # KL = .736122 ln(.736122/.576117) + .164252 ln(.164252/.211942) + .099624 ln(.099624/.211942) = .063339
    # p = 1 / (.063339 + .01) = 13.635210
    p = mp.consistency_scores(source_of(G), L, V0, S_T, psi="softmax", temperature=1.0, gamma=1.0, eps=0.01)
    np.testing.assert_allclose(p, [13.63521, 3.290901, 26.189799, 6.605804, 13.63521, 1.408767], rtol=2e-5)
    # the mislabeled image (row 5: looks like class 0, labeled 2) is the least consistent
    assert p.argmin() == 5


def test_eq4_temperature_gamma_eps_hand_computed():
    p = mp.consistency_scores(source_of(G), L, V0, S_T, psi="softmax", temperature=0.5, gamma=2.0, eps=0.001)
    np.testing.assert_allclose(p, [113.771494, 1.750864, 329.800824, 8.066818, 113.771494, 0.267926], rtol=1e-4)


def test_eq4_l2_psi_hand_computed():
    # psi = l2: (s / ||s||)^2, entries floored at 1e-12 before the log
    p = mp.consistency_scores(source_of(G), L, V0, S_T, psi="l2", gamma=1.0, eps=0.01)
    np.testing.assert_allclose(p, [0.708398, 1.291842, 0.376752, 0.635863, 0.708398, 0.036473], rtol=1e-4)


def test_eq4_fast_and_logsumexp_paths_match_direct_kl(rng):
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 5, 50)
    V = rng.standard_normal((5, 8)).astype(np.float32)
    S = rng.random((5, 5)).astype(np.float32) + 2 * np.eye(5, dtype=np.float32)
    Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
    for T in (0.2, 0.005):  # 0.005 < EXP_SAFE_T: the shifted logsumexp path
        sm = lambda a: np.exp(a / T - (a / T).max(1, keepdims=True)) / np.exp(a / T - (a / T).max(1, keepdims=True)).sum(1, keepdims=True)
        P, Q = sm(S.astype(np.float64))[y], sm(x.astype(np.float64) @ Vn.T.astype(np.float64))
        kl = (P * (np.log(np.maximum(P, 1e-300)) - np.log(np.maximum(Q, 1e-300)))).sum(1)
        want = 1 / (kl + 1e-3)
        got = mp.consistency_scores(source_of(x, 7), y, V, S, temperature=T, eps=1e-3)
        np.testing.assert_allclose(got, want, rtol=2e-3)


def test_eq4_skips_unlabeled_rows():
    labels = L.copy()
    labels[[1, 4]] = -1
    p = mp.consistency_scores(source_of(G), labels, V0, S_T, temperature=1.0, eps=0.01)
    assert np.isnan(p[[1, 4]]).all()
    np.testing.assert_allclose(p[[0, 2, 3, 5]], [13.63521, 26.189799, 6.605804, 1.408767], rtol=2e-5)


# -- eq. 5 -------------------------------------------------------------------------------------

G5 = np.array([(1, 0, 0), (0.6, 0.8, 0), (0, 0, 1), (0, 1, 0), (0, 0.8, 0.6), (0.6, 0, 0.8)], dtype=np.float32)
L5 = np.array([0, 0, 0, 1, 1, 2])
P5 = np.array([4.0, 1.0, 2.0, 3.0, 5.0, 0.5], dtype=np.float32)


def test_eq5_weighted_topk_hand_computed():
    # class 0: top-2 by p are rows 0 (p=4) and 2 (p=2): (4 e1 + 2 e3) / 6 = (.667, 0, .333) -> unit (.894427, 0, .447214)
    # class 1: rows 4 (p=5) and 3 (p=3): (5 (0,.8,.6) + 3 e2) / 8 = (0, .875, .375) -> (0, .919145, .393919)
    # class 2: row 5 alone -> (.6, 0, .8)
    protos, sel = mp.prototypes_from_consistency(source_of(G5, 4), L5, P5, 3, np.array([2, 2, 2]))
    np.testing.assert_allclose(protos, [[0.894427, 0, 0.447214], [0, 0.919145, 0.393919], [0.6, 0, 0.8]], atol=1e-5)
    assert sel.tolist() == [True, False, True, True, True, True]


def test_eq5_sums_as_one_sparse_product_hand_computed_and_equal_to_index_add(rng):
    torch = pytest.importorskip("torch")
    # rows (1,2) w=2 and (3,4) w=1 in class 2, row (5,6) w=.5 in class 0, class 1 empty:
    # class 0: .5 (5,6) = (2.5, 3); class 1: 0; class 2: 2 (1,2) + (3,4) = (5, 8); added to ones
    sums = torch.ones(3, 2)
    rows = torch.tensor([[1.0, 2], [5, 6], [3, 4]])
    mp._add_weighted_class_sums(sums, torch.tensor([2, 0, 2]), torch.tensor([2.0, 0.5, 1.0]), rows)
    assert sums.tolist() == [[3.5, 4.0], [1.0, 1.0], [6.0, 9.0]]
    y = torch.as_tensor(rng.integers(0, 50, 3000))
    w = torch.as_tensor(rng.random(3000).astype(np.float32))
    g = torch.as_tensor(rng.standard_normal((3000, 64)).astype(np.float32))
    ours = torch.zeros(60, 64)
    mp._add_weighted_class_sums(ours, y, w, g)
    ref = torch.zeros(60, 64).index_add_(0, y, g * w[:, None])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_eq5_constant_weighting_is_the_plain_mean():
    protos, _ = mp.prototypes_from_consistency(source_of(G5, 4), L5, P5, 3, np.array([2, 2, 2]), weighting="constant")
    np.testing.assert_allclose(protos, [[0.707107, 0, 0.707107], [0, 0.948683, 0.316228], [0.6, 0, 0.8]], atol=1e-5)


def test_chain_confidence_eq4_eq5_hand_computed():
    # initial prototypes: the most confident image per class (init_topk 0.5 of 2 -> 1):
    # class 0 -> row 0 (.9), class 1 -> row 3 (.8), class 2 -> row 5 (.7, the mislabeled one)
    conf = np.array([0.9, 0.2, 0.3, 0.8, 0.6, 0.7], dtype=np.float32)
    cfg = mp.PrototypeConfig(init_topk=0.5, topk=1.0, temperature=1.0, gamma=1.0, eps=0.01)
    r = mp.make_prototypes(source_of(G, 4), L, S_T, cfg, confidence=conf)
    np.testing.assert_allclose(r.initial_prototypes, [[1, 0, 0], [0, 0.8, 0.6], [1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(r.consistency, [3.517832, 2.750474, 15.111889, 26.189799, 1.998907, 3.517832], rtol=1e-4)
    np.testing.assert_allclose(
        r.prototypes, [[0.920079, 0.391733, 0], [0, 0.916754, 0.399453], [0.869442, 0, 0.494035]], atol=1e-5)
    assert r.init_source == "probs" and r.prototype_class.tolist() == [0, 1, 2]


# -- selection helpers -------------------------------------------------------------------------


def test_resolve_k_fraction_and_count():
    counts = np.array([10, 3, 0, 1])
    assert mp.resolve_k(0.5, counts).tolist() == [5, 2, 0, 1]
    assert mp.resolve_k(1.0, counts).tolist() == [10, 3, 0, 1]
    assert mp.resolve_k(4, counts).tolist() == [4, 3, 0, 1]


def test_class_topk_ranks_within_class_and_ignores_unlabeled():
    labels = np.array([1, 0, 1, 0, -1, 1, 0])
    score = np.array([0.1, 0.9, 0.7, np.nan, 5.0, 0.3, 0.2])
    m = mp.class_topk(labels, score, np.array([2, 1]))
    # class 0: 0.9 and 0.2 beat NaN -> top-2 rows 1, 6; class 1: top-1 row 2; row 4 unlabeled
    assert np.flatnonzero(m).tolist() == [1, 2, 6]


def test_config_rejects_bad_values():
    for bad in (dict(psi="cosine"), dict(topk=0), dict(topk=2.5), dict(temperature=0), dict(eps=0),
                dict(weighting="median"), dict(per_class=0), dict(rounds=0)):
        with pytest.raises(ValueError):
            mp.PrototypeConfig(**bad).validate()


# -- larger synthetic data: probe, chunking, several prototypes, rounds ------------------------


def blobs(rng, n_per=60, C=4, D=16, noise=0.3, modes=1, spread=0.35):
    centers = rng.standard_normal((C, modes, D)).astype(np.float32)
    y = np.repeat(np.arange(C), n_per)
    mode = rng.integers(0, modes, len(y))
    x = centers[y, mode] + spread * rng.standard_normal((len(y), D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    noisy = y.copy()
    flip = rng.random(len(y)) < noise
    noisy[flip] = (y[flip] + rng.integers(1, C, flip.sum())) % C
    return x, y, noisy, centers


def test_probe_prototypes_recover_clean_classes(rng):
    x, y, noisy, _ = blobs(rng)
    S = np.eye(4, dtype=np.float32) * 2
    r = mp.make_prototypes(source_of(x, 37), noisy, S, mp.PrototypeConfig(probe_epochs=2))
    clean_means = np.stack([x[y == c].mean(0) for c in range(4)])
    clean_means /= np.linalg.norm(clean_means, axis=1, keepdims=True)
    noisy_means = np.stack([x[noisy == c].mean(0) for c in range(4)])
    noisy_means /= np.linalg.norm(noisy_means, axis=1, keepdims=True)
    # the prototypes sit closer to the clean class means than the noisy means do
    assert (np.sum(r.prototypes * clean_means, 1) > np.sum(noisy_means * clean_means, 1)).all()
    # consistency ranks mislabeled rows low
    wrong = noisy != y
    assert np.nanmean(r.consistency[wrong]) < np.nanmean(r.consistency[~wrong])
    assert r.init_source == "probe" and r.probe["rows"] == len(x) and r.probe["epochs"] == 2


def test_thread_count_restored_and_results_independent_of_it(rng):
    """The stage runs its small elementwise work on one torch thread and its products on all of them:
    the caller's thread count comes back, and the result does not depend on it."""
    torch = pytest.importorskip("torch")
    x, _, noisy, _ = blobs(rng, n_per=800, C=4, D=64)
    S = np.eye(4, dtype=np.float32) * 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = mp.make_prototypes(source_of(x, 1024), noisy, S, mp.PrototypeConfig(probe_epochs=2))
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = mp.make_prototypes(source_of(x, 1024), noisy, S, mp.PrototypeConfig(probe_epochs=2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(one.prototypes, two.prototypes, atol=1e-6)
    np.testing.assert_allclose(one.consistency, two.consistency, rtol=1e-5)
    assert (one.selected == two.selected).all()


def test_small_ops_run_on_one_thread_only_with_few_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        for threads, inside in ((1, 1), (2, 1), (4, 4)):
            torch.set_num_threads(threads)
            with mp._small_ops("cpu"):
                assert torch.get_num_threads() == inside
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_block_size(rng):
    x, _, noisy, _ = blobs(rng)
    S = np.eye(4, dtype=np.float32) * 2
    a = mp.make_prototypes(source_of(x, 5), noisy, S)
    b = mp.make_prototypes(source_of(x, 1000), noisy, S)
    np.testing.assert_allclose(a.prototypes, b.prototypes, atol=1e-5)
    np.testing.assert_allclose(a.consistency, b.consistency, rtol=1e-4)


def test_several_prototypes_per_class_find_the_modes(rng):
    x, y, _, centers = blobs(rng, n_per=120, C=2, D=8, noise=0.0, modes=2, spread=0.1)
    S = np.eye(2, dtype=np.float32) * 2
    # constant weighting: the plain k-means view (p-weighting lets the most consistent mode dominate)
    r = mp.make_prototypes(source_of(x, 50), y, S, mp.PrototypeConfig(per_class=2, topk=1.0, weighting="constant"))
    assert r.prototypes.shape == (4, 8) and r.prototype_class.tolist() == [0, 0, 1, 1]
    cn = centers / np.linalg.norm(centers, axis=2, keepdims=True)
    for c in range(2):
        sims = r.prototypes[2 * c : 2 * c + 2] @ cn[c].T  # (2 prototypes, 2 modes)
        assert sims.max(0).min() > 0.95  # each mode has a prototype on it


def test_rounds_start_from_the_previous_prototypes(rng):
    x, _, noisy, _ = blobs(rng, noise=0.4)
    S = np.eye(4, dtype=np.float32) * 2
    one = mp.make_prototypes(source_of(x, 64), noisy, S, mp.PrototypeConfig(rounds=1))
    two = mp.make_prototypes(source_of(x, 64), noisy, S, mp.PrototypeConfig(rounds=2))
    # round 2's consistency is eq. 4 against round 1's prototypes
    p = mp.consistency_scores(source_of(x, 64), noisy, one.prototypes, S)
    np.testing.assert_allclose(two.consistency, p, rtol=1e-5)
    np.testing.assert_allclose(two.initial_prototypes, one.initial_prototypes, atol=1e-6)


def test_stage_rejects_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        mp.make_prototypes(source_of(G), L, np.ones((3, 2)))
    with pytest.raises(ValueError, match="out of range"):
        mp.make_prototypes(source_of(G), L + 5, S_T)
    with pytest.raises(ValueError, match="no labeled rows"):
        mp.make_prototypes(source_of(G), -np.ones(6, dtype=int), S_T)
