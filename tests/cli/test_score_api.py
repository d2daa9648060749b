"""stages.find_label_issues and the score-noise command give the same numbers on the same features
(both run stages.score_noise's sample_rows, fit_score_state and score_rows)."""

from __future__ import annotations

import numpy as np
import pytest

import stages
from sinet_cli import store
from test_score_noise import flat_index


@pytest.mark.parametrize("options", [[], ["--score", "paper"], ["--probe-rows", "0"]])
def test_api_and_cli_agree(tmp_path, sinet, options):
    rng = np.random.default_rng(3)
    C, D, n = 4, 16, 400
    truth = rng.integers(0, C, n)
    x = rng.normal(size=(n, D)).astype(np.float32) + 3 * np.eye(C, D, dtype=np.float32)[truth]
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # features.h5 holds unit rows
    labels = np.where(rng.random(n) < 0.25, rng.integers(0, C, n), truth)
    classes = [f"c{i}" for i in range(C)]
    store.write_artifact(tmp_path / "features.h5", "features",
                         {"ids": [f"i{i}" for i in range(n)], "labels": labels, "features": x, "classes": classes},
                         {}, {})
    protos = stages.build_prototypes(x, labels)
    store.write_artifact(tmp_path / "prototypes.h5", "prototypes", {
        "classes": classes, "prototypes": protos.prototypes, "prototype_class": protos.prototype_class,
        "initial_prototypes": protos.prototypes, "ids": ["p"], "consistency": np.ones(1, dtype=np.float32)}, {}, {})
    store.write_faiss_index(tmp_path / "prototypes.faiss", flat_index(protos.prototypes))
    assert sinet("score-noise", "--out", tmp_path, "--device", "cpu", *options)[0] == 0
    with store.open_artifact(tmp_path / "scores.h5", "scores") as a:
        cli = {k: a.read(k) for k in ("weight", "distance", "flagged", "suggested_class", "suggested_confidence")}
        eq6 = a.read("weight_eq6") if "weight_eq6" in a else cli["weight"]
        info = a.json_attr("noise_estimate")
    kw = {"score": "paper"} if "paper" in options else {"probe_rows": 0} if "0" in options else {}
    api = stages.find_label_issues(x, labels, prototypes=protos, **kw)
    # score-noise runs its per-block products on one thread on a small machine, the API on all of them:
    # the sums differ in order, so the floats agree to rounding
    close = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(api.weight, cli["weight"], **close)
    np.testing.assert_allclose(api.eq6_weight, eq6, **close)
    np.testing.assert_allclose(api.distance, cli["distance"], **close)
    np.testing.assert_array_equal(api.flagged, cli["flagged"].astype(bool))
    np.testing.assert_array_equal(api.suggested_class, cli["suggested_class"])
    np.testing.assert_allclose(api.suggested_confidence, cli["suggested_confidence"], **close)
    if "0" in options:
        assert np.isnan(api.noise_rate) and not api.flagged.any()
    else:
        assert api.noise_rate == pytest.approx(info["overall"], abs=1e-9) and api.flagged.any()


def test_api_graph_equals_build_graph(tmp_path, sinet):
    """stages.build_class_graph with the class table's synsets gives build-graph's S_t (eqs. 2-3)."""
    import json

    import h5py

    code, _, err = sinet("build-graph", "--data", "demo", "--out", tmp_path)
    assert code == 0, err
    with h5py.File(tmp_path / "graph.h5", "r") as f:
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][:]]
        S_t = f["S_t"][:]
        synsets = [e["synset"] or None for e in json.loads(f.attrs["name_resolution"])]
    graph = stages.build_class_graph(names, synsets=synsets)
    assert graph.classes == names
    np.testing.assert_allclose(graph.similarity, S_t, atol=1e-6)
