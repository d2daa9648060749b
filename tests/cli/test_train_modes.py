"""train's modes beyond weighting (docs/training-modes.md): the command on features and images, the
knobs it records, one-line errors (the equations and the stage itself: tests/unit/test_stage_train_modes.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from sinet_cli import store
from test_train import demo_artifacts  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py



# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def mode_artifacts(demo_artifacts):  # noqa: F811
    """demo_artifacts plus a graph.h5 and a probe in scores.h5 (as the default score stores it)."""
    out = demo_artifacts
    with store.open_artifact(out / "scores.h5", "scores") as s:
        data = {k: s.read(k) for k in ("ids", "labels", "weight", "distance", "nearest_class", "nearest_distance",
                                       "classes")}
        params, inputs = s.params, s.inputs
    with store.open_artifact(out / "features.h5", "features") as f:
        x, lab, sp = f.read("features"), f.read("labels"), f.read("splits")
    tr = sp == "train"
    W = np.zeros((2, x.shape[1], 3), np.float32)
    for c in range(3):  # a probe from the class means of the (noisy) train rows
        W[:, :, c] = 5 * x[tr][lab[tr] == c].mean(0)
    data.update(probe_W=W, probe_b=np.zeros((2, 3), np.float32))
    store.write_artifact(out / "scores.h5", "scores", data, dict(params, score="fused"), inputs)
    S = np.array([[1, .5, .1], [.5, 1, .2], [.1, .2, 1]], np.float32)
    store.write_artifact(out / "graph.h5", "graph", {"classes": ["a", "b", "c"], "S_w": S, "S_l": S, "S_t": S},
                         {}, {})
    return out


FAST = ["--epochs", "4", "--batch-size", "32", "--lr", "0.5"]


def test_cli_new_modes_on_features_record_their_knobs(sinet, mode_artifacts):
    out = mode_artifacts
    for mode in ("correct", "fixmatch", "mixmatch", "graph", "forward"):
        code, _, err = sinet("train", "--mode", mode, "--out", out, *FAST)
        assert code == 0, err
        assert f"train-{mode}" in err and "top-1" in err
        assert ("relabeled" in err) == (mode in ("correct", "fixmatch", "mixmatch"))
    m = {k: json.loads((out / f"train-{k}" / "metrics.json").read_text()) for k in
         ("correct", "fixmatch", "mixmatch", "graph", "forward")}
    assert m["forward"]["params"]["transition_neighbours"] == 0 and m["forward"]["mean_weight"] == 1.0
    assert len(m["forward"]["mode_stats"]["transition_diagonal"]) == 3
    assert 0 <= m["forward"]["mode_stats"]["transition_error"] <= 2
    assert m["correct"]["params"]["suggestions"] == "scores.h5 probe"
    assert m["correct"]["params"]["flags"].startswith("w <= 0.5")
    assert m["correct"]["params"]["correct_target"] == "cleaned" and m["correct"]["params"]["min_confidence"] == 0.5
    code, _, err = sinet("train", "--mode", "correct", "--correct-target", "distribution", "--suffix", "d",
                         "--out", out, *FAST)
    assert code == 0, err
    md = json.loads((out / "train-correct-d" / "metrics.json").read_text())
    assert md["params"]["soft_keep"] == 16 and "min_confidence" not in md["params"]
    assert 0 < md["mode_stats"]["moved_right"] <= 1
    assert 0 < m["correct"]["mode_stats"]["corrected"] <= m["correct"]["mode_stats"]["flagged"]
    assert 0 <= m["correct"]["mode_stats"]["corrected_right"] <= 1
    assert m["fixmatch"]["params"]["lambda_u"] == 1.0 and m["fixmatch"]["params"]["pseudo_confidence"] == 0.95
    fm = m["fixmatch"]["mode_stats"]  # the flagged images are relabeled (labeled) or unlabeled
    assert fm["unlabeled"] + fm["corrected"] == fm["flagged"] > 0
    assert "pseudo_labeled" in m["fixmatch"]["history"][-1]
    assert m["mixmatch"]["params"]["lambda_u"] == 25.0 and "loss_u" in m["mixmatch"]["history"][-1]
    assert m["graph"]["params"]["graph_neighbours"] == 3 and {"graph", "prototypes"} <= set(m["graph"]["inputs"])
    shared = json.loads((out / "metrics.json").read_text())["train"]
    assert shared["mixmatch"]["params"]["mix_alpha"] == 4.0
    # the split can be set by a weight threshold; top-k smoothing restricted to graph neighbours
    code, _, err = sinet("train", "--mode", "fixmatch", "--threshold", "0.3", "--suffix", "t", "--out", out, *FAST)
    assert code == 0, err
    assert json.loads((out / "train-fixmatch-t" / "metrics.json").read_text())["params"]["flags"] == "w <= 0.3"
    code, _, err = sinet("train", "--mode", "forward", "--transition-neighbours", "1", "--suffix", "g", "--out", out,
                         *FAST)
    assert code == 0, err
    assert json.loads((out / "train-forward-g" / "metrics.json").read_text())["params"]["transition_neighbours"] == 1
    code, _, err = sinet("train", "--mode", "C", "--topk-smoothing", "2", "--topk-neighbours", "1", "--suffix", "tg",
                         "--out", out, *FAST)
    assert code == 0, err
    assert json.loads((out / "train-C-tg" / "metrics.json").read_text())["params"]["topk_neighbours"] == 1


def test_cli_mode_errors_are_one_line(sinet, mode_artifacts, tmp_path):
    out = mode_artifacts
    code, _, err = sinet("train", "--mode", "pseudo", "--out", out, *FAST)
    assert code == 1 and "fixmatch" in err
    code, _, err = sinet("train", "--mode", "correct", "--correct-target", "both", "--out", out, *FAST)
    assert code == 1 and "cleaned, soft, hard or distribution" in err
    code, _, err = sinet("train", "--mode", "C", "--topk-neighbours", "2", "--out", out, *FAST)
    assert code == 1 and "--topk-smoothing" in err
    code, _, err = sinet("train", "--mode", "fixmatch", "--topk-smoothing", "2", "--out", out, *FAST)
    assert code == 1 and "--mode A or C" in err
    code, _, err = sinet("train", "--mode", "graph", "--graph", tmp_path / "none.h5", "--out", out, *FAST)
    assert code == 1 and "none.h5" in err


SCORE_FIELDS = {f.name for f in store.SCHEMAS["scores"]}
STORED_FLAGS = {"flagged", "suggested_class", "suggested_confidence"} <= SCORE_FIELDS


@pytest.mark.parametrize("stored", [False, pytest.param(True, marks=pytest.mark.skipif(
    not STORED_FLAGS, reason="this scores.h5 schema has no flagged / suggested_class columns"))])
def test_cli_new_modes_on_images(sinet, tmp_path, stored):
    # a manifest of image files (the DataLoader path) with scores, features and a graph for it
    r = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["id\tpath\tlabel\tsplit\tclean_label"]
    ids, labels = [], []
    for i in range(12):
        c = i % 3
        arr = np.full((20, 24, 3), 60 * c + 20, np.uint8) + r.integers(0, 30, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"i{i}\timg/{i}.png\t{'abc'[c]}\t{'val' if i >= 9 else 'train'}\t{'abc'[c]}")
        ids.append(f"i{i}")
        labels.append(c)
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    ids, labels = np.array(ids), np.array(labels)
    x = np.eye(3, 4, dtype=np.float32)[labels] + 0.1
    store.write_artifact(out / "features.h5", "features", {"ids": ids, "labels": labels, "features": x,
                                                           "classes": ["a", "b", "c"]}, {}, {})
    w = np.array([0.9, 0.8, 0.2, 0.9, 0.1, 0.7, 0.3, 0.9, 0.8], np.float32)
    z = np.zeros(9)
    scores = {"ids": ids[:9], "labels": labels[:9], "weight": w, "distance": z, "nearest_class":
              np.array([0, 1, 1, 0, 2, 2, 1, 2, 2]), "nearest_distance": z, "classes": ["a", "b", "c"]}
    if stored:  # score-noise's own flags and suggestions
        # the flagged rows i2, i4, i6; i6's suggestion is not confident given a wrong label (0.4 / 1)
        conf = np.where(np.arange(9) == 6, 0.4, 0.8).astype(np.float32)
        scores.update(flagged=(w < 0.5).astype(np.int8), suggested_class=(labels[:9] + 1) % 3,
                      suggested_confidence=conf, flag_score=np.where(np.arange(9) == 6, 1.0, 1.0 - w))
    store.write_artifact(out / "scores.h5", "scores", scores, {"score": "fused"}, {})
    protos = np.eye(3, 4, dtype=np.float32)
    store.write_artifact(out / "prototypes.h5", "prototypes",
                         {"classes": ["a", "b", "c"], "prototypes": protos, "prototype_class": np.arange(3),
                          "initial_prototypes": protos, "ids": ids[:9], "consistency": np.ones(9)}, {}, {})
    S = np.array([[1, .5, .1], [.5, 1, .2], [.1, .2, 1]], np.float32)
    store.write_artifact(out / "graph.h5", "graph", {"classes": ["a", "b", "c"], "S_w": S, "S_l": S, "S_t": S}, {}, {})
    common = ["--on", "images", "--data", f"manifest:{tmp_path / 'm.tsv'}", "--backbone", "test_efficientnet_gn",
              "--random-init", "--image-size", "24", "--epochs", "1", "--batch-size", "4", "--workers", "0",
              "--device", "cpu", "--out", out]
    for mode in ("correct", "fixmatch", "mixmatch", "graph", "forward"):
        code, _, err = sinet("train", "--mode", mode, *common)
        assert code == 0, err
        m = json.loads((out / f"train-{mode}" / "metrics.json").read_text())
        assert m["n_train"] == 9 and m["top1"] is not None and len(m["history"]) == 1
    m = json.loads((out / "train-correct" / "metrics.json").read_text())
    if stored:
        assert m["params"]["suggestions"].startswith("scores.h5 suggested_class") and "T2c" in m["params"]["suggestions"]
        assert m["params"]["flags"] == "scores.h5 flagged"
        assert m["mode_stats"] == {"flagged": 3, "corrected": 2, "dropped": 1, "corrected_right": 0.0}
        # i2 and i4 relabeled, i6 (not confident) unlabeled
        assert json.loads((out / "train-fixmatch" / "metrics.json").read_text())["mode_stats"] == {
            "flagged": 3, "corrected": 2, "unlabeled": 1}
    else:
        # no probe either: suggestions from eq. 7's weights over the prototypes (features.h5 by id);
        # flags by the suspect rule: w <= 0.5 (i2, i4, i6) or a nearer prototype of another class
        # (the same three and i7)
        assert m["params"]["suggestions"] == "prototypes (eq. 7)" and "features" in m["inputs"]
        assert m["mode_stats"]["flagged"] == 4
