"""``sinet make-prototypes``: features.h5 + graph.h5 -> prototypes.h5 + prototypes.faiss (eq. 4-5)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import DataOpt, DeviceOpt, ForceOpt, OutOpt, WaitOpt, artifact_dir, resolve_device
from ..errors import SinetError
from ..locks import Plan, locked
from ..progress import progress_bar

PANEL_INIT = "Initial prototypes"
PANEL_EQ4 = "Consistency (eq. 4)"
PANEL_EQ5 = "Prototypes (eq. 5)"


def _rows_equal(art: store.Artifact, name: str, value: str, chunk: int) -> np.ndarray:
    ds = art.dataset(name)  # raw bytes: no per-row decoding
    n = art.dims["N"]
    mask = np.zeros(n, dtype=bool)
    step = max(chunk, 65536)
    for start in range(0, n, step):
        block = np.asarray(ds[start : start + step])
        mask[start : start + len(block)] = (block == value.encode()) | (block == value)
    return mask


def train_mask(art: store.Artifact, chunk: int, subset: str = "all") -> np.ndarray:
    """Rows of the train split (every row when the file records no splits), restricted to rows of
    ``subset`` (features.h5 ``subset``, e.g. Clothing1M's ``clean``) unless it is ``all``."""
    n = art.dims["N"]
    mask = _rows_equal(art, "splits", "train", chunk) if "splits" in art else np.ones(n, dtype=bool)
    if subset != "all":
        if "subset" not in art:
            raise SinetError(f"{art.path}: --prototypes-from {subset}: the file records no subsets "
                             "(only Clothing1M and WebVision readers write them)")
        mask &= _rows_equal(art, "subset", subset, chunk)
    return mask


def row_source(art: store.Artifact, chunk: int, cache_mb: float = 0):
    """A callable the stage calls once per pass: streams ``features`` in blocks of ``chunk`` rows.

    The raw blocks of the first pass are kept in memory while they fit in ``cache_mb`` megabytes,
    so later passes replay them instead of re-reading the file; past the cap nothing is cached
    and every pass streams from disk (memory stays bounded either way).
    """
    cap = cache_mb * 2**20
    cache: list[tuple[int, np.ndarray]] = []
    state = {"complete": False, "bytes": 0, "overflow": cap <= 0}

    def source():
        if state["complete"]:
            yield from cache
            return
        # the next block is read while the stage computes on this one (passes past the cache's cap)
        for start, rows in art.iter_rows(["features"], chunk, prefetch=True):
            block = rows["features"]
            if not state["overflow"]:
                if state["bytes"] + block.nbytes <= cap:
                    cache.append((start, block))
                    state["bytes"] += block.nbytes
                else:
                    state["overflow"] = True
                    cache.clear()
            yield start, block
        state["complete"] = not state["overflow"]

    return source


def labeled_confidence(art: store.Artifact, labels: np.ndarray, chunk: int) -> np.ndarray:
    """p(y_i | x_i) from the stored ``probs`` (one streamed pass)."""
    conf = np.empty(len(labels), dtype=np.float32)
    lab = np.clip(labels, 0, None)
    for start, rows in art.iter_rows(["probs"], chunk):
        p = rows["probs"]
        conf[start : start + len(p)] = np.take_along_axis(p, lab[start : start + len(p), None], 1)[:, 0]
    return conf


def build_index(prototypes: np.ndarray, device: str):
    """Exact inner-product index over the (unit) prototypes: nearest by IP = nearest by L2.
    Built on the GPU when faiss-gpu and CUDA are present (the store writes it back as CPU)."""
    import faiss

    index = faiss.IndexFlatIP(prototypes.shape[1])
    if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(np.ascontiguousarray(prototypes, dtype=np.float32))
    return index


def check_classes(features_path: Path, f_classes: np.ndarray, other_path: Path, o_classes: np.ndarray) -> None:
    if len(f_classes) != len(o_classes):
        raise SinetError(
            f"{features_path} has {len(f_classes)} classes but {other_path} has {len(o_classes)}; "
            "rebuild one of them for the same class table"
        )
    diff = np.flatnonzero(np.asarray(f_classes) != np.asarray(o_classes))
    if len(diff):
        i = int(diff[0])
        raise SinetError(
            f"{features_path} and {other_path} disagree on class {i}: {f_classes[i]!r} vs {o_classes[i]!r} "
            f"({len(diff)} classes differ); rebuild one of them for the same class table"
        )


def format_detection(name: str, m: dict | None) -> str:
    if not m:
        return ""
    return f"{name} ROC-AUC {m['roc_auc']:.4f} AP {m['average_precision']:.4f}"


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
    from stages import score_noise as scoring

    folder = artifact_dir(out, data)
    features_path = features or folder / "features.h5"
    graph_path = graph or folder / "graph.h5"
    target = folder / "prototypes.h5"
    index_path = folder / "prototypes.faiss"
    if init_source not in ("auto", "probs", "probe"):
        raise SinetError(f"--init-source {init_source!r}: choose auto, probs or probe")
    if chunk_rows < 1:
        raise SinetError("--chunk-rows must be >= 1")
    cfg = stage.PrototypeConfig(
        init_topk=init_topk, topk=topk, psi=psi, temperature=temperature, gamma=gamma, eps=eps,
        weighting=weighting, per_class=per_class, rounds=rounds, probe_rows=probe_rows,
        probe_epochs=probe_epochs, probe_lr=probe_lr, seed=seed,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise SinetError(f"make-prototypes: {e}") from None

    feats = store.open_artifact(features_path, "features")
    try:
        with store.open_artifact(graph_path, "graph") as g:
            check_classes(features_path, feats.read("classes"), graph_path, g.read("classes"))
            S_t = g.read("S_t").astype(np.float32)
            graph_fp = g.fingerprint
        has_probs = "probs" in feats
        if init_source == "probs" and not has_probs:
            raise SinetError(f"--init-source probs: {features_path} stores no probs (extract with --probs, or use probe)")
        source_used = "probs" if (init_source == "probs" or (init_source == "auto" and has_probs)) else "probe"
        params = {k: v for k, v in cfg.__dict__.items()}
        params["init_source"] = source_used
        if prototypes_from != "all":
            params["prototypes_from"] = prototypes_from
        if source_used == "probs":  # the probe's options do not change the output
            for k in ("probe_rows", "probe_epochs", "probe_lr", "probe_batch", "probe_scale"):
                params.pop(k)
        inputs = {"features": feats.fingerprint, "graph": graph_fp}
        if not force and store.is_up_to_date(target, "prototypes", params, inputs) and \
                store.outputs_current(target, [target, index_path]):
            console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
            return
        dev = resolve_device(device)
        t0 = time.perf_counter()
        train = train_mask(feats, chunk_rows, prototypes_from)
        labels_all = feats.read("labels").astype(np.int64)
        labels = np.where(train, labels_all, -1)
        if not train.any():
            raise SinetError(f"{features_path}: no rows in the train split"
                             f"{'' if prototypes_from == 'all' else f' of subset {prototypes_from!r}'} to build prototypes from")
        confidence = labeled_confidence(feats, labels, chunk_rows) if source_used == "probs" else None
        n = feats.dims["N"]
        with progress_bar("make-prototypes", n * stage.count_passes(cfg)) as advance:
            try:
                source = row_source(feats, chunk_rows, cache_mb)
                result = stage.make_prototypes(source, labels, S_t, cfg,
                                               confidence=confidence, device=dev, progress=advance)
            except ValueError as e:
                raise SinetError(f"{features_path}: {e}") from None
        seconds = time.perf_counter() - t0
        classes = feats.read("classes")
        for c in result.empty_classes:
            console.warn(f"class {classes[c]!r} has no training image in {features_path}; its prototype is zero")

        detection = {}
        if "clean_labels" in feats:
            clean = feats.read("clean_labels")
            known = scoring.noise_mask(labels_all, clean)[0] & train
            if known.any():
                p = np.nan_to_num(result.consistency, nan=0.0)
                detection["consistency"] = scoring.detection_metrics(labels_all, clean, -p, train)
                dist = np.full(n, np.nan, dtype=np.float32)
                index = build_index(result.prototypes, "cpu")
                slots = scoring.class_slots(result.prototype_class, len(classes))
                for start, block in source():
                    k = known[start : start + len(block)]
                    if k.any():
                        b = scoring.score_block(block[k], labels_all[start : start + len(k)][k],
                                                result.prototypes, slots, result.prototype_class, index,
                                                device=dev)
                        dist[start : start + len(k)][k] = b.distance
                detection["distance"] = scoring.detection_metrics(labels_all, clean, dist, known)

        writer = store.ArtifactWriter(target, "prototypes", params, inputs, mode="new")
        try:
            writer.write("classes", classes)
            writer.write("prototypes", result.prototypes)
            writer.write("prototype_class", result.prototype_class)
            writer.write("initial_prototypes", result.initial_prototypes)
            for start, rows in feats.iter_rows(["ids"], max(chunk_rows, 65536)):
                sl = slice(start, start + len(rows["ids"]))
                t = train[sl]
                if t.any():
                    writer.append_rows({
                        "ids": rows["ids"][t],
                        "consistency": result.consistency[sl][t].astype(np.float32),
                        "selected": result.selected[sl][t].astype(np.int8),
                    })
            writer.set_attr("init_source", result.init_source)
            writer.set_attr("probe", result.probe)
            writer.set_attr("empty_classes", [str(classes[c]) for c in result.empty_classes])
            writer.set_attr("detection", detection)
            writer.set_attr("seconds", round(seconds, 3))
            writer.set_attr("device", dev)
            index_tmp = store.write_faiss_index(index_path, build_index(result.prototypes, dev), stage=True)
            fp = writer.commit(rename=False)
        except BaseException:
            writer.abort()
            raise
        # prototypes.h5 and prototypes.faiss together: a kill between the renames is completed by the next run
        store.commit_outputs(target, {target: writer.partial, index_path: index_tmp}, params, inputs)
    finally:
        feats.close()
    n_sel = int(result.selected.sum())
    msg = (f"{target}: {len(result.prototypes)} prototypes ({per_class}/class) from {int(train.sum())} training "
           f"images, {n_sel} selected, init from {result.init_source}, {seconds:.1f}s (fingerprint {fp[:12]})")
    if detection:
        parts = [format_detection(k, v) for k, v in detection.items() if v]
        msg += f"; noise detection on train ({detection['consistency']['noise_rate']:.0%} noisy): " + ", ".join(parts)
    console.info(msg)
