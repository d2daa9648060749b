"""The embedded demos: real images committed in the package, label noise injected by seed.

* ``demo``: a 5,000-image train / 1,000-image validation subset of Fashion-MNIST (Zalando SE,
  MIT licence); open-set junk comes from the MNIST subset.
* ``demo-mnist``: the same sizes of MNIST digits (LeCun & Cortes, CC BY-SA 3.0); open-set junk
  comes from Fashion-MNIST. A second real dataset, so that nothing is tuned to one.

See ``data/README.md``. The validation split stays clean. Noise kinds, combinable as
``"confusion:0.2+openset:0.15"`` (a term without ``:rate`` takes the ``rate`` argument):

* ``symmetric``: the paper's uniform flip; exactly ``rate`` of the train images get another class.
* ``confusion``: look-alike classes swap labels (``rate`` of each mapped class).
* ``openset``: images from outside every class, labeled at random, make up ``rate`` of the
  resulting train split; their clean label is ``OUTSIDE`` (-2).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from . import noise as noise_lib
from .table import OUTSIDE, ClassTable, DatasetTable

NOISE_KINDS = ("none", "symmetric", "confusion", "openset")
# Look-alike garments: the confusions a web crawl of clothing really makes.
DEFAULT_CONFUSION = {
    "demo": "T-shirt/top<->Shirt,Pullover<->Coat,Sandal<->Sneaker,Ankle boot->Sneaker",
    # digits a careless labeler or OCR confuses
    "demo-mnist": "four<->nine,three<->five,one<->seven,two->seven",
}
DEMOS = {
    # name: (images file, class table, id prefix, open-set junk source)
    "demo": ("fashion_mnist_subset.npz", "fashion_mnist_classes.tsv", "fmnist", "demo-mnist"),
    "demo-mnist": ("mnist_subset.npz", "mnist_classes.tsv", "mnist", "demo"),
}


def data_dir() -> Path:
    return Path(str(resources.files("sinet_cli.datasets") / "data"))


def demo_classes(name: str = "demo") -> ClassTable:
    return ClassTable.from_tsv(data_dir() / DEMOS[name][1])


def parse_noise(spec: str, rate: float) -> list[tuple[str, float]]:
    """``"confusion:0.2+openset:0.1"`` -> [("confusion", 0.2), ("openset", 0.1)]."""
    terms: list[tuple[str, float]] = []
    for term in filter(None, (t.strip() for t in spec.split("+"))):
        kind, _, value = term.partition(":")
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; choose from {', '.join(NOISE_KINDS)} (combine with +)")
        try:
            r = float(value) if value else rate
        except ValueError:
            raise ValueError(f"noise rate {value!r} in {term!r} is not a number") from None
        if kind != "none":
            terms.append((kind, r))
    if len({k for k, _ in terms}) != len(terms):
        raise ValueError(f"noise kind repeated in {spec!r}")
    return terms


def _load_images(name: str) -> dict[str, np.ndarray]:
    with np.load(data_dir() / DEMOS[name][0]) as z:
        return {k: z[k] for k in z.files}


def load_demo(
    noise: str = "symmetric",
    rate: float = 0.4,
    seed: int = 0,
    confusion_pairs: str | None = None,
    name: str = "demo",
) -> DatasetTable:
    """An embedded demo table with ``noise`` injected into its train split."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; choose from {', '.join(DEMOS)}")
    terms = parse_noise(noise, rate)
    classes = demo_classes(name)
    prefix, junk_source = DEMOS[name][2], DEMOS[name][3]
    z = _load_images(name)
    tr_y = z["train_labels"]
    tr_noisy = tr_y.copy()
    pairs_spec = confusion_pairs or DEFAULT_CONFUSION[name]
    for k, (kind, r) in enumerate(terms):
        term_seed = seed * 1000 + k  # independent streams per term
        if kind == "symmetric":
            tr_noisy = noise_lib.symmetric(tr_noisy, r, len(classes), term_seed)
        elif kind == "confusion":
            tr_noisy = noise_lib.class_confusion(tr_noisy, r, noise_lib.parse_pairs(pairs_spec, classes.names), term_seed)
    ids = [f"{prefix}-train-{i:05d}" for i in z["train_source_index"]]
    images, labels, clean = [z["train_images"]], [tr_noisy], [tr_y]
    openset = dict(terms).get("openset")
    if openset:
        if not 0 <= openset < 1:
            raise ValueError(f"open-set rate {openset} outside [0, 1)")
        junk = _load_images(junk_source)
        n_junk = int(round(openset * len(tr_y) / (1 - openset)))  # junk is `openset` of the result
        if n_junk > len(junk["train_labels"]):
            raise ValueError(f"open-set rate {openset} needs {n_junk} junk images, {len(junk['train_labels'])} exist")
        rng = np.random.default_rng(seed * 1000 + 999)
        pick = np.sort(rng.choice(len(junk["train_labels"]), n_junk, replace=False))
        images.append(junk["train_images"][pick])
        labels.append(rng.integers(0, len(classes), n_junk))
        clean.append(np.full(n_junk, OUTSIDE))
        ids += [f"{DEMOS[junk_source][2]}-junk-{i:05d}" for i in junk["train_source_index"][pick]]
    n_train = sum(len(x) for x in labels)
    ids += [f"{prefix}-val-{i:05d}" for i in z["val_source_index"]]
    return DatasetTable(
        name=name,
        classes=classes,
        ids=np.asarray(ids),
        labels=np.concatenate(labels + [z["val_labels"]]),
        splits=np.asarray(["train"] * n_train + ["val"] * len(z["val_labels"])),
        pixels=np.concatenate(images + [z["val_images"]]),
        clean_labels=np.concatenate(clean + [z["val_labels"]]),
        provenance={"reader": name, "noise": noise, "rate": rate, "seed": seed,
                    "confusion_pairs": pairs_spec if "confusion" in dict(terms) else None},
    )
