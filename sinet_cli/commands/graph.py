"""``sinet build-graph``: the class relation graphs S_w, S_l and S_t (graph.h5), section 3.1.

This module is the loading side: it reads the class table and the taxonomy file, loads WordNet
and the frozen text encoder, fingerprints the inputs and writes graph.h5. Placing the classes in
WordNet, the descriptions, eq. 2, eq. 3, the hierarchy distances and the BiLSTM text head are
``stages.build_graph.run_build_graph`` (configured by ``stages.build_graph.GraphConfig``).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import (ClassesOpt, DataOpt, DeviceOpt, ForceOpt, OutOpt, WaitOpt, artifact_dir, load_table,
                      require_two_classes, resolve_device)
from ..errors import InputError, SinetError
from ..locks import Plan, locked
from ..progress import progress_bar
from ..textio import read_text


@contextmanager
def one_line() -> Iterator[None]:
    """A stage's ValueError (bad config, bad class table) as the CLI's one-line error."""
    try:
        yield
    except ValueError as e:
        raise SinetError(str(e)) from None


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


def load_classes(data: str, classes: Path | None) -> Any:
    from ..datasets import ClassTable

    if classes is not None:
        return ClassTable.from_tsv(classes)
    if data == "demo":
        from ..datasets.demo import demo_classes

        return demo_classes()
    return load_table(data, None).classes


# -- the command -------------------------------------------------------------------------------


# the options of build-graph (their help is the --help text)
SourcesOpt = Annotated[str, typer.Option(
    help="Sources summed into S_t: wordnet|hierarchy (HW, S_w), text (CD: descriptions), name (CN: class names), "
    "comma- or plus-separated, e.g. 'CD+HW' or 'name,wordnet'. Sources left out are zeros.", rich_help_panel="Graph")]
HierarchyOpt = Annotated[str, typer.Option(
    help="Where S_w comes from: wordnet, taxonomy (--taxonomy / the parent column), or auto.",
    rich_help_panel="Hierarchy")]
TaxonomyOpt = Annotated[Optional[Path], typer.Option(
    help="Taxonomy file: child<TAB>parent lines (product catalogues).", rich_help_panel="Hierarchy")]
HierarchySimOpt = Annotated[str, typer.Option(
    help="S_w from the shortest path d: path 1/(1+d), wup (Wu-Palmer), exp exp(-d/tau).", rich_help_panel="Hierarchy")]
TauOpt = Annotated[float, typer.Option(help="Temperature of --hierarchy-sim exp.", rich_help_panel="Hierarchy")]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Stop with an error naming the class and the file when a class has no place in the hierarchy "
    "(its name resolves to nothing in WordNet, an unknown synset or parent in the class table, a class missing from "
    "the taxonomy). Without it such a class gets a warning and takes part through text similarity only (its S_w row "
    "is 0 off-diagonal).", rich_help_panel="Hierarchy")]
LenientOpt = Annotated[bool, typer.Option(
    "--lenient", hidden=True, help="Deprecated, no effect: lenient is the default (see --strict).")]
EncoderOpt = Annotated[Optional[Path], typer.Option(
    help="Local sentence-transformers model folder (default: the packaged all-MiniLM-L6-v2).", rich_help_panel="Text")]
TextHeadOpt = Annotated[str, typer.Option(
    help="none: the encoder's pooled sentence embedding; bilstm: the paper's BiLSTM over frozen token embeddings, "
    "trained contrastively (InfoNCE) on several texts per class.", rich_help_panel="Text")]
HeadStepsOpt = Annotated[int, typer.Option(help="BiLSTM head: training steps.", rich_help_panel="Text")]
HeadHiddenOpt = Annotated[int, typer.Option(help="BiLSTM head: units per direction.", rich_help_panel="Text")]
HeadLrOpt = Annotated[float, typer.Option(help="BiLSTM head: Adam learning rate.", rich_help_panel="Text")]
HeadTemperatureOpt = Annotated[float, typer.Option(help="BiLSTM head: InfoNCE temperature.", rich_help_panel="Text")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the BiLSTM head.", rich_help_panel="Text")]
ShowOpt = Annotated[int, typer.Option(help="Print the K nearest classes of each class by S_t.",
                                      rich_help_panel="Artifacts")]


def _plan(a: dict) -> Plan:
    target = artifact_dir(a["out"], a["data"]) / "graph.h5"
    return Plan(writes=[target], wait=a["wait"], resume=f"{target} is unchanged; run the same command again")


@app.command("build-graph")
@locked("build-graph", _plan)
def build_graph(
    data: DataOpt = None,
    classes: ClassesOpt = None,
    sources: SourcesOpt = "wordnet,text",
    hierarchy: HierarchyOpt = "auto",
    taxonomy: TaxonomyOpt = None,
    hierarchy_sim: HierarchySimOpt = "path",
    tau: TauOpt = 2.0,
    strict: StrictOpt = False,
    lenient: LenientOpt = False,
    encoder: EncoderOpt = None,
    text_head: TextHeadOpt = "none",
    head_steps: HeadStepsOpt = 200,
    head_hidden: HeadHiddenOpt = 192,
    head_lr: HeadLrOpt = 2e-3,
    head_temperature: HeadTemperatureOpt = 0.1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    show: ShowOpt = 0,
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

    with one_line():
        config = stage.GraphConfig(
            sources=sources, hierarchy=hierarchy, hierarchy_sim=hierarchy_sim, tau=tau, text_head=text_head,
            head_steps=head_steps, head_hidden=head_hidden, head_lr=head_lr, head_temperature=head_temperature,
            seed=seed, strict=strict)
    table = load_classes(data, classes)
    require_two_classes(table.names, str(classes) if classes is not None else f"--data {data}")
    with one_line():
        config = config.resolved(taxonomy is not None, table.synsets, table.parents)
    if lenient:
        console.warn("--lenient is deprecated and has no effect: a class without a place in the hierarchy gets a "
                     "warning by default (--strict makes it an error)")
    use_h, mode = "hierarchy" in config.sources, config.hierarchy
    target = artifact_dir(out, data) / "graph.h5"
    inputs: dict[str, str] = {"classes": table.fingerprint()}
    if use_h and mode == "taxonomy" and taxonomy is not None:
        inputs["taxonomy"] = store.fingerprint_file(taxonomy)
    if config.needs_wordnet:
        from ..sideinfo import wordnet_fingerprint

        # the WordNet release and the name-resolution rules: the class names are in inputs["classes"]
        inputs["wordnet"] = f"{wordnet_fingerprint()}/names-{stage.NAME_RULES_VERSION}"
    enc_dir = encoder_dir(encoder) if config.needs_encoder else None
    if enc_dir is not None:
        inputs["encoder"] = encoder_fingerprint(enc_dir)
    if not force and store.is_up_to_date(target, "graph", config.params(), inputs):
        if strict:
            with store.open_artifact(target, "graph") as art, one_line():
                stage.check_strict(table.source, art.json_attr("table_problems", []),
                                   art.json_attr("unknown_hierarchy", []), mode,
                                   str(taxonomy) if taxonomy is not None else None)
        console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
        return

    dev = resolve_device(device) if enc_dir is not None else "cpu"
    with one_line():
        res = stage.run_build_graph(
            config, table, wn=_wordnet() if config.needs_wordnet else None,
            encoder=_encoder(str(enc_dir), dev) if enc_dir is not None else None,
            taxonomy=read_taxonomy(taxonomy) if use_h and mode == "taxonomy" and taxonomy is not None else None,
            taxonomy_source=str(taxonomy) if taxonomy is not None else None, device=dev, phase=progress_bar,
            note=lambda level, text: getattr(console, level)(text))
    g = res.graphs
    data_out: dict[str, Any] = {
        "classes": res.classes, "S_w": g.S_w, "S_l": g.S_l, "S_t": g.S_t, "hierarchy_known": res.hierarchy_known,
        "descriptions": res.descriptions, "description_source": res.description_source,
        "label_embeddings": res.label_embeddings,
    }
    fp = store.write_artifact(target, "graph", data_out, config.params(), inputs, res.attrs)
    if show > 0:
        console.table(f"nearest classes by S_t ({config.strategy})", ["class", "nearest"], nearest_rows(res, show))
    console.info(f"{target}: {summary_line(res, config)} (fingerprint {fp[:12]})")


def nearest_rows(res: Any, k: int) -> list[list[str]]:
    """Per class its ``k`` nearest classes by S_t, with the similarity."""
    names, S_t = res.classes, res.graphs.S_t
    k = min(k, len(names) - 1)
    rows = []
    for i, name in enumerate(names):
        order = [j for j in np.argsort(-S_t[i], kind="stable") if j != i][:k]
        rows.append([name, ", ".join(f"{names[j]} ({S_t[i, j]:.2f})" for j in order)])
    return rows


def summary_line(res: Any, config: Any) -> str:
    C = len(res.classes)
    parts = [f"{C} classes", f"S_t = {config.strategy.replace('+', ' + ')}"]
    if res.hierarchy_known is not None:
        parts.append(f"S_w from {config.hierarchy} ({int(res.hierarchy_known.sum())}/{C} placed, "
                     f"{config.hierarchy_sim})")
    if res.description_source is not None:
        counts = {s: res.description_source.count(s) for s in ("user", "wordnet", "name")
                  if res.description_source.count(s)}
        parts.append("descriptions " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    head = res.text_head
    if head:
        parts.append(f"bilstm head eval loss {head['eval_loss_before']:.3f} -> {head['eval_loss_after']:.3f}")
    return "; ".join(parts)
