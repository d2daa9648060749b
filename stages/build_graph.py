"""build-graph: the class relation graphs of SINet, section 3.1 (eq. 2 and eq. 3).

* ``S_w`` (hierarchy, "HW"): a similarity from the shortest-path distance between the classes'
  nodes in a hierarchy (WordNet's hypernym graph or a user's taxonomy). The hierarchy arrives as
  one *ancestor map* per class: ``{node: number of edges from the class's node}`` (the class's own
  node at 0), i.e. what nltk's ``Synset._shortest_hypernym_paths`` computes. The distance of two
  classes is ``d(a, b) = min over common ancestors k of anc_a[k] + anc_b[k]``, which is exactly
  nltk's ``shortest_path_distance``. Each map is computed once per class and the C x C distances
  come from a vectorized min-plus over a dense (shared ancestors x C) matrix, one row at a time,
  never from a per-pair graph search. Transforms: ``path`` 1/(1+d) (default), ``wup``
  (Wu-Palmer, as nltk's ``wup_similarity``), ``exp`` exp(-d/tau). No common ancestor -> 0.
* ``S_l`` (text, "CD"/"CN"): the cosine similarity of label embeddings (eq. 2), from a frozen
  sentence encoder over each class's description (CD) or name (CN).
* ``S_t = S_l + S_w`` (eq. 3). A source that is switched off contributes a zero matrix.

Optional text head (``--text-head bilstm``), as in the paper: a bidirectional LSTM over the
*frozen* token-level embeddings of the sentence encoder's transformer; only the LSTM is trained.

Training objective of the text head: a symmetric InfoNCE (contrastive) loss over classes.
Each class has several texts that describe it (its description, WordNet gloss, lemma names,
hypernym gloss, the user's description, its name). At every step a batch of B classes is
drawn and two of each class's texts (drawn at random; the same text twice when a class has
only one, token dropout making the two views differ) are encoded by the BiLSTM, mean-pooled over
tokens and L2-normalized into z1, z2 (B x 2H). With logits = z1 z2^T / temperature, the loss is
    L = 1/2 [ CE(logits, diag) + CE(logits^T, diag) ],
i.e. each text must pick the other text of its own class among the B classes of the batch: texts
of the same class are pulled together, texts of different classes pushed apart. Adam, seeded,
a few hundred steps at most. The class embedding v_i is the trained BiLSTM's pooled output
(eval mode, no dropout) over the class's description, and S_l follows from eq. 2.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
import weakref
from collections import Counter, deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import numpy as np

HIERARCHY_SIMS = ("path", "wup", "exp")
ROOT = "*ROOT*"  # simulated root joining separate trees (nltk does the same for verbs)

Ancestors = Mapping[Hashable, int]
ProgressFn = Callable[[int], None]


# -- hierarchy: S_w ----------------------------------------------------------------------------


def _shared_index(ancestors: Sequence[Ancestors | None]) -> tuple[dict[Hashable, int], np.ndarray, int]:
    """The nodes held by at least two classes (only those can be common ancestors) as a dense
    (M x C) matrix of distances, ``inf`` (a sentinel of the chosen int dtype) where absent."""
    counts: Counter = Counter()
    maxd = 0
    for anc in ancestors:
        if anc:
            counts.update(anc.keys())
            maxd = max(maxd, max(anc.values()))
    shared = [k for k, c in counts.items() if c >= 2]
    index = {k: i for i, k in enumerate(shared)}
    # sentinel inf > any finite sum (2 maxd) and inf + maxd within the dtype: no overflow below
    if maxd <= 63:
        dtype, inf = np.uint8, 128
    elif maxd <= 16000:
        dtype, inf = np.uint16, 32768
    else:
        dtype, inf = np.int64, 1 << 40
    C = len(ancestors)
    D = np.full((len(shared), C), inf, dtype=dtype)
    rows, cols, vals = [], [], []
    for c, anc in enumerate(ancestors):
        if anc:
            for k, d in anc.items():
                i = index.get(k)
                if i is not None:
                    rows.append(i)
                    cols.append(c)
                    vals.append(d)
    if rows:
        D[np.asarray(rows), np.asarray(cols)] = np.asarray(vals, dtype=dtype)
    return index, D, inf


def _check_ancestors(ancestors: Sequence[Ancestors | None]) -> None:
    for c, anc in enumerate(ancestors):
        if anc is None:
            continue
        if not anc:
            raise ValueError(f"class {c}: empty ancestor map (it must hold the class's own node at 0)")
        if min(anc.values()) < 0:
            raise ValueError(f"class {c}: negative distance in its ancestor map")
        if min(anc.values()) != 0:
            raise ValueError(f"class {c}: ancestor map has no node at distance 0 (the class's own node)")


def hierarchy_distances(
    ancestors: Sequence[Ancestors | None],
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Shortest-path distances between classes from their ancestor maps.

    Args:
        ancestors: per class ``{node: edges from the class's node}`` (own node at 0), or ``None``
            for a class whose place in the hierarchy is unknown.
        progress: called with the number of rows finished.

    Returns:
        C x C float32: d(a, b) = min over common ancestors k of anc_a[k] + anc_b[k] (0 on the
        diagonal of known classes); ``inf`` where no common ancestor exists or a class is unknown.
    """
    _check_ancestors(ancestors)
    C = len(ancestors)
    index, D, inf = _shared_index(ancestors)
    out = np.full((C, C), np.inf, dtype=np.float32)
    for a, anc in enumerate(ancestors):
        if anc is not None:
            items = [(index[k], d) for k, d in anc.items() if k in index]
            if items:
                idx = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
                da = np.fromiter((d for _, d in items), dtype=D.dtype, count=len(items))
                best = (D[idx] + da[:, None]).min(axis=0)  # min-plus over common ancestors
                row = best.astype(np.float32)
                row[best >= inf] = np.inf
                out[a] = row
            out[a, a] = 0.0
        if progress is not None and (a % 256 == 255 or a == C - 1):
            progress(a % 256 + 1)
    unknown = np.array([anc is None for anc in ancestors], dtype=bool)
    out[:, unknown] = np.inf
    return out


