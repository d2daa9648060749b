"""score-noise --score fused (docs/method.md, "Scoring beyond eq. 6") through the command; the hand-computed
cases of the stage: tests/unit/test_stage_score_fused.py."""

import numpy as np

from sinet_cli import store
from stages import score_noise as sn


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
