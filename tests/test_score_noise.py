"""score-noise: eq. 6 against a hand-computed case, metrics vs scikit-learn, CLI, incremental runs, lock."""

from __future__ import annotations

import csv
import fcntl
import os
import threading
import time

import faiss
import numpy as np
import pytest

from sinet_cli import store
from sinet_cli.commands.score import RunColumns, id_hashes
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


def test_id_hashes_ignore_padding_and_separate_ids():
    a = id_hashes(np.array(["img1", "img22", "a-much-longer-id-0001"]))
    b = id_hashes(np.array(["img1"]))
    assert a[0] == b[0] and len(set(a.tolist())) == 3
    many = id_hashes(np.array([f"fmnist-train-{i:05d}" for i in range(20000)]))
    assert len(np.unique(many)) == 20000


# -- the command ---------------------------------------------------------------------------------


def make_features(path, n, *, D=8, C=3, seed=0, start=0, classes=None, clean=True, paths=True):
    rng = np.random.default_rng(seed)
    centers = np.eye(C, D, dtype=np.float32)
    y = rng.integers(0, C, n)
    x = centers[y] + 0.25 * rng.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    noisy = np.where(rng.random(n) < 0.3, (y + 1) % C, y)
    ids = [f"img{i:05d}" for i in range(start, start + n)]
    data = {"ids": ids, "labels": noisy, "features": x.astype(np.float16),
            "classes": classes or [f"c{i}" for i in range(C)],
            "splits": np.where(np.arange(n) % 5 == 4, "val", "train")}
    if clean:
        data["clean_labels"] = y
    if paths:
        data["paths"] = [f"/data/{i}.jpg" for i in ids]
    store.write_artifact(path, "features", data, {"seed": seed}, {})
    return data


def make_prototypes_artifact(folder, C=3, D=8, shift=0.0):
    v = np.eye(C, D, dtype=np.float32) + shift
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    n = 4
    store.write_artifact(folder / "prototypes.h5", "prototypes", {
        "classes": [f"c{i}" for i in range(C)], "prototypes": v, "prototype_class": np.arange(C),
        "initial_prototypes": v, "ids": [f"p{i}" for i in range(n)], "consistency": np.ones(n, dtype=np.float32),
    }, {"shift": shift}, {})
    store.write_faiss_index(folder / "prototypes.faiss", flat_index(v))
    return v


def grow(folder, n_old, n_new, seed=0):
    """features.h5 with the same first n_old rows and n_new more (a later crawl)."""
    old = make_features(folder / "old.h5", n_old, seed=seed)
    new = make_features(folder / "new.h5", n_new, seed=seed + 1, start=n_old)
    data = {k: np.concatenate([np.asarray(old[k]), np.asarray(new[k])]) if k != "classes" else old[k] for k in old}
    store.write_artifact(folder / "features.h5", "features", data, {"grown": n_old + n_new}, {})
    return data


def read_scores(folder):
    with store.open_artifact(folder / "scores.h5", "scores") as a:
        return {k: a.read(k) for k in a.file.keys()}, a.fingerprint, a.json_attr("detection")


def test_cli_scores_every_row_and_ranks_suspects(tmp_path, sinet):
    data = make_features(tmp_path / "features.h5", 300)
    v = make_prototypes_artifact(tmp_path)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper")
    assert code == 0, err
    s, _, det = read_scores(tmp_path)
    assert s["ids"].tolist() == data["ids"]  # all splits, in order
    g = data["features"].astype(np.float32)
    d = np.linalg.norm(g - v[data["labels"]], axis=1)
    np.testing.assert_allclose(s["distance"], d, atol=2e-3)
    np.testing.assert_allclose(s["weight"], np.maximum(0, 1.2 - d) ** 1.5, atol=3e-3)
    assert (s["nearest_class"] == (g @ v.T).argmax(1)).mean() > 0.99
    assert set(s["splits"]) == {"train", "val"} and (s["clean_labels"] == data["clean_labels"]).all()
    assert det["weight"]["roc_auc"] > 0.9 and 0 < det["weight"]["noise_rate"] < 0.5
    assert "ROC-AUC" in err
    rows = list(csv.reader(open(tmp_path / "suspects.tsv"), delimiter="\t"))
    assert rows[0] == ["id", "path", "label", "suggested_class", "suggested_confidence", "weight", "distance"]
    body = rows[1:]
    weights = [float(r[5]) for r in body]
    assert weights == sorted(weights) and len(body) > 0
    # exactly the flagged rows, worst first (lowest weight, then farthest)
    flagged = np.flatnonzero(s["flagged"] == 1)
    worst = flagged[np.lexsort((-s["distance"][flagged], s["weight"][flagged]))]
    assert [r[0] for r in body] == [s["ids"][i] for i in worst]
    assert body[0][1] == f"/data/{s['ids'][worst[0]]}.jpg"
    names = [f"c{i}" for i in range(3)]
    assert [r[3] for r in body] == [names[s["suggested_class"][i]] for i in worst]
    assert all(r[2] != r[3] for r in body)  # the suggestion is another class than the label
    # unlimited ranking (bounded-memory scratch-file path) starts with the same rows
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper", "--force", "--max-suspects", "0")
    assert code == 0, err
    full = list(csv.reader(open(tmp_path / "suspects.tsv"), delimiter="\t"))
    assert full[1:11] == body[:10] and len(full) >= len(rows)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper", "--max-suspects", "5", "--force")
    assert code == 0, err
    assert len(open(tmp_path / "suspects.tsv").read().splitlines()) == 6


