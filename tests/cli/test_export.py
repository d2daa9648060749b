"""sinet export: images.csv / images.parquet read by pandas as they are, cleaned.tsv read back by the
manifest reader, the decision rule, the images folder (symlink for files, PNG for the demos)."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd
from PIL import Image

from sinet_cli import store
from stages.export import decide

CLASSES = ["c0", "c1", "c2"]


def scored_folder(folder, n=60, *, paths=None, ids=None, side_text=None, seed=0):
    """features.h5 + scores.h5 of n rows with known weights, flags and suggestions (written directly,
    so the test knows every value)."""
    rng = np.random.default_rng(seed)
    ids = ids if ids is not None else [f"img{i:03d}" for i in range(n)]
    labels = rng.integers(0, 3, n)
    feats = {"ids": ids, "labels": labels, "features": rng.standard_normal((n, 4)).astype(np.float16),
             "classes": CLASSES, "splits": np.where(np.arange(n) % 6 == 5, "val", "train")}
    if paths is not None:
        feats["paths"] = paths
    if side_text is not None:
        feats["side_text"] = side_text
    fp = store.write_artifact(folder / "features.h5", "features", feats, {"t": 1}, {})
    scores = {"ids": ids, "labels": labels, "weight": rng.random(n).astype(np.float32),
              "distance": rng.random(n).astype(np.float32), "nearest_class": rng.integers(0, 3, n),
              "nearest_distance": rng.random(n).astype(np.float32), "classes": CLASSES,
              "flagged": (rng.random(n) < 0.4).astype(np.int8), "suggested_class": (labels + 1) % 3,
              "suggested_confidence": rng.random(n).astype(np.float32),
              "class_noise": np.array([0.1, 0.2, 0.3])}
    store.write_artifact(folder / "scores.h5", "scores", scores, {"t": 1}, {"features": fp})
    return feats, scores


def test_decision_rule():
    d = decide(np.array([0, 0, 1, 1, 1, 1]), np.array([0.9, 0.1, 0.5, 0.49, np.nan, 1.0]), 0.5)
    assert d.tolist() == [0, 0, 1, 2, 2, 1]  # not flagged: keep; flagged: relabel at >= 0.5, else drop


def test_export_files_csv_parquet_and_cleaned_manifest(tmp_path, sinet):
    from sinet_cli.common import load_table

    imgs = tmp_path / "crawl" / "photos"
    paths = []
    for i in range(60):
        p = imgs / f"sub{i % 2}" / f"img{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(p)
        paths.append(str(p))
    text = [f"caption {i}" if i % 3 else "" for i in range(60)]
    art = tmp_path / "art"
    feats, scores = scored_folder(art, paths=paths, side_text=text)
    code, _, err = sinet("export", "--data", "imagefolder:x", "--out", art, "--relabel-at", "0.6")
    assert code == 0, err
    flagged, conf = scores["flagged"].astype(bool), scores["suggested_confidence"]
    relabel = flagged & (conf >= 0.6)
    drop = flagged & ~relabel
    assert f"keeps {60 - drop.sum()} ({(~flagged).sum()} not flagged, {relabel.sum()} flagged and relabeled" in err
    assert f"drops {drop.sum()}" in err

    for frame in (pd.read_csv(art / "export" / "images.csv"), pd.read_parquet(art / "export" / "images.parquet")):
        assert list(frame.columns) == ["id", "path", "split", "label", "weight", "flagged", "suggested_class",
                                       "suggested_confidence", "class_noise", "decision", "side_text"]
        assert frame["id"].tolist() == feats["ids"] and frame["path"].tolist() == paths
        assert frame["label"].tolist() == [CLASSES[k] for k in feats["labels"]]
        assert frame["split"].tolist() == feats["splits"].tolist()
        assert frame["flagged"].dtype == bool and frame["flagged"].tolist() == flagged.tolist()
        np.testing.assert_allclose(frame["weight"], scores["weight"], rtol=1e-6)
        np.testing.assert_allclose(frame["suggested_confidence"], conf, rtol=1e-6)
        assert frame["suggested_class"].tolist() == [CLASSES[k] for k in scores["suggested_class"]]
        np.testing.assert_allclose(frame["class_noise"], scores["class_noise"][feats["labels"]])
        assert frame["decision"].tolist() == np.where(relabel, "relabel", np.where(drop, "drop", "keep")).tolist()
    assert pd.read_parquet(art / "export" / "images.parquet")["side_text"].tolist() == text

    # the manifest reads back as a dataset: kept rows, relabeled labels, paths through the symlink
    link = art / "export" / "images"
    assert link.is_symlink() and link.resolve() == imgs.resolve()
    table = load_table(f"manifest:{art / 'export' / 'cleaned.tsv'}")
    kept = ~drop
    assert table.ids.tolist() == [i for i, k in zip(feats["ids"], kept) if k]
    want = np.where(relabel, scores["suggested_class"], feats["labels"])[kept]
    assert [table.classes.names[k] for k in table.labels] == [CLASSES[k] for k in want]
    assert table.splits.tolist() == feats["splits"][kept].tolist()
    assert table.side_text.tolist() == [t for t, k in zip(text, kept) if k]
    for p, orig in zip(table.paths, np.asarray(paths)[kept]):
        assert "images/" in p and not p.startswith("..")
        assert Image.open(p).tobytes() == Image.open(orig).tobytes()  # the same image file
    assert all(not line.split("\t")[1].startswith("/") for line in
               (art / "export" / "cleaned.tsv").read_text().splitlines()[1:])
    assert not [p for p in (art / "export").iterdir() if p.name.endswith(".partial")]


def test_export_demo_writes_png_of_kept_images(tmp_path, sinet):
    from sinet_cli.datasets import load_demo, read_manifest

    demo = load_demo(noise="openset:0.2", name="demo")
    pick = np.r_[0:20, len(demo.ids) - 1100 : len(demo.ids) - 1090]  # train rows and open-set junk
    ids = demo.ids[pick].tolist()
    assert any("-junk-" in i for i in ids)
    feats, scores = scored_folder(tmp_path, n=len(ids), ids=ids)
    code, _, err = sinet("export", "--data", "demo", "--out", tmp_path)
    assert code == 0, err
    table = read_manifest(tmp_path / "export" / "cleaned.tsv")
    keep = decide(scores["flagged"], scores["suggested_confidence"], 0.5) < 2
    assert table.ids.tolist() == [i for i, k in zip(ids, keep) if k]
    pos = {i: k for k, i in enumerate(demo.ids.tolist())}
    for i, p in zip(table.ids, table.paths):
        assert np.array_equal(np.asarray(Image.open(p)), demo.pixels[pos[i]])  # the demo's own pixels
    assert len(list((tmp_path / "export" / "images").iterdir())) == keep.sum()


def test_export_refuses_stale_scores(tmp_path, sinet):
    scored_folder(tmp_path, paths=[f"/x/{i}.png" for i in range(60)])
    store.write_artifact(tmp_path / "features.h5", "features", {
        "ids": ["a"], "labels": [0], "features": np.zeros((1, 4), np.float16), "classes": CLASSES}, {"t": 2}, {})
    code, _, err = sinet("export", "--out", tmp_path)
    assert code == 1 and "run sinet score-noise" in err and err.count("\n") == 1
    assert not (tmp_path / "export" / "images.csv").exists()


def test_export_of_pixels_without_data_says_which_data_to_pass(tmp_path, sinet):
    scored_folder(tmp_path)  # features.h5 with pixels only (no paths), as the demos write it
    code, _, err = sinet("export", "--out", tmp_path)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "features.h5 has no image paths" in err and "pass the --data it was extracted from" in err
    assert not (tmp_path / "export" / "images.csv").exists()


def test_export_block_by_hand():
    from stages.export import ExportConfig, export_block

    # rows: not flagged (keep), flagged + sure (relabel to class 0), flagged + unsure (drop),
    # flagged + sure but an invalid suggestion (relabel, left out of the manifest), a label outside the classes
    scores = {"labels": np.array([0, 1, 1, 0, 5]), "weight": np.array([0.9, 0.1, 0.2, 0.3, 0.5]),
              "flagged": np.array([0, 1, 1, 1, 0]), "suggested_class": np.array([0, 0, 0, -1, 1]),
              "suggested_confidence": np.array([0.9, 0.7, 0.2, 0.9, np.nan])}
    ids = np.array(["a", "b", "c", "d", "e"])
    block = export_block(scores, ids, np.full(5, ""), np.full(5, "train"), None, ["cat", "dog"],
                         np.array([0.1, 0.4]), 0.5)
    assert block.columns["decision"] == ["keep", "relabel", "drop", "relabel", "keep"]
    assert block.columns["label"] == ["cat", "dog", "dog", "cat", None]
    assert block.columns["suggested_class"] == ["cat", "cat", "cat", None, "dog"]
    assert block.columns["class_noise"][:4].tolist() == [0.1, 0.4, 0.4, 0.1] and np.isnan(block.columns["class_noise"][4])
    assert block.keep.tolist() == [True, True, False, False, False]
    assert block.new_label[:2].tolist() == [0, 0]
    assert ExportConfig(0.3, 10).params() == {"relabel_at": 0.3, "chunk_rows": 10}
    with pytest.raises(ValueError, match="--relabel-at 2"):
        ExportConfig(relabel_at=2)
