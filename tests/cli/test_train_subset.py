"""`sinet train --train-subset` / `--finetune-subset`: Clothing1M's table-8 setting (weighted training
on the noisy set, then fine-tuning on the clean set), and the Makefile variables that drive it."""

import json

import numpy as np
import pytest
import torch

import stages.train as stage
from fixtures_layouts import make_clothing1m
from sinet_cli import store
from test_make_all import dry


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


N_TRAIN, N_VAL, D = 120, 30, 16
FAST = ["--epochs", "4", "--batch-size", "32", "--lr", "0.5"]


def _features(n, seed=4):
    r = np.random.default_rng(seed)
    centers = r.normal(size=(3, D)) * 3
    y = r.integers(0, 3, n)
    x = centers[y] + r.normal(size=(n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


@pytest.fixture
def subset_artifacts(tmp_path):
    """features.h5 in a Clothing1M-like shape: train rows interleaved from a noisy subset (40 % wrong
    labels) and a clean one (true labels), a clean val split; scores.h5 weights only the noisy rows
    (as a table-8 run needs). Also ``noisy_only/features.h5``: exactly the noisy train rows and val."""
    x, true = _features(N_TRAIN + N_VAL)
    r = np.random.default_rng(5)
    subset = np.array(["clean" if i % 3 == 0 else "noisy" for i in range(N_TRAIN)] + ["clean"] * N_VAL)
    splits = np.array(["train"] * N_TRAIN + ["val"] * N_VAL)
    flip = (subset == "noisy") & (r.random(len(x)) < 0.4)
    labels = np.where(flip, (true + r.integers(1, 3, len(x))) % 3, true)
    ids = np.array([f"{s}:{i:03d}" for i, s in enumerate(subset)])
    out = tmp_path / "art"
    cols = {"ids": ids, "labels": labels, "features": x, "classes": ["a", "b", "c"], "splits": splits,
            "clean_labels": true, "subset": subset}
    store.write_artifact(out / "features.h5", "features", cols, {"test": 1}, {})
    noisy = np.flatnonzero((splits == "train") & (subset == "noisy"))
    w = np.where(flip[noisy], 0.05, 0.8).astype(np.float32)
    z = np.zeros(len(noisy))
    store.write_artifact(out / "scores.h5", "scores",
                         {"ids": ids[noisy], "labels": labels[noisy], "weight": w, "distance": z,
                          "nearest_class": z.astype(int), "nearest_distance": z, "classes": ["a", "b", "c"]},
                         {"alpha": 1.2, "beta": 1.5}, {})
    keep = np.concatenate([noisy, np.arange(N_TRAIN, N_TRAIN + N_VAL)])
    only = {k: (v if k == "classes" else v[keep]) for k, v in cols.items() if k != "subset"}
    store.write_artifact(tmp_path / "noisy_only" / "features.h5", "features", only, {"test": 1}, {})
    (tmp_path / "noisy_only" / "scores.h5").write_bytes((out / "scores.h5").read_bytes())
    clean = np.flatnonzero((splits == "train") & (subset == "clean"))
    return {"out": out, "noisy": noisy, "clean": clean, "x": x, "labels": labels, "only": tmp_path / "noisy_only"}


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def _model(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_train_subset_trains_on_exactly_that_subsets_rows(sinet, subset_artifacts):
    a = subset_artifacts
    out = a["out"]
    code, _, err = sinet("train", "--mode", "C", "--train-subset", "noisy", "--out", out, *FAST)
    assert code == 0, err
    m = _metrics(out / "train-C")
    assert m["n_train"] == len(a["noisy"]) == 80 and m["train_subset"] == "noisy"
    assert m["params"]["train_subset"] == "noisy" and m["n_val"] == N_VAL and m["finetune"] is None
    assert "of subset noisy" in err
    # the same model as training on a file that holds only the noisy rows: same rows, order, weights
    code, _, err = sinet("train", "--mode", "C", "--out", a["only"], *FAST)
    assert code == 0, err
    alone, subset = _model(a["only"] / "train-C"), _model(out / "train-C")
    assert all(torch.equal(alone[k], subset[k]) for k in alone)
    # weights are looked up only for the rows trained on: all rows need the clean rows' weights too
    code, _, err = sinet("train", "--mode", "C", "--suffix", "all", "--out", out, *FAST)
    assert code == 1 and "scores.h5" in err and "no weight for training image 'clean:000'" in err
    # the option is a parameter of the run: without it (mode A), a different run with every train row
    code, _, err = sinet("train", "--mode", "A", "--out", out, *FAST)
    assert code == 0 and _metrics(out / "train-A")["n_train"] == N_TRAIN
    assert "train_subset" not in _metrics(out / "train-A")["params"]  # older runs stay up to date
    code, _, err = sinet("train", "--mode", "A", "--train-subset", "clean", "--out", out, *FAST)
    assert code == 0 and "up to date" not in err and _metrics(out / "train-A")["n_train"] == len(a["clean"])


def test_finetune_on_the_clean_subset_continues_the_weighted_model(sinet, subset_artifacts):
    a = subset_artifacts
    out = a["out"]
    base = ["train", "--mode", "C", "--train-subset", "noisy", "--out", out, *FAST]
    assert sinet(*base, "--suffix", "base")[0] == 0
    ft_args = [*base, "--finetune-subset", "clean", "--finetune-epochs", "2", "--suffix", "ft"]
    code, _, err = sinet(*ft_args)
    assert code == 0, err
    assert f"fine-tuned 2 epochs on {len(a['clean'])} of subset clean" in err
    m, m_base = _metrics(out / "train-C-ft"), _metrics(out / "train-C-base")
    ft = m["finetune"]
    assert ft["subset"] == "clean" and ft["epochs"] == 2 and ft["n_train"] == len(a["clean"]) == 40
    assert len(ft["history"]) == 2 and len(m["history"]) == 4 and m["n_train"] == len(a["noisy"])
    assert m["history"] == m_base["history"]  # the same weighted main phase
    assert m["params"]["finetune_subset"] == "clean" and m["params"]["finetune_epochs"] == 2
    cfg = stage.TrainConfig(epochs=4, lr=0.5, batch_size=32, lr_steps=stage.scaled_lr_steps(4))
    assert ft["lr"] == pytest.approx(cfg.lr_at(3))  # default: the last lr of the main schedule
    shared = json.loads((out / "metrics.json").read_text())["train"]
    assert shared["C-ft"]["finetune_subset"] == "clean" and shared["C-ft"]["n_finetune"] == 40

    # exactly: the base model trained 2 more epochs on the clean rows, their labels, unit weights
    head = stage.build_head("linear", D, 3, dropout=0.25)
    head.load_state_dict(_model(out / "train-C-base"))
    expected = stage.train_features(a["x"][a["clean"]], stage.hard_targets(a["labels"][a["clean"]]), 3,
                                    stage.finetune_config(cfg, 2), model=head).model.state_dict()
    got, before = _model(out / "train-C-ft"), _model(out / "train-C-base")
    assert all(torch.equal(expected[k], got[k]) for k in got)
    assert not torch.equal(got["1.weight"], before["1.weight"])

    code, _, err = sinet(*ft_args)
    assert code == 0 and "up to date" in err
    # another fine-tuning length and lr: the main phase is resumed from its checkpoint, not redone
    code, _, err = sinet(*ft_args[:-4], "--finetune-epochs", "3", "--finetune-lr", "0.01", "--suffix", "ft")
    assert code == 0 and "resuming after epoch 4 of 4" in err, err
    m3 = _metrics(out / "train-C-ft")
    assert m3["finetune"]["epochs"] == 3 and len(m3["finetune"]["history"]) == 3
    assert m3["finetune"]["lr"] == 0.01 and m3["params"]["finetune_lr"] == 0.01
    assert all(h["lr"] == pytest.approx(0.01) for h in m3["finetune"]["history"])


def test_subset_errors_name_the_file(sinet, subset_artifacts, tmp_path):
    out = subset_artifacts["out"]
    code, _, err = sinet("train", "--mode", "C", "--train-subset", "holdout", "--out", out, *FAST)
    assert code == 1 and str(out / "features.h5") in err and "--train-subset holdout" in err
    assert "clean, noisy" in err and len(err.strip().splitlines()) == 1
    code, _, err = sinet("train", "--mode", "A", "--finetune-subset", "val", "--finetune-epochs", "1", "--out", out,
                         *FAST)
    assert code == 1 and "--finetune-subset val" in err and "features.h5" in err
    code, _, err = sinet("train", "--mode", "A", "--finetune-subset", "clean", "--out", out, *FAST)
    assert code == 1 and "--finetune-epochs" in err
    code, _, err = sinet("train", "--mode", "A", "--finetune-epochs", "2", "--out", out, *FAST)
    assert code == 1 and "--finetune-subset" in err
    # a file that records no subsets
    x, y = _features(20)
    bare = tmp_path / "bare"
    store.write_artifact(bare / "features.h5", "features", {"ids": np.array([f"i{i}" for i in range(20)]),
                         "labels": y, "features": x, "classes": ["a", "b", "c"],
                         "splits": ["train"] * 16 + ["val"] * 4}, {}, {})  # a val split: not skipped
    code, _, err = sinet("train", "--mode", "A", "--train-subset", "noisy", "--out", bare, *FAST)
    assert code == 1 and str(bare / "features.h5") in err and "no subsets are recorded" in err


def test_on_images_clothing1m_noisy_then_clean(sinet, tmp_path):
    c1m = make_clothing1m(tmp_path / "c1m")
    code, _, err = sinet("train", "--on", "images", "--mode", "A", "--data", f"clothing1m:{c1m['root']}",
                         "--train-subset", "noisy", "--finetune-subset", "clean", "--finetune-epochs", "1",
                         "--backbone", "test_efficientnet_gn", "--random-init", "--image-size", "24", "--epochs", "1",
                         "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 0, err
    m = _metrics(tmp_path / "o" / "train-A")
    assert m["n_train"] == len(c1m["noisy_train"]) and m["finetune"]["n_train"] == len(c1m["clean_train"])
    assert m["finetune"]["image_size"] == 24 and len(m["finetune"]["history"]) == 1 and m["n_val"] == len(c1m["val"])
    code, _, err = sinet("train", "--on", "images", "--mode", "A", "--data", f"clothing1m:{c1m['root']}",
                         "--train-subset", "google", "--out", tmp_path / "o")
    assert code == 1 and f"--data clothing1m:{c1m['root']}" in err and "subset 'google'" in err


def test_make_clothing1m_follows_table_8_and_captions_reach_the_commands():
    def lines(out, command):
        # a make recipe line continues over backslash-newlines
        joined = out.replace("\\\n", " ")
        return [ln for ln in joined.splitlines() if f"-m sinet_cli {command} " in ln]

    c1m = dry("all", "DATASET=clothing1m", "DATA_ROOT=/d/c1m")
    (train,) = lines(c1m, "train")
    assert "--train-subset noisy" in train and "--finetune-subset clean --finetune-epochs 10" in train
    assert "--prototypes-from clean" in lines(c1m, "make-prototypes")[0]
    plain = dry("all", "DATASET=clothing1m", "DATA_ROOT=/d/c1m", "TRAIN_SUBSET=all", "FINETUNE_SUBSET=",
                "PROTOTYPES_FROM=all")
    assert "subset" not in lines(plain, "train")[0] and "--prototypes-from" not in plain
    tuned = dry("train", "DATASET=clothing1m", "DATA_ROOT=/d/c1m", "FINETUNE_EPOCHS=3", "FINETUNE_LR=0.001")
    assert "--finetune-subset clean --finetune-epochs 3 --finetune-lr 0.001" in lines(tuned, "train")[0]
    for kind in ("webvision", "manifest"):
        other = dry("all", f"DATASET={kind}", "DATA_ROOT=/d/x")
        assert "subset" not in lines(other, "train")[0] and "--prototypes-from" not in other
    demo = dry("all", "CAPTIONS=synthetic:0.2:0.1")
    for command in ("extract-features", "train"):
        assert "--captions synthetic:0.2:0.1" in lines(demo, command)[0], command
    assert "--captions" not in dry("all")
    cron = dry("cron", "ART=artifacts/demo", "NEW=demo", "CAPTIONS=synthetic:0.2")
    assert "--captions synthetic:0.2" in lines(cron, "rescore")[0]
