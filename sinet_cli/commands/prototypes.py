"""``sinet make-prototypes``: features.h5 + graph.h5 -> prototypes.h5 + prototypes.faiss (eq. 4-5)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import DataOpt, DeviceOpt, ForceOpt, OutOpt, WaitOpt, artifact_dir, build_config, resolve_device
from ..errors import SinetError
from ..locks import Plan, locked
from ..progress import progress_bar

PANEL_INIT = "Initial prototypes"
PANEL_EQ4 = "Consistency (eq. 4)"
PANEL_EQ5 = "Prototypes (eq. 5)"
CLASS_FIX = "rebuild one of them for the same class table"


def format_detection(name: str, m: dict | None) -> str:
    if not m:
        return ""
    return f"{name} ROC-AUC {m['roc_auc']:.4f} AP {m['average_precision']:.4f}"


def detection(feats: store.Artifact, result, labels: np.ndarray, train: np.ndarray, source, device: str) -> dict:
    """Where features.h5 knows the clean labels (the demos): how well the consistency p_i (eq. 4) and
    the distance to the own class's prototype (eq. 6's d_i, as score-noise computes it) find the
    noisy training labels."""
    from stages import score_noise as scoring

    if "clean_labels" not in feats:
        return {}
    clean = feats.read("clean_labels")
    known = scoring.noise_mask(labels, clean)[0] & train
    if not known.any():
        return {}
    p = np.nan_to_num(result.consistency, nan=0.0)
    found = {"consistency": scoring.detection_metrics(labels, clean, -p, train)}
    dist = np.full(len(labels), np.nan, dtype=np.float32)
    index = store.prototype_index(result.prototypes, "cpu")
    slots = scoring.class_slots(result.prototype_class, len(result.initial_prototypes))
    for start, block in source():
        k = known[start : start + len(block)]
        if k.any():
            b = scoring.score_block(block[k], labels[start : start + len(k)][k], result.prototypes, slots,
                                    result.prototype_class, index, device=device)
            dist[start : start + len(k)][k] = b.distance
    found["distance"] = scoring.detection_metrics(labels, clean, dist, known)
    return found


def summary(target: Path, result, cfg, n_train: int, seconds: float, fp: str, found: dict) -> str:
    msg = (f"{target}: {len(result.prototypes)} prototypes ({cfg.per_class}/class) from {n_train} training "
           f"images, {int(result.selected.sum())} selected, init from {result.init_source}, {seconds:.1f}s "
           f"(fingerprint {fp[:12]})")
    if found:
        parts = [format_detection(k, v) for k, v in found.items() if v]
        msg += f"; noise detection on train ({found['consistency']['noise_rate']:.0%} noisy): " + ", ".join(parts)
    return msg


def _plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    target = folder / "prototypes.h5"
    return Plan(writes=[target], reads=[a["features"] or folder / "features.h5", a["graph"] or folder / "graph.h5"],
                wait=a["wait"], units=[target],
                resume=f"{target} and prototypes.faiss are unchanged; run the same command again")


@app.command("make-prototypes")
@locked("make-prototypes", _plan)
def make_prototypes(
    data: DataOpt = None,
    features: Annotated[
        Optional[Path], typer.Option(help="features.h5 (default: <artifact folder>/features.h5).", rich_help_panel="Artifacts")
    ] = None,
    graph: Annotated[
        Optional[Path], typer.Option(help="graph.h5 (default: <artifact folder>/graph.h5).", rich_help_panel="Artifacts")
    ] = None,
    init_source: Annotated[
        str,
        typer.Option(help="Confidence that ranks the initial top-k: auto (stored probs when present, else probe), "
                     "probs or probe.", rich_help_panel=PANEL_INIT),
    ] = "auto",
    init_topk: Annotated[
        float,
        typer.Option(help="Images per class averaged into the initial prototype, ranked by confidence: a fraction "
                     "of the class (<= 1) or a count (> 1). 0.5 = the confident half, which stays mostly clean "
                     "as long as noise is below 50% per class (the premise of learning from noisy labels).",
                     rich_help_panel=PANEL_INIT),
    ] = 0.5,
    probe_rows: Annotated[
        int, typer.Option(help="Linear probe: seeded class-stratified subsample it is fitted on (and ranks).",
                          rich_help_panel=PANEL_INIT)
    ] = 5000,
    probe_epochs: Annotated[
        int, typer.Option(help="Linear probe: Adam epochs from the class-mean classifier (0 = that classifier).",
                          rich_help_panel=PANEL_INIT)
    ] = 1,
    probe_lr: Annotated[float, typer.Option(help="Linear probe: learning rate.", rich_help_panel=PANEL_INIT)] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the subsample, the probe and k-means.", rich_help_panel=PANEL_INIT)] = 0,
    psi: Annotated[
        str, typer.Option(help="Normalization psi of eq. 4: softmax (with --temperature) or l2 (unit vector, squared).",
                          rich_help_panel=PANEL_EQ4)
    ] = "softmax",
    temperature: Annotated[float, typer.Option(help="Softmax temperature of psi.", rich_help_panel=PANEL_EQ4)] = 0.1,
    gamma: Annotated[float, typer.Option(help="Contrast exponent gamma of eq. 4.", rich_help_panel=PANEL_EQ4)] = 1.0,
    eps: Annotated[float, typer.Option(help="epsilon of eq. 4 (keeps p finite when KL = 0).", rich_help_panel=PANEL_EQ4)] = 1e-3,
    topk: Annotated[
        float, typer.Option(help="Images per class in eq. 5, ranked by consistency p_i: a fraction (<= 1) or a count.",
                            rich_help_panel=PANEL_EQ5)
    ] = 0.5,
    weighting: Annotated[
        str, typer.Option(help="consistency (eq. 5, p-weighted) or constant (plain mean; table 3).", rich_help_panel=PANEL_EQ5)
    ] = "consistency",
    per_class: Annotated[
        int, typer.Option(help="Prototypes per class (weighted k-means of the selected images).", rich_help_panel=PANEL_EQ5)
    ] = 1,
    rounds: Annotated[
        int, typer.Option(help="Rebuild this many times, each round starting from the previous prototypes.",
                          rich_help_panel=PANEL_EQ5)
    ] = 1,
    prototypes_from: Annotated[
        str, typer.Option(help="Build from the train rows of this subset only: all, or a subset recorded in "
                          "features.h5, e.g. clean (Clothing1M's clean train set, the paper's table 8).",
                          rich_help_panel=PANEL_INIT)
    ] = "all",
    chunk_rows: Annotated[int, typer.Option(help="Rows per streamed block.", rich_help_panel="Compute")] = 16384,
    cache_mb: Annotated[
        float, typer.Option(help="Keep the feature blocks in memory between passes when they fit in this many MB "
                            "(0: stream every pass from disk).", rich_help_panel="Compute")
    ] = 1024,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Build visual prototypes: initial prototypes from confident images, consistency p_i of every
    training image with the class relation graph (eq. 4), p-weighted top-K means (eq. 5).

    Example: sinet make-prototypes --data demo
    """
    from stages import make_prototypes as stage

    if chunk_rows < 1:
        raise SinetError("--chunk-rows must be >= 1")
    cfg = build_config(stage.PrototypeConfig, "make-prototypes", init_source=init_source, init_topk=init_topk,
                       topk=topk, psi=psi, temperature=temperature, gamma=gamma, eps=eps, weighting=weighting,
                       per_class=per_class, rounds=rounds, probe_rows=probe_rows, probe_epochs=probe_epochs,
                       probe_lr=probe_lr, seed=seed, prototypes_from=prototypes_from)
    folder = artifact_dir(out, data)
    features_path, graph_path = features or folder / "features.h5", graph or folder / "graph.h5"
    target, index_path = folder / "prototypes.h5", folder / "prototypes.faiss"
    with store.open_artifact(features_path, "features") as feats:
        graph = store.read_graph(graph_path)
        store.check_classes(features_path, feats.read("classes"), graph.path, graph.classes, CLASS_FIX)
        try:
            source_used = cfg.resolve_init_source("probs" in feats)
        except ValueError as e:
            raise SinetError(f"{features_path}: {e}") from None
        params = cfg.provenance(source_used)
        inputs = {"features": feats.fingerprint, "graph": graph.fingerprint}
        if not force and store.is_up_to_date(target, "prototypes", params, inputs, unit=target, files=[index_path]):
            console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
            return
        dev = resolve_device(device)
        t0 = time.perf_counter()
        train = store.train_mask(feats, chunk_rows, prototypes_from)
        labels_all = feats.read("labels").astype(np.int64)
        labels = np.where(train, labels_all, -1)
        if not train.any():
            raise SinetError(f"{features_path}: no rows in the train split"
                             f"{'' if prototypes_from == 'all' else f' of subset {prototypes_from!r}'} to build prototypes from")
        confidence = store.labeled_confidence(feats, labels, chunk_rows) if source_used == "probs" else None
        source = store.feature_blocks(feats, chunk_rows, cache_mb)
        with progress_bar("make-prototypes", feats.dims["N"] * stage.count_passes(cfg)) as advance:
            try:
                result = stage.make_prototypes(source, labels, graph.S_t, cfg, confidence=confidence, device=dev,
                                               progress=advance)
            except ValueError as e:
                raise SinetError(f"{features_path}: {e}") from None
        seconds = time.perf_counter() - t0
        for c in result.empty_classes:
            console.warn(f"class {graph.classes[c]!r} has no training image in {features_path}; its prototype is zero")
        found = detection(feats, result, labels_all, train, source, dev)
        attrs = {"init_source": result.init_source, "probe": result.probe, "detection": found, "device": dev,
                 "empty_classes": [str(graph.classes[c]) for c in result.empty_classes], "seconds": round(seconds, 3)}
        fp = store.write_prototypes(target, index_path, feats, result, train, params, inputs, attrs, dev, chunk_rows)
    console.info(summary(target, result, cfg, int(train.sum()), seconds, fp, found))
