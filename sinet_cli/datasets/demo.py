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

``captions="synthetic:W[:E]"`` adds SYNTHETIC image-level side text (``side_text``), made up here
to test ``score-noise --image-text`` on data with known noise; the demo images have no real
captions. See :func:`synthetic_captions`.
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


# SYNTHETIC caption templates per demo (the class name or one of its WordNet lemmas fills {name})
CAPTION_TEMPLATES = {
    "demo": ("a photo of a {name}", "{name} for sale", "new {name}, size M", "women's {name}, free shipping",
             "cheap {name}", "{name}"),
    "demo-mnist": ("handwritten digit {name}", "the number {name}", "a scan of a handwritten {name}",
                   "digit {name}", "{name}"),
}
CAPTION_LEMMAS = 3  # at most this many WordNet lemmas per class besides its name


def parse_captions(spec: str | None) -> tuple[float, float] | None:
    """``None`` / ``"none"`` -> None; ``"synthetic:W[:E]"`` -> (W, E): the shares of train images
    whose SYNTHETIC caption names a wrong class (W, default 0.2) and whose caption is empty (E, default 0)."""
    if spec is None or spec.strip() in ("", "none"):
        return None
    kind, _, rest = spec.strip().partition(":")
    if kind != "synthetic":
        raise ValueError(f"--captions {spec!r}: expected none or synthetic:WRONG[:EMPTY], e.g. synthetic:0.2")
    parts = rest.split(":") if rest else []
    if len(parts) > 2:
        raise ValueError(f"--captions {spec!r}: expected synthetic:WRONG[:EMPTY]")
    try:
        wrong = float(parts[0]) if parts else 0.2
        empty = float(parts[1]) if len(parts) > 1 else 0.0
    except ValueError:
        raise ValueError(f"--captions {spec!r}: shares must be numbers") from None
    if not (0 <= wrong <= 1 and 0 <= empty <= 1 and wrong + empty <= 1):
        raise ValueError(f"--captions {spec!r}: shares must lie in [0, 1] and sum to at most 1")
    return wrong, empty


def caption_names(classes: ClassTable) -> list[list[str]]:
    """Per class: its name, then up to CAPTION_LEMMAS WordNet lemmas of its synset (if WordNet is there)."""
    try:
        from ..sideinfo import wordnet

        wn = wordnet()
    except Exception:  # noqa: BLE001 - names alone still make captions
        wn = None
    out = []
    for name, synset in zip(classes.names, classes.synsets):
        names = [name]
        if wn is not None and synset:
            try:
                lemmas = [lem.name().replace("_", " ") for lem in wn.synset(synset).lemmas()]
            except Exception:  # noqa: BLE001 - an unknown synset: the name only
                lemmas = []
            for lem in lemmas[:CAPTION_LEMMAS]:
                if lem.lower() not in {n.lower() for n in names}:
                    names.append(lem)
        out.append(names)
    return out


def synthetic_captions(true_labels: np.ndarray, source: np.ndarray, names: dict[str, list[list[str]]],
                       own: str, wrong: float, empty: float, seed: int,
                       templates: dict[str, tuple[str, ...]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC captions built from each image's TRUE class (never from its noisy label).

    Args:
        true_labels: (N,) the true class of each image in its source's class table.
        source: (N,) the demo each image comes from (``own`` or the open-set junk source).
        names: per demo, per class, the names a caption may use (:func:`caption_names`).
        own: the demo whose class table labels the images; wrong captions name one of its classes.
        wrong: share of images (exact count, rounded) whose caption names another class of ``own``.
        empty: share of the other images' captions left empty.
        seed: random seed (templates, names, which images get wrong / empty captions).
        templates: per demo, caption templates with ``{name}`` (default CAPTION_TEMPLATES).

    Returns:
        (captions, status): status 0 = the true class, 1 = a wrong class, 2 = empty.
    """
    n = len(true_labels)
    rng = np.random.default_rng([seed, 0xCA])
    order = rng.permutation(n)
    n_wrong, n_empty = int(round(wrong * n)), int(round(empty * n))
    status = np.zeros(n, dtype=np.int8)
    status[order[:n_wrong]] = 1
    status[order[n_wrong:n_wrong + n_empty]] = 2
    num_own = len(names[own])
    templates = templates or CAPTION_TEMPLATES
    captions = []
    for y, src, st in zip(np.asarray(true_labels).tolist(), np.asarray(source).tolist(), status.tolist()):
        if st == 2:
            captions.append("")
            continue
        if st == 1:  # another class of the label set (any class for junk from another source)
            k = int(rng.integers(num_own - 1)) if src == own else int(rng.integers(num_own))
            y = k + (k >= y) if src == own else k
            src = own
        choices = names[src][y]
        name = choices[int(rng.integers(len(choices)))]
        forms = templates[src]
        captions.append(forms[int(rng.integers(len(forms)))].format(name=name))
    return np.asarray(captions, dtype=str), status


def _load_images(name: str) -> dict[str, np.ndarray]:
    with np.load(data_dir() / DEMOS[name][0]) as z:
        return {k: z[k] for k in z.files}


def load_demo(
    noise: str = "symmetric",
    rate: float = 0.4,
    seed: int = 0,
    confusion_pairs: str | None = None,
    name: str = "demo",
    captions: str | None = None,
) -> DatasetTable:
    """An embedded demo table with ``noise`` injected into its train split.

    ``captions="synthetic:W[:E]"`` also gives every train image a SYNTHETIC caption
    (``side_text``) built from its true class, W of them naming a wrong class and E empty
    (:func:`synthetic_captions`, seeded by ``seed``); validation images get empty side text.
    Without it (the default) the table has no side text, as before.
    """
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; choose from {', '.join(DEMOS)}")
    terms = parse_noise(noise, rate)
    caption_shares = parse_captions(captions)
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
    true, source = [tr_y], [np.full(len(tr_y), name, dtype=object)]
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
        true.append(junk["train_labels"][pick])
        source.append(np.full(n_junk, junk_source, dtype=object))
        ids += [f"{DEMOS[junk_source][2]}-junk-{i:05d}" for i in junk["train_source_index"][pick]]
    n_train = sum(len(x) for x in labels)
    ids += [f"{prefix}-val-{i:05d}" for i in z["val_source_index"]]
    side_text = None
    if caption_shares is not None:
        names = {d: caption_names(demo_classes(d)) for d in (name, junk_source)}
        tr_text, _ = synthetic_captions(np.concatenate(true), np.concatenate(source), names, name,
                                        caption_shares[0], caption_shares[1], seed * 1000 + 555)
        side_text = np.concatenate([tr_text, np.full(len(z["val_labels"]), "", dtype=str)])
    return DatasetTable(
        name=name,
        classes=classes,
        ids=np.asarray(ids),
        labels=np.concatenate(labels + [z["val_labels"]]),
        splits=np.asarray(["train"] * n_train + ["val"] * len(z["val_labels"])),
        pixels=np.concatenate(images + [z["val_images"]]),
        clean_labels=np.concatenate(clean + [z["val_labels"]]),
        side_text=side_text,
        provenance={"reader": name, "noise": noise, "rate": rate, "seed": seed,
                    "confusion_pairs": pairs_spec if "confusion" in dict(terms) else None,
                    **({"captions": captions} if caption_shares is not None else {})},
    )