def test_cli_incremental_append_and_nothing_new(tmp_path, sinet):
    make_features(tmp_path / "features.h5", 200)
    make_prototypes_artifact(tmp_path)
    assert sinet("score-noise", "--out", tmp_path, "--score", "paper")[0] == 0
    first, fp1, _ = read_scores(tmp_path)
    grown = grow(tmp_path, 200, 70)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper")
    assert code == 0, err
    assert "200 ids already scored, scoring 70 new" in err
    second, fp2, det = read_scores(tmp_path)
    assert fp2 != fp1 and second["ids"].tolist() == list(grown["ids"])
    for k in ("weight", "distance", "nearest_class", "labels"):  # old rows untouched
        np.testing.assert_array_equal(second[k][:200], first[k])
    # appended rows scored like a fresh full run would
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.link(tmp_path / "features.h5", fresh / "features.h5")
    make_prototypes_artifact(fresh)
    assert sinet("score-noise", "--out", fresh, "--score", "paper")[0] == 0
    full, _, det_full = read_scores(fresh)
    np.testing.assert_allclose(second["weight"], full["weight"], atol=1e-6)
    assert det["weight"]["roc_auc"] == pytest.approx(det_full["weight"]["roc_auc"])
    # a features file that changed without new ids: nothing to do, scores.h5 untouched
    store.write_artifact(tmp_path / "features.h5", "features",
                         {**grown, "side_text": ["x"] * len(grown["ids"])}, {"touched": 1}, {})
    mtime = os.stat(tmp_path / "scores.h5").st_mtime_ns
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper")
    assert code == 0 and "already scored; nothing to do" in err
    assert os.stat(tmp_path / "scores.h5").st_mtime_ns == mtime
    # unchanged inputs: up to date
    code, _, err = sinet("score-noise", "--out", tmp_path, "--score", "paper", "--features", tmp_path / "fresh" / "features.h5")
    assert code == 0 and "up to date" in err


def test_cli_new_prototypes_rescore_everything(tmp_path, sinet):
    make_features(tmp_path / "features.h5", 120)
    make_prototypes_artifact(tmp_path)
    assert sinet("score-noise", "--out", tmp_path)[0] == 0
    code, _, err = sinet("score-noise", "--out", tmp_path)
    assert code == 0 and "up to date" in err
    first, _, _ = read_scores(tmp_path)
    make_prototypes_artifact(tmp_path, shift=0.3)
    code, _, err = sinet("score-noise", "--out", tmp_path)
    assert code == 0 and "prototypes changed; rescoring every row" in err
    second, _, _ = read_scores(tmp_path)
    assert len(second["ids"]) == 120 and not np.allclose(first["distance"], second["distance"])
    code, _, err = sinet("score-noise", "--out", tmp_path, "--alpha", "1.0")
    assert code == 0 and "options changed" in err


