"""The embedded demo: real Fashion-MNIST images committed in the package, noise injected by seed.

Data: a 5,000-image train / 1,000-image validation subset of Fashion-MNIST (Zalando SE, MIT
licence), see ``data/README.md``. The validation split stays clean.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from . import noise as noise_lib
from .table import ClassTable, DatasetTable

NOISE_KINDS = ("none", "symmetric", "confusion")
# Look-alike garments: the confusions a web crawl of clothing really makes.
DEFAULT_CONFUSION = "T-shirt/top<->Shirt,Pullover<->Coat,Sandal<->Sneaker,Ankle boot->Sneaker"


def data_dir() -> Path:
    return Path(str(resources.files("sinet_cli.datasets") / "data"))


def demo_classes() -> ClassTable:
    return ClassTable.from_tsv(data_dir() / "fashion_mnist_classes.tsv")


def load_demo(
    noise: str = "symmetric",
    rate: float = 0.4,
    seed: int = 0,
    confusion_pairs: str = DEFAULT_CONFUSION,
) -> DatasetTable:
    """The demo table with ``noise`` ("none", "symmetric", "confusion") at ``rate`` on the train split."""
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; choose one of {', '.join(NOISE_KINDS)}")
    classes = demo_classes()
    with np.load(data_dir() / "fashion_mnist_subset.npz") as z:
        tr_x, tr_y, tr_src = z["train_images"], z["train_labels"], z["train_source_index"]
        va_x, va_y, va_src = z["val_images"], z["val_labels"], z["val_source_index"]
    if noise == "symmetric":
        tr_noisy = noise_lib.symmetric(tr_y, rate, len(classes), seed)
    elif noise == "confusion":
        tr_noisy = noise_lib.class_confusion(tr_y, rate, noise_lib.parse_pairs(confusion_pairs, classes.names), seed)
    else:
        tr_noisy = tr_y.copy()
    ids = [f"fmnist-train-{i:05d}" for i in tr_src] + [f"fmnist-t10k-{i:05d}" for i in va_src]
    return DatasetTable(
        name="demo",
        classes=classes,
        ids=np.asarray(ids),
        labels=np.concatenate([tr_noisy, va_y]),
        splits=np.asarray(["train"] * len(tr_y) + ["val"] * len(va_y)),
        pixels=np.concatenate([tr_x, va_x]),
        clean_labels=np.concatenate([tr_y, va_y]),
        provenance={"reader": "demo", "noise": noise, "rate": rate, "seed": seed,
                    "confusion_pairs": confusion_pairs if noise == "confusion" else None},
    )
