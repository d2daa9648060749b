"""train: the command on features and images, up-to-date skips, resume after a kill, one-line errors
(eq. 1, eq. 7 and the stage itself: tests/unit/test_stage_train.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import stages.train as stage
from sinet_cli import store
from test_stage_train import _blobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture
def demo_artifacts(tmp_path):
    """A tiny features.h5 (3 well separated classes, 40 % symmetric noise) and a scores.h5 that
    weights the noisy images low."""
    x, clean = _blobs(n=150, d=16, c=3, seed=4)
    r = np.random.default_rng(5)
    n_tr = 120
    noisy = np.zeros(150, bool)
    noisy[:n_tr] = r.random(n_tr) < 0.4
    labels = np.where(noisy, (clean + r.integers(1, 3, 150)) % 3, clean)
    splits = np.array(["train"] * n_tr + ["val"] * 30)
    ids = np.array([f"img{i:03d}" for i in range(150)])
    out = tmp_path / "art"
    store.write_artifact(out / "features.h5", "features",
                         {"ids": ids, "labels": labels, "features": x, "classes": ["a", "b", "c"], "splits": splits,
                          "clean_labels": clean}, {"test": 1}, {})
    fp = store.artifact_fingerprint(out / "features.h5", "features")
    w = np.where(noisy[:n_tr], 0.05, 0.8).astype(np.float32) * r.uniform(0.8, 1.0, n_tr).astype(np.float32)
    z = np.zeros(n_tr)
    store.write_artifact(out / "scores.h5", "scores",
                         {"ids": ids[:n_tr], "labels": labels[:n_tr], "weight": w, "distance": z,
                          "nearest_class": z.astype(int), "nearest_distance": z, "classes": ["a", "b", "c"]},
                         {"alpha": 1.2, "beta": 1.5}, {"features": fp})
    protos = np.stack([x[:n_tr][(clean[:n_tr] == c)].mean(0) for c in range(3)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    store.write_artifact(out / "prototypes.h5", "prototypes",
                         {"classes": ["a", "b", "c"], "prototypes": protos, "prototype_class": np.arange(3),
                          "initial_prototypes": protos, "ids": ids[:n_tr], "consistency": np.ones(n_tr)}, {}, {})
    return out


FAST = ["--epochs", "4", "--batch-size", "32", "--lr", "0.5"]


def test_cli_modes_write_metrics_and_skip_when_up_to_date(sinet, demo_artifacts):
    out = demo_artifacts
    for mode in ("A", "B", "C", "oracle"):
        code, _, err = sinet("train", "--mode", mode, "--out", out, *FAST)
        assert code == 0, err
        assert f"train-{mode}" in err and "top-1" in err
    shared = json.loads((out / "metrics.json").read_text())["train"]
    assert set(shared) == {"A", "B", "C", "oracle"}
    m_b = json.loads((out / "train-B" / "metrics.json").read_text())
    assert m_b["n_train"] < 120 and m_b["threshold"] == pytest.approx(float(np.median(
        store.open_artifact(out / "scores.h5", "scores").read("weight"))))
    assert m_b["train_noise_rate"] < 0.1  # B keeps the confident (clean) half
    m_o = json.loads((out / "train-oracle" / "metrics.json").read_text())
    assert m_o["train_noise_rate"] == 0 and m_o["eval_labels"] == "clean_labels"
    for mode in ("A", "C"):
        assert 0 <= shared[mode]["top1"] <= shared[mode]["top5"] <= 100
    sd = torch.load(out / "train-C" / "model.pt", weights_only=True)
    assert sd["1.weight"].shape == (3, 16)
    mtime = (out / "train-C" / "metrics.json").stat().st_mtime_ns
    code, _, err = sinet("train", "--mode", "C", "--out", out, *FAST)
    assert code == 0 and "up to date" in err
    assert (out / "train-C" / "metrics.json").stat().st_mtime_ns == mtime
    code, _, err = sinet("train", "--mode", "C", "--out", out, *FAST, "--force")
    assert code == 0 and "up to date" not in err
    assert (out / "train-C" / "metrics.json").stat().st_mtime_ns != mtime
    # a changed option is a new run
    code, _, err = sinet("train", "--mode", "C", "--out", out, *FAST, "--seed", "1")
    assert code == 0 and "up to date" not in err


def test_cli_resumes_after_a_kill(sinet, demo_artifacts, monkeypatch):
    out = demo_artifacts
    real = stage.train_features

    def killed(*a, **k):
        def cb(epoch, stats):
            if epoch == 2:
                raise KeyboardInterrupt
        return real(*a, **k, on_epoch_end=cb)

    monkeypatch.setattr(stage, "train_features", killed)
    code, _, err = sinet("train", "--mode", "C", "--out", out, *FAST)
    assert code == 130 and not (out / "train-C" / "metrics.json").exists()
    monkeypatch.setattr(stage, "train_features", real)
    code, _, err = sinet("train", "--mode", "C", "--out", out, *FAST)
    assert code == 0 and "resuming after epoch 2" in err, err
    resumed = torch.load(out / "train-C" / "model.pt", weights_only=True)
    code, _, err = sinet("train", "--mode", "C", "--out", out, *FAST, "--suffix", "again")
    assert code == 0
    again = torch.load(out / "train-C-again" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[k], again[k]) for k in resumed)


def test_cli_missing_or_relabeled_scores_are_clear_errors(sinet, demo_artifacts):
    out = demo_artifacts
    with store.open_artifact(out / "scores.h5", "scores") as s:
        data = {k: s.read(k) for k in ("ids", "labels", "weight", "distance", "nearest_class", "nearest_distance", "classes")}
    short = {k: (v[1:] if k != "classes" else v) for k, v in data.items()}
    store.write_artifact(out / "short.h5", "scores", short, {}, {})
    code, _, err = sinet("train", "--mode", "C", "--out", out, "--scores", out / "short.h5", *FAST)
    assert code == 1 and "short.h5" in err and "features.h5" in err and "img000" in err
    relabeled = dict(data, labels=(data["labels"] + 1) % 3)
    store.write_artifact(out / "relabeled.h5", "scores", relabeled, {}, {})
    code, _, err = sinet("train", "--mode", "B", "--out", out, "--scores", out / "relabeled.h5", *FAST)
    assert code == 1 and "relabeled.h5" in err and "another labeling" in err
    code, _, err = sinet("train", "--mode", "C", "--out", out, "--scores", out / "nope.h5", *FAST)
    assert code == 1 and "nope.h5" in err
    code, _, err = sinet("train", "--mode", "A", "--soft-targets", "--out", out, *FAST)
    assert code == 1 and "--mode C" in err


def test_cli_soft_targets_and_topk_smoothing(sinet, demo_artifacts):
    out = demo_artifacts
    code, _, err = sinet("train", "--mode", "C", "--soft-targets", "--suffix", "soft", "--out", out, *FAST)
    assert code == 0, err
    m = json.loads((out / "train-C-soft" / "metrics.json").read_text())
    assert m["params"]["alpha"] == 1.2 and "prototypes" in m["inputs"]
    code, _, err = sinet("train", "--mode", "A", "--topk-smoothing", "2", "--suffix", "topk", "--head", "mlp",
                         "--hidden", "8", "--out", out, *FAST)
    assert code == 0, err
    assert (out / "train-A-topk" / "topk-init.pt").exists()
    shared = json.loads((out / "metrics.json").read_text())["train"]
    assert {"C-soft", "A-topk"} <= set(shared)


@pytest.fixture
def image_manifest(tmp_path):
    r = np.random.default_rng(0)
    rows = ["id\tpath\tlabel\tsplit\tclean_label"]
    (tmp_path / "img").mkdir()
    for i in range(12):
        c = i % 3
        arr = np.full((20, 24, 3), 60 * c + 20, np.uint8) + r.integers(0, 30, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"i{i}\timg/{i}.png\t{'abc'[c]}\t{'val' if i >= 9 else 'train'}\t{'abc'[c]}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.tsv"


def test_cli_on_images_with_progressive_resolution(sinet, image_manifest, tmp_path):
    code, _, err = sinet("train", "--on", "images", "--mode", "A", "--data", f"manifest:{image_manifest}",
                         "--backbone", "test_efficientnet_gn", "--random-init", "--image-size", "24",
                         "--finetune-size", "32", "--finetune-epochs", "1", "--epochs", "1", "--batch-size", "4",
                         "--workers", "0", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 0, err
    m = json.loads((tmp_path / "o" / "train-A" / "metrics.json").read_text())
    assert m["n_train"] == 9 and m["n_val"] == 3 and len(m["history"]) == 2 and m["top1"] is not None
    sd = torch.load(tmp_path / "o" / "train-A" / "model.pt", weights_only=True)
    assert "fc.weight" in sd and any(k.startswith("backbone.") for k in sd)
