"""Small fixture trees in the exact Clothing1M and WebVision layouts, built from real demo images.

Each builder writes real Fashion-MNIST demo images as JPEG files and returns what a correct reader
must find (ids per split, labels, clean labels, side text), so tests compare against it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from sinet_cli.datasets import load_demo

CLOTHING1M_NAMES = [
    "T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
    "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear",
]
# A few real ImageNet/WebVision 1.0 synsets lines; more classes get made-up ids.
SYNSET_LINES = [
    "n01440764 tench, Tinca tinca",
    "n01443537 goldfish, Carassius auratus",
    "n01484850 great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "n01491361 tiger shark, Galeocerdo cuvieri",
]


@lru_cache(maxsize=1)
def _pixels() -> np.ndarray:
    return load_demo(noise="none").pixels


def write_jpeg(path: Path, k: int) -> None:
    """The k-th demo image (cycled) as a JPEG file."""
    pixels = _pixels()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[k % len(pixels)]).convert("RGB").save(path, "JPEG", quality=90)


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def make_clothing1m(root: Path, layout: str = "annotations") -> dict:
    """Clothing1M as downloaded: 14 classes x 2 noisy training images, 4 clean training images (2 of
    them also noisy training images), 3 val, 3 test; annotation files under ``annotations/`` or at
    the root (``layout="root"``).

    Returns the expected content: key lists per set, ``noisy`` / ``clean`` label dicts, ``ann`` dir.
    """
    ann = root / "annotations" if layout == "annotations" else root
    k = 0

    def image() -> str:
        nonlocal k
        rel = f"images/{k % 10}/{k % 7:02d}/{1000 + k}.jpg"
        write_jpeg(root / rel, k)
        k += 1
        return rel

    noisy: dict[str, int] = {}
    clean: dict[str, int] = {}
    noisy_train = []
    for c in range(14):
        for _ in range(2):
            rel = image()
            noisy_train.append(rel)
            noisy[rel] = c
    # human labels for a few noisy training images: two agree, two disagree (label noise)
    clean[noisy_train[0]] = 0
    clean[noisy_train[2]] = 4  # noisy label 1 (Shirt) is wrong: a Sweater
    clean[noisy_train[5]] = 2
    clean[noisy_train[27]] = 12  # noisy label 13 (Underwear) is wrong: a Vest
    clean_train = [noisy_train[0], noisy_train[2]]
    for c in (3, 9):
        rel = image()
        clean_train.append(rel)
        clean[rel] = c
    val, test = [], []
    for c in (0, 5, 11):
        rel = image()
        val.append(rel)
        clean[rel] = c
    for c in (1, 6, 13):
        rel = image()
        test.append(rel)
        clean[rel] = c
    noisy[val[0]] = 7  # noisy_label_kv also covers some clean images, as in the real files
    _lines(ann / "category_names_eng.txt", CLOTHING1M_NAMES)
    _lines(ann / "noisy_label_kv.txt", [f"{p} {c}" for p, c in noisy.items()])
    _lines(ann / "clean_label_kv.txt", [f"{p} {c}" for p, c in clean.items()])
    _lines(ann / "noisy_train_key_list.txt", noisy_train)
    _lines(ann / "clean_train_key_list.txt", clean_train)
    _lines(ann / "clean_val_key_list.txt", val)
    _lines(ann / "clean_test_key_list.txt", test)
    return {"root": root, "ann": ann, "noisy": noisy, "clean": clean, "noisy_train": noisy_train,
            "clean_train": clean_train, "val": val, "test": test}


def make_webvision(
    root: Path,
    n_classes: int = 4,
    google_per_class: int = 2,
    flickr_per_class: int = 1,
    val_per_class: int = 1,
    json_dirs: str = "plain",
    val_bare_names: bool = False,
) -> dict:
    """WebVision 1.0 as downloaded: ``info/`` lists, ``google/qNNNN/*.jpg``, ``flickr/qNNNN/*.jpg``,
    ``val_images_256/``, and per-query JSON metadata (``google/q0001.json``, or ``google_json/...``
    with ``json_dirs="suffixed"``, none with ``json_dirs="none"``). One query per class and source;
    ``queries_synsets_map.txt`` is 1-based in classes as shipped. Google records carry ids equal to
    the file stems (listed in reverse order so only id matching gets them right); Flickr records
    have no ids (matched by position) and tags as a list.

    Returns the expected content: ``train`` {id: label}, ``val`` {id: label}, ``text`` {id: side text},
    ``json`` {(source, query): path}.
    """
    synsets = SYNSET_LINES[:n_classes] + [f"n{2000000 + c:08d} class {c}, other name" for c in range(len(SYNSET_LINES), n_classes)]
    _lines(root / "info" / "synsets.txt", synsets)
    _lines(root / "info" / "queries_synsets_map.txt", [f"{c + 1} {c + 1}" for c in range(n_classes)])
    train: dict[str, int] = {}
    text: dict[str, str] = {}
    json_paths: dict[tuple[str, str], Path] = {}
    k = 0
    for source, per_class in (("google", google_per_class), ("flickr", flickr_per_class)):
        lines = []
        for c in range(n_classes):
            q = f"q{c + 1:04d}"
            records = []
            for j in range(1, per_class + 1):
                rel = f"{source}/{q}/{j:06d}.jpg"
                write_jpeg(root / rel, k)
                k += 1
                lines.append(f"{rel} {c}")
                train[rel] = c
                if source == "google":
                    records.append({"id": f"{j:06d}", "title": f"photo of {c}-{j}", "description": "a fish.",
                                    "orig_url": f"http://example.com/{c}/{j}.jpg"})
                    text[rel] = f"photo of {c}-{j}. a fish."
                else:
                    records.append({"title": f"flickr {c}-{j}", "description": "", "tags": ["lake", "fish"],
                                    "url": f"http://example.com/f{c}{j}.jpg"})
                    text[rel] = f"flickr {c}-{j}. lake, fish"
            if source == "google":
                records.reverse()
            if json_dirs != "none":
                jdir = root / (source if json_dirs == "plain" else f"{source}_json")
                jdir.mkdir(parents=True, exist_ok=True)
                (jdir / f"{q}.json").write_text(json.dumps(records), encoding="utf-8")
                json_paths[(source, q)] = jdir / f"{q}.json"
        _lines(root / "info" / f"train_filelist_{source}.txt", lines)
    val: dict[str, int] = {}
    lines = []
    for c in range(n_classes):
        for _ in range(val_per_class):
            name = f"ILSVRC2012_val_{len(val) + 1:08d}.JPEG"
            write_jpeg(root / "val_images_256" / name, k)
            k += 1
            val[f"val_images_256/{name}"] = c
            lines.append(f"{name if val_bare_names else 'val_images_256/' + name} {c}")
    _lines(root / "info" / "val_filelist.txt", lines)
    return {"root": root, "train": train, "val": val, "text": text, "json": json_paths, "synsets": synsets}


def score_on_flat_graph(art: Path, classes: list[str], run) -> None:
    """Prototypes and scores for ``art``'s features.h5 over a flat class graph (S = 0.2 off the
    diagonal, 1 on it), through the CLI runner ``run(*args) -> (code, out, err)``."""
    from sinet_cli import store

    C = len(classes)
    S = np.full((C, C), 0.2, dtype=np.float32) + 0.8 * np.eye(C, dtype=np.float32)
    store.write_artifact(art / "graph.h5", "graph", {"classes": classes, "S_w": S, "S_l": S, "S_t": 2 * S},
                         {"test": True}, {})
    for step in (["make-prototypes", "--out", art, "--device", "cpu"], ["score-noise", "--out", art]):
        code, _, err = run(*step)
        assert code == 0, err
