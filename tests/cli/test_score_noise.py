"""score-noise: the command, incremental runs, lock (eq. 6 and the metrics themselves: tests/unit/test_stage_score_noise.py)."""

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


def flat_index(v: np.ndarray):
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(np.ascontiguousarray(v, dtype=np.float32))
    return index


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
