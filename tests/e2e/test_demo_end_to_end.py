"""The one slow test: the whole chain on the embedded demo, as `make demo` runs it."""

import json

import numpy as np
import pytest

from sinet_cli import store

pytestmark = pytest.mark.slow


def test_demo_chain_scores_noise_trains_and_reuses_artifacts(sinet, tmp_path):
    out = tmp_path / "demo"
    data = ["--data", "demo", "--noise", "symmetric", "--noise-rate", "0.4", "--out", out]
    steps = [
        ["build-graph", "--data", "demo", "--out", out],
        ["extract-features", *data, "--image-size", "64"],
        ["make-prototypes", "--out", out],
        ["score-noise", "--out", out],
        *[["train", *data, "--on", "features", "--mode", m, "--epochs", "20"] for m in ("A", "B", "C", "oracle")],
    ]
    for step in steps:
        code, _, err = sinet(*step)
        assert code == 0, f"{step[0]}: {err}"

    with store.open_artifact(out / "scores.h5", "scores") as art:
        detection = art.json_attr("detection")
        weight, ids = art.read("weight"), art.read("ids")
    with store.open_artifact(out / "features.h5", "features") as feats:
        assert list(feats.read("ids")) == list(ids)
    # pretrained features + prototypes find the injected noise far better than chance
    assert detection["weight"]["roc_auc"] > 0.8
    assert detection["weight"]["noise_rate"] == pytest.approx(0.4, abs=0.01)
    assert np.all(weight >= 0)
    suspects = (out / "suspects.tsv").read_text().splitlines()
    assert suspects[0].startswith("id\t") and len(suspects) > 100

    runs = json.loads((out / "metrics.json").read_text())["train"]
    assert {r["mode"] for r in runs.values()} == {"A", "B", "C", "oracle"}
    for r in runs.values():
        assert 50 < r["top1"] <= r["top5"] <= 100  # percent; far above the 10% of chance on real images

    code, table, _ = sinet("summary", "--out", out)
    assert code == 0 and "ROC-AUC" in table and "oracle" in table

    # a second run reuses every artifact
    for step in steps:
        code, _, err = sinet(*step)
        assert code == 0 and "up to date" in err, f"{step[0]} was not skipped: {err}"

    # a changed score-noise parameter reruns score-noise and what reads scores.h5, nothing upstream
    code, _, err = sinet("make-prototypes", "--out", out)
    assert "up to date" in err
    code, _, err = sinet("score-noise", "--out", out, "--alpha", "1.0")
    assert code == 0 and "up to date" not in err
    code, _, err = sinet("train", *data, "--on", "features", "--mode", "C", "--epochs", "20")
    assert code == 0 and "up to date" not in err
    code, _, err = sinet("train", *data, "--on", "features", "--mode", "A", "--epochs", "20")
    assert code == 0 and "up to date" in err  # mode A ignores the weights
