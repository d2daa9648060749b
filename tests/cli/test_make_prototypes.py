"""make-prototypes: the command (eq. 4, eq. 5 and the stage itself: tests/unit/test_stage_make_prototypes.py)."""

from __future__ import annotations

import math

import numpy as np

from sinet_cli import store
from test_stage_make_prototypes import blobs

# -- the command -------------------------------------------------------------------------------


def write_inputs(folder, rng, *, n_per=50, C=4, D=16, noise=0.3, classes=None, probs=False, clean=True):
    x, y, noisy, _ = blobs(rng, n_per=n_per, C=C, D=D, noise=noise)
    n = len(x)
    splits = np.where(rng.random(n) < 0.8, "train", "val")
    noisy = np.where(splits == "train", noisy, y)
    names = classes or [f"class{c}" for c in range(C)]
    data = {"ids": [f"img{i:04d}" for i in range(n)], "labels": noisy, "features": x.astype(np.float16),
            "classes": names, "splits": splits}
    if clean:
        data["clean_labels"] = y
    if probs:
        logits = 5 * x @ np.stack([x[y == c].mean(0) for c in range(C)]).T
        data["probs"] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    store.write_artifact(folder / "features.h5", "features", data, {"test": 1}, {})
    S = np.eye(C, dtype=np.float32)
    store.write_artifact(folder / "graph.h5", "graph", {"classes": names, "S_w": S, "S_l": S, "S_t": 2 * S},
                         {"test": 1}, {})
    return x, y, noisy, splits


def test_cli_writes_prototypes_and_index(tmp_path, rng, sinet):
    x, y, noisy, splits = write_inputs(tmp_path, rng)
    code, _, err = sinet("make-prototypes", "--out", tmp_path)
    assert code == 0, err
    assert "noise detection on train" in err
    with store.open_artifact(tmp_path / "prototypes.h5", "prototypes") as a:
        protos = a.read("prototypes")
        assert protos.shape == (4, 16)
        np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-5)
        train = splits == "train"
        assert a.read("ids").tolist() == [f"img{i:04d}" for i in np.flatnonzero(train)]
        assert not np.isnan(a.read("consistency")).any()
        assert a.read("selected").sum() == sum(math.ceil(0.5 * (noisy[train] == c).sum()) for c in range(4))
        assert a.params["init_source"] == "probe" and a.params["topk"] == 0.5
        det = a.json_attr("detection")
        assert det["consistency"]["roc_auc"] > 0.8 and det["distance"]["roc_auc"] > 0.8
    index = store.read_faiss_index(tmp_path / "prototypes.faiss", expected_dim=16, expected_rows=4)
    np.testing.assert_allclose(index.reconstruct_n(0, 4), protos, atol=1e-6)
    code, _, err = sinet("make-prototypes", "--out", tmp_path)
    assert code == 0 and "up to date" in err


def test_cli_uses_stored_probs(tmp_path, rng, sinet):
    write_inputs(tmp_path, rng, probs=True)
    code, _, err = sinet("make-prototypes", "--out", tmp_path)
    assert code == 0, err
    with store.open_artifact(tmp_path / "prototypes.h5", "prototypes") as a:
        assert a.params["init_source"] == "probs" and "probe_rows" not in a.params
        assert a.attr("init_source") == "probs"


def test_cli_class_mismatch_names_both_files(tmp_path, rng, sinet):
    write_inputs(tmp_path, rng)
    S = np.eye(3, dtype=np.float32)
    store.write_artifact(tmp_path / "graph.h5", "graph",
                         {"classes": ["a", "b", "c"], "S_w": S, "S_l": S, "S_t": S}, {}, {})
    code, _, err = sinet("make-prototypes", "--out", tmp_path)
    assert code == 1
    assert "features.h5" in err and "graph.h5" in err and "4 classes" in err and err.count("\n") == 1


def test_cli_rejects_bad_option(tmp_path, rng, sinet):
    write_inputs(tmp_path, rng)
    code, _, err = sinet("make-prototypes", "--out", tmp_path, "--psi", "cosine")
    assert code == 1 and "psi" in err
