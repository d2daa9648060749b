"""Reproducible label-noise injection: the noisy labels change, the clean ones are kept."""

from __future__ import annotations

import numpy as np


def symmetric(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Uniform flip (the paper's ImageNet-40% protocol): exactly round(rate * N) images, chosen
    at random, get a label drawn uniformly from the *other* classes."""
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    n_flip = int(round(rate * len(labels)))
    idx = rng.choice(len(labels), n_flip, replace=False)
    shift = rng.integers(1, num_classes, size=n_flip)  # never 0: the new label always differs
    noisy[idx] = (labels[idx] + shift) % num_classes
    return noisy


def class_confusion(labels: np.ndarray, rate: float, pairs: dict[int, int], seed: int) -> np.ndarray:
    """Confusion between look-alike classes: in every class c that ``pairs`` maps to c', exactly
    round(rate * n_c) of its images, chosen at random, are relabeled c'. Other classes are untouched,
    so the overall noise rate is ``rate`` times the share of mapped classes."""
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for src, dst in sorted(pairs.items()):
        members = np.flatnonzero(labels == src)
        idx = rng.choice(members, int(round(rate * len(members))), replace=False)
        noisy[idx] = dst
    return noisy


def parse_pairs(spec: str, class_names: list[str]) -> dict[int, int]:
    """``"Shirt<->T-shirt/top,Sneaker->Sandal"`` (names or indices) to a source -> target map."""
    def lookup(tok: str) -> int:
        tok = tok.strip()
        if tok.isdigit() and int(tok) < len(class_names):
            return int(tok)
        if tok in class_names:
            return class_names.index(tok)
        raise ValueError(f"unknown class {tok!r} in confusion pairs (known: {', '.join(class_names)})")

    pairs: dict[int, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "<->" in item:
            a, b = (lookup(t) for t in item.split("<->", 1))
            pairs[a], pairs[b] = b, a
        elif "->" in item:
            a, b = (lookup(t) for t in item.split("->", 1))
            pairs[a] = b
        else:
            raise ValueError(f"confusion pair {item!r} must look like A<->B or A->B")
    return pairs


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate {rate} outside [0, 1]")
