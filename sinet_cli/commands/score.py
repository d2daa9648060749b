"""``sinet score-noise``: prototypes + features.h5 -> scores.h5 + suspects.tsv (eq. 6).

Streams features.h5 block by block (memory does not grow with N beyond a few N-length numeric
arrays). Incremental for cron: when scores.h5 exists for the same prototypes and options, only
ids not yet scored are scored and appended. A lock (``scores.h5.lock``) keeps concurrent runs
from interleaving.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import DataOpt, DeviceOpt, ForceOpt, OutOpt, artifact_dir, resolve_device
from ..locks import Plan, file_lock, locked
from ..errors import SinetError
from ..progress import progress_bar
from .extract import DEFAULT_PART_ROWS, RayAddressOpt, check_engine

PANEL_EQ6 = "Weighting (eq. 6)"
PANEL_FUSED = "Scoring beyond eq. 6 (--score fused)"
SUSPECT_COLUMNS = ("id", "path", "label", "suggested_class", "suggested_confidence", "weight", "distance")


# At most this many prototypes, the per-block products are short and score-noise runs them on one
# thread on a 2-thread machine; with more they are long regions that gain from every thread
# (bench/bench_score_noise.py).
SERIAL_MAX_PROTOTYPES = 64


# -- ids -----------------------------------------------------------------------------------------


def id_hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit polynomial hashes of string ids, vectorized over the UCS-4 code points (no Python
    loop over rows). Two distinct ids collide with probability about 2^-64 per pair."""
    a = np.asarray(ids).astype(str)
    if a.size == 0:
        return np.zeros(0, dtype=np.uint64)
    width = a.dtype.itemsize // 4
    codes = a.view(np.uint32).reshape(len(a), width).astype(np.uint64)
    h = np.full(len(a), 0xCBF29CE484222325, dtype=np.uint64)
    mult = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(width):
            col = codes[:, j]
            h = np.where(col != 0, (h ^ col) * mult, h)  # NUL only pads: ids of any width agree
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


# -- suspects.tsv ----------------------------------------------------------------------------


def _clean_field(values: np.ndarray) -> list[str]:
    strs = np.asarray(values).astype(str).tolist()  # one C loop, not a str() call per row
    blob = "".join(strs)  # one scan: fields almost never hold a tab or a line break
    if "\t" in blob or "\n" in blob or "\r" in blob:
        return [v.replace("\t", " ").replace("\n", " ").replace("\r", " ") for v in strs]
    return strs


