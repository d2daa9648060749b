"""The Python API: label issues of in-memory arrays in at most three calls.

This is the one module that composes the stages (``stages/*.py`` never import each other): the
class relation graph (:func:`build_class_graph`, section 3.1), the visual prototypes
(:func:`build_prototypes`, section 3.2) and the score of every image (:func:`find_label_issues`,
section 3.3 and the default score beyond eq. 6, docs/method.md). score-noise runs the same functions of
:mod:`stages.score_noise` on features.h5, block by block, so both give the same numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import build_graph as _graph
from . import make_prototypes as _protos
from . import score_noise as _score
from .make_prototypes import PrototypeConfig
from .score_noise import ScoreConfig

BLOCK_ROWS = 16384  # rows per block of the prototype passes and the scoring
SOURCES = {"wordnet": "hierarchy", "hierarchy": "hierarchy", "text": "text", "name": "name"}
PLACED = _graph.PLACED  # node of a class placed one edge below its parent synset


@dataclass
class ClassGraph:
    """The class relation graph of section 3.1.

    Attributes:
        classes: the C class names.
        similarity: (C, C) S_t = S_l + S_w (eqs. 2-3), the S of eq. 4.
        name_resolution: per class, where it sits in WordNet and why (``class``, ``synset``,
            ``source``: name | table | none, ``rule``, ``detail``).
        label_embeddings: (C, E) the classes' text embeddings (what side text is compared with), or
            None without a text source.
    """

    classes: list[str]
    similarity: np.ndarray
    name_resolution: list[dict[str, Any]] = field(default_factory=list)
    label_embeddings: np.ndarray | None = None


@dataclass
class Prototypes:
    """Visual prototypes of section 3.2.

    Attributes:
        prototypes: (P, D) unit prototypes (eq. 5), P = C x per_class.
        prototype_class: (P,) class of each prototype.
        consistency: (N,) p_i of eq. 4 of each image (NaN for unlabeled ones), or None when the
            prototypes came from elsewhere.
        selected: (N,) whether the image was among the top-K of its class (eq. 5), or None.
    """

    prototypes: np.ndarray
    prototype_class: np.ndarray
    consistency: np.ndarray | None = None
    selected: np.ndarray | None = None


@dataclass
class LabelIssues:
    """What :func:`find_label_issues` finds.

    Attributes:
        weight: (N,) how likely each image's label is right (the training weight; default score:
            fused, docs/method.md).
        flagged: (N,) bool: the images likeliest mislabeled, as many as the estimate expects.
        suggested_class: (N,) the likeliest other class of each image.
        suggested_confidence: (N,) the probability that it is the image's class (0 without an estimate).
        eq6_weight: (N,) w_i of eq. 6 alone.
        distance: (N,) distance to the nearest prototype of the labeled class (eq. 6's d).
        class_noise: (C,) estimated noise rate of each class (NaN without an estimate or rows).
        noise_rate: estimated share of wrong labels over the labeled rows (NaN without an estimate).
        config: the score's options.
    """

    weight: np.ndarray
    flagged: np.ndarray
    suggested_class: np.ndarray
    suggested_confidence: np.ndarray
    eq6_weight: np.ndarray
    distance: np.ndarray
    class_noise: np.ndarray
    noise_rate: float
    config: ScoreConfig

    def to_frame(self) -> Any:
        """A pandas DataFrame with one row per image and the per-image columns."""
        import pandas as pd

        return pd.DataFrame({k: getattr(self, k) for k in (
            "weight", "flagged", "suggested_class", "suggested_confidence", "eq6_weight", "distance")})


# -- the class graph ---------------------------------------------------------------------------


def _default_encoder(encoder: Any) -> Any:
    """The sentence encoder: an object with ``encode`` as given, else the packaged one (or a folder)."""
    if encoder is not None and hasattr(encoder, "encode"):
        return encoder
    from .assets import load_text_encoder  # the packaged offline assets, found without downloads

    return load_text_encoder(encoder)


def build_class_graph(class_names: Sequence[str], *, synsets: Sequence[str | None] | None = None,
                      descriptions: Sequence[str | None] | None = None,
                      sources: Sequence[str] = ("wordnet", "text"), encoder: Any = None) -> ClassGraph:
    """The class relation graph S_t from class names (section 3.1, eqs. 2-3), in one call.

    Each class finds its place in WordNet by its name (``stages.build_graph.resolve_class_names``)
    unless ``synsets`` gives it; S_w is the path similarity 1 / (1 + d) over hypernyms; S_l the
    cosine of the encoded ``name: description`` texts (the description given, else the WordNet
    gloss, else the bare name). A class with no place in WordNet takes part through text only.

    Args:
        class_names: the C class names.
        synsets: per class a WordNet synset (``dog.n.01`` or ``n02084071``) or None (by name).
        descriptions: per class a description or None (the WordNet gloss).
        sources: any of ``wordnet`` (S_w), ``text`` (descriptions), ``name`` (class names).
        encoder: a sentence encoder with ``encode`` (sentence-transformers), a local model folder,
            or None for the packaged all-MiniLM-L6-v2.

    Returns:
        ClassGraph.

    Raises:
        ValueError: fewer than two classes, an unknown source, or lists of another length.
    """
    names = [str(n) for n in class_names]
    C = len(names)
    if C < 2:
        raise ValueError(f"{C} classes: a class graph needs at least two")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"source {unknown[0]!r}: choose from {', '.join(SOURCES)}")
    srcs = {SOURCES[s] for s in sources}
    for what, given in (("synsets", synsets), ("descriptions", descriptions)):
        if given is not None and len(given) != C:
            raise ValueError(f"{what}: {len(given)} entries for {C} classes")
    from .assets import wordnet  # the packaged WordNet, found without downloads

    wn = wordnet()
    own: list[Any | None] = [_graph.synset_by_id(wn, s) if s else None for s in (synsets or [None] * C)]
    by_name = _graph.resolve_class_names(names, wn, [s.name() if s is not None else None for s in own])
    maps: list[dict[str, int] | None] = []
    gloss: list[Any | None] = []
    entries: list[dict[str, Any]] = []
    for name, syn, r in zip(names, own, by_name):
        if syn is not None:
            maps.append(_graph.synset_ancestors(syn))
            entry = {"synset": syn.name(), "source": "table", "rule": "synset given", "detail": syn.name()}
        elif r.synset is None:
            maps.append(None)
            entry = {"synset": "", "source": "none", "rule": "", "detail": r.describe()}
        else:
            syn = wn.synset(r.synset)
            up = _graph.synset_ancestors(syn)
            # a class that is a kind of the synset sits one edge below it
            maps.append({PLACED + name: 0, **{k: d + 1 for k, d in up.items()}} if r.placed else up)
            entry = {"synset": r.synset, "source": "name", "rule": r.rule, "detail": r.describe()}
        gloss.append(syn)
        entries.append({"class": name, **entry})
    S_w = _graph.hierarchy_similarity(maps, sim="path") if "hierarchy" in srcs else None
    label_sims: dict[str, np.ndarray] = {}
    embeddings = None
    if srcs & {"text", "name"}:
        model = _default_encoder(encoder)
        encode = lambda texts: np.asarray(model.encode(texts, batch_size=64, show_progress_bar=False),  # noqa: E731
                                          dtype=np.float32)
        if "text" in srcs:
            user = descriptions or [None] * C
            texts = [f"{n}: {' '.join(d.split())}" if d and d.strip() else
                     f"{n}: {g.definition().strip()}" if g is not None and g.definition().strip() else n
                     for n, d, g in zip(names, user, gloss)]
            embeddings = encode(texts)
            label_sims["text"] = _graph.cosine_similarity(embeddings)  # eq. 2
        if "name" in srcs:
            name_emb = encode(names)
            label_sims["name"] = _graph.cosine_similarity(name_emb)  # eq. 2
            embeddings = name_emb if embeddings is None else embeddings
    graphs = _graph.relation_graphs(C, S_w, label_sims)  # eq. 3
    return ClassGraph(classes=names, similarity=graphs.S_t, name_resolution=entries, label_embeddings=embeddings)


# -- prototypes --------------------------------------------------------------------------------


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (features.h5 holds them so)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features: expected an N x D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features: not all finite")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels: expected {n} integer class indices, got shape {y.shape} of {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"labels: class {int(y.max())} out of range for {num_classes} classes")
    return y


def _num_classes(labels: np.ndarray, graph: ClassGraph | None) -> int:
    return len(graph.classes) if graph is not None else int(np.max(labels, initial=-1)) + 1


def _split_options(options: dict[str, Any], *kinds: type) -> list[dict[str, Any]]:
    """``options`` by the config class that has the field, the first of ``kinds`` for a name two share."""
    out: list[dict[str, Any]] = [{} for _ in kinds]
    names = [{f.name for f in dataclasses.fields(k)} for k in kinds]
    for key, value in options.items():
        owner = next((i for i, n in enumerate(names) if key in n), None)
        if owner is None:
            raise TypeError(f"unknown option {key!r}")
        out[owner][key] = value
    return out


def build_prototypes(features: np.ndarray, labels: np.ndarray, *, graph: ClassGraph | None = None,
                    device: str = "cpu", **options: Any) -> Prototypes:
    """Visual prototypes of every class (section 3.2: eqs. 4-5), in one call.

    Args:
        features: (N, D) image features (rows are scaled to unit length, as features.h5 holds them).
        labels: (N,) noisy labels in [0, C); -1 for an unlabeled row (left out).
        graph: the class graph (:func:`build_class_graph`); None: S = I (no side information: each
            class relates to itself only) over max(labels) + 1 classes.
        device: torch device of the products.
        **options: fields of :class:`stages.make_prototypes.PrototypeConfig` (``topk``, ``psi``,
            ``temperature``, ``per_class``, ...).

    Returns:
        Prototypes.

    Raises:
        ValueError: bad shapes, labels out of range, or bad options.
    """
    (proto_opts,) = _split_options(options, PrototypeConfig)
    x = _unit_rows(features)
    C = _num_classes(np.asarray(labels), graph)
    y = _labels(labels, len(x), C)
    S = np.asarray(graph.similarity, dtype=np.float32) if graph is not None else np.eye(C, dtype=np.float32)
    result = _protos.make_prototypes(lambda: ((i, x[i : i + BLOCK_ROWS]) for i in range(0, len(x), BLOCK_ROWS)),
                                     y, S, PrototypeConfig(**proto_opts), device=device)
    return Prototypes(prototypes=result.prototypes, prototype_class=result.prototype_class,
                      consistency=result.consistency, selected=result.selected)


# -- label issues ------------------------------------------------------------------------------


def _flat_index(prototypes: np.ndarray) -> Any:
    import faiss

    index = faiss.IndexFlatIP(prototypes.shape[1])  # exact: score_block computes its search itself
    index.add(np.ascontiguousarray(prototypes, dtype=np.float32))
    return index


def _pred_probs(pred_probs: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    p = np.asarray(pred_probs, dtype=np.float32)
    if p.shape != (n, num_classes):
        raise ValueError(f"pred_probs: expected shape ({n}, {num_classes}), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("pred_probs: each row must hold finite probabilities >= 0 that sum to 1")
    return p


def find_label_issues(features: np.ndarray, labels: np.ndarray, *, graph: ClassGraph | None = None,
                      prototypes: Prototypes | None = None, pred_probs: np.ndarray | None = None,
                      side_text: Sequence[str] | None = None, encoder: Any = None, device: str = "cpu",
                      **options: Any) -> LabelIssues:
    """Weight, flag and relabel every image of a noisily labeled set (the numbers score-noise writes).

    The default score (``score="fused"``, docs/method.md): p(label | x) of a reweighted out-of-fold
    linear probe times an open-set factor from eq. 6's distance to the labeled class's prototype
    (times the side text's agreement with the label, when given). The noise estimate, the flags and
    the suggestions come from the same probe (docs/noise-estimate.md).

    Args:
        features: (N, D) image features (rows are scaled to unit length).
        labels: (N,) noisy labels in [0, C); -1 for an unlabeled row (weight 0, flagged).
        graph: the class graph (:func:`build_class_graph`), for the prototypes (and with side text,
            its label embeddings). None: S = I, C = max(labels) + 1.
        prototypes: :func:`build_prototypes`' result; None: made here from ``features`` and ``graph``.
        pred_probs: (N, C) out-of-sample class probabilities, as cleanlab takes them: they replace the
            probe wherever its probabilities are used (fused weight, thresholds, estimate, flags,
            suggestions); no probe is fitted.
        side_text: (N,) per-image text (title, tags; "" for none), encoded with the graph's encoder and
            combined as the caption factor (needs ``graph.label_embeddings``).
        encoder: the sentence encoder of the side text (as :func:`build_class_graph`; None: packaged).
        device: torch device of the products and the probe.
        **options: fields of :class:`stages.score_noise.ScoreConfig` (``alpha``, ``beta``, ``score``,
            ``probe_rows``, ...) and, when the prototypes are made here, the other fields of
            ``PrototypeConfig`` (a name both have, as ``temperature``, is the score's: give such
            prototype options to :func:`build_prototypes` and pass its result).

    Returns:
        LabelIssues.

    Raises:
        ValueError: bad shapes, labels out of range, bad options, or side text without label embeddings.
    """
    score_opts, proto_opts = _split_options(options, ScoreConfig, PrototypeConfig)
    x = _unit_rows(features)
    C = _num_classes(np.asarray(labels), graph)
    y = _labels(labels, len(x), C)
    if side_text is not None:
        if graph is None or graph.label_embeddings is None:
            raise ValueError("side_text needs a graph with label_embeddings (build_class_graph with a text source)")
        if len(side_text) != len(x):
            raise ValueError(f"side_text: {len(side_text)} entries for {len(x)} images")
    score_opts.setdefault("image_text", side_text is not None)
    config = ScoreConfig(**score_opts)
    if config.image_text and side_text is None:
        raise ValueError("image_text needs side_text")
    probs = _pred_probs(pred_probs, len(x), C) if pred_probs is not None else None
    if probs is not None and config.probe_rows == 0:
        raise ValueError("pred_probs replace the probe: give probe_rows > 0 (the rows the estimate is made on)")
    if prototypes is None:
        prototypes = build_prototypes(x, y, graph=graph, device=device, **proto_opts)
    elif proto_opts:
        raise TypeError(f"option {next(iter(proto_opts))!r} applies only when the prototypes are made here")
    V = np.ascontiguousarray(prototypes.prototypes, dtype=np.float32)
    pc = np.asarray(prototypes.prototype_class, dtype=np.int64)
    if V.ndim != 2 or V.shape[1] != x.shape[1]:
        raise ValueError(f"prototypes of shape {V.shape} for {x.shape[1]}-d features")
    model = (V, _score.class_slots(pc, C), pc, _flat_index(V))
    state = _score.ScoreState()
    if config.fits_state or probs is not None:
        rows, class_rows = _score.sample_rows(y, np.ones(len(y), dtype=bool), C, config)
        state = _score.fit_score_state(x[rows], y[rows], rows, class_rows, *model, config,
                                       pred_probs=probs[rows] if probs is not None else None, device=device)
    text = None
    if config.image_text:
        text = _score.text_shares(_default_encoder(encoder), np.asarray(side_text, dtype=str),
                                  graph.label_embeddings, y, config.text_temperature)
    parts = []
    for i in range(0, len(x), BLOCK_ROWS):
        block = slice(i, i + BLOCK_ROWS)
        parts.append(_score.score_rows(x[block], y[block], np.arange(i, min(i + BLOCK_ROWS, len(x))), state, config,
                                       *model, text_share=text[block] if text is not None else None,
                                       pred_probs=probs[block] if probs is not None else None, device=device))
    cols = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in
            ("weight", "distance", "flagged", "suggested_class", "suggested_confidence")}
    eq6 = np.concatenate([p.get("weight_eq6", p["weight"]) for p in parts]) if parts else np.zeros(0, np.float32)
    estimate = state.estimate
    return LabelIssues(
        weight=cols["weight"], flagged=cols["flagged"].astype(bool), suggested_class=cols["suggested_class"],
        suggested_confidence=cols["suggested_confidence"], eq6_weight=eq6, distance=cols["distance"],
        class_noise=estimate.class_noise if estimate is not None else np.full(C, np.nan),
        noise_rate=float(estimate.overall) if estimate is not None else float("nan"), config=config)
