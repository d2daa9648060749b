"""Clothing1M's table-8 setting: prototypes from the clean training set, scores for the noisy one."""

import numpy as np

from sinet_cli import store
from fixtures_layouts import make_clothing1m

TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--workers", "0"]


def test_prototypes_from_the_clean_subset(tmp_path, sinet):
    c1m = make_clothing1m(tmp_path / "c1m")
    out = tmp_path / "art"
    data = ["--data", f"clothing1m:{c1m['root']}", "--out", out]
    assert sinet("extract-features", *data, *TINY)[0] == 0
    assert sinet("build-graph", *data, "--sources", "wordnet")[0] == 0
    code, _, err = sinet("make-prototypes", "--out", out, "--prototypes-from", "clean")
    assert code == 0, err
    with store.open_artifact(out / "prototypes.h5", "prototypes") as art:
        ids = sorted(art.read("ids"))
        assert art.params["prototypes_from"] == "clean"
    assert ids == sorted(f"clean:{p}" for p in c1m["clean_train"])
    code, _, err = sinet("score-noise", "--out", out)
    assert code == 0, err
    with store.open_artifact(out / "scores.h5", "scores") as art:
        scored = set(art.read("ids"))
    assert set(c1m["noisy_train"]) <= scored  # the noisy set is weighted against clean prototypes
    code, _, err = sinet("make-prototypes", "--out", out, "--prototypes-from", "holdout")
    assert code == 1 and "of subset 'holdout'" in err
