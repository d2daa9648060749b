"""The path a real user takes: their own crawl as a plain image folder with ordinary class names,
no clean labels, no val split, through `make all` with the defaults, to exit 0 and a report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sinet_cli import store
from sinet_cli.datasets import load_demo
from test_make_all import make

# Fashion-MNIST class k is crawled into the folder NAMES[k]: names as people type them
NAMES = ["T-shirt", "trousers", "pullover", "dress", "Down Coat", "sandal", "shirt", "sneakers", "bag", "ankle_boot"]
# a small random-init backbone at 32 px: seconds per stage; MODES and everything else as a user gets it
TINY = ["BACKBONE=test_efficientnet", "EXTRACT_OPTS=--random-init", "IMAGE_SIZE=32", "EPOCHS=2", "WORKERS=0",
        "DEVICE=cpu"]
TQDM_BAR = re.compile(r"\d+%\|.*\||it/s\]|Loading weights")


def build_crawl(root: Path, per_class: int = 30, moved: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Real demo images as PNG files in DIR/<class name>/, a share ``moved`` of them in a wrong
    class's folder. Returns each file's true class by its path relative to ``root``."""
    table = load_demo(noise="none")
    train = np.flatnonzero(table.splits == "train")
    rng = np.random.default_rng(seed)
    truth = {}
    for c in range(len(NAMES)):
        for k, r in enumerate(train[table.labels[train] == c][:per_class]):
            folder = c if rng.random() >= moved else int(rng.choice([x for x in range(len(NAMES)) if x != c]))
            rel = f"{NAMES[folder]}/{c}-{k}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(table.pixels[r]).save(root / rel)
            truth[rel] = c
    return truth


@pytest.mark.slow
def test_make_all_on_a_plain_image_folder_without_clean_labels_or_val_split(tmp_path):
    crawl, art = tmp_path / "crawl", tmp_path / "shop"
    truth = build_crawl(crawl)
    moved = sum(NAMES.index(rel.split("/")[0]) != c for rel, c in truth.items())
    assert len(truth) == 300 and 30 <= moved <= 90
    done = make("all", "DATASET=imagefolder", f"DATA_ROOT={crawl}", f"ART={art}", *TINY)
    out, err = done.stdout, done.stderr

    # every image read, as training images with the folder's label, and nothing claims a truth
    with store.open_artifact(art / "features.h5", "features") as f:
        assert f.dims["N"] == 300 and set(f.read("splits")) == {"train"} and "clean_labels" not in f
        assert sorted(f.read("classes")) == sorted(NAMES)
    # train: skipped, one line per model saying why and what to add; recorded for summary and report
    skips = [line for line in err.splitlines() if "not trained:" in line]
    modes = ("A", "B", "C", "correct")
    assert len(skips) == len(modes), err
    for mode, line in zip(modes, skips):
        assert line.startswith(f"{art / ('train-' + mode)}: not trained: {art / 'features.h5'} has no val split")
        assert "add a val split" in line and "DIR/val/<class>/" in line
    runs = json.loads((art / "metrics.json").read_text())["train"]
    assert {m: r["skipped"] for m, r in runs.items()} == {m: "no val split" for m in modes}
    assert not any((art / f"train-{m}" / "model.pt").exists() for m in modes)

    # summary (make's last step): what is known, and what is not
    assert out.index("Noise (") < out.index("outputs:")
    with store.open_artifact(art / "scores.h5", "scores") as s:
        estimate = s.json_attr("noise_estimate")
        flagged = int(s.read("flagged").sum()) if "flagged" in s else None
    assert estimate is not None and flagged is not None  # score-noise estimates and flags by default
    assert f"estimated noise {100 * estimate['overall']:.1f}%" in out
    assert f"flagged {flagged} of 300" in out
    assert "not known: no clean labels: no ROC-AUC/AP" in out
    assert "not known: not trained (A, B, C, correct): no val split" in out
    assert re.search(rf"^ report\s+{re.escape(str(art / 'report' / 'index.html'))}$", out, re.M), out
    assert f"{art / 'suspects.tsv'}" in out and f"{art / 'export' / 'cleaned.tsv'}" in out
    for name in ("ankle_boot", "Down Coat", "T-shirt", "sneakers"):
        assert name in out  # the per-class table

    # the report: written, says the same, shows every class
    page = (art / "report" / "index.html").read_text()
    unknown = page[page.index('id="not-known"'):]
    unknown = unknown[: unknown.index("</ul>")]
    assert "No clean labels" in unknown and "Not trained (A, B, C, correct): no val split" in unknown
    assert "Accuracy on the validation split" not in page and 'id="suspects"' in page
    for name in NAMES:
        assert f">{name}<" in page or f">{name}</a>" in page
    with store.open_artifact(art / "graph.h5", "graph") as g:
        resolution = g.json_attr("name_resolution")
    assert resolution is not None  # build-graph records how it resolved each plain name
    assert 'id="name-resolution"' in page and "class names: 10 classes" in out
    for name in ("images.csv", "images.parquet", "cleaned.tsv"):
        assert (art / "export" / name).is_file(), name

    # make's log holds no third-party progress bar (the text encoder and the backbone were loaded)
    assert not TQDM_BAR.search(err), err