def test_cli_lock_stops_a_concurrent_run(tmp_path, sinet):
    make_features(tmp_path / "features.h5", 50)
    make_prototypes_artifact(tmp_path)
    fd = os.open(tmp_path / "scores.h5.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the lock
    try:
        t0 = time.monotonic()
        code, _, err = sinet("score-noise", "--out", tmp_path, "--wait", "0.3")
        assert code == 75 and time.monotonic() - t0 >= 0.3  # EX_TEMPFAIL
        assert "another process holds" in err and "--wait" in err and err.count("\n") == 1
        assert not (tmp_path / "scores.h5").exists()
        threading.Timer(0.3, lambda: fcntl.flock(fd, fcntl.LOCK_UN)).start()
        code, _, err = sinet("score-noise", "--out", tmp_path, "--wait", "10")
        assert code == 0, err
        assert (tmp_path / "scores.h5").exists()
    finally:
        os.close(fd)


def test_cli_dimension_and_class_mismatch_name_both_files(tmp_path, sinet):
    make_features(tmp_path / "features.h5", 30, D=6)
    make_prototypes_artifact(tmp_path, D=8)
    code, _, err = sinet("score-noise", "--out", tmp_path)
    assert code == 1 and "features.h5" in err and "prototypes.h5" in err and "6-d" in err and "8-d" in err
    make_features(tmp_path / "features.h5", 30, C=4, D=8)
    code, _, err = sinet("score-noise", "--out", tmp_path)
    assert code == 1 and "features.h5" in err and "prototypes.h5" in err and "4 classes" in err


@pytest.mark.parametrize("where", ["score_block", "append_rows"])
def test_cli_failure_mid_run_keeps_the_previous_outputs_and_stops_its_threads(tmp_path, sinet, monkeypatch, where):
    # an interrupt while a block is scored (main thread), or a write error on the writer thread
    make_features(tmp_path / "features.h5", 300)
    make_prototypes_artifact(tmp_path)
    args = ("score-noise", "--out", tmp_path, "--score", "paper", "--chunk-rows", "40")
    code, _, err = sinet(*args)
    assert code == 0, err
    before = {name: (tmp_path / name).read_bytes() for name in ("scores.h5", "suspects.tsv")}
    threads = threading.active_count()
    calls = []
    if where == "score_block":
        real_score = sn.score_block

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_score(*a, **k)

        monkeypatch.setattr(sn, "score_block", failing)
        expected = 130
    else:
        real_append = store.ArtifactWriter.append_rows

        def failing(self, rows, **attrs):
            calls.append(1)
            if len(calls) == 3:
                raise store.ArtifactError(f"{self.path}: no space left on device (test)")
            return real_append(self, rows, **attrs)

        monkeypatch.setattr(store.ArtifactWriter, "append_rows", failing)
        expected = 1
    code, _, err = sinet(*args, "--force")
    assert code == expected and len(calls) == 3
    if where == "append_rows":
        assert "no space left on device (test)" in err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".partial", ".scratch")]
    assert threading.active_count() == threads  # the reader and writer threads are gone


def test_run_columns_fill_compact_arrays_or_only_count():
    blocks = [{"labels": np.array([0, 2]), "weight": np.array([0.0, 0.5], np.float32),
               "distance": np.array([1.3, 0.4], np.float32), "flagged": np.array([1, 0], np.int8),
               "suggested_class": np.array([1, 0]), "suggested_confidence": np.array([0.9, 0.1], np.float32),
               "clean_labels": np.array([1, 2]), "splits": np.array(["train", "val"])},
              {"labels": np.array([1]), "weight": np.array([0.0], np.float32), "distance": np.array([1.5], np.float32),
               "flagged": np.array([1], np.int8), "suggested_class": np.array([2]),
               "suggested_confidence": np.array([0.5], np.float32),
               "clean_labels": np.array([-1]), "splits": np.array(["train"])}]
    kept, counted = RunColumns(10, keep=True), RunColumns(10, keep=False)
    for b in blocks:
        kept.add(b)
        counted.add(b)
    full = kept.columns()
    assert full["labels"].tolist() == [0, 2, 1] and full["labels"].dtype == np.int32
    assert full["clean_labels"].tolist() == [1, 2, -1] and full["train"].tolist() == [True, False, True]
    assert full["weight"].tolist() == [0.0, 0.5, 0.0] and full["flagged"].tolist() == [1, 0, 1]
    assert full["suggested_class"].tolist() == [1, 0, 2] and full["flagged"].dtype == np.int8
    assert (kept.rows, kept.zero_weight, kept.flagged) == (counted.rows, counted.zero_weight, counted.flagged) == (3, 2, 2)
    assert counted.columns() == {}
    with pytest.raises(ValueError, match="4 rows for columns of 3"):
        small = RunColumns(3, keep=True)
        small.add(blocks[0])
        small.add(blocks[0])
