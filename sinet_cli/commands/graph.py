"""``sinet build-graph``: the class relation graphs S_w, S_l and S_t (graph.h5), section 3.1.

This module is the loading side: it reads the class table and the taxonomy, places the classes
in WordNet (the table's synset or parent column, else the class name through
``stages.build_graph.resolve_class_names``), loads the frozen text encoder and chooses each class's
description; the computation (eq. 2, eq. 3, the hierarchy distances, the BiLSTM text head, the
name resolution) lives in ``stages.build_graph``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import (ClassesOpt, DataOpt, DeviceOpt, ForceOpt, OutOpt, WaitOpt, artifact_dir, load_table,
                      require_two_classes, resolve_device)
from ..errors import InputError, SinetError
from ..locks import Plan, locked
from ..textio import read_text
from ..progress import progress_bar

SOURCE_ORDER = ("hierarchy", "text", "name")
SOURCE_ALIASES = {
    "wordnet": "hierarchy", "hierarchy": "hierarchy", "hw": "hierarchy", "taxonomy": "hierarchy",
    "text": "text", "description": "text", "descriptions": "text", "cd": "text",
    "name": "name", "names": "name", "cn": "name",
}
PAPER_NAMES = {"hierarchy": "HW", "text": "CD", "name": "CN"}
HIERARCHY_MODES = ("auto", "wordnet", "taxonomy")
TEXT_HEADS = ("none", "bilstm")
ROOT = "*ROOT*"


def parse_sources(spec: str) -> list[str]:
    """``wordnet,text`` / ``CD+HW`` / ``name`` -> canonical source names, in a fixed order."""
    parts = [p.strip().lower() for p in re.split(r"[,+ ]+", spec or "") if p.strip()]
    if not parts:
        raise SinetError("--sources is empty: choose from wordnet (HW), text (CD), name (CN), e.g. wordnet,text")
    bad = [p for p in parts if p not in SOURCE_ALIASES]
    if bad:
        raise SinetError(f"--sources: unknown source {bad[0]!r}; choose from wordnet|hierarchy (HW), text (CD), name (CN)")
    chosen = {SOURCE_ALIASES[p] for p in parts}
    return [s for s in SOURCE_ORDER if s in chosen]


# -- WordNet -----------------------------------------------------------------------------------

def lookup_synset(wn: Any, ident: str) -> Any | None:
    """A synset from ``dog.n.01`` or an offset id ``n02084071`` / ``02084071-n``; None if unknown."""
    from stages.build_graph import synset_by_id

    return synset_by_id(wn, ident.strip())


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
    synsets: list[Any | None],
    with_depths: bool = False,
    progress: Callable[[int], None] | None = None,
    placed: list[tuple[str, Any] | None] | None = None,
) -> tuple[list[dict[str, int] | None], dict[str, Any] | None]:
    """Ancestor maps of the classes' synsets, each synset walked once. Non-noun synsets get nltk's
    simulated root (``simulate_root``). With ``with_depths``, also what Wu-Palmer needs, as nltk
    computes it: ``node_depth`` ``{node: (min_depth, max_depth)}`` and ``lengths`` (per class, nltk's
    ``shortest_path_distance`` to each ancestor: min over the ancestor's own ancestors k of
    anc_class[k] + anc_node[k]). ``placed[i] = (name, parent synset)`` puts a class that has no
    synset of its own one edge below its parent (e.g. Clothing1M's Hoodie under sweatshirt.n.01)."""
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
    wn = _wordnet()
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


@functools.lru_cache(maxsize=1)
def _wordnet() -> Any:
    from ..sideinfo import wordnet

    return wordnet()


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


def place_classes(wn: Any, table: Any, use_parents: bool, strict: bool) -> Placement:
    """Place every class: the class table's synset column first (the override), then its parent
    column (``use_parents``: the column holds WordNet synsets), then the class name
    (:func:`stages.build_graph.resolve_class_names`, all names at once: a sense is chosen in view
    of the other classes, those the table places included). An unknown id or parent in the table
    is looked up by name instead (``strict``: a one-line error naming the class and the file)."""
    from stages import build_graph as stage

    C = len(table)
    out = Placement([None] * C, [None] * C, [None] * C, [])
    known = []  # the classes the table places: context for the names, not looked up
    for sid, parent in zip(table.synsets, table.parents):
        syn = lookup_synset(wn, sid) if sid else None
        if syn is None and parent and use_parents:
            syn = lookup_synset(wn, parent)
        known.append(syn.name() if syn is not None else None)
    by_name = stage.resolve_class_names(table.names, wn, known)
    for i, (name, sid, parent) in enumerate(zip(table.names, table.synsets, table.parents)):
        entry: dict[str, Any] | None = None
        problem = ""  # what is wrong with the class's row of the table
        if sid:
            syn = lookup_synset(wn, sid)
            if syn is not None:
                out.synsets[i] = out.gloss[i] = syn
                entry = {"synset": syn.name(), "source": "table", "lemma": "", "rule": "synset column",
                         "detail": f"{syn.name()} (synset column)"}
            else:
                problem = f"unknown WordNet synset {sid!r}"
                if strict:
                    raise SinetError(f"{table.source}: class {name!r} has {problem} (expected a name like dog.n.01 or "
                                     "an offset like n02084071; without --strict it is looked up by its name)")
        if entry is None and parent and use_parents:
            ps = lookup_synset(wn, parent)
            if ps is not None:
                out.placed[i] = (name, ps)
                out.gloss[i] = ps
                entry = {"synset": ps.name(), "source": "parent", "lemma": "", "rule": "parent column",
                         "detail": f"below {ps.name()} (parent column)"}
            else:
                problem = problem or f"a parent {parent!r} that is not a WordNet synset"
                if strict:
                    raise SinetError(f"{table.source}: class {name!r} has {problem} (fix the parent, use --hierarchy "
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


def check_strict(source: str, problems: list[str], unknown: list[str], mode: str, taxonomy: Path | None) -> None:
    """``--strict``: a one-line error for the first class without a place in the hierarchy."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SinetError(f"{source}: {problems[0]}{more} (--strict)")
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        if mode == "wordnet":
            raise SinetError(f"{source}: class {unknown[0]!r}{more} has no WordNet synset and its name resolves to "
                             "nothing (fill the synset column of a class table, --classes, or drop --strict to use "
                             "text similarity only for it)")
        raise SinetError(f"{taxonomy if taxonomy is not None else source}: class {unknown[0]!r}{more} is not in the "
                         "taxonomy (add a child<TAB>parent line, or drop --strict to use text similarity only for it)")


# -- taxonomy ----------------------------------------------------------------------------------


def read_taxonomy(path: Path) -> dict[str, list[str]]:
    """``child<TAB>parent`` lines (optional ``child  parent`` header, ``#`` comments) -> parents."""
    text = read_text(path)
    parents: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if lineno == 1 and [f.lower() for f in fields] == ["child", "parent"]:
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise InputError(path, f"expected child<TAB>parent, got {line.strip()!r}", lineno)
        child, parent = fields
        if child == parent:
            raise InputError(path, f"{child!r} is its own parent (a cycle)", lineno)
        ps = parents.setdefault(child, [])
        if parent not in ps:
            ps.append(parent)
    if not parents:
        raise InputError(path, "no child<TAB>parent lines")
    return parents


# -- text encoder ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _encoder(path: str | None, device: str) -> Any:
    from ..sideinfo import load_text_encoder

    return load_text_encoder(path, device=device)


def encoder_dir(path: Path | None) -> Path:
    from ..sideinfo import default_text_encoder

    return Path(path) if path else default_text_encoder()


def encoder_fingerprint(folder: Path) -> str:
    """Content hash of a local sentence-transformers model folder."""
    if not folder.is_dir():
        raise SinetError(f"{folder}: --encoder must be a local sentence-transformers model folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return store.fingerprint_arrays([[str(p.relative_to(folder)), store.fingerprint_file(p)] for p in files])


def encode_sentences(model: Any, texts: list[str], desc: str) -> np.ndarray:
    out = []
    with progress_bar(desc, len(texts)) as advance:
        for s in range(0, len(texts), 256):
            chunk = texts[s : s + 256]
            out.append(np.asarray(model.encode(chunk, batch_size=64, show_progress_bar=False, convert_to_numpy=True)))
            advance(len(chunk))
    return np.concatenate(out).astype(np.float32)


def encode_tokens(model: Any) -> Callable[[list[str]], list[np.ndarray]]:
    """texts -> the frozen transformer's token-level outputs (T_i x E) per text."""

    def run(texts: list[str]) -> list[np.ndarray]:
        out = model.encode(texts, batch_size=64, output_value="token_embeddings", show_progress_bar=False)
        return [t.detach().float().cpu().numpy() for t in out]

    return run


# -- descriptions ------------------------------------------------------------------------------


def has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def choose_descriptions(
    table: Any, synsets: list[Any | None]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Per class: (description, its source: user|wordnet|name). The user's description wins,
    then the WordNet gloss, then the class name. Returns also the classes whose explicitly empty
    description fell back, and the classes described only by their name."""
    names, user = table.names, table.descriptions
    any_user = any(d is not None and d.strip() for d in user)
    descriptions, sources, empty, name_only = [], [], [], []
    for name, d, syn in zip(names, user, synsets):
        if d is not None and d.strip():
            if not has_words(d):
                raise SinetError(
                    f"{table.source}: class {name!r}: description {d!r} has no words "
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


def class_texts(name: str, desc_text: str, description: str, user: str | None, synset: Any | None) -> list[str]:
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


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_classes(data: str, classes: Path | None) -> Any:
    from ..datasets import ClassTable

    if classes is not None:
        return ClassTable.from_tsv(classes)
    if data == "demo":
        from ..datasets.demo import demo_classes

        return demo_classes()
    return load_table(data, None).classes


# -- the command -------------------------------------------------------------------------------


def _plan(a: dict) -> Plan:
    target = artifact_dir(a["out"], a["data"]) / "graph.h5"
    return Plan(writes=[target], wait=a["wait"], resume=f"{target} is unchanged; run the same command again")


@app.command("build-graph")
@locked("build-graph", _plan)
def build_graph(
    data: DataOpt = None,
    classes: ClassesOpt = None,
    sources: Annotated[
        str,
        typer.Option(
            help="Sources summed into S_t: wordnet|hierarchy (HW, S_w), text (CD: descriptions), name (CN: class "
            "names), comma- or plus-separated, e.g. 'CD+HW' or 'name,wordnet'. Sources left out are zeros.",
            rich_help_panel="Graph",
        ),
    ] = "wordnet,text",
    hierarchy: Annotated[
        str,
        typer.Option(help="Where S_w comes from: wordnet, taxonomy (--taxonomy / the parent column), or auto.",
                     rich_help_panel="Hierarchy"),
    ] = "auto",
    taxonomy: Annotated[
        Optional[Path],
        typer.Option(help="Taxonomy file: child<TAB>parent lines (product catalogues).", rich_help_panel="Hierarchy"),
    ] = None,
    hierarchy_sim: Annotated[
        str, typer.Option(help="S_w from the shortest path d: path 1/(1+d), wup (Wu-Palmer), exp exp(-d/tau).",
                          rich_help_panel="Hierarchy")
    ] = "path",
    tau: Annotated[float, typer.Option(help="Temperature of --hierarchy-sim exp.", rich_help_panel="Hierarchy")] = 2.0,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Stop with an error naming the class and the file when a class has no place in "
                     "the hierarchy (its name resolves to nothing in WordNet, an unknown synset or parent in the class "
                     "table, a class missing from the taxonomy). Without it such a class gets a warning and takes part "
                     "through text similarity only (its S_w row is 0 off-diagonal).", rich_help_panel="Hierarchy"),
    ] = False,
    lenient: Annotated[
        bool, typer.Option("--lenient", hidden=True, help="Deprecated, no effect: lenient is the default (see --strict).")
    ] = False,
    encoder: Annotated[
        Optional[Path],
        typer.Option(help="Local sentence-transformers model folder (default: the packaged all-MiniLM-L6-v2).",
                     rich_help_panel="Text"),
    ] = None,
    text_head: Annotated[
        str,
        typer.Option(help="none: the encoder's pooled sentence embedding; bilstm: the paper's BiLSTM over frozen "
                     "token embeddings, trained contrastively (InfoNCE) on several texts per class.",
                     rich_help_panel="Text"),
    ] = "none",
    head_steps: Annotated[int, typer.Option(help="BiLSTM head: training steps.", rich_help_panel="Text")] = 200,
    head_hidden: Annotated[int, typer.Option(help="BiLSTM head: units per direction.", rich_help_panel="Text")] = 192,
    head_lr: Annotated[float, typer.Option(help="BiLSTM head: Adam learning rate.", rich_help_panel="Text")] = 2e-3,
    head_temperature: Annotated[float, typer.Option(help="BiLSTM head: InfoNCE temperature.",
                                                    rich_help_panel="Text")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the BiLSTM head.", rich_help_panel="Text")] = 0,
    device: DeviceOpt = "auto",
    show: Annotated[int, typer.Option(help="Print the K nearest classes of each class by S_t.",
                                      rich_help_panel="Artifacts")] = 0,
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Build the class relation graphs S_w (hierarchy), S_l (text, eq. 2) and S_t = S_l + S_w (eq. 3).

    Class names find their own place in WordNet. A class without a synset in a class table
    (--classes; a folder name, a manifest label) is looked up by its name: case, _ - and spaces,
    and plurals do not matter (ankle_boot, T-shirt, Down Coat, sneakers, tshirt). The whole name
    is tried as one word first (tee_shirt, t-shirt), then the first of alternatives (T-shirt/top),
    then its head noun: 'ankle boot' sits one edge below boot.n.01, 'Down Coat' below coat.n.01.
    Only noun senses count; of several, the most frequent (SemCor's count, over all forms: shoes
    is a shoe), unless another sits clearly closer to the other classes (mouse among laptop and
    keyboard is the device, among hamster and rat the rodent). A name ending in a number
    (class_01), or with verb or adjective senses only (casual), stays unresolved.
    Every choice is printed and stored in graph.h5 (attribute name_resolution); the class table's
    synset column, or its parent column, overrides it. A name that resolves to nothing (a brand, a
    word in another language) gets one warning and takes part through text similarity only (its
    S_w row is 0 off-diagonal); --strict makes it an error.

    Example: sinet build-graph --data imagefolder:photos --show 3
    """
    from stages import build_graph as stage

    srcs = parse_sources(sources)
    if hierarchy not in HIERARCHY_MODES:
        raise SinetError(f"--hierarchy {hierarchy!r}: choose one of {', '.join(HIERARCHY_MODES)}")
    if hierarchy_sim not in stage.HIERARCHY_SIMS:
        raise SinetError(f"--hierarchy-sim {hierarchy_sim!r}: choose one of {', '.join(stage.HIERARCHY_SIMS)}")
    if hierarchy_sim == "exp" and not tau > 0:
        raise SinetError(f"--tau {tau}: must be > 0")
    if text_head not in TEXT_HEADS:
        raise SinetError(f"--text-head {text_head!r}: choose one of {', '.join(TEXT_HEADS)}")
    if text_head == "bilstm" and "text" not in srcs:
        raise SinetError("--text-head bilstm encodes descriptions: add 'text' to --sources")
    if text_head == "bilstm" and (head_steps < 0 or head_hidden < 1 or not head_temperature > 0 or not head_lr > 0):
        raise SinetError("--head-steps must be >= 0, --head-hidden >= 1, --head-lr and --head-temperature > 0")

    table = load_classes(data, classes)
    require_two_classes(table.names, str(classes) if classes is not None else f"--data {data}")
    C = len(table)
    mode = hierarchy
    if mode == "auto":
        # a class table with synsets uses WordNet (a parent then places a class that has none);
        # only a table of parents without synsets is a user taxonomy
        mode = "taxonomy" if taxonomy is not None or (any(table.parents) and not any(table.synsets)) else "wordnet"
    if taxonomy is not None and mode != "taxonomy":
        raise SinetError("--taxonomy given with --hierarchy wordnet: drop one")
    use_h = "hierarchy" in srcs
    # WordNet places the classes for S_w and gives the glosses the text source describes them by
    need_wordnet = (use_h and mode == "wordnet") or "text" in srcs
    if lenient:
        console.warn("--lenient is deprecated and has no effect: a class without a place in the hierarchy gets a "
                     "warning by default (--strict makes it an error)")

    folder = artifact_dir(out, data)
    target = folder / "graph.h5"
    # --strict is no param: it only decides whether a class without a place stops the command
    params: dict[str, Any] = {"sources": srcs}
    if need_wordnet or use_h:
        params["hierarchy"] = mode  # wordnet mode reads the parent column as WordNet synsets
    if use_h:
        params.update(hierarchy_sim=hierarchy_sim)
        if hierarchy_sim == "exp":
            params["tau"] = tau
    if "text" in srcs:
        params["text_head"] = text_head
        if text_head == "bilstm":
            params.update(head_steps=head_steps, head_hidden=head_hidden, head_lr=head_lr,
                          head_temperature=head_temperature, seed=seed)
    inputs: dict[str, str] = {"classes": table.fingerprint()}
    if use_h and mode == "taxonomy" and taxonomy is not None:
        inputs["taxonomy"] = store.fingerprint_file(taxonomy)
    if need_wordnet:
        from ..sideinfo import wordnet_fingerprint

        # the WordNet release and the name-resolution rules: the class names are in inputs["classes"]
        inputs["wordnet"] = f"{wordnet_fingerprint()}/names-{stage.NAME_RULES_VERSION}"
    enc_dir = None
    if "text" in srcs or "name" in srcs:
        enc_dir = encoder_dir(encoder)
        inputs["encoder"] = encoder_fingerprint(enc_dir)
    if not force and store.is_up_to_date(target, "graph", params, inputs):
        if strict:
            with store.open_artifact(target, "graph") as art:
                check_strict(table.source, art.json_attr("table_problems", []), art.json_attr("unknown_hierarchy", []),
                             mode, taxonomy)
        console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
        return

    # -- WordNet: every class's place (the class table's synset or parent column, else its name)
    synsets: list[Any | None] = [None] * C
    gloss: list[Any | None] = [None] * C
    placed: list[tuple[str, Any] | None] = [None] * C
    placement: Placement | None = None
    if need_wordnet:
        placement = place_classes(_wordnet(), table, use_parents=mode == "wordnet", strict=strict)
        synsets, gloss, placed = placement.synsets, placement.gloss, placement.placed
        if strict and use_h and mode == "wordnet":
            check_strict(table.source, [], placement.unresolved, mode, None)
        if placement.table_problems:
            console.warn(f"{table.source}: {'; '.join(placement.table_problems[:3])}"
                         f"{f' and {len(placement.table_problems) - 3} more' if len(placement.table_problems) > 3 else ''}"
                         ": looked up by name instead")
        below_parent = [e["class"] for e in placement.entries if e["rule"] == "parent column"]
        if below_parent:
            console.info(f"placed one edge below their WordNet parent: {_names(below_parent)}")
        line = resolution_summary(placement)
        if line:
            console.info(line)

    # -- descriptions (checked before any long computation)
    descriptions: list[str] | None = None
    desc_sources: list[str] | None = None
    if "text" in srcs:
        descriptions, desc_sources, empty, name_only = choose_descriptions(table, gloss)
        if empty:
            console.warn(f"empty description for {_names(empty)}: using the WordNet gloss (or the name)")
        if name_only and not (use_h and mode == "wordnet"):  # else the unresolved warning below names them
            console.warn(f"no description or WordNet gloss for {_names(name_only)}: encoding the class name")

    # -- S_w
    S_w = None
    known = np.zeros(C, dtype=np.int64)
    if use_h:
        if mode == "wordnet":
            with progress_bar("hypernym paths", C) as advance:
                maps, wup_info = wordnet_hierarchy(synsets, with_depths=hierarchy_sim == "wup", progress=advance,
                                                   placed=placed)
        else:
            parents: dict[str, list[str]] = read_taxonomy(taxonomy) if taxonomy is not None else {}
            for name, parent in zip(table.names, table.parents):
                if parent:
                    ps = parents.setdefault(name, [])
                    if parent not in ps:
                        ps.append(parent)
            if not parents:
                raise SinetError(f"{table.source}: --hierarchy taxonomy needs --taxonomy FILE or a parent column")
            try:
                maps, depths = stage.taxonomy_ancestors(table.names, parents)
                wup_info = {"node_depth": depths}
            except ValueError as e:
                raise SinetError(f"{taxonomy if taxonomy is not None else table.source}: {e}") from None
            if strict:
                check_strict(table.source, [], [n for n, m in zip(table.names, maps) if m is None], mode, taxonomy)
        unknown = [n for n, m in zip(table.names, maps) if m is None]
        if unknown:
            why = "their names resolve to nothing in WordNet" if mode == "wordnet" else "not in the taxonomy"
            fix = ("fill the synset column of a class table (--classes)" if mode == "wordnet"
                   else "add child<TAB>parent lines")
            console.warn(f"{len(unknown)} of {C} classes have no place in the {mode} hierarchy ({why}): "
                         f"{_names(unknown)}; they take part through text similarity only (S_w row 0 off-diagonal; "
                         f"{fix}, or --strict to stop here)")
        known = np.array([m is not None for m in maps], dtype=np.int64)
        try:
            with progress_bar("S_w", C) as advance:
                S_w = stage.hierarchy_similarity(maps, sim=hierarchy_sim, tau=tau, progress=advance, **(wup_info or {}))
        except ValueError as e:
            raise SinetError(str(e)) from None

    # -- S_l (eq. 2)
    label_sims: dict[str, np.ndarray] = {}
    embeddings = None
    head_record: dict[str, Any] | None = None
    if enc_dir is not None:
        dev = resolve_device(device)
        model = _encoder(str(enc_dir), dev)
        if "text" in srcs:
            texts = [description_text(n, d, s) for n, d, s in zip(table.names, descriptions, desc_sources)]
            if text_head == "bilstm":
                per_class = [class_texts(n, t, d, u, s) for n, t, d, u, s in
                             zip(table.names, texts, descriptions, table.descriptions, gloss)]
                try:
                    with progress_bar("text head", head_steps) as advance:
                        res = stage.train_text_head(
                            per_class, texts, encode_tokens(model), hidden=head_hidden, steps=head_steps,
                            lr=head_lr, temperature=head_temperature, seed=seed, device=dev, progress=advance,
                        )
                except ValueError as e:
                    raise SinetError(f"--text-head bilstm: {e}") from None
                embeddings = res.embeddings
                head_record = {
                    "objective": "symmetric InfoNCE over texts of the same class (see stages/build_graph.py)",
                    "steps": res.steps, "loss_first": res.losses[0] if res.losses else None,
                    "loss_last": res.losses[-1] if res.losses else None,
                    "eval_loss_before": res.eval_loss_before, "eval_loss_after": res.eval_loss_after,
                    "texts_per_class_mean": float(np.mean([len(t) for t in per_class])),
                }
            else:
                embeddings = encode_sentences(model, texts, "encode descriptions")
            label_sims["text"] = stage.cosine_similarity(embeddings)
        if "name" in srcs:
            name_emb = encode_sentences(model, list(table.names), "encode names")
            label_sims["name"] = stage.cosine_similarity(name_emb)
            if embeddings is None:
                embeddings = name_emb

    graphs = stage.relation_graphs(C, S_w, label_sims)
    data_out: dict[str, Any] = {
        "classes": table.names, "S_w": graphs.S_w, "S_l": graphs.S_l, "S_t": graphs.S_t,
        "hierarchy_known": known if use_h else None,
        "descriptions": descriptions, "description_source": desc_sources,
        "label_embeddings": embeddings,
    }
    attrs: dict[str, Any] = {
        "sources": srcs,
        "strategy": "+".join(PAPER_NAMES[s] for s in ("name", "text", "hierarchy") if s in srcs),
        "synsets": [s.name() if s is not None else "" for s in synsets],
        "unknown_hierarchy": [n for n, k in zip(table.names, known) if use_h and not k],
    }
    if placement is not None:
        attrs["name_resolution"] = placement.entries
        attrs["table_problems"] = placement.table_problems
    if head_record:
        attrs["text_head"] = head_record
    fp = store.write_artifact(target, "graph", data_out, params, inputs, attrs)

    if show > 0:
        k = min(show, C - 1)
        rows = []
        for i, name in enumerate(table.names):
            order = [j for j in np.argsort(-graphs.S_t[i], kind="stable") if j != i][:k]
            rows.append([name, ", ".join(f"{table.names[j]} ({graphs.S_t[i, j]:.2f})" for j in order)])
        console.table(f"nearest classes by S_t ({attrs['strategy']})", ["class", "nearest"], rows)
    parts = [f"{C} classes", f"S_t = {attrs['strategy'].replace('+', ' + ')}"]
    if use_h:
        parts.append(f"S_w from {mode} ({int(known.sum())}/{C} placed, {hierarchy_sim})")
    if desc_sources is not None:
        counts = {s: desc_sources.count(s) for s in ("user", "wordnet", "name") if desc_sources.count(s)}
        parts.append("descriptions " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if head_record:
        parts.append(f"bilstm head eval loss {head_record['eval_loss_before']:.3f} -> {head_record['eval_loss_after']:.3f}")
    console.info(f"{target}: {'; '.join(parts)} (fingerprint {fp[:12]})")