def wup_similarities(
    ancestors: Sequence[Ancestors | None],
    node_depth: Mapping[Hashable, tuple[int, int]],
    lengths: Sequence[Ancestors | None] | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Wu-Palmer similarity from ancestor maps, as nltk's ``wup_similarity``.

    The least common subsumer l of (a, b) is the common ancestor of greatest ``select`` depth
    (nltk: ``min_depth``; ties go to a itself, then to the smallest node name), and
    wup = 2 h / (len_a(l) + len_b(l) + 2 h) with h = ``depth`` + 1 (nltk: ``max_depth() + 1``).

    Args:
        ancestors: as for :func:`hierarchy_distances`.
        node_depth: ``{node: (select, depth)}`` for every node of every ancestor map.
        lengths: per class ``{ancestor: len}``, the path length used above; default the ancestor
            maps themselves (hypernym edges). nltk uses its ``shortest_path_distance`` between the
            class and the LCS, which differs under multiple inheritance.
        progress: called with the number of rows finished.

    Returns:
        C x C float32 in [0, 1]; 1 on the diagonal of known classes, 0 without a common ancestor.
    """
    _check_ancestors(ancestors)
    C = len(ancestors)
    index, D, inf = _shared_index(ancestors)
    if lengths is None:
        L = D
    else:
        if len(lengths) != C:
            raise ValueError(f"lengths has {len(lengths)} entries for {C} classes")
        L = np.zeros(D.shape, dtype=np.float64)
        for c, (anc, ln) in enumerate(zip(ancestors, lengths)):
            if anc is not None:
                if ln is None or any(k not in ln for k in anc):
                    raise ValueError(f"class {c}: lengths must cover every node of its ancestor map")
                for k in anc:
                    i = index.get(k)
                    if i is not None:
                        L[i, c] = ln[k]
    missing = [k for anc in ancestors if anc for k in anc if k not in node_depth]
    if missing:
        raise ValueError(f"node_depth lacks node {missing[0]!r}")
    sel = {k: node_depth[k][0] for k in index}
    out = np.zeros((C, C), dtype=np.float32)
    cols = np.arange(C)
    for a, anc in enumerate(ancestors):
        if anc is not None:
            ln = anc if lengths is None else lengths[a]
            items = [(k, d) for k, d in anc.items() if k in index]
            if items:
                items.sort(key=lambda kd: (-sel[kd[0]], kd[1] != 0, str(kd[0])))
                idx = np.asarray([index[k] for k, _ in items])
                la = np.asarray([ln[k] for k, _ in items], dtype=np.float64)
                h = np.asarray([node_depth[k][1] + 1 for k, _ in items], dtype=np.float64)
                common = D[idx] < inf
                first = common.argmax(axis=0)  # the LCS of (a, b): first common ancestor in LCS order
                has = common.any(axis=0)
                lb = L[idx[first], cols].astype(np.float64)
                hl = h[first]
                w = 2.0 * hl / (la[first] + lb + 2.0 * hl)
                out[a] = np.where(has, w, 0.0)
            out[a, a] = 1.0
        if progress is not None and (a % 256 == 255 or a == C - 1):
            progress(a % 256 + 1)
    unknown = np.array([anc is None for anc in ancestors], dtype=bool)
    out[:, unknown] = 0.0
    return out


def similarity_from_distance(dist: np.ndarray, sim: str = "path", tau: float = 1.0) -> np.ndarray:
    """``path``: 1 / (1 + d); ``exp``: exp(-d / tau). ``inf`` distances give 0."""
    d = np.asarray(dist, dtype=np.float64)
    if sim == "path":
        s = 1.0 / (1.0 + d)
    elif sim == "exp":
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        s = np.exp(-d / tau)
    else:
        raise ValueError(f"similarity {sim!r} is not a distance transform; choose path or exp")
    s[~np.isfinite(d)] = 0.0
    return s.astype(np.float32)


def hierarchy_similarity(
    ancestors: Sequence[Ancestors | None] | None = None,
    *,
    distances: np.ndarray | None = None,
    sim: str = "path",
    tau: float = 1.0,
    node_depth: Mapping[Hashable, tuple[int, int]] | None = None,
    lengths: Sequence[Ancestors | None] | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """S_w: the hierarchy graph G_w of section 3.1 as a C x C matrix.

    Give either ``ancestors`` (per-class ancestor maps, ``None`` = unknown class) or a ready
    ``distances`` matrix (``inf`` = no path). A class whose place is unknown (``None``) gets a
    row and column of 0 with 1 on the diagonal.

    Args:
        ancestors: per-class ancestor maps, see :func:`hierarchy_distances`.
        distances: C x C shortest-path distances instead of ``ancestors``.
        sim: ``path`` (1/(1+d)), ``wup`` (Wu-Palmer, needs ``ancestors`` and ``node_depth``),
            ``exp`` (exp(-d/tau)).
        tau: temperature of ``exp``.
        node_depth: ``{node: (select depth, depth)}`` for ``wup``.
        lengths: optional per-class path lengths to ancestors for ``wup``, see
            :func:`wup_similarities`.
        progress: called with the number of rows finished.
    """
    if sim not in HIERARCHY_SIMS:
        raise ValueError(f"unknown hierarchy similarity {sim!r}; choose one of {', '.join(HIERARCHY_SIMS)}")
    if (ancestors is None) == (distances is None):
        raise ValueError("give exactly one of ancestors and distances")
    if sim == "wup":
        if ancestors is None or node_depth is None:
            raise ValueError("wup needs ancestor maps and node depths")
        S = wup_similarities(ancestors, node_depth, lengths, progress)
    else:
        if distances is None:
            distances = hierarchy_distances(ancestors, progress)
        distances = np.asarray(distances)
        if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
            raise ValueError(f"distances must be C x C, got shape {distances.shape}")
        S = similarity_from_distance(distances, sim, tau)
    if ancestors is not None:
        for c, anc in enumerate(ancestors):
            if anc is None:  # unknown place: no hierarchy relation, only itself
                S[c, :] = 0.0
                S[:, c] = 0.0
                S[c, c] = 1.0
    return S


def taxonomy_ancestors(
    nodes: Sequence[str],
    parents: Mapping[str, Sequence[str]],
    root: str | None = ROOT,
) -> tuple[list[dict[str, int] | None], dict[str, tuple[int, int]]]:
    """Ancestor maps of ``nodes`` in a user taxonomy (``child -> parents``), by tree distance.

    Top-level nodes (no parent) hang under a simulated ``root`` so that classes of separate trees
    are still related (far apart); ``root=None`` leaves them unrelated. A node that appears
    nowhere in the taxonomy gets ``None`` (unknown place).

    Returns:
        (per-node ancestor maps, ``{node: (min_depth, max_depth)}`` for Wu-Palmer).

    Raises:
        ValueError: the taxonomy has a cycle (the message lists it).
    """
    graph: dict[str, list[str]] = {str(c): [str(p) for p in ps] for c, ps in parents.items()}
    present = set(graph) | {p for ps in graph.values() for p in ps}
    # cycle check: iterative three-colour DFS over child -> parent edges
    state: dict[str, int] = {}
    for start in graph:
        if state.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
                path.append(node)
            ps = graph.get(node, [])
            if i < len(ps):
                stack.append((node, i + 1))
                p = ps[i]
                if state.get(p) == 1:
                    cycle = path[path.index(p):] + [p]
                    raise ValueError(f"the taxonomy has a cycle: {' -> '.join(cycle)}")
                if not state.get(p):
                    stack.append((p, 0))
            else:
                state[node] = 2
                path.pop()

    def up(node: str) -> list[str]:
        ps = graph.get(node, [])
        if not ps and root is not None and node != root:
            return [root]
        return ps

    maps: list[dict[str, int] | None] = []
    for n in nodes:
        n = str(n)
        if n not in present:
            maps.append(None)
            continue
        dist: dict[str, int] = {}
        queue = deque([(n, 0)])
        while queue:
            s, d = queue.popleft()
            if s in dist:
                continue
            dist[s] = d
            queue.extend((p, d + 1) for p in up(s))
        maps.append(dist)

    depth: dict[str, tuple[int, int]] = {}

    def node_depth(s: str) -> tuple[int, int]:
        # iterative memoized (min, max) depth below the top (root at 0)
        todo = [s]
        while todo:
            x = todo[-1]
            if x in depth:
                todo.pop()
                continue
            ps = up(x)
            pending = [p for p in ps if p not in depth]
            if pending:
                todo.extend(pending)
                continue
            depth[x] = (0, 0) if not ps else (1 + min(depth[p][0] for p in ps), 1 + max(depth[p][1] for p in ps))
            todo.pop()
        return depth[s]

    for m in maps:
        for k in m or ():
            node_depth(k)
    return maps, depth


# -- class names: WordNet resolution ------------------------------------------------------------

#: Version of the rules of :func:`resolve_class_name`; part of graph.h5's provenance, so a graph
#: built under older rules is stale.
NAME_RULES_VERSION = 2

_SYNSET_ID = re.compile(r"^[a-z0-9_.'-]+\.[nvasr]\.\d{1,2}$|^[nvasr]\d{8}$|^\d{8}-[nvasr]$", re.IGNORECASE)
_ALTERNATIVES = re.compile(r"\s*[/,|&+;]\s*|\s+(?:and|or)\s+|_(?:and|or)_", re.IGNORECASE)
_POSSESSIVE = re.compile(r"['\u2019]s\b|['\u2019]", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+")
_OFFSET = re.compile(r"^([nvasr])(\d{8})$|^(\d{8})-([nvasr])$")
_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
MIN_COMPOUND_PART = 3  # the shortest head and modifier a closed compound ("downcoat") is split into


def name_words(name: str) -> list[str]:
    """The lower-case words of a class name: Unicode-normalized (NFKC), possessives dropped
    (``men's`` -> ``men``), split at ``_``, ``-``, spaces and any other non-alphanumeric character.

    ``"T-Shirt"``, ``"t_shirt"`` and ``"T shirt"`` all give ``["t", "shirt"]``.
    """
    text = _POSSESSIVE.sub("", unicodedata.normalize("NFKC", name))
    return _WORD.findall(text.lower())


def name_key(name: str) -> str:
    """The words of a name run together (``"Down Coat"``, ``"down_coat"``, ``"Downcoat"`` ->
    ``"downcoat"``): the key under which spellings of one name compare equal."""
    return "".join(name_words(name))


def same_name(a: str, b: str) -> bool:
    """Whether two class names are spellings of one name: equal :func:`name_key`, or equal up to a
    plural ``-s`` / ``-es`` on one side (``"T-shirts"`` = ``"T-Shirt"``, ``"Dresses"`` = ``"dress"``)."""
    ka, kb = name_key(a), name_key(b)
    if not ka or not kb:
        return False
    return ka == kb or ka in (kb + "s", kb + "es") or kb in (ka + "s", ka + "es")


SENSE_RULES = ("first", "frequency", "context")
# the context rule's settings, chosen on ImageNet-1k's names (singular and plural) and 45 crawl
# names, and checked on held-out draws of ImageNet-21k (bench/name_resolution.py)
CONTEXT_NEIGHBOURS = 10  # k: a sense is judged by the k other classes it sits closest to
CONTEXT_MARGIN = 0.05  # Wu-Palmer: how much closer another sense must sit to override frequency
CONTEXT_FLOOR = 0.6  # the least context that may override frequency (sharing "organism" is no context)
CONTEXT_ROUNDS = 2  # passes: the second judges each sense against the first pass's choices


@dataclass(frozen=True)
class NameResolution:
    """How one class name was placed in WordNet (see :func:`resolve_class_names`).

    Attributes:
        name: the class name as given.
        synset: the WordNet synset name (``dress.n.01``) the class *is* or, with ``placed``, the
            synset it sits one edge *below*; ``None`` when the name resolved to nothing.
        placed: True when the class is a kind of ``synset`` rather than ``synset`` itself (the
            head-noun fallbacks: ``ankle boot`` sits below ``boot.n.01``).
        lemma: the WordNet lemma of ``synset`` that matched (``sneaker`` for ``sneakers``), ``""``
            if none.
        rule: which rule matched: ``synset id``, ``lemma``, ``compound``, ``head noun`` or
            ``closed compound`` (``""`` when unresolved).
        senses: how many noun senses the matched word has (pooled over its forms: ``shoes`` has the
            senses of the lemma ``shoes`` and of ``shoe``).
        modifier: the words left of the head for the head-noun rules (``ankle``), else ``""``.
        part: the alternative that matched when the name lists several (``T-shirt`` of
            ``T-shirt/top``), else ``""``.
        note: why a name is unresolved (``no noun sense; adjective casual.s.01``), else ``""``.
        choice: how the sense was chosen among several: ``most frequent`` (highest SemCor count),
            ``first listed`` (equal counts: WordNet's order; or the ``first`` rule), ``context``
            (closest to the other classes, see :func:`resolve_class_names`); ``""`` for one sense.
        runner_up: the sense that came second by the same rule, ``""`` for one sense.
        evidence: the figures behind the choice, chosen sense first (``SemCor 27 vs 1``; ``context
            0.77 vs 0.35, SemCor 0 vs 14``: Wu-Palmer context and SemCor counts), ``""`` for one
            sense.
    """

    name: str
    synset: str | None
    placed: bool = False
    lemma: str = ""
    rule: str = ""
    senses: int = 0
    modifier: str = ""
    part: str = ""
    note: str = ""
    choice: str = ""
    runner_up: str = ""
    evidence: str = ""

    def describe(self) -> str:
        """One short phrase: ``boot.n.01 (head noun 'boot', placed below it, most frequent of 7 noun
        senses: SemCor 13 vs 1, runner-up boot.n.02)``, ``unresolved (not in WordNet)``."""
        if self.synset is None:
            return f"unresolved ({self.note})" if self.note else "unresolved"
        why = []
        if self.part:
            why.append(f"alternative {self.part!r}")
        if self.placed:
            why.append(f"{self.rule} {self.lemma!r}, placed below it")
        elif self.rule == "lemma" and self.lemma.lower() != self.name.strip().lower():
            why.append(f"lemma {self.lemma!r}")
        elif self.rule == "compound":
            why.append(f"compound {self.lemma!r}")
        elif self.rule == "synset id":
            why.append("synset id")
        if self.senses > 1:
            sense = f"{self.choice or 'first listed'} of {self.senses} noun senses"
            if self.evidence:
                sense += f": {self.evidence}"
            if self.runner_up:
                sense += f", runner-up {self.runner_up}"
            why.append(sense)
        return f"{self.synset} ({', '.join(why)})" if why else self.synset


@dataclass(frozen=True)
class _Senses:
    """The noun senses one lemma candidate can mean, pooled over its forms (``shoes``: the senses
    of the lemma ``shoes``, then those of its base form ``shoe``), in nltk's order."""

    synsets: tuple[Any, ...]
    lemmas: tuple[str, ...]  # per sense: its lemma that matched a form (the most frequent one)
    counts: tuple[int, ...]  # per sense: that lemma's SemCor tag count (WordNet's cntlist)
    ranks: tuple[int, ...]  # per sense: its place among that lemma's senses (0: WordNet's first)

    def by_frequency(self) -> list[int]:
        """Sense indices, most frequent first; equal counts in WordNet's order (sense number, then
        the literal form before its base forms)."""
        return sorted(range(len(self.synsets)), key=lambda i: (-self.counts[i], self.ranks[i], i))


_COUNTS: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()


def _lemma_count(wn: Any, lemma: Any) -> int:
    """SemCor tag count of a lemma, as nltk's ``Lemma.count()``: WordNet's cntlist read once per
    reader (nltk searches the file on every call)."""
    try:
        counts = _COUNTS.get(wn)
    except TypeError:  # a reader that takes no weak references
        return int(lemma.count())
    if counts is None:
        counts = {}
        try:
            with wn.open("cntlist.rev") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3:
                        counts[parts[0]] = int(parts[2])
        except Exception:  # no cntlist file in this WordNet: nltk's own lookup, one lemma at a time
            _COUNTS[wn] = {}
            return int(lemma.count())
        _COUNTS[wn] = counts
    if not counts:
        return int(lemma.count())
    return counts.get(lemma.key(), 0)


def _noun_lookup(wn: Any, candidate: str) -> _Senses | None:
    """The noun senses of one lemma candidate, through nltk's morphology (inflections:
    ``sneakers`` -> ``sneaker``, ``ankle_boots`` -> ``ankle_boot``)."""
    if not candidate:
        return None
    senses = wn.synsets(candidate, pos="n")
    if not senses:
        return None
    morph = getattr(wn, "_morphy", None)
    forms = [candidate.lower()]
    bases = morph(candidate.lower(), "n") if morph is not None else [wn.morphy(candidate, "n")]
    forms += [b.lower() for b in bases if b and b.lower() not in forms]
    rank_of: dict[tuple[str, str], int] = {}  # (form, synset) -> sense number of that form
    for f in forms:
        r = 0
        for s in wn.synsets(f, pos="n") if f != candidate.lower() else senses:
            if any(lm.name().lower() == f for lm in s.lemmas()):
                rank_of[(f, s.name())] = r
                r += 1
    lemmas, counts, ranks = [], [], []
    for s in senses:
        best = None  # (count, -form order, lemma name, rank)
        for lm in s.lemmas():
            f = lm.name().lower()
            if f in forms:
                key = (_lemma_count(wn, lm), -forms.index(f), lm.name(), rank_of.get((f, s.name()), len(senses)))
                if best is None or key[:2] > best[:2]:
                    best = key
        if best is None:  # nltk matched it through a form not listed above
            best = (0, -len(forms), s.lemmas()[0].name(), len(senses))
        counts.append(best[0])
        lemmas.append(best[2])
        ranks.append(best[3])
    return _Senses(tuple(senses), tuple(lemmas), tuple(counts), tuple(ranks))


def _compound(wn: Any, words: Sequence[str]) -> tuple[_Senses, str] | None:
    """The words as one WordNet lemma: joined by ``_`` / ``-`` / nothing (``ankle_boot``,
    ``t-shirt``, ``tshirt``); one closed word is also tried split in two at every place
    (``tshirt`` -> ``t-shirt``). Returns the lookup and the rule (``lemma`` or ``compound``)."""
    if not words:
        return None
    if len(words) == 1:
        hit = _noun_lookup(wn, words[0])
        if hit:
            return hit, "lemma"
        w = words[0]
        for i in range(1, len(w)):
            for sep in ("-", "_"):
                hit = _noun_lookup(wn, w[:i] + sep + w[i:])
                if hit:
                    return hit, "compound"
        return None
    for sep in ("_", "-", ""):
        hit = _noun_lookup(wn, sep.join(words))
        if hit:
            return hit, "compound"
    return None


# a located name: the resolution without its sense, and the senses it may mean
_Located = tuple[NameResolution, "_Senses | None"]


def _whole(wn: Any, words: list[str], text: str = "") -> _Located | None:
    # the name as written, spaces as "_": WordNet lemmas that mix separators or keep an apostrophe
    # ("sulphur-crested_cockatoo", "carpenter's_kit") are not any one join of the bare words
    if text and len(words) > 1:
        hit = _noun_lookup(wn, "_".join(text.split()))
        if hit:
            return NameResolution("", None, False, "", "compound"), hit
    found = _compound(wn, words)
    if found:
        hit, rule = found
        return NameResolution("", None, False, "", rule), hit
    return None


def _head(wn: Any, words: list[str]) -> _Located | None:
    """Rules 4 and 5 of :func:`resolve_class_names` (the class placed below its head noun)."""
    # a trailing number (a size, model or index: "class 01", "iphone 12") names a specific item
    # WordNet does not list; its head would put every numbered class on one node
    if not words or words[-1].isdigit():
        return None
    # English compounds are head-final: the longest resolvable run of last words is what the class
    # is a kind of ("women's ankle boots" -> boot, "black t-shirt" -> t-shirt)
    for i in range(1, len(words)):
        found = _compound(wn, words[i:])
        if found:
            return NameResolution("", None, True, "", "head noun", 0, " ".join(words[:i])), found[0]
    # a closed compound: a known word, then a noun, run together in the last word ("downcoat"); a
    # word WordNet knows in any part of speech ("knitted") is not split
    last = words[-1]
    if wn.synsets(last):
        return None
    for i in range(MIN_COMPOUND_PART, len(last) - MIN_COMPOUND_PART + 1):
        mod, head = last[:i], last[i:]
        hit = _noun_lookup(wn, head)
        if hit and wn.synsets(mod):
            return NameResolution("", None, True, "", "closed compound", 0, " ".join(words[:-1] + [mod])), hit
    return None


def _resolve_part(wn: Any, words: list[str], text: str) -> _Located | None:
    """Rules 2, 4 and 5 of :func:`resolve_class_names` for one alternative's words."""
    return _whole(wn, words, text) or _head(wn, words)


def _unresolved_note(wn: Any, words: list[str]) -> str:
    if len(words) > 1 and words[-1].isdigit():
        return "ends in a number"
    other = [sy for sy in wn.synsets("_".join(words)) if sy.pos() != "n"]
    if other:
        return f"no noun sense; {_POS_NAMES.get(other[0].pos(), other[0].pos())} {other[0].name()}"
    return "not in WordNet"


def _locate(name: str, wn: Any) -> _Located:
    """Rules 1-5 of :func:`resolve_class_names`: which word of the name WordNet knows, and its
    senses (``None`` for a synset id, whose synset is given; an unresolved name has no synset)."""
    text = unicodedata.normalize("NFKC", name).strip()
    if _SYNSET_ID.match(text):
        syn = synset_by_id(wn, text)
        if syn is not None:
            return NameResolution(name, syn.name(), False, syn.lemmas()[0].name(), "synset id", 1), None
    words = name_words(text)
    if not words:
        return NameResolution(name, None, note="no letters or digits"), None
    hit = _whole(wn, words, text)
    if hit is None:
        parts = [p for p in _ALTERNATIVES.split(text) if name_words(p)]
        if len(parts) > 1:
            for p in parts:
                sub = _resolve_part(wn, name_words(p), p)
                if sub is not None:
                    hit = replace(sub[0], part=p.strip()), sub[1]
                    break
        else:
            hit = _head(wn, words)
    if hit is None:
        return NameResolution(name, None, note=_unresolved_note(wn, words)), None
    return replace(hit[0], name=name), hit[1]


#: How close a candidate sense is to another class: ``(senses, anchors, names) -> (len(senses) x
#: len(anchors))`` float, larger is closer, NaN where an anchor is ``None`` (a class without a
#: synset); ``anchors[j]`` is class j's synset, ``names[j]`` its name.
SenseSimilarity = Callable[[Sequence[Any], Sequence[Any], Sequence[str]], np.ndarray]


class WuPalmer:
    """nltk's ``wup_similarity`` of each sense with each anchor synset (no simulated root), as a
    :data:`SenseSimilarity`, vectorized as :func:`wup_similarities` computes S_w: the lowest common
    subsumer l is the common ancestor of greatest ``min_depth`` (ties: the sense itself, then the
    smallest name), and wup = 2 h / (len_s(l) + len_t(l) + 2 h) with h = ``max_depth(l)`` + 1 and
    len nltk's ``shortest_path_distance``. A broad sense is shallow, so its h is small against
    anything. An instance keeps each synset's hypernym distances and depths between calls.
    """

    def __init__(self) -> None:
        self._up: dict[Any, dict[Any, int]] = {}
        self._lengths: dict[Any, dict[Any, int]] = {}
        self._depth: dict[Any, tuple[int, int]] = {}

    def up(self, syn: Any) -> dict[Any, int]:
        """``{synset: edges}`` up hypernyms and instance hypernyms, breadth first (nltk's
        ``_shortest_hypernym_paths`` without its simulated root)."""
        got = self._up.get(syn)
        if got is None:
            got = {}
            frontier, d = [syn], 0
            while frontier:
                nxt = []
                for s in frontier:
                    if s not in got:
                        got[s] = d
                        nxt.extend(s.hypernyms() + s.instance_hypernyms())
                frontier, d = nxt, d + 1
            self._up[syn] = got
        return got

    def lengths(self, syn: Any) -> dict[Any, int]:
        """nltk's ``shortest_path_distance`` from ``syn`` to each of its ancestors k: up to a common
        ancestor of both (under multiple inheritance that can beat the way up to k itself)."""
        got = self._lengths.get(syn)
        if got is None:
            up = self.up(syn)
            got = self._lengths[syn] = {k: min(up[j] + dj for j, dj in self.up(k).items()) for k in up}
        return got

    def depth(self, syn: Any) -> tuple[int, int]:
        got = self._depth.get(syn)
        if got is None:
            got = self._depth[syn] = (syn.min_depth(), syn.max_depth())
        return got

    def __call__(self, senses: Sequence[Any], anchors: Sequence[Any | None], names: Sequence[str] = ()) -> np.ndarray:
        """(len(senses) x len(anchors)) float32 in [0, 1]; NaN for an anchor that is ``None``, 0
        without a common ancestor. ``names`` is not used."""
        inf = np.iinfo(np.int32).max // 4
        index: dict[Any, int] = {}
        ri: list[int] = []
        ci: list[int] = []
        vi: list[int] = []
        for j, a in enumerate(anchors):
            if a is not None:
                for k, ln in self.lengths(a).items():
                    ri.append(index.setdefault(k, len(index)))
                    ci.append(j)
                    vi.append(ln)
        L = np.full((len(index), len(anchors)), inf, dtype=np.int32)
        if ri:
            L[np.asarray(ri), np.asarray(ci)] = np.asarray(vi)
        cols = np.arange(len(anchors))
        out = np.zeros((len(senses), len(anchors)), dtype=np.float32)
        for r, syn in enumerate(senses):
            ls = self.lengths(syn)
            items = sorted((k for k in ls if k in index), key=lambda k: (-self.depth(k)[0], ls[k] != 0, k.name()))
            if not items:
                continue
            idx = np.asarray([index[k] for k in items])
            la = np.asarray([ls[k] for k in items], dtype=np.float64)
            h = np.asarray([self.depth(k)[1] + 1 for k in items], dtype=np.float64)
            common = L[idx] < inf
            first = common.argmax(axis=0)  # the LCS with each anchor: the first common one in LCS order
            lb = L[idx[first], cols].astype(np.float64)
            w = 2.0 * h[first] / (la[first] + lb + 2.0 * h[first])
            out[r] = np.where(common.any(axis=0), w, 0.0)
        out[:, [a is None for a in anchors]] = np.nan
        return out


def _choose_senses(
    located: Sequence[_Located],
    fixed: Sequence[Any | None],
    names: Sequence[str],
    rule: str,
    neighbours: int,
    margin: float,
    floor: float,
    rounds: int,
    similarity: SenseSimilarity,
) -> list[tuple[int, int, str, str]]:
    """Per name: (chosen sense index, runner-up index or -1, choice, evidence); (-1, -1, "", "")
    for a name without senses to choose from (see :func:`resolve_class_names`)."""
    C = len(located)
    out: list[tuple[int, int, str, str]] = [(-1, -1, "", "")] * C
    freq: list[list[int]] = [[] for _ in range(C)]
    for i, (_, senses) in enumerate(located):
        if senses is None:
            continue
        order = freq[i] = senses.by_frequency()
        if len(order) == 1:
            out[i] = (0, -1, "", "")
        elif rule == "first":
            out[i] = (0, 1, "first listed", "")
        else:
            a, b = order[0], order[1]
            ca, cb = senses.counts[a], senses.counts[b]
            out[i] = (a, b, "most frequent" if ca > cb else "first listed", f"SemCor {ca} vs {cb}")
    ambiguous = [i for i, (_, s) in enumerate(located) if s is not None and len(s.synsets) > 1]
    if rule != "context" or not ambiguous or C < 2:
        return out
    rows: list[Any] = []  # every sense of every ambiguous name
    row_of: dict[int, list[int]] = {}
    for i in ambiguous:
        row_of[i] = list(range(len(rows), len(rows) + len(located[i][1].synsets)))
        rows.extend(located[i][1].synsets)
    # names with the same senses (two classes "crane") are not each other's context
    group = {i: tuple(s.name() for s in located[i][1].synsets) for i in ambiguous}
    same: dict[tuple[str, ...], list[int]] = {}
    for i in ambiguous:
        same.setdefault(group[i], []).append(i)
    k_max = max(1, neighbours)
    for _ in range(max(1, rounds)):
        anchors = [fixed[i] if fixed[i] is not None else
                   senses.synsets[out[i][0]] if senses is not None and out[i][0] >= 0 else None
                   for i, (_, senses) in enumerate(located)]
        sims = np.asarray(similarity(rows, anchors, names), dtype=np.float64)
        new = list(out)
        for i in ambiguous:
            senses = located[i][1]
            block = sims[row_of[i]]
            others = ~np.isnan(block[0])
            others[same[group[i]]] = False  # itself included
            n_other = int(others.sum())
            if n_other == 0:
                continue
            k = min(k_max, n_other)
            ctx = -np.partition(-block[:, others], k - 1, axis=1)[:, :k].mean(axis=1)  # mean of the k largest
            prior = freq[i][0]
            rank = {s: r for r, s in enumerate(freq[i])}
            ranked = sorted(range(len(ctx)), key=lambda s: (-ctx[s], rank[s]))  # context ties: frequency order
            best = ranked[0]
            if best != prior and ctx[best] - ctx[prior] >= margin and ctx[best] >= floor:
                new[i] = (best, prior, "context", f"context {ctx[best]:.2f} vs {ctx[prior]:.2f}, SemCor "
                          f"{senses.counts[best]} vs {senses.counts[prior]}")
            else:
                other = ranked[0] if ranked[0] != prior else ranked[1]
                choice = "most frequent" if senses.counts[prior] > senses.counts[other] else "first listed"
                new[i] = (prior, other, choice, f"SemCor {senses.counts[prior]} vs {senses.counts[other]}, context "
                          f"{ctx[prior]:.2f} vs {ctx[other]:.2f}")
        out = new
    return out


def resolve_class_names(
    names: Sequence[str],
    wn: Any,
    known: Sequence[str | None] | None = None,
    *,
    rule: str = "context",
    neighbours: int = CONTEXT_NEIGHBOURS,
    margin: float = CONTEXT_MARGIN,
    floor: float = CONTEXT_FLOOR,
    rounds: int = CONTEXT_ROUNDS,
    similarity: SenseSimilarity | None = None,
) -> list[NameResolution]:
    """Place classes in WordNet from their names alone, each sense chosen in view of the others.

    Which word of a name WordNet knows (the first rule that matches wins):

    1. A name that is a synset id (``dog.n.01``, or an ImageNet-style offset ``n02084071``) is that
       synset.
    2. The whole name as one noun lemma: as written with spaces as ``_`` (``sulphur-crested
       cockatoo``, ``carpenter's kit``), then its words normalized by :func:`name_words` (case;
       ``_``, ``-`` and spaces are one separator) and joined as WordNet writes compounds
       (``ankle_boot``, ``t-shirt``, ``downcoat``), a closed word also split in two (``tshirt`` ->
       ``t-shirt``); plurals and other inflections through nltk's morphology (``sneakers`` ->
       ``sneaker``).
    3. A name listing alternatives (``T-shirt/top``, ``Tops & Tees``, ``shirts or blouses``): the
       first alternative that resolves by rules 2, 4, 5.
    4. Head noun of a multiword name: the longest run of last words that is a noun lemma; the
       class is placed one edge *below* it (``ankle boot`` below ``boot.n.01``, ``Down Coat``
       below ``coat.n.01``) and the words before it are kept as the modifier.
    5. Closed compound: a last word WordNet does not know at all, split into a known word and a
       noun of at least ``MIN_COMPOUND_PART`` letters each (``downcoat`` below ``coat.n.01``,
       modifier ``down``).

    Only noun senses count (image classes name things). A name with only verb or adjective senses
    (``casual``, ``knitted``) is left unresolved, with a note: such synsets have no place in the
    noun hierarchy S_w is built from. A name ending in a number (``class 01``, ``iphone 12``)
    resolves only as a whole lemma (digits ``0``-``9`` do); otherwise it is left unresolved, so
    numbered classes do not all collapse onto one node.

    Which sense, when the word has several (``rule``):

    * ``frequency``: the senses of every form of the word pooled (``shoes``: the lemma ``shoes``
      and its base ``shoe``), the one whose matching lemma has the highest SemCor count first;
      equal counts keep WordNet's order (sense number, then the literal form first).
    * ``context`` (default): the frequency choice, unless another sense sits clearly closer to the
      other classes of the list (``mouse`` among ``laptop`` and ``keyboard`` is the device). A
      sense's context is the mean of its ``neighbours`` largest similarities to the other classes'
      senses, by ``similarity`` (default :class:`WuPalmer`: the depth of the lowest common
      subsumer against the two senses' own depths, so a broad sense such as ``attire`` for
      ``dress`` or ``coating`` for ``coat`` gains little by being near everything). Another sense
      replaces the frequency choice when its context is larger by at least ``margin``. The other
      classes' senses are their frequency choices (or ``known``), then, for ``rounds`` > 1, the
      previous round's choices. Classes with the same senses (two classes ``crane``) are not each
      other's context. With one class it is the frequency rule.
    * ``first``: the first noun sense of the literal word in nltk's order (the rule of
      ``NAME_RULES_VERSION`` 1, kept for comparison).

    Args:
        names: the class names.
        wn: nltk's WordNet corpus reader (``synsets``, ``synset``, ``morphy``).
        known: per class, a synset name that already places it (a class table's synset or parent
            column), or ``None``: such classes are not looked up (their result has rule
            ``given``) but are context for the others.
        rule: ``context``, ``frequency`` or ``first`` (see above).
        neighbours: k of the context rule.
        margin: by how much the context must favour another sense over the frequency choice.
        floor: the least context a sense needs to replace the frequency choice.
        rounds: passes of the context rule.
        similarity: the context rule's closeness of senses to classes (default :class:`WuPalmer`).

    Returns:
        One resolution per name; ``synset`` is ``None`` when nothing matched (``note`` says why).
    """
    if rule not in SENSE_RULES:
        raise ValueError(f"unknown sense rule {rule!r}; choose one of {', '.join(SENSE_RULES)}")
    if known is not None and len(known) != len(names):
        raise ValueError(f"known has {len(known)} entries for {len(names)} names")
    located: list[_Located] = []
    fixed: list[Any | None] = []
    for i, name in enumerate(names):
        given = known[i] if known is not None else None
        syn = synset_by_id(wn, given) if given else None
        if syn is not None:
            located.append((NameResolution(name, syn.name(), False, "", "given"), None))
        else:
            located.append(_locate(name, wn))
            res = located[-1][0]
            syn = wn.synset(res.synset) if res.rule == "synset id" else None
        fixed.append(syn)
    choices = _choose_senses(located, fixed, list(names), rule, neighbours, margin, floor, rounds,
                             similarity or WuPalmer())
    out = []
    for (res, senses), (ci, ri, choice, evidence) in zip(located, choices):
        if senses is None:
            out.append(res)
            continue
        out.append(replace(res, synset=senses.synsets[ci].name(), lemma=senses.lemmas[ci], senses=len(senses.synsets),
                           choice=choice, runner_up=senses.synsets[ri].name() if ri >= 0 else "", evidence=evidence))
    return out


def resolve_class_name(name: str, wn: Any, rule: str = "frequency") -> NameResolution:
    """Place one class in WordNet from its name alone: :func:`resolve_class_names` for a list of
    one (no other classes, so no context: the most frequent sense)."""
    return resolve_class_names([name], wn, rule=rule)[0]


def synset_by_id(wn: Any, ident: str) -> Any | None:
    """``dog.n.01`` or an offset ``n02084071`` / ``02084071-n``; None if WordNet has no such synset."""
    try:
        m = _OFFSET.match(ident)
        if m:
            pos, off = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return wn.synset_from_pos_and_offset(pos, int(off))
        return wn.synset(ident)
    except Exception:  # nltk raises WordNetError / ValueError for ids it does not know
        return None


# -- text: S_l (eq. 2) and the blend (eq. 3) ---------------------------------------------------


def cosine_similarity(embeddings: np.ndarray) -> np.ndarray:
    """S_l from label embeddings v_i (C x E)."""
    v = np.asarray(embeddings, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"embeddings must be C x E, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError(f"embedding of class {int(np.flatnonzero((norms == 0) | ~np.isfinite(norms))[0])} is zero or not finite")
    # eq. 2: S_l^ij = v_i^T v_j / (||v_i||_2 ||v_j||_2)
    S = (v @ v.T) / np.outer(norms, norms)
    return np.clip(S, -1.0, 1.0).astype(np.float32)


@dataclass
class Graphs:
    """The three C x C relation matrices and which sources fed them."""

    S_w: np.ndarray
    S_l: np.ndarray
    S_t: np.ndarray
    sources: list[str] = field(default_factory=list)


def relation_graphs(
    num_classes: int,
    S_w: np.ndarray | None = None,
    label_similarities: Mapping[str, np.ndarray] | None = None,
) -> Graphs:
    """Blend the enabled sources into S_t; a source switched off contributes zeros.

    Args:
        num_classes: C.
        S_w: the hierarchy similarity (``None`` when the hierarchy source is off).
        label_similarities: eq. 2 matrices by text source name (``"text"`` = descriptions (CD),
            ``"name"`` = class names (CN)); several are summed into S_l.
    """
    C = num_classes
    zeros = np.zeros((C, C), dtype=np.float32)
    sources: list[str] = []
    Sw = zeros.copy()
    if S_w is not None:
        Sw = np.asarray(S_w, dtype=np.float32)
        if Sw.shape != (C, C):
            raise ValueError(f"S_w has shape {Sw.shape}, expected {(C, C)}")
        sources.append("hierarchy")
    Sl = zeros.copy()
    for name, S in (label_similarities or {}).items():
        S = np.asarray(S, dtype=np.float32)
        if S.shape != (C, C):
            raise ValueError(f"label similarity {name!r} has shape {S.shape}, expected {(C, C)}")
        Sl = Sl + S
        sources.append(name)
    # eq. 3: S_t = S_l + S_w
    St = Sl + Sw
    return Graphs(Sw, Sl, St.astype(np.float32), sources)


# -- optional BiLSTM text head (paper: BERT frozen, LSTM fine-tuned) ---------------------------


@dataclass
class TextHeadResult:
    """Class embeddings from the trained head and the record of its training."""

    embeddings: np.ndarray  # C x 2H, the pooled BiLSTM output over each class's description
    losses: list[float]  # training loss per step
    eval_loss_before: float  # InfoNCE of description vs. another text of the class, untrained head
    eval_loss_after: float  # the same after training
    steps: int


def _make_head(dim_in: int, hidden: int, dropout: float):
    import torch
    from torch import nn

    class BiLSTMHead(nn.Module):
        """BiLSTM over frozen token embeddings, mean-pooled over the real tokens."""

        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.lstm = nn.LSTM(dim_in, hidden, batch_first=True, bidirectional=True)

        def forward(self, x: "torch.Tensor", lengths: "torch.Tensor") -> "torch.Tensor":
            from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

            packed = pack_padded_sequence(self.drop(x), lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(out.dtype)
            return (out * mask[..., None]).sum(1) / lengths[:, None].to(out.dtype)

    return BiLSTMHead()


def train_text_head(
    class_texts: Sequence[Sequence[str]],
    descriptions: Sequence[str],
    encode_tokens: Callable[[list[str]], list[np.ndarray]],
    *,
    hidden: int = 192,
    steps: int = 200,
    batch_classes: int = 64,
    lr: float = 2e-3,
    temperature: float = 0.1,
    dropout: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    num_threads: int | None = 1,
    progress: ProgressFn | None = None,
) -> TextHeadResult:
    """Train the BiLSTM text head with the InfoNCE objective of the module docstring.

    Args:
        class_texts: per class, the texts that describe it (at least one each).
        descriptions: per class, the text whose pooled embedding becomes the class embedding.
        encode_tokens: frozen encoder: texts -> one (T_i x E) token-embedding array per text.
        hidden: LSTM units per direction (embedding size 2 * hidden).
        steps: optimizer steps (0: the untrained head, for comparison).
        batch_classes: classes per step (the InfoNCE negatives).
        lr: Adam learning rate.
        temperature: InfoNCE temperature.
        dropout: token-embedding dropout (the augmentation between two views of a text).
        seed: seeds the head's initialization, the sampling and the dropout.
        device: torch device.
        num_threads: torch CPU threads while training (restored afterwards); the head is small,
            and one thread avoids oversubscribing a shared machine (bench/bench_build_graph.py).
            ``None`` keeps torch's setting.
        progress: called with 1 after each step.
    """
    import torch

    C = len(class_texts)
    if C < 2:
        raise ValueError("the text head needs at least 2 classes (InfoNCE contrasts classes)")
    if len(descriptions) != C:
        raise ValueError(f"{len(descriptions)} descriptions for {C} classes")
    if any(len(t) == 0 for t in class_texts):
        raise ValueError(f"class {next(i for i, t in enumerate(class_texts) if len(t) == 0)} has no text")
    if steps < 0 or batch_classes < 2 or not temperature > 0:
        raise ValueError("steps must be >= 0, batch_classes >= 2 and temperature > 0")

    # frozen token embeddings, computed once for every distinct text
    uniq: dict[str, int] = {}
    for texts in class_texts:
        for t in texts:
            uniq.setdefault(t, len(uniq))
    for t in descriptions:
        uniq.setdefault(t, len(uniq))
    token_arrays = encode_tokens(list(uniq))
    if len(token_arrays) != len(uniq):
        raise ValueError(f"encode_tokens returned {len(token_arrays)} arrays for {len(uniq)} texts")
    toks = [torch.as_tensor(np.asarray(a), dtype=torch.float16) for a in token_arrays]
    if any(t.ndim != 2 or t.shape[0] == 0 for t in toks):
        raise ValueError("encode_tokens must return one non-empty (tokens x dim) array per text")
    dim = toks[0].shape[1]
    text_ids = [[uniq[t] for t in texts] for texts in class_texts]
    desc_ids = [uniq[t] for t in descriptions]

    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(
            toks, text_ids, desc_ids, dim, hidden, dropout, steps, batch_classes, lr, temperature, seed, device, progress
        )
    finally:
        torch.set_num_threads(threads_before)


def _train(toks, text_ids, desc_ids, dim, hidden, dropout, steps, batch_classes, lr, temperature, seed, device,
           progress) -> TextHeadResult:
    import torch
    import torch.nn.functional as F

    C = len(text_ids)
    dev = torch.device(device)

    def batch(ids: Sequence[int]) -> tuple["torch.Tensor", "torch.Tensor"]:
        seqs = [toks[i] for i in ids]
        lengths = torch.tensor([s.shape[0] for s in seqs])
        x = torch.zeros(len(seqs), int(lengths.max()), dim)
        for j, s in enumerate(seqs):
            x[j, : s.shape[0]] = s.float()
        return x.to(dev), lengths.to(dev)

    def info_nce(z1: "torch.Tensor", z2: "torch.Tensor") -> "torch.Tensor":
        logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / temperature
        target = torch.arange(len(z1), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    # fixed evaluation pairs: description vs. another text of the class (itself if it has none)
    eval_classes = np.random.default_rng(seed).permutation(C)[: min(C, 512)]
    eval_a = [desc_ids[c] for c in eval_classes]
    eval_b = [next((i for i in text_ids[c] if i != desc_ids[c]), desc_ids[c]) for c in eval_classes]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _make_head(dim, hidden, dropout).to(dev)
        gen = np.random.default_rng(seed)

        def evaluate() -> float:
            head.eval()
            with torch.no_grad():
                return float(info_nce(head(*batch(eval_a)), head(*batch(eval_b))))

        before = evaluate()
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        losses: list[float] = []
        B = min(C, batch_classes)
        for _ in range(steps):
            head.train()
            cls = gen.choice(C, size=B, replace=False)
            first, second = [], []
            for c in cls:
                ids = text_ids[c]
                pick = gen.choice(len(ids), size=2, replace=len(ids) < 2)
                first.append(ids[pick[0]])
                second.append(ids[pick[1]])
            loss = info_nce(head(*batch(first)), head(*batch(second)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(1)
        after = evaluate()
        head.eval()
        out = []
        with torch.no_grad():
            for s in range(0, C, 256):
                out.append(head(*batch(desc_ids[s : s + 256])).cpu().numpy())
    return TextHeadResult(np.concatenate(out).astype(np.float32), losses, before, after, steps)


# -- WordNet: ancestor maps and where each class sits ------------------------------------------


def synset_ancestors(synset: Any) -> dict[str, int]:
    """``{synset name: edges}`` over hypernyms and instance hypernyms, breadth first (as nltk's
    ``_shortest_hypernym_paths``, which ``shortest_path_distance`` compares)."""
    dist: dict[str, int] = {}
    frontier = [synset]
    d = 0
    seen: set = set()
    while frontier:
        nxt = []
        for s in frontier:
            if s in seen:
                continue
            seen.add(s)
            dist[s.name()] = d
            nxt.extend(s.hypernyms())
            nxt.extend(s.instance_hypernyms())
        frontier = nxt
        d += 1
    return dist


PLACED = "class:"  # node of a class placed one edge below its parent synset


def wordnet_hierarchy(
    synsets: Sequence[Any | None],
    with_depths: bool = False,
    progress: ProgressFn | None = None,
    placed: Sequence[tuple[str, Any] | None] | None = None,
    wn: Any = None,
) -> tuple[list[dict[str, int] | None], dict[str, Any] | None]:
    """Ancestor maps of the classes' synsets, each synset walked once.

    Non-noun synsets get nltk's simulated root (``simulate_root``). With ``with_depths``, also
    what Wu-Palmer needs, as nltk computes it: ``node_depth`` ``{node: (min_depth, max_depth)}``
    and ``lengths`` (per class, nltk's ``shortest_path_distance`` to each ancestor: min over the
    ancestor's own ancestors k of anc_class[k] + anc_node[k]).

    Args:
        synsets: per class its synset, or None.
        with_depths: also return the Wu-Palmer depths and lengths.
        progress: called with the number of classes walked.
        placed: ``placed[i] = (name, parent synset)`` puts a class that has no synset of its own
            one edge below its parent (e.g. Clothing1M's Hoodie under sweatshirt.n.01).
        wn: the nltk WordNet reader (needed with ``with_depths``; default: the synsets' own).

    Returns:
        (per-class ancestor maps, None or ``{"node_depth", "lengths"}``).
    """
    cache: dict[str, dict[str, int]] = {}
    maps: list[dict[str, int] | None] = []
    placed_parent: dict[str, Any] = {}
    for i, s in enumerate(synsets):
        if s is None and placed is not None and placed[i] is not None:
            name, parent = placed[i]
            if parent.name() not in cache:
                cache[parent.name()] = synset_ancestors(parent)
            node = PLACED + name
            placed_parent[node] = parent
            maps.append({node: 0, **{k: d + 1 for k, d in cache[parent.name()].items()}})
        elif s is None:
            maps.append(None)
        else:
            key = s.name()
            if key not in cache:
                cache[key] = synset_ancestors(s)
            maps.append(cache[key])
        if progress is not None and (i % 256 == 255 or i == len(synsets) - 1):
            progress(i % 256 + 1)
    needs_root = any(s is not None and s.pos() != "n" for s in synsets) or any(
        p.pos() != "n" for p in placed_parent.values())
    if needs_root:
        # nltk adds a fake root for verbs (and other non-noun) synsets so separate trees connect
        maps = [None if m is None else {**m, ROOT: max(m.values()) + 1} for m in maps]
    if not with_depths:
        return maps, None
    if wn is None:
        known = next((s for s in synsets if s is not None), None) or next(
            (p for p in placed_parent.values()), None)
        wn = getattr(known, "_wordnet_corpus_reader", None)
    node_anc: dict[str, dict[str, int]] = {}
    depth: dict[str, tuple[int, int]] = {ROOT: (-1, 0)}
    for m in maps:
        for k in m or ():
            if k in placed_parent:  # not a WordNet node: one below its parent
                parent = placed_parent[k]
                node_anc[k] = m
                depth[k] = (parent.min_depth() + 1, parent.max_depth() + 1)
            elif k not in node_anc and k != ROOT:
                syn = wn.synset(k)
                node_anc[k] = synset_ancestors(syn)
                depth[k] = (syn.min_depth(), syn.max_depth())
    lengths_cache: dict[int, dict[str, int]] = {}
    lengths: list[dict[str, int] | None] = []
    for m in maps:
        if m is None:
            lengths.append(None)
            continue
        if id(m) not in lengths_cache:
            lengths_cache[id(m)] = {
                k: m[k] if k == ROOT else min(m[j] + dj for j, dj in node_anc[k].items()) for k in m
            }
        lengths.append(lengths_cache[id(m)])
    return maps, {"node_depth": depth, "lengths": lengths}


@dataclass
class Placement:
    """Where each class sits in WordNet, and why (see :func:`place_classes`)."""

    synsets: list[Any | None]  # the class's own synset
    placed: list[tuple[str, Any] | None]  # (class name, parent synset): one edge below the parent
    gloss: list[Any | None]  # the synset whose gloss describes the class (own, else parent)
    entries: list[dict[str, Any]]  # graph.h5's name_resolution, one per class
    table_problems: list[str] = field(default_factory=list)  # unknown ids/parents in the class table

    @property
    def unresolved(self) -> list[str]:
        return [e["class"] for e in self.entries if e["source"] == "none"]


def place_classes(
    wn: Any,
    names: Sequence[str],
    synsets: Sequence[str],
    parents: Sequence[str],
    *,
    use_parents: bool,
    strict: bool,
    source: str = "the class table",
) -> Placement:
    """Place every class in WordNet.

    The class table's synset column first (the override), then its parent column
    (``use_parents``: the column holds WordNet synsets), then the class name
    (:func:`resolve_class_names`, all names at once: a sense is chosen in view of the other
    classes, those the table places included). An unknown id or parent in the table is looked
    up by name instead.

    Args:
        wn: the nltk WordNet reader.
        names, synsets, parents: the class table's columns ("" where empty).
        use_parents: the parent column holds WordNet synsets.
        strict: an unknown id or parent is an error instead of a name lookup.
        source: the class table's file, named in messages.

    Raises:
        ValueError: ``strict`` and an unknown id or parent (one line naming the class and ``source``).
    """
    C = len(names)
    out = Placement([None] * C, [None] * C, [None] * C, [])
    known = []  # the classes the table places: context for the names, not looked up
    for sid, parent in zip(synsets, parents):
        syn = synset_by_id(wn, sid.strip()) if sid else None
        if syn is None and parent and use_parents:
            syn = synset_by_id(wn, parent.strip())
        known.append(syn.name() if syn is not None else None)
    by_name = resolve_class_names(names, wn, known)
    for i, (name, sid, parent) in enumerate(zip(names, synsets, parents)):
        entry: dict[str, Any] | None = None
        problem = ""  # what is wrong with the class's row of the table
        if sid:
            syn = synset_by_id(wn, sid.strip())
            if syn is not None:
                out.synsets[i] = out.gloss[i] = syn
                entry = {"synset": syn.name(), "source": "table", "lemma": "", "rule": "synset column",
                         "detail": f"{syn.name()} (synset column)"}
            else:
                problem = f"unknown WordNet synset {sid!r}"
                if strict:
                    raise ValueError(f"{source}: class {name!r} has {problem} (expected a name like dog.n.01 or "
                                     "an offset like n02084071; without --strict it is looked up by its name)")
        if entry is None and parent and use_parents:
            ps = synset_by_id(wn, parent.strip())
            if ps is not None:
                out.placed[i] = (name, ps)
                out.gloss[i] = ps
                entry = {"synset": ps.name(), "source": "parent", "lemma": "", "rule": "parent column",
                         "detail": f"below {ps.name()} (parent column)"}
            else:
                problem = problem or f"a parent {parent!r} that is not a WordNet synset"
                if strict:
                    raise ValueError(f"{source}: class {name!r} has {problem} (fix the parent, use --hierarchy "
                                     "taxonomy, or drop --strict to look the class up by its name)")
        if entry is None:
            r = by_name[i]
            if r.synset is None:
                entry = {"synset": "", "source": "none", "lemma": "", "rule": "", "detail": r.describe()}
            else:
                syn = wn.synset(r.synset)
                out.gloss[i] = syn
                if r.placed:
                    out.placed[i] = (name, syn)
                else:
                    out.synsets[i] = syn
                entry = {"synset": r.synset, "source": "parent" if r.placed else "name", "lemma": r.lemma,
                         "rule": r.rule, "detail": r.describe()}
            entry.update(senses=r.senses, modifier=r.modifier, alternative=r.part, choice=r.choice,
                         runner_up=r.runner_up, evidence=r.evidence)
        if problem:
            out.table_problems.append(f"class {name!r} has {problem}")
            entry["detail"] = f"{entry['detail']}; the class table has {problem}"
        out.entries.append({"class": name, **entry})
    return out


def resolution_summary(placement: Placement, limit: int = 5) -> str | None:
    """One line on the classes looked up by name (None when the class table placed every class):
    the least obvious choices first (placed below a head noun, alternatives, several senses)."""
    entries = [e for e in placement.entries if e["source"] in ("name", "parent") and e["rule"] not in
               ("synset column", "parent column")]
    if not entries and not placement.unresolved:
        return None
    C = len(placement.entries)

    def interest(e: dict[str, Any]) -> int:
        return 0 if e["source"] == "parent" else 1 if e["alternative"] or e["senses"] > 1 or e["rule"] != "lemma" else 2

    def short(e: dict[str, Any]) -> str:
        why = [e["rule"]] if e["source"] == "parent" else []
        if e["alternative"]:
            why.append(f"from {e['alternative']!r}")
        if e["senses"] > 1:
            why.append(f"{e.get('choice') or 'first'} of {e['senses']} senses")
        where = f"below {e['synset']}" if e["source"] == "parent" else e["synset"]
        return f"{e['class']} -> {where}" + (f" ({', '.join(why)})" if why else "")

    shown = sorted(entries, key=interest)[:limit]
    more = f" and {len(entries) - len(shown)} more" if len(entries) > len(shown) else ""
    unresolved = len(placement.unresolved)
    line = f"resolved {len(entries)} of {C} class names in WordNet: {', '.join(map(short, shown))}{more}"
    if unresolved:
        line += f"; {unresolved} unresolved"
    return line + " (graph.h5 attribute name_resolution has each choice)"


def check_strict(source: str, problems: Sequence[str], unknown: Sequence[str], mode: str,
                 taxonomy: str | None) -> None:
    """``strict``: an error for the first class without a place in the hierarchy.

    Raises:
        ValueError: one line naming the class and the file (``source`` or ``taxonomy``).
    """
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{source}: {problems[0]}{more} (--strict)")
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        if mode == "wordnet":
            raise ValueError(f"{source}: class {unknown[0]!r}{more} has no WordNet synset and its name resolves to "
                             "nothing (fill the synset column of a class table, --classes, or drop --strict to use "
                             "text similarity only for it)")
        raise ValueError(f"{taxonomy if taxonomy is not None else source}: class {unknown[0]!r}{more} is not in the "
                         "taxonomy (add a child<TAB>parent line, or drop --strict to use text similarity only for it)")


# -- descriptions and the texts of a class -----------------------------------------------------


def has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def choose_descriptions(
    names: Sequence[str], user: Sequence[str | None], synsets: Sequence[Any | None], source: str = "the class table"
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Per class: (description, its source: user|wordnet|name).

    The user's description wins, then the WordNet gloss of ``synsets[i]``, then the class name.

    Returns:
        (descriptions, sources, the classes whose explicitly empty description fell back, the
        classes described only by their name).

    Raises:
        ValueError: a user description without words (naming the class and ``source``).
    """
    any_user = any(d is not None and d.strip() for d in user)
    descriptions, sources, empty, name_only = [], [], [], []
    for name, d, syn in zip(names, user, synsets):
        if d is not None and d.strip():
            if not has_words(d):
                raise ValueError(
                    f"{source}: class {name!r}: description {d!r} has no words "
                    "(write a description, or leave it empty to use the WordNet gloss)"
                )
            descriptions.append(" ".join(d.split()))
            sources.append("user")
            continue
        if any_user or d is not None:
            empty.append(name)
        if syn is not None and syn.definition().strip():
            descriptions.append(syn.definition().strip())
            sources.append("wordnet")
        else:
            descriptions.append(name)
            sources.append("name")
            name_only.append(name)
    return descriptions, sources, empty, name_only


def description_text(name: str, description: str, source: str) -> str:
    """What the encoder reads for a class: ``name: description`` as in the paper's example
    ("Manx cat: A short-haired tailless breed of cat ..."), or the bare name."""
    return name if source == "name" else f"{name}: {description}"


def head_texts(name: str, desc_text: str, description: str, user: str | None, synset: Any | None) -> list[str]:
    """The texts of one class for the text head's contrastive objective (deduplicated)."""
    texts = [desc_text, description]
    if synset is not None:
        texts.append(synset.definition())
        texts.append(", ".join(lemma.replace("_", " ") for lemma in synset.lemma_names()))
        hypers = synset.hypernyms() + synset.instance_hypernyms()
        if hypers:
            h = hypers[0]
            texts.append(f"{h.lemma_names()[0].replace('_', ' ')}: {h.definition()}")
    if user:
        texts.append(user)
    texts.append(name)
    seen: dict[str, None] = {}
    for t in texts:
        t = " ".join(t.split())
        if t:
            seen.setdefault(t, None)
    return list(seen)


# -- the sentence encoder ----------------------------------------------------------------------


def encode_sentences(model: Any, texts: Sequence[str], progress: ProgressFn | None = None) -> np.ndarray:
    """Pooled sentence embeddings (N x E float32) of a sentence-transformers model, 256 texts a block."""
    out = []
    for s in range(0, len(texts), 256):
        chunk = list(texts[s : s + 256])
        out.append(np.asarray(model.encode(chunk, batch_size=64, show_progress_bar=False, convert_to_numpy=True)))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out).astype(np.float32)


def encode_tokens(model: Any) -> Callable[[list[str]], list[np.ndarray]]:
    """texts -> the frozen transformer's token-level outputs (T_i x E) per text."""

    def run(texts: list[str]) -> list[np.ndarray]:
        out = model.encode(texts, batch_size=64, output_value="token_embeddings", show_progress_bar=False)
        return [t.detach().float().cpu().numpy() for t in out]

    return run


# -- build-graph: the configuration and the one run function -----------------------------------

SOURCE_ORDER = ("hierarchy", "text", "name")
SOURCE_ALIASES = {
    "wordnet": "hierarchy", "hierarchy": "hierarchy", "hw": "hierarchy", "taxonomy": "hierarchy",
    "text": "text", "description": "text", "descriptions": "text", "cd": "text",
    "name": "name", "names": "name", "cn": "name",
}
PAPER_NAMES = {"hierarchy": "HW", "text": "CD", "name": "CN"}
HIERARCHY_MODES = ("auto", "wordnet", "taxonomy")
TEXT_HEADS = ("none", "bilstm")


def parse_sources(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``wordnet,text`` / ``CD+HW`` / ``name`` (or a list of such names) -> canonical source names,
    in a fixed order.

    Raises:
        ValueError: empty, or an unknown source.
    """
    text = spec if isinstance(spec, str) else ",".join(spec)
    parts = [p.strip().lower() for p in re.split(r"[,+ ]+", text or "") if p.strip()]
    if not parts:
        raise ValueError("--sources is empty: choose from wordnet (HW), text (CD), name (CN), e.g. wordnet,text")
    bad = [p for p in parts if p not in SOURCE_ALIASES]
    if bad:
        raise ValueError(f"--sources: unknown source {bad[0]!r}; choose from wordnet|hierarchy (HW), text (CD), "
                         "name (CN)")
    chosen = {SOURCE_ALIASES[p] for p in parts}
    return tuple(s for s in SOURCE_ORDER if s in chosen)


def _uses(*sources: str) -> Callable[["GraphConfig"], bool]:
    return lambda c: any(s in c.sources for s in sources)


def _bilstm(c: "GraphConfig") -> bool:
    return "text" in c.sources and c.text_head == "bilstm"


# metadata "param": when the field changes graph.h5 (a predicate of the config), False when never
@dataclass(frozen=True)
class GraphConfig:
    """What build-graph computes (section 3.1): the sources of S_t and how each is made.

    ``params()`` is graph.h5's provenance: the fields that change the output for these sources.
    """

    sources: tuple[str, ...] = ("hierarchy", "text")
    # where S_w comes from; "auto" until :meth:`resolved` decides from the class table
    hierarchy: str = field(default="auto", metadata={"param": _uses("hierarchy", "text")})
    hierarchy_sim: str = field(default="path", metadata={"param": _uses("hierarchy")})
    tau: float = field(default=2.0, metadata={"param": lambda c: "hierarchy" in c.sources and c.hierarchy_sim == "exp"})
    text_head: str = field(default="none", metadata={"param": _uses("text")})
    head_steps: int = field(default=200, metadata={"param": _bilstm})
    head_hidden: int = field(default=192, metadata={"param": _bilstm})
    head_lr: float = field(default=2e-3, metadata={"param": _bilstm})
    head_temperature: float = field(default=0.1, metadata={"param": _bilstm})
    seed: int = field(default=0, metadata={"param": _bilstm})
    # strict only decides whether a class without a place stops the run: no param
    strict: bool = field(default=False, metadata={"param": False})

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", parse_sources(self.sources))
        if self.hierarchy not in HIERARCHY_MODES:
            raise ValueError(f"--hierarchy {self.hierarchy!r}: choose one of {', '.join(HIERARCHY_MODES)}")
        if self.hierarchy_sim not in HIERARCHY_SIMS:
            raise ValueError(f"--hierarchy-sim {self.hierarchy_sim!r}: choose one of {', '.join(HIERARCHY_SIMS)}")
        if self.hierarchy_sim == "exp" and not self.tau > 0:
            raise ValueError(f"--tau {self.tau}: must be > 0")
        if self.text_head not in TEXT_HEADS:
            raise ValueError(f"--text-head {self.text_head!r}: choose one of {', '.join(TEXT_HEADS)}")
        if self.text_head == "bilstm" and "text" not in self.sources:
            raise ValueError("--text-head bilstm encodes descriptions: add 'text' to --sources")
        if self.text_head == "bilstm" and (self.head_steps < 0 or self.head_hidden < 1
                                           or not self.head_temperature > 0 or not self.head_lr > 0):
            raise ValueError("--head-steps must be >= 0, --head-hidden >= 1, --head-lr and --head-temperature > 0")

    def resolved(self, taxonomy_given: bool, synsets: Sequence[str], parents: Sequence[str]) -> "GraphConfig":
        """This config with ``hierarchy`` decided: "auto" is WordNet unless there is a taxonomy file
        or a class table of parents without synsets (a user taxonomy).

        Raises:
            ValueError: a taxonomy file with ``hierarchy="wordnet"``.
        """
        mode = self.hierarchy
        if mode == "auto":
            # a class table with synsets uses WordNet (a parent then places a class that has none);
            # only a table of parents without synsets is a user taxonomy
            mode = "taxonomy" if taxonomy_given or (any(parents) and not any(synsets)) else "wordnet"
        if taxonomy_given and mode != "taxonomy":
            raise ValueError("--taxonomy given with --hierarchy wordnet: drop one")
        return replace(self, hierarchy=mode)

    @property
    def needs_wordnet(self) -> bool:
        """WordNet places the classes for S_w and gives the glosses the text source describes them by."""
        return ("hierarchy" in self.sources and self.hierarchy == "wordnet") or "text" in self.sources

    @property
    def needs_encoder(self) -> bool:
        return "text" in self.sources or "name" in self.sources

    @property
    def strategy(self) -> str:
        """The paper's name of the blend, e.g. ``CD+HW``."""
        return "+".join(PAPER_NAMES[s] for s in ("name", "text", "hierarchy") if s in self.sources)

    def params(self) -> dict[str, Any]:
        """graph.h5's provenance params: every field that changes the output for these sources."""
        values = asdict(self)
        values["sources"] = list(self.sources)
        return {f.name: values[f.name] for f in fields(self)
                if f.metadata.get("param", True) is True or (callable(f.metadata.get("param"))
                                                             and f.metadata["param"](self))}


class ClassTableLike(Protocol):
    """The class table build-graph reads (``sinet_cli.datasets.ClassTable`` is one): per class its
    name and the table's synset, description and parent ("" / None where empty)."""

    names: Sequence[str]
    synsets: Sequence[str]
    descriptions: Sequence[str | None]
    parents: Sequence[str]
    source: str


# progress of one named phase: ``with phase("S_w", total) as advance: advance(n)``
PhaseProgress = Callable[[str, int], "AbstractContextManager[ProgressFn]"]
# a message for people, as it happens: ``note("warn" | "info", text)``
NoteFn = Callable[[str, str], None]


@dataclass
class GraphResult:
    """Everything graph.h5 holds, and what build-graph says about it."""

    classes: list[str]
    graphs: Graphs
    hierarchy_known: np.ndarray | None  # per class 1 when it has a place in the hierarchy (S_w on)
    descriptions: list[str] | None
    description_source: list[str] | None  # user | wordnet | name
    label_embeddings: np.ndarray | None
    attrs: dict[str, Any]  # sources, strategy, synsets, unknown_hierarchy, name_resolution, table_problems, text_head
    placement: Placement | None
    text_head: dict[str, Any] | None  # the BiLSTM head's training record


def _quoted(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _no_phase(description: str, total: int) -> "AbstractContextManager[ProgressFn]":
    return nullcontext(lambda n=1: None)


def run_build_graph(
    config: GraphConfig,
    table: ClassTableLike,
    *,
    wn: Any = None,
    encoder: Any = None,
    taxonomy: Mapping[str, Sequence[str]] | None = None,
    taxonomy_source: str | None = None,
    device: str = "cpu",
    phase: PhaseProgress | None = None,
    note: NoteFn | None = None,
) -> GraphResult:
    """The class relation graphs S_w, S_l (eq. 2) and S_t (eq. 3) of a class table.

    Args:
        config: a :meth:`GraphConfig.resolved` config (``hierarchy`` is "wordnet" or "taxonomy").
        table: the classes (names, and the table's synset, description and parent columns).
        wn: the nltk WordNet reader (needed when ``config.needs_wordnet``).
        encoder: the frozen sentence-transformers model (needed when ``config.needs_encoder``).
        taxonomy: ``child -> parents`` of a taxonomy file (taxonomy mode; the table's parent
            column is added to it).
        taxonomy_source: the taxonomy file, named in messages.
        device: where the BiLSTM head trains.
        phase: progress of each long phase (see :data:`PhaseProgress`).
        note: warnings and facts for people, as they arise.

    Raises:
        ValueError: a class without a place with ``config.strict``, a description without words,
            a taxonomy cycle, no taxonomy, or a failed text head (one line naming the file).
    """
    if config.hierarchy not in ("wordnet", "taxonomy"):
        raise ValueError("run_build_graph needs a resolved config (GraphConfig.resolved)")
    phase = phase or _no_phase
    say = note or (lambda level, text: None)
    srcs, mode, C = config.sources, config.hierarchy, len(table.names)
    use_h = "hierarchy" in srcs
    names = list(table.names)

    # -- WordNet: every class's place (the class table's synset or parent column, else its name)
    synsets: list[Any | None] = [None] * C
    gloss: list[Any | None] = [None] * C
    placed: list[tuple[str, Any] | None] = [None] * C
    placement: Placement | None = None
    if config.needs_wordnet:
        placement = place_classes(wn, names, table.synsets, table.parents, use_parents=mode == "wordnet",
                                  strict=config.strict, source=table.source)
        synsets, gloss, placed = placement.synsets, placement.gloss, placement.placed
        if config.strict and use_h and mode == "wordnet":
            check_strict(table.source, [], placement.unresolved, mode, None)
        problems = placement.table_problems
        if problems:
            say("warn", f"{table.source}: {'; '.join(problems[:3])}"
                f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}: looked up by name instead")
        below_parent = [e["class"] for e in placement.entries if e["rule"] == "parent column"]
        if below_parent:
            say("info", f"placed one edge below their WordNet parent: {_quoted(below_parent)}")
        line = resolution_summary(placement)
        if line:
            say("info", line)

    # -- descriptions (checked before any long computation)
    descriptions: list[str] | None = None
    desc_sources: list[str] | None = None
    if "text" in srcs:
        descriptions, desc_sources, empty, name_only = choose_descriptions(names, table.descriptions, gloss,
                                                                           table.source)
        if empty:
            say("warn", f"empty description for {_quoted(empty)}: using the WordNet gloss (or the name)")
        if name_only and not (use_h and mode == "wordnet"):  # else the unresolved warning below names them
            say("warn", f"no description or WordNet gloss for {_quoted(name_only)}: encoding the class name")

    # -- S_w
    S_w = None
    known = np.zeros(C, dtype=np.int64)
    if use_h:
        S_w, known = _hierarchy(config, table, synsets, placed, wn, taxonomy, taxonomy_source, phase, say)

    # -- S_l (eq. 2)
    label_sims: dict[str, np.ndarray] = {}
    embeddings = None
    head_record: dict[str, Any] | None = None
    if "text" in srcs:
        texts = [description_text(n, d, s) for n, d, s in zip(names, descriptions, desc_sources)]
        if config.text_head == "bilstm":
            per_class = [head_texts(n, t, d, u, s) for n, t, d, u, s in
                         zip(names, texts, descriptions, table.descriptions, gloss)]
            try:
                with phase("text head", config.head_steps) as advance:
                    res = train_text_head(
                        per_class, texts, encode_tokens(encoder), hidden=config.head_hidden,
                        steps=config.head_steps, lr=config.head_lr, temperature=config.head_temperature,
                        seed=config.seed, device=device, progress=advance,
                    )
            except ValueError as e:
                raise ValueError(f"--text-head bilstm: {e}") from None
            embeddings = res.embeddings
            head_record = {
                "objective": "symmetric InfoNCE over texts of the same class (see stages/build_graph.py)",
                "steps": res.steps, "loss_first": res.losses[0] if res.losses else None,
                "loss_last": res.losses[-1] if res.losses else None,
                "eval_loss_before": res.eval_loss_before, "eval_loss_after": res.eval_loss_after,
                "texts_per_class_mean": float(np.mean([len(t) for t in per_class])),
            }
        else:
            with phase("encode descriptions", len(texts)) as advance:
                embeddings = encode_sentences(encoder, texts, advance)
        label_sims["text"] = cosine_similarity(embeddings)
    if "name" in srcs:
        with phase("encode names", C) as advance:
            name_emb = encode_sentences(encoder, names, advance)
        label_sims["name"] = cosine_similarity(name_emb)
        if embeddings is None:
            embeddings = name_emb

    graphs = relation_graphs(C, S_w, label_sims)
    attrs: dict[str, Any] = {
        "sources": list(srcs),
        "strategy": config.strategy,
        "synsets": [s.name() if s is not None else "" for s in synsets],
        "unknown_hierarchy": [n for n, k in zip(names, known) if use_h and not k],
    }
    if placement is not None:
        attrs["name_resolution"] = placement.entries
        attrs["table_problems"] = placement.table_problems
    if head_record:
        attrs["text_head"] = head_record
    return GraphResult(names, graphs, known if use_h else None, descriptions, desc_sources, embeddings, attrs,
                       placement, head_record)


def _hierarchy(config: GraphConfig, table: ClassTableLike, synsets: list[Any | None],
               placed: list[tuple[str, Any] | None], wn: Any, taxonomy: Mapping[str, Sequence[str]] | None,
               taxonomy_source: str | None, phase: PhaseProgress, say: NoteFn) -> tuple[np.ndarray, np.ndarray]:
    """S_w and which classes have a place in the hierarchy (WordNet or a taxonomy)."""
    mode, C, names = config.hierarchy, len(table.names), list(table.names)
    if mode == "wordnet":
        with phase("hypernym paths", C) as advance:
            maps, wup_info = wordnet_hierarchy(synsets, with_depths=config.hierarchy_sim == "wup", progress=advance,
                                               placed=placed, wn=wn)
    else:
        parents: dict[str, list[str]] = {k: list(v) for k, v in (taxonomy or {}).items()}
        for name, parent in zip(names, table.parents):
            if parent:
                ps = parents.setdefault(name, [])
                if parent not in ps:
                    ps.append(parent)
        if not parents:
            raise ValueError(f"{table.source}: --hierarchy taxonomy needs --taxonomy FILE or a parent column")
        try:
            maps, depths = taxonomy_ancestors(names, parents)
            wup_info = {"node_depth": depths}
        except ValueError as e:
            raise ValueError(f"{taxonomy_source if taxonomy_source is not None else table.source}: {e}") from None
        if config.strict:
            check_strict(table.source, [], [n for n, m in zip(names, maps) if m is None], mode, taxonomy_source)
    unknown = [n for n, m in zip(names, maps) if m is None]
    if unknown:
        why = "their names resolve to nothing in WordNet" if mode == "wordnet" else "not in the taxonomy"
        fix = ("fill the synset column of a class table (--classes)" if mode == "wordnet"
               else "add child<TAB>parent lines")
        say("warn", f"{len(unknown)} of {C} classes have no place in the {mode} hierarchy ({why}): "
            f"{_quoted(unknown)}; they take part through text similarity only (S_w row 0 off-diagonal; "
            f"{fix}, or --strict to stop here)")
    known = np.array([m is not None for m in maps], dtype=np.int64)
    with phase("S_w", C) as advance:
        S_w = hierarchy_similarity(maps, sim=config.hierarchy_sim, tau=config.tau, progress=advance,
                                   **(wup_info or {}))
    return S_w, known