def write_suspects(
    scores_path: Path,
    out_path: Path,
    order: np.ndarray,
    labels: np.ndarray,
    suggested_class: np.ndarray,
    suggested_confidence: np.ndarray,
    weight: np.ndarray,
    distance: np.ndarray,
    classes: np.ndarray,
    chunk: int,
    stage: bool = False,
) -> Path:
    """Write the rows ``order`` of scores.h5 to a TSV in that order, in bounded memory (``stage``:
    left at its temporary name, returned, for store.commit_outputs).

    Lines are formatted block by block in file order into a scratch file, with each line's byte
    offset recorded by its rank; the final file is then assembled in rank order by vectorized
    gathers from a memory map of the scratch file.
    """
    rank = np.full(len(weight), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    offsets = np.zeros(len(order), dtype=np.int64)
    lengths = np.zeros(len(order), dtype=np.int64)
    names = np.asarray(_clean_field(classes), dtype=object)
    scratch = out_path.with_name(out_path.name + ".scratch")
    partial = out_path.with_name(out_path.name + store.PARTIAL_SUFFIX)
    try:
        pos = 0
        with open(scratch, "wb") as f, store.open_artifact(scores_path, "scores") as art:
            cols = ["ids"] + (["paths"] if "paths" in art else [])
            for start, rows in art.iter_rows(cols, chunk):
                r = rank[start : start + len(rows["ids"])]
                sel = np.flatnonzero(r >= 0)
                if len(sel) == 0:
                    continue
                g = start + sel
                paths = _clean_field(rows["paths"][sel]) if "paths" in rows else [""] * len(sel)
                lines = [line.encode() for line in suspect_lines(
                    _clean_field(rows["ids"][sel]), paths, labels[g], suggested_class[g], suggested_confidence[g],
                    weight[g], distance[g], names)]
                blob = b"".join(lines)
                lens = np.fromiter((len(x) for x in lines), dtype=np.int64, count=len(lines))
                offsets[r[sel]] = pos + np.concatenate([[0], np.cumsum(lens)[:-1]])
                lengths[r[sel]] = lens
                f.write(blob)
                pos += len(blob)
        with open(partial, "wb") as out:
            out.write(("\t".join(SUSPECT_COLUMNS) + "\n").encode())
            if pos:
                mm = np.memmap(scratch, dtype=np.uint8, mode="r")
                step = 65536
                for i in range(0, len(order), step):
                    o, n = offsets[i : i + step], lengths[i : i + step]
                    if len(n) == 0:
                        continue
                    ends = np.cumsum(n)
                    idx = np.repeat(o - (ends - n), n) + np.arange(ends[-1])
                    out.write(mm[idx].tobytes())
                del mm
        if not stage:
            os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        scratch.unlink(missing_ok=True)
    return partial if stage else out_path


# -- the command -----------------------------------------------------------------------------


def _plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    target = folder / "scores.h5"
    proto = a["prototypes"] or folder / "prototypes.h5"
    reads = [a["features"] or folder / "features.h5", proto, a["graph"] or folder / "graph.h5"]
    return Plan(writes=[target], reads=reads, wait=a["wait"], units=[target],
                resume=f"{target} and suspects.tsv are unchanged; run the same command again")


FeaturesOpt = Annotated[Optional[Path], typer.Option(
    help="features.h5 to score (default: <artifact folder>/features.h5).", rich_help_panel="Artifacts")]
PrototypesOpt = Annotated[Optional[Path], typer.Option(
    help="prototypes.h5, with prototypes.faiss beside it (default: <artifact folder>/prototypes.h5).",
    rich_help_panel="Artifacts")]
AlphaOpt = Annotated[float, typer.Option(
    help="Shift alpha of eq. 6: distances >= alpha get weight 0 (table 4).", rich_help_panel=PANEL_EQ6)]
BetaOpt = Annotated[float, typer.Option(help="Contrast beta of eq. 6 (table 5).", rich_help_panel=PANEL_EQ6)]
ScoreOpt = Annotated[str, typer.Option(
    help="fused (default): p(label|x) of a reweighted out-of-fold linear probe times an open-set factor from "
    "eq. 6's distance to the own prototype (and, with side text, the caption's class share); docs/method.md. "
    "paper: eq. 6 alone (the noise estimate, flags and suggestions still come from the probe: "
    "docs/noise-estimate.md).", rich_help_panel=PANEL_FUSED)]
QuantileOpt = Annotated[float, typer.Option(
    help="--score fused: t_c is this quantile of the own-prototype distances of class c's rows the probe agrees "
    "with; o = 1 up to t_c, then eq. 6 relative to w(t_c).", rich_help_panel=PANEL_FUSED)]
TemperatureOpt = Annotated[float, typer.Option(
    help="--score fused --probe-rows 0: softmax temperature T over cosine similarities (the prototype share "
    "replaces the probe).", rich_help_panel=PANEL_FUSED)]
BackgroundOpt = Annotated[Optional[float], typer.Option(
    help="--score fused --probe-rows 0: cosine b of the share's background column (default 1 - alpha^2/2, where "
    "eq. 6 reaches 0).", rich_help_panel=PANEL_FUSED)]
ProbeRowsOpt = Annotated[int, typer.Option(
    help="Sample of training rows the probe is fitted on, and the noise estimate made on (0 = no probe: --score "
    "fused uses the prototype share instead, and there is no noise estimate, flag or suggestion).",
    rich_help_panel=PANEL_FUSED)]
ProbeFoldsOpt = Annotated[int, typer.Option(help="Probe folds (out-of-fold p).", rich_help_panel=PANEL_FUSED)]
ProbeEpochsOpt = Annotated[int, typer.Option(
    help="Epochs of the probe's first round (the reweighted second round runs half as many).",
    rich_help_panel=PANEL_FUSED)]
ImageTextOpt = Annotated[Optional[bool], typer.Option(
    "--image-text/--no-image-text", help="--score fused: also fuse the agreement of each image's side text with "
    "its labeled class (features.h5 side_text vs graph.h5 label_embeddings). Default: on when features.h5 has "
    "side text (and graph.h5 label embeddings).", show_default=False, rich_help_panel=PANEL_FUSED)]
TextTemperatureOpt = Annotated[float, typer.Option(
    help="Side text: softmax temperature over cos(text, class).", rich_help_panel=PANEL_FUSED)]
TextFloorOpt = Annotated[float, typer.Option(
    help="Side text: the caption factor is floor + (1 - floor) x the caption's class share (0.5: a caption is as "
    "likely unrelated to the image as informative).", rich_help_panel=PANEL_FUSED)]
GraphOpt = Annotated[Optional[Path], typer.Option(
    help="Side text: graph.h5 with label_embeddings (default: <artifact folder>/graph.h5).",
    rich_help_panel="Artifacts")]
EncoderOpt = Annotated[Optional[Path], typer.Option(
    help="Side text: sentence encoder folder (default: the one build-graph uses).", rich_help_panel="Artifacts")]
MaxSuspectsOpt = Annotated[int, typer.Option(
    help="Rows in suspects.tsv (the flagged rows, worst first); 0 = all of them.", rich_help_panel="Artifacts")]
ScoreWaitOpt = Annotated[float, typer.Option(
    help="Seconds to wait for another score-noise run on the same scores.h5.", rich_help_panel="Artifacts")]
ChunkRowsOpt = Annotated[int, typer.Option(help="Rows per streamed block.", rich_help_panel="Compute")]
ScoreEngineOpt = Annotated[str, typer.Option(
    "--engine", help="local (this process) or ray: the state is fitted here, the rows are scored as Ray tasks "
    "of --part-rows rows each, on a local Ray cluster or the one at --ray-address (the artifact folder on a file "
    "system every node sees); needs pip install 'sinet\\[ray]' (docs/ray.md).", rich_help_panel="Compute")]
ScoreRayRetriesOpt = Annotated[int, typer.Option(
    "--ray-retries", help="--engine ray: retries of a task whose worker died; a part failing after them fails the "
    "run, scores.h5 unchanged.", rich_help_panel="Compute")]
ScorePartRowsOpt = Annotated[int, typer.Option(
    "--part-rows", help="--engine ray: rows per task (rounded up to whole --chunk-rows blocks).",
    rich_help_panel="Compute")]


@app.command("score-noise")
@locked("score-noise", _plan)
def score_noise(
    data: DataOpt = None, features: FeaturesOpt = None, prototypes: PrototypesOpt = None,
    alpha: AlphaOpt = 1.2, beta: BetaOpt = 1.5, score: ScoreOpt = "fused", open_set_quantile: QuantileOpt = 0.99,
    temperature: TemperatureOpt = 0.02, background: BackgroundOpt = None, probe_rows: ProbeRowsOpt = 20000,
    probe_folds: ProbeFoldsOpt = 5, probe_epochs: ProbeEpochsOpt = 10, image_text: ImageTextOpt = None,
    text_temperature: TextTemperatureOpt = 0.05, text_floor: TextFloorOpt = 0.5, graph: GraphOpt = None,
    encoder: EncoderOpt = None, max_suspects: MaxSuspectsOpt = 100000, wait: ScoreWaitOpt = 0.0,
    chunk_rows: ChunkRowsOpt = 16384, device: DeviceOpt = "auto", engine: ScoreEngineOpt = "local",
    ray_address: RayAddressOpt = None, ray_retries: ScoreRayRetriesOpt = 3, part_rows: ScorePartRowsOpt = DEFAULT_PART_ROWS,
    out: OutOpt = None, force: ForceOpt = False,
) -> None:
    """Weight every image by how likely its label is right: by default a reweighted out-of-fold
    probe times an open-set factor from its distance to its class prototype (eq. 6); --score paper
    gives eq. 6 alone. Estimate the noise rate of every class, flag the images likeliest mislabeled
    (as many as the estimate expects), suggest a class for each image, and list the flagged ones worst
    first (docs/noise-estimate.md). Re-running on a grown features.h5 scores only the new ids (cron);
    new prototypes rescore everything.

    Example: sinet score-noise --data demo --alpha 1.2 --beta 1.5
    """
    from stages.score_noise import ScoreConfig

    if chunk_rows < 1:
        raise SinetError("--chunk-rows must be >= 1")
    check_engine(engine)
    try:
        config = ScoreConfig(alpha=alpha, beta=beta, score=score, open_set_quantile=open_set_quantile,
                             temperature=temperature, background=background, probe_rows=probe_rows,
                             probe_folds=probe_folds, probe_epochs=probe_epochs, image_text=image_text,
                             text_temperature=text_temperature, text_floor=text_floor)
    except ValueError as e:
        raise SinetError(f"score-noise: {e}") from None
    run_score_noise(artifact_dir(out, data), config, features=features, prototypes=prototypes, graph=graph,
                    encoder=encoder, max_suspects=max_suspects, chunk_rows=chunk_rows, wait=wait, device=device,
                    force=force, ray_opts=None if engine == "local" else {
                        "address": ray_address, "retries": ray_retries, "part_rows": part_rows})


@dataclass
class SideText:
    """The side text of a run: the encoder, the classes' label embeddings, and the caption shares of
    the fit's sample rows (encoded once, reused by the scoring pass)."""

    encoder: Any
    label_embeddings: np.ndarray
    encoder_path: str | None = None  # where the encoder was loaded from (None: the default one)
    sample_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sample_shares: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


def run_score_noise(folder: Path, config, *, features: Path | None = None, prototypes: Path | None = None,
                    graph: Path | None = None, encoder: Path | None = None, max_suspects: int = 100000,
                    chunk_rows: int = 16384, wait: float = 0.0, device: str = "auto", force: bool = False,
                    ray_opts: dict | None = None) -> None:
    """score-noise on the artifacts of ``folder`` with ``config`` (stages.score_noise.ScoreConfig):
    scores.h5 + suspects.tsv, or only the ids scores.h5 lacks when it was made with the same options
    and prototypes (rescore calls this too). ``ray_opts`` (address, retries, part_rows): the state is
    fitted here, the rows are scored as Ray tasks (``--engine ray``, engines.ray_score)."""
    import dataclasses

    features_path = features or folder / "features.h5"
    proto_path = prototypes or folder / "prototypes.h5"
    index_path = proto_path.with_suffix(".faiss")
    target = folder / "scores.h5"
    suspects_path = folder / "suspects.tsv"
    torn = store.unit_problem(proto_path, [proto_path, index_path], "make-prototypes")
    if torn:
        raise SinetError(torn)
    pa = store.read_prototypes(proto_path)
    classes, protos, proto_fp = pa.classes, np.ascontiguousarray(pa.prototypes), pa.fingerprint
    proto_class = pa.prototype_class.astype(np.int64)
    feats = store.open_artifact(features_path, "features")
    try:
        check_features(feats, features_path, classes, proto_path, protos.shape[1])
        inputs = {"features": feats.fingerprint, "prototypes": proto_fp}
        label_emb = None
        if config.score == "fused":
            label_emb = resolve_image_text(config.image_text, feats, features_path, graph or folder / "graph.h5",
                                           inputs)
        config = dataclasses.replace(config, image_text=label_emb is not None)
        params = config.params()
        if not force and store.is_up_to_date(target, "scores", params, inputs, unit=target, files=[suspects_path]):
            console.info(f"{target}: up to date, nothing to do (use --force to rescore)")
            return
        from stages import score_noise as stage

        dev = resolve_device(device)
        index = store.read_faiss_index(index_path, expected_dim=protos.shape[1], expected_rows=len(protos))
        try:
            stored = index.reconstruct_n(0, index.ntotal)
        except RuntimeError:  # an index type that cannot give its vectors back: trust the dims check
            stored = protos
        if not np.allclose(stored, protos, atol=1e-5):
            raise SinetError(f"{index_path} does not hold the prototypes of {proto_path}; rerun make-prototypes --force")
        try:
            slots = stage.class_slots(proto_class, len(classes))
        except ValueError as e:
            raise SinetError(f"{proto_path}: {e}") from None
        text = None
        if label_emb is not None:
            from ..sideinfo import load_text_encoder

            text = SideText(load_text_encoder(encoder), label_emb,
                            encoder_path=None if encoder is None else os.path.abspath(encoder))
        model = (protos, slots, proto_class, index)
        with file_lock(target, wait, "score-noise"):
            # checked again under the lock: another run may have written it meanwhile
            if not force and store.is_up_to_date(target, "scores", params, inputs, unit=target,
                                                 files=[suspects_path]):
                console.info(f"{target}: up to date, nothing to do (use --force to rescore)")
                return
            state, info = previous_state(stage, target, config, params, proto_fp, force)
            append = state is not None
            import faiss
            import torch

            threads = torch.get_num_threads()
            faiss_threads = faiss.omp_get_max_threads()
            # per block only short products and elementwise ops: with at most 2 threads their parallel
            # regions stall on busy cores, so they run on one (bench/bench_score_noise.py); with more
            # threads they keep them all, as make-prototypes does
            serial = threads <= 2 and len(protos) < SERIAL_MAX_PROTOTYPES and dev == "cpu"
            try:
                if state is None:
                    state = stage.ScoreState()
                    if config.fits_state:  # the probe's fit runs alone, on every thread
                        state, info = fit_state(stage, feats, len(classes), config, model, text, chunk_rows, dev)
                torch.set_num_threads(1 if serial else threads)
                faiss.omp_set_num_threads(1 if serial else faiss_threads)
                run_scoring(stage, feats, features_path, target, suspects_path, model, classes, params, inputs,
                            config, state, info, text, append, max_suspects, chunk_rows, dev,
                            None if ray_opts is None else {**ray_opts, "device": device})
            finally:
                torch.set_num_threads(threads)
                faiss.omp_set_num_threads(faiss_threads)
    finally:
        feats.close()


def check_features(feats, features_path: Path, classes: np.ndarray, proto_path: Path, dim: int) -> None:
    """features.h5 holds the classes and the feature width of the prototypes."""
    store.check_classes(features_path, feats.read("classes"), proto_path, classes,
                        "extract the features and make the prototypes for the same classes")
    if feats.dims["D"] != dim:
        raise SinetError(f"{features_path} holds {feats.dims['D']}-d features but {proto_path} holds {dim}-d "
                         "prototypes; extract both with the same backbone")


def previous_state(stage, target: Path, config, params: dict, proto_fp: str, force: bool):
    """(state, estimate record) stored in ``target`` when its new rows are to be appended to it (same
    options and prototypes), else (None, None): every row is rescored. Says why it rescores."""
    prev = store.read_provenance(target)
    if prev is None and target.exists() and not force:
        console.info(f"{target}: unreadable; rescoring every row with the options given")
    append = (
        not force and prev is not None and prev["kind"] == "scores"
        and prev["schema_version"] == store.SCHEMA_VERSION
        and store.canonical_json(prev["params"]) == store.canonical_json(params)
        and prev["inputs"].get("prototypes") == proto_fp
    )
    # new rows are scored, flagged and given suggestions by the state the existing rows had
    stored = load_state(stage, target, config) if append else None
    if prev is not None and stored is None and not force:
        why = "options changed" if prev["params"] != params else "prototypes changed"
        console.info(f"{target}: {why}; rescoring every row")
    return stored if stored is not None else (None, None)


def fit_state(stage, feats, num_classes: int, config, model: tuple, text: SideText | None, chunk: int, device: str):
    """The run's state (stages.score_noise.fit_score_state) on its seeded sample of labeled train rows,
    gathered in one streamed read, and the estimate's record; with side text, the sample's caption
    shares are encoded here once for the scoring pass."""
    labels = feats.read("labels").astype(np.int64)
    train = feats.read("splits") == "train" if "splits" in feats else np.ones(len(labels), dtype=bool)
    try:
        rows, class_rows = stage.sample_rows(labels, train, num_classes, config)
    except ValueError as e:
        raise SinetError(f"{feats.path}: {e}") from None
    x = feats.take("features", rows, max(chunk, 65536)).astype(np.float32)
    state = stage.fit_score_state(x, labels[rows], rows, class_rows, *model, config, device=device)
    if text is not None and state.probe is not None:
        text.sample_rows = rows
        text.sample_shares = stage.text_shares(text.encoder, read_rows(feats, "side_text", rows, chunk),
                                               text.label_embeddings, labels[rows], config.text_temperature)
    info = stage.estimate_record(state.estimate, state.train_rows) if state.estimate is not None else None
    return state, info


def block_text_shares(stage, text: SideText, side_text: np.ndarray, labels: np.ndarray, block_rows: np.ndarray,
                      temperature: float) -> np.ndarray:
    """The caption shares of one block: the fit's sample rows among them from the sample, the rest encoded."""
    ts = np.full(len(labels), np.nan, dtype=np.float32)
    srows = text.sample_rows
    hit = np.zeros(len(labels), dtype=bool)
    if len(srows):
        pos, hit = store.match_ids(srows, block_rows)
        ts[hit] = text.sample_shares[pos[hit]]
    if (~hit).any():
        ts[~hit] = stage.text_shares(text.encoder, np.asarray(side_text)[~hit], text.label_embeddings, labels[~hit],
                                     temperature)
    return ts


def has_side_text(feats, chunk: int = 65536) -> bool:
    """Whether features.h5 has a side_text column with at least one non-blank value (read block by
    block until the first one)."""
    if "side_text" not in feats:
        return False
    for _, rows in feats.iter_rows(["side_text"], chunk):
        text = np.asarray(rows["side_text"]).astype(str)
        if (np.char.str_len(np.char.strip(text)) > 0).any():
            return True
    return False


def resolve_image_text(image_text: Optional[bool], feats, features_path: Path, graph_path: Path,
                       inputs: dict) -> np.ndarray | None:
    """The label embeddings the side text is compared with, or None when the run goes without side
    text: the flag when given (on: side text and label embeddings must exist), else on exactly when
    features.h5 has side text and graph.h5 has label embeddings (a missing graph.h5 or embeddings is
    said once, and scoring goes on without). On: graph.h5's fingerprint goes into ``inputs``."""
    if image_text is False:
        return None
    if image_text is None and not has_side_text(feats):
        return None
    if image_text and "side_text" not in feats:
        raise SinetError(f"{features_path}: no side_text; --image-text needs image titles/tags")
    if not graph_path.exists() and image_text is None:
        console.warn(f"{features_path} has side text but {graph_path} does not exist; scoring without it "
                     "(build-graph writes the class embeddings it is compared with)")
        return None
    with store.open_artifact(graph_path, "graph") as ga:
        if "label_embeddings" not in ga:
            if image_text:
                raise SinetError(f"{graph_path}: no label_embeddings; rebuild it with sinet build-graph")
            console.warn(f"{features_path} has side text but {graph_path} has no label_embeddings; scoring "
                         "without it (rebuild graph.h5 with sinet build-graph to use it)")
            return None
        inputs["graph"] = ga.fingerprint
        return ga.read("label_embeddings").astype(np.float32)


def write_state(writer, classes: np.ndarray, state, info: dict | None) -> None:
    """The fitted state a later append scores its rows with (:func:`load_state` reads it back)."""
    writer.write("classes", classes)
    if state.thresholds is not None:
        writer.write("open_set_threshold", state.thresholds.astype(np.float64))
    if state.probe is not None:
        writer.write("probe_W", state.probe.W)
        writer.write("probe_b", state.probe.b)
        writer.write("relabel_probe_W", state.probe1.W)
        writer.write("relabel_probe_b", state.probe1.b)
    if state.estimate is not None:
        writer.write("class_noise", state.estimate.class_noise.astype(np.float64))
        writer.write("noise_transition", state.estimate.transition.astype(np.float64))
        writer.write("outside_level", state.estimate.outside_level.astype(np.float64))
        writer.set_attr("noise_estimate", info)
    else:
        writer.write("class_noise", np.full(len(classes), np.nan))
        writer.set_attr("noise_estimate", {"overall": float("nan"), "method": "none", "rows": 0,
                                           "why": "no probe (--probe-rows 0): no estimate, flag or suggestion"})


def run_scoring(stage, feats, features_path: Path, target: Path, suspects_path: Path, model: tuple,
                classes: np.ndarray, params: dict, inputs: dict, config, state, info: dict | None,
                text: SideText | None, append: bool, max_suspects: int, chunk_rows: int, device: str = "cpu",
                ray_opts: dict | None = None) -> None:
    """Score the rows of features.h5 (every row, or with a stored state only the ids scores.h5 lacks),
    write scores.h5 and suspects.tsv together, and print the run's line. With ``ray_opts`` (address,
    retries, part_rows, device) the blocks are scored as Ray tasks (engines.ray_score), written here
    in row order as the local loop writes them."""
    n = feats.dims["N"]
    t0 = time.perf_counter()
    big = max(chunk_rows, 65536)
    has_clean = "clean_labels" in feats
    # splits are copied only with clean labels: they say which rows the detection metrics cover
    optional = [k for k in ("clean_labels", "paths", "splits") if k in feats and (k != "splits" or has_clean)]
    top = stage.TopSuspects(max_suspects) if max_suspects > 0 else None
    # the N-length columns are kept only for what reads them: the metrics (clean labels known) or a
    # ranking of every suspect (--max-suspects 0); a crawl without clean labels keeps none
    collected = RunColumns(n, has_clean or top is None)
    new_mask = None
    n_old = 0
    if append:
        # one pass over the scores already written: their id hashes, the columns the metrics and
        # the suspect ranking need, and their suspect candidates
        hashes = []
        with store.open_artifact(target, "scores") as art:
            have = [k for k in ("clean_labels", "paths", "splits") if k in art]
            collected = RunColumns(art.dataset("ids").shape[0] + n, "clean_labels" in have or top is None)
            cols = ["ids", "labels", "weight", "distance", *ROW_ESTIMATE] + [k for k in have if k != "paths"]
            if top is not None and "paths" in have:
                cols.append("paths")
            for start, rows in art.iter_rows(cols, big):
                hashes.append(id_hashes(rows["ids"]))
                collected.add(rows)
                if top is not None:
                    feed(top, start, rows)
                n_old = start + len(rows["ids"])
        existing = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        wanted = [id_hashes(rows["ids"]) for _, rows in feats.iter_rows(["ids"], big)]
        new_mask = ~store.match_ids(existing, np.concatenate(wanted) if wanted else np.zeros(0, np.uint64))[1]
        n_new = int(new_mask.sum())
        if n_new == 0:
            console.info(f"{target}: every id of {features_path} is already scored; nothing to do")
            return
        console.info(f"{target}: {n_old} ids already scored, scoring {n_new} new")
        optional = have
    total = n if new_mask is None else int(new_mask.sum())
    writer = store.ArtifactWriter(target, "scores", params, inputs, mode="append" if append else "new")
    try:
        if not append:
            write_state(writer, classes, state, info)
        pos = n_old
        read = block_columns(feats, optional, text is not None)
        ran_on = {"device": device}
        if ray_opts is None:
            scored = local_blocks(stage, feats, read, optional, new_mask, model, config, state, text, chunk_rows,
                                  device)
        else:
            from ..engines import ray_score

            job = ray_score.score_job(features_path, read, optional, state, config, model, text, chunk_rows)
            scored = ray_score.scored_parts(job, n, new_mask, address=ray_opts.get("address"),
                                            retries=ray_opts.get("retries", ray_score.DEFAULT_RETRIES),
                                            part_rows=ray_opts.get("part_rows", ray_score.DEFAULT_PART_ROWS),
                                            device=ray_opts.get("device", "auto"), resolved=ran_on)
        # (local) reads run one block ahead and writes one block behind, each on its own thread; on an
        # error the reader is closed (its pending read waited for) before the file is
        with progress_bar("score-noise", total) as advance, store.BackgroundAppender(writer) as appender, \
                closing(scored) as blocks:
            for out in blocks:
                labels = out["labels"]
                appender.append(out)
                collected.add(out)
                if top is not None:
                    feed(top, pos, out)
                pos += len(labels)
                advance(len(labels))
        full = collected.columns()
        # suspects.tsv's lines are formatted (Python, holding the GIL) while the metrics sort (numpy,
        # releasing it); the file is written only after scores.h5 is committed
        formatter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinet-suspects")
        suspects_text = formatter.submit(format_top_suspects, top.result(), classes) if top is not None else None
        formatter.shutdown(wait=False)
        detection, flagged = {}, None
        if "clean_labels" in full:
            for name, suspicion in (("weight", 1.0 - full["weight"]), ("distance", full["distance"])):
                m = stage.detection_metrics(full["labels"], full["clean_labels"], suspicion, full["train"])
                if m:
                    detection[name] = m
            flagged = flag_metrics(stage, full)
        writer.set_attr("detection", detection)
        if flagged:  # apart from "detection", whose entries are ROC-AUC / AP figures of a score
            writer.set_attr("flag_detection", flagged)
        writer.set_attr("scored_last_run", total)
        writer.set_attr("device", ran_on["device"] if ray_opts is None else f"ray:{ran_on['device']}")
        fp = writer.commit(rename=False)
    except BaseException:
        writer.abort()
        raise
    if suspects_text is not None:
        text, n_suspects = suspects_text.result()
        suspects_tmp = store.write_text(suspects_path, text, stage=True)
    else:
        order = stage.suspect_order(full["weight"], full["distance"], full["flagged"])
        suspects_tmp = write_suspects(writer.partial, suspects_path, order, full["labels"], full["suggested_class"],
                                      full["suggested_confidence"], full["weight"], full["distance"], classes, big,
                                      stage=True)
        n_suspects = len(order)
    # scores.h5 and suspects.tsv together: a kill between the renames is completed by the next run
    store.commit_outputs(target, {target: writer.partial, suspects_path: suspects_tmp}, params, inputs)
    seconds = time.perf_counter() - t0
    info = info or {}
    overall = info.get("overall", float("nan"))
    noise = (f"estimated noise {overall:.1%} (on {info.get('rows', 0)} train rows), {collected.flagged} flagged"
             if info.get("method", "none") != "none" else "no noise estimate without a probe, nothing flagged")
    msg = (f"{target}: {collected.rows} images ({total} scored now) in {seconds:.1f}s; {noise}; {n_suspects} in "
           f"{suspects_path}, {collected.zero_weight} with weight 0 (fingerprint {fp[:12]})")
    if "weight" in detection:
        d = detection["weight"]
        msg += (f"; noise detection on train ({d['noise_rate']:.0%} noisy): ROC-AUC {d['roc_auc']:.4f} "
                f"AP {d['average_precision']:.4f}")
        if flagged:
            msg += f", flagged precision {flagged['precision']:.3f} recall {flagged['recall']:.3f}"
    console.info(msg)


# appended rows of a file that lacks the field
FILL = {"clean_labels": -1, "paths": "", "splits": ""}


def block_columns(feats, optional: list[str], with_text: bool) -> list[str]:
    """The features.h5 columns a scored block is made from."""
    return ["ids", "labels", "features"] + [k for k in optional if k in feats] + (["side_text"] if with_text else [])


def score_block_rows(stage, rows: dict, block_rows: np.ndarray, optional: list[str], model: tuple, config, state,
                     text: SideText | None, device: str) -> dict[str, np.ndarray]:
    """scores.h5's columns of one block of features.h5 rows (``rows``, at positions ``block_rows``):
    the same per block on either engine."""
    labels = rows["labels"].astype(np.int64)
    ts = (block_text_shares(stage, text, rows["side_text"], labels, block_rows, config.text_temperature)
          if text is not None else None)
    out = {"ids": rows["ids"], "labels": labels,
           **stage.score_rows(rows["features"], labels, block_rows, state, config, *model, text_share=ts,
                              device=device)}
    for k in optional:
        out[k] = rows[k] if k in rows else np.full(len(labels), FILL[k])
    return out


def local_blocks(stage, feats, read: list[str], optional: list[str], new_mask: np.ndarray | None, model: tuple,
                 config, state, text: SideText | None, chunk_rows: int, device: str):
    """The scored blocks of features.h5 in row order, computed in this process (only the rows of
    ``new_mask`` when given)."""
    with closing(feats.iter_rows(read, chunk_rows, prefetch=True)) as blocks:
        for start, rows in blocks:
            b = len(rows["ids"])
            block_rows = np.arange(start, start + b)
            if new_mask is not None:
                keep = new_mask[start : start + b]
                if not keep.any():
                    continue
                rows = {k: v[keep] for k, v in rows.items()}
                block_rows = block_rows[keep]
            yield score_block_rows(stage, rows, block_rows, optional, model, config, state, text, device)


# the per-row columns of the estimate: scored rows carry them, appended rows get them from the stored state
ROW_ESTIMATE = ("flagged", "suggested_class", "suggested_confidence")


def flag_metrics(stage, full: dict) -> dict | None:
    """Precision, recall and F1 of the flagged train rows against the known noise mask."""
    known, noisy = stage.noise_mask(full["labels"], full["clean_labels"])
    rows = known & full["train"]
    if not rows.any() or "flagged" not in full:
        return None
    f, t = full["flagged"][rows].astype(bool), noisy[rows]
    tp = int((f & t).sum())
    p = tp / max(int(f.sum()), 1)
    r = tp / max(int(t.sum()), 1)
    return {"flagged": int(f.sum()), "precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12),
            "noise_rate": float(t.mean())}


def read_rows(feats, name: str, rows: np.ndarray, chunk: int) -> np.ndarray:
    """Values of a string row dataset at sorted positions ``rows``, read block by block."""
    out = []
    for start, block in feats.iter_rows([name], max(chunk, 65536)):
        lo, hi = np.searchsorted(rows, [start, start + len(block[name])])
        if hi > lo:
            out.append(np.asarray(block[name])[rows[lo:hi] - start])
    return np.concatenate(out) if out else np.zeros(0, dtype=str)


def load_state(stage, target: Path, config):
    """(state, estimate record) stored in ``target``: the probes, thresholds, estimate, noise process and
    flag threshold its rows were scored with; None when it lacks them (then every row is rescored)."""
    with_probe = config.probe_rows > 0
    with store.open_artifact(target, "scores") as art:
        names = (["open_set_threshold"] if config.score == "fused" or with_probe else []) + (
            ["probe_W", "probe_b", "relabel_probe_W", "relabel_probe_b", "class_noise", "noise_transition",
             "outside_level"] if with_probe else [])
        info = art.json_attr("noise_estimate")
        if not all(n in art for n in names) or info is None or (
                with_probe and not {"temperature", "flag_threshold"} <= set(info)):
            return None
        state = stage.ScoreState()
        if "open_set_threshold" in names:
            state.thresholds = art.read("open_set_threshold").astype(np.float64)
        if with_probe:
            # the stored rows are not re-scored, so no row needs its out-of-fold model: every new row
            # gets the models' mean W and b (probe_label_probability)
            none = np.zeros(0, dtype=np.int64)
            state.probe, state.probe1 = (
                stage.Probe(W=art.read(f"{prefix}_W").astype(np.float32), b=art.read(f"{prefix}_b").astype(np.float32),
                            sample_rows=none, sample_fold=none) for prefix in ("probe", "relabel_probe"))
            state.estimate = stage.NoiseEstimate(
                class_noise=art.read("class_noise"), overall=float(info["overall"]),
                transition=art.read("noise_transition").astype(np.float64), temperature=float(info["temperature"]),
                flag_threshold=float(info["flag_threshold"]), outside_level=art.read("outside_level"),
                rows=int(info["rows"]), outside=float(info.get("outside", float("nan"))),
                alpha=float(info.get("transition_alpha", float("nan"))))
            state.noise_model = state.estimate.model()
    return state, info


class RunColumns:
    """The N-length numeric columns (and the train flag) that the detection metrics and a full
    suspect ranking read, filled block by block into arrays allocated once for ``capacity`` rows
    (untouched pages cost no memory) in compact types: 26 bytes a row, no per-block copies to
    concatenate. With ``keep`` False only the counts are kept (memory flat in N)."""

    TYPES = {"labels": np.int32, "weight": np.float32, "distance": np.float32, "flagged": np.int8,
             "suggested_class": np.int32, "suggested_confidence": np.float32, "clean_labels": np.int32,
             "train": np.bool_}

    def __init__(self, capacity: int, keep: bool) -> None:
        self.capacity, self.keep = capacity, keep
        self.arrays: dict[str, np.ndarray] = {}
        self.rows = 0
        self.zero_weight = 0
        self.flagged = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        n = len(rows["labels"])
        self.zero_weight += int((np.asarray(rows["weight"]) == 0).sum())
        if "flagged" in rows:
            self.flagged += int(np.asarray(rows["flagged"]).astype(bool).sum())
        if self.keep:
            if self.rows + n > self.capacity:
                raise ValueError(f"{self.rows + n} rows for columns of {self.capacity}")
            at = slice(self.rows, self.rows + n)
            for k in self.TYPES:
                if k in rows:
                    self._array(k)[at] = rows[k]
            self._array("train")[at] = rows["splits"] == "train" if "splits" in rows else True
        self.rows += n

    def _array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = np.empty(self.capacity, dtype=self.TYPES[name])
        return self.arrays[name]

    def columns(self) -> dict[str, np.ndarray]:
        return {k: a[: self.rows] for k, a in self.arrays.items()}


def feed(top, start: int, rows: dict[str, np.ndarray]) -> None:
    n = len(rows["labels"])
    top.add(np.arange(start, start + n), rows["weight"], rows["distance"], rows["flagged"],
            labels=rows["labels"], suggested_class=rows["suggested_class"],
            suggested_confidence=rows["suggested_confidence"], ids=np.asarray(rows["ids"]),
            paths=np.asarray(rows["paths"]) if "paths" in rows else np.full(n, ""))


def suspect_lines(ids: list[str], paths: list[str], labels: np.ndarray, suggested: np.ndarray,
                  confidence: np.ndarray, weight: np.ndarray, distance: np.ndarray, names: np.ndarray) -> list[str]:
    """suspects.tsv's lines (SUSPECT_COLUMNS) of some rows; class names already cleaned of tabs."""
    def name_of(c: np.ndarray) -> np.ndarray:
        c = np.asarray(c)
        return np.where((c >= 0) & (c < len(names)), names[np.clip(c, 0, len(names) - 1)], c.astype(str))

    return [f"{i}\t{p}\t{ln}\t{sg}\t{sc:.4f}\t{w:.6g}\t{d:.6g}\n"
            for i, p, ln, sg, sc, w, d in zip(ids, paths, name_of(labels), name_of(suggested),
                                               np.asarray(confidence).tolist(), np.asarray(weight).tolist(),
                                               np.asarray(distance).tolist())]


def format_top_suspects(top: dict[str, np.ndarray], classes: np.ndarray) -> tuple[str, int]:
    """suspects.tsv's text for the kept top suspects, and their count."""
    names = np.asarray(_clean_field(classes), dtype=object)
    lines = ["\t".join(SUSPECT_COLUMNS) + "\n"]
    if top:
        lines += suspect_lines(_clean_field(top["ids"]), _clean_field(top["paths"]), top["labels"],
                               top["suggested_class"], top["suggested_confidence"], top["weight"], top["distance"],
                               names)
    return "".join(lines), len(lines) - 1

