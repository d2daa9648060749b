"""``sinet build-graph``: the class relation graphs S_w, S_l and S_t (graph.h5), section 3.1.

This module is the loading side: it reads the class table and the taxonomy, looks classes up in
WordNet, loads the frozen text encoder and chooses each class's description; the computation
(eq. 2, eq. 3, the hierarchy distances, the BiLSTM text head) lives in ``stages.build_graph``.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import ClassesOpt, DataOpt, DeviceOpt, ForceOpt, OutOpt, artifact_dir, load_table, resolve_device
from ..errors import InputError, SinetError
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

_OFFSET = re.compile(r"^([nvasr])(\d{8})$|^(\d{8})-([nvasr])$")


def lookup_synset(wn: Any, ident: str) -> Any | None:
    """A synset from ``dog.n.01`` or an offset id ``n02084071`` / ``02084071-n``; None if unknown."""
    ident = ident.strip()
    m = _OFFSET.match(ident)
    try:
        if m:
            pos, off = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return wn.synset_from_pos_and_offset(pos, int(off))
        return wn.synset(ident)
    except Exception:  # nltk raises WordNetError or ValueError for malformed/unknown names
        return None


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


@app.command("build-graph")
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
    lenient: Annotated[
        bool,
        typer.Option("--lenient", help="A class with a missing/unknown synset (or not in the taxonomy) gets no S_w "
                     "relations (0 off-diagonal) instead of an error.", rich_help_panel="Hierarchy"),
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
) -> None:
    """Build the class relation graphs S_w (hierarchy), S_l (text, eq. 2) and S_t = S_l + S_w (eq. 3).

    Example: sinet build-graph --data demo --show 3
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
    C = len(table)
    mode = hierarchy
    if mode == "auto":
        # a class table with synsets uses WordNet (a parent then places a class that has none);
        # only a table of parents without synsets is a user taxonomy
        mode = "taxonomy" if taxonomy is not None or (any(table.parents) and not any(table.synsets)) else "wordnet"
    if taxonomy is not None and mode != "taxonomy":
        raise SinetError("--taxonomy given with --hierarchy wordnet: drop one")
    use_h = "hierarchy" in srcs
    need_wordnet = (use_h and mode == "wordnet") or ("text" in srcs and any(table.synsets))

    folder = artifact_dir(out, data)
    target = folder / "graph.h5"
    params: dict[str, Any] = {"sources": srcs, "lenient": lenient}
    if use_h:
        params.update(hierarchy=mode, hierarchy_sim=hierarchy_sim)
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
        import nltk

        inputs["wordnet"] = f"wordnet-3.0/nltk-{nltk.__version__}"
    enc_dir = None
    if "text" in srcs or "name" in srcs:
        enc_dir = encoder_dir(encoder)
        inputs["encoder"] = encoder_fingerprint(enc_dir)
    if not force and store.is_up_to_date(target, "graph", params, inputs):
        console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
        return

    # -- WordNet lookups (every class with a synset id, so a bad id is reported whatever the sources)
    synsets: list[Any | None] = [None] * C
    bad_ids: list[str] = []
    if need_wordnet:
        wn = _wordnet()
        for i, (name, sid) in enumerate(zip(table.names, table.synsets)):
            if sid:
                synsets[i] = lookup_synset(wn, sid)
                if synsets[i] is None:
                    bad_ids.append(name)
                    if not lenient:
                        raise SinetError(
                            f"{table.source}: class {name!r} has unknown WordNet synset {sid!r} (expected a name "
                            "like dog.n.01 or an offset like n02084071; --lenient drops S_w for this class)"
                        )
        if bad_ids:
            console.warn(f"unknown WordNet synset for {_names(bad_ids)}: no hierarchy relations or gloss for them")
    placed: list[tuple[str, Any] | None] = [None] * C
    if need_wordnet and use_h and mode == "wordnet":
        for i, (name, sid, parent) in enumerate(zip(table.names, table.synsets, table.parents)):
            if not sid and parent:
                ps = lookup_synset(wn, parent)
                if ps is None and not lenient:
                    raise SinetError(f"{table.source}: class {name!r} has no synset and its parent {parent!r} is not "
                                     "a WordNet synset (use --hierarchy taxonomy, fix the parent, or --lenient)")
                placed[i] = None if ps is None else (name, ps)
        if any(placed):
            console.info(f"placed one edge below their WordNet parent: {_names([p[0] for p in placed if p])}")

    # -- descriptions (checked before any long computation)
    descriptions: list[str] | None = None
    desc_sources: list[str] | None = None
    if "text" in srcs:
        descriptions, desc_sources, empty, name_only = choose_descriptions(table, synsets)
        if empty:
            console.warn(f"empty description for {_names(empty)}: using the WordNet gloss (or the name)")
        if name_only:
            console.warn(f"no description or WordNet gloss for {_names(name_only)}: encoding the class name")

    # -- S_w
    S_w = None
    known = np.zeros(C, dtype=np.int64)
    if use_h:
        if mode == "wordnet":
            missing = [n for n, sid, p in zip(table.names, table.synsets, placed) if not sid and p is None]
            if missing and not lenient:
                raise SinetError(
                    f"{table.source}: class {missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                    " has no WordNet synset (fill the synset column, use --taxonomy, or --lenient to drop S_w for it)"
                )
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
            missing = [n for n, m in zip(table.names, maps) if m is None]
            if missing and not lenient:
                raise SinetError(
                    f"{taxonomy if taxonomy is not None else table.source}: class {missing[0]!r}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} is not in the taxonomy "
                    "(add a child<TAB>parent line, or --lenient to drop S_w for it)"
                )
        unknown = [n for n, m in zip(table.names, maps) if m is None]
        if unknown:
            console.warn(f"no place in the {mode} hierarchy for {_names(unknown)}: their S_w rows are 0 off-diagonal")
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
                             zip(table.names, texts, descriptions, table.descriptions, synsets)]
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
