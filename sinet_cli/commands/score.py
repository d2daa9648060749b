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
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import DataOpt, DeviceOpt, ForceOpt, OutOpt, artifact_dir, resolve_device
from ..locks import Plan, file_lock, locked
from ..errors import SinetError
from ..progress import progress_bar

PANEL_EQ6 = "Weighting (eq. 6)"
SCORE_MODES = ("fused", "paper")  # README "Scoring beyond eq. 6"; checked before torch is imported
THRESHOLD_SAMPLE_ROWS = 20000  # --probe-rows 0: rows sampled for the open-set thresholds
PANEL_FUSED = "Scoring beyond eq. 6 (--score fused)"
SUSPECT_COLUMNS = ("id", "path", "label", "suggested_class", "suggested_confidence", "weight", "distance")
# the noise estimate's method (stages.score_noise.estimate_noise; docs/noise-estimate.md), recorded in params
NOISE_ESTIMATE = "anchor-transition+posterior"


# -- ids -----------------------------------------------------------------------------------------



# At most this many prototypes, the per-block products are short (a 4,096 x 512 by 512 x 64 product
# is ~1 ms) and score-noise runs them on one thread on a 2-thread machine; with more they are long
# regions that gain from every thread.
SERIAL_MAX_PROTOTYPES = 64

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


def scored_hashes(path: Path, chunk: int) -> np.ndarray:
    with store.open_artifact(path, "scores") as art:
        parts = [id_hashes(rows["ids"]) for _, rows in art.iter_rows(["ids"], chunk)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def is_member(h: np.ndarray, sorted_h: np.ndarray) -> np.ndarray:
    if len(sorted_h) == 0:
        return np.zeros(len(h), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_h, h), len(sorted_h) - 1)
    return sorted_h[pos] == h


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


@app.command("score-noise")
@locked("score-noise", _plan)
def score_noise(
    data: DataOpt = None,
    features: Annotated[
        Optional[Path], typer.Option(help="features.h5 to score (default: <artifact folder>/features.h5).",
                                     rich_help_panel="Artifacts")
    ] = None,
    prototypes: Annotated[
        Optional[Path], typer.Option(help="prototypes.h5, with prototypes.faiss beside it "
                                     "(default: <artifact folder>/prototypes.h5).", rich_help_panel="Artifacts")
    ] = None,
    alpha: Annotated[float, typer.Option(help="Shift alpha of eq. 6: distances >= alpha get weight 0 (table 4).",
                                         rich_help_panel=PANEL_EQ6)] = 1.2,
    beta: Annotated[float, typer.Option(help="Contrast beta of eq. 6 (table 5).", rich_help_panel=PANEL_EQ6)] = 1.5,
    score: Annotated[str, typer.Option(help="fused (default): p(label|x) of a reweighted out-of-fold linear probe "
                     "times an open-set factor from eq. 6's distance to the own prototype (and, with side text, "
                     "the caption's class share); README 'Scoring beyond eq. 6'. paper: eq. 6 alone (the noise "
                     "estimate, flags and suggestions still come from the probe: docs/noise-estimate.md).",
                     rich_help_panel=PANEL_FUSED)] = "fused",
    open_set_quantile: Annotated[float, typer.Option(help="--score fused: t_c is this quantile of the own-prototype "
                                 "distances of class c's rows the probe agrees with; o = 1 up to t_c, then eq. 6 "
                                 "relative to w(t_c).", rich_help_panel=PANEL_FUSED)] = 0.99,
    temperature: Annotated[float, typer.Option(help="--score fused --probe-rows 0: softmax temperature T over cosine "
                                               "similarities (the prototype share replaces the probe).",
                                               rich_help_panel=PANEL_FUSED)] = 0.02,
    background: Annotated[Optional[float], typer.Option(help="--score fused --probe-rows 0: cosine b of the share's "
                          "background column (default 1 - alpha^2/2, where eq. 6 reaches 0).",
                          rich_help_panel=PANEL_FUSED)] = None,
    probe_rows: Annotated[int, typer.Option(help="Sample of training rows the probe is fitted on, and the noise "
                                            "estimate made on (0 = no probe: --score fused uses the prototype share "
                                            "instead, and there is no noise estimate, flag or suggestion).",
                                            rich_help_panel=PANEL_FUSED)] = 20000,
    probe_folds: Annotated[int, typer.Option(help="Probe folds (out-of-fold p).", rich_help_panel=PANEL_FUSED)] = 5,
    probe_epochs: Annotated[int, typer.Option(help="Epochs of the probe's first round (the reweighted second round "
                                              "runs half as many).", rich_help_panel=PANEL_FUSED)] = 10,
    image_text: Annotated[Optional[bool], typer.Option("--image-text/--no-image-text", help="--score fused: also "
                          "fuse the agreement of each image's side text with its labeled class (features.h5 "
                          "side_text vs graph.h5 label_embeddings). Default: on when features.h5 has side text "
                          "(and graph.h5 label embeddings).", show_default=False,
                          rich_help_panel=PANEL_FUSED)] = None,
    text_temperature: Annotated[float, typer.Option(help="Side text: softmax temperature over cos(text, class).",
                                                    rich_help_panel=PANEL_FUSED)] = 0.05,
    text_floor: Annotated[float, typer.Option(help="Side text: the caption factor is floor + (1 - floor) x the "
                          "caption's class share (0.5: a caption is as likely unrelated to the image as "
                          "informative).", rich_help_panel=PANEL_FUSED)] = 0.5,
    graph: Annotated[Optional[Path], typer.Option(help="Side text: graph.h5 with label_embeddings "
                     "(default: <artifact folder>/graph.h5).", rich_help_panel="Artifacts")] = None,
    encoder: Annotated[Optional[Path], typer.Option(help="Side text: sentence encoder folder (default: the one "
                       "build-graph uses).", rich_help_panel="Artifacts")] = None,
    max_suspects: Annotated[
        int, typer.Option(help="Rows in suspects.tsv (the flagged rows, worst first); 0 = all of them.",
                          rich_help_panel="Artifacts")
    ] = 100000,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for another score-noise run on the same scores.h5.",
                            rich_help_panel="Artifacts")
    ] = 0.0,
    chunk_rows: Annotated[int, typer.Option(help="Rows per streamed block.", rich_help_panel="Compute")] = 16384,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    force: ForceOpt = False,
) -> None:
    """Weight every image by how likely its label is right: by default a reweighted out-of-fold
    probe times an open-set factor from its distance to its class prototype (eq. 6); --score paper
    gives eq. 6 alone. Estimate the noise rate of every class, flag the images likeliest mislabeled
    (as many as the estimate expects), suggest a class for each image, and list the flagged ones worst
    first (docs/noise-estimate.md). Re-running
    on a grown features.h5 scores only the new ids (cron); new prototypes rescore everything.

    Example: sinet score-noise --data demo --alpha 1.2 --beta 1.5
    """
    folder = artifact_dir(out, data)
    features_path = features or folder / "features.h5"
    proto_path = prototypes or folder / "prototypes.h5"
    index_path = proto_path.with_suffix(".faiss")
    target = folder / "scores.h5"
    suspects_path = folder / "suspects.tsv"
    if not alpha > 0 or not beta > 0:
        raise SinetError(f"--alpha {alpha} / --beta {beta}: both must be > 0")
    if chunk_rows < 1:
        raise SinetError("--chunk-rows must be >= 1")
    if score not in SCORE_MODES:
        raise SinetError(f"--score {score!r}: choose one of {', '.join(SCORE_MODES)}")
    if probe_rows < 0 or probe_folds < 2 or probe_epochs < 1:
        raise SinetError("--probe-rows must be >= 0, --probe-folds >= 2, --probe-epochs >= 1")

    torn = store.unit_problem(proto_path, [proto_path, index_path], "make-prototypes")
    if torn:
        raise SinetError(torn)
    with store.open_artifact(proto_path, "prototypes") as pa:
        classes = pa.read("classes")
        protos = np.ascontiguousarray(pa.read("prototypes"), dtype=np.float32)
        proto_class = pa.read("prototype_class").astype(np.int64)
        proto_fp = pa.fingerprint
    feats = store.open_artifact(features_path, "features")
    try:
        f_classes = feats.read("classes")
        if len(f_classes) != len(classes) or (f_classes != classes).any():
            raise SinetError(
                f"{features_path} has {len(f_classes)} classes but {proto_path} was built for {len(classes)}"
                if len(f_classes) != len(classes) else
                f"{features_path} and {proto_path} disagree on class names "
                f"(first: {f_classes[f_classes != classes][0]!r} vs {classes[f_classes != classes][0]!r})"
            )
        if feats.dims["D"] != protos.shape[1]:
            raise SinetError(
                f"{features_path} holds {feats.dims['D']}-d features but {proto_path} holds {protos.shape[1]}-d "
                "prototypes; extract both with the same backbone"
            )
        params = {"alpha": alpha, "beta": beta, "score": score}
        inputs = {"features": feats.fingerprint, "prototypes": proto_fp}
        fused: dict = {"mode": score, "quantile": open_set_quantile}
        if probe_rows > 0:  # the probe: the fused score's q_i, and in both modes the estimate, flag and suggestion
            # the open-set thresholds also decide which rows the estimate counts outside every class
            params.update({"probe_rows": probe_rows, "probe_folds": probe_folds, "probe_epochs": probe_epochs,
                           "noise_estimate": NOISE_ESTIMATE, "open_set_quantile": open_set_quantile})
        if score == "fused":
            if not temperature > 0 or not text_temperature > 0:
                raise SinetError("--temperature / --text-temperature must be > 0")
            if not 0 < open_set_quantile <= 1:
                raise SinetError(f"--open-set-quantile {open_set_quantile}: must be in (0, 1]")
            b = background if background is not None else 1.0 - alpha**2 / 2.0
            use_text = resolve_image_text(image_text, feats, features_path, graph or folder / "graph.h5", fused,
                                          inputs)
            params.update({"temperature": temperature, "background": b, "probe_rows": probe_rows,
                           "probe_folds": probe_folds, "probe_epochs": probe_epochs, "image_text": use_text,
                           "open_set_quantile": open_set_quantile})
            fused.update({"temperature": temperature, "background": b})
            if use_text:
                if not 0 <= text_floor <= 1:
                    raise SinetError(f"--text-floor {text_floor}: must be in [0, 1]")
                params.update({"text_temperature": text_temperature, "text_floor": text_floor})
                fused.update({"text_temperature": text_temperature, "text_floor": text_floor})
        elif image_text:
            raise SinetError("--image-text applies to --score fused only")
        # before torch, FAISS and the text encoder are loaded (seconds): an up-to-date run costs ~1 s.
        # Checked again under the lock below, since another run may be writing.
        if not force and store.is_up_to_date(target, "scores", params, inputs) and \
                store.outputs_current(target, [target, suspects_path]):
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
        if "label_emb" in fused:
            from ..sideinfo import load_text_encoder

            fused["encoder"] = load_text_encoder(encoder)
        with file_lock(target, wait, "score-noise"):
            if not force and store.is_up_to_date(target, "scores", params, inputs) and \
                    store.outputs_current(target, [target, suspects_path]):
                console.info(f"{target}: up to date, nothing to do (use --force to rescore)")
                return
            prev = store.read_provenance(target)
            append = (
                not force and prev is not None and prev["kind"] == "scores"
                and prev["schema_version"] == store.SCHEMA_VERSION
                and store.canonical_json(prev["params"]) == store.canonical_json(params)
                and prev["inputs"].get("prototypes") == proto_fp
            )
            if append:
                # new rows are scored, flagged and given suggestions by the state the existing rows had
                append = load_fused_state(target, fused, probe_rows > 0)
            if prev is None and target.exists() and not force:
                console.info(f"{target}: unreadable; rescoring every row with the options given")
            if prev is not None and not append and not force:
                why = "options changed" if prev["params"] != params else "prototypes changed"
                console.info(f"{target}: {why}; rescoring every row")
            import faiss
            import torch

            threads = torch.get_num_threads()
            faiss_threads = faiss.omp_get_max_threads()
            # Per block only short products and elementwise ops: with at most 2 threads their
            # parallel regions stall on busy cores, so they run on one (measured on 2 shared cores:
            # read + scoring 1M rows 3.6 s -> 2.8-3.4 s, no 13 s spikes). With more threads they keep
            # them all, as make-prototypes does (there, 16 idle cores ran its stage 2x faster so).
            serial = threads <= 2 and len(protos) < SERIAL_MAX_PROTOTYPES and dev == "cpu"
            try:
                if not append and (score == "fused" or probe_rows > 0):
                    # the probe's fit runs alone, on every thread (2 shared cores: 1.65 s -> 1.2 s on
                    # 20,000 rows at D=512, C=14)
                    fit_fused(stage, fused, feats, len(classes), probe_rows, probe_folds, probe_epochs, chunk_rows,
                              protos, slots, proto_class, index, alpha, beta, dev)
                torch.set_num_threads(1 if serial else threads)
                faiss.omp_set_num_threads(1 if serial else faiss_threads)
                run_scoring(stage, feats, features_path, target, suspects_path, protos, proto_class, slots, index,
                            classes, params, inputs, append, max_suspects, chunk_rows, fused, dev)
            finally:
                torch.set_num_threads(threads)
                faiss.omp_set_num_threads(faiss_threads)
    finally:
        feats.close()


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


def resolve_image_text(image_text: Optional[bool], feats, features_path: Path, graph_path: Path, fused: dict,
                       inputs: dict) -> bool:
    """The effective --image-text: the flag when given (on: side text and label embeddings must
    exist), else on exactly when features.h5 has side text and graph.h5 has label embeddings (a
    missing graph.h5 or embeddings is said once, and scoring goes on without). On: the embeddings go
    into ``fused`` and graph.h5's fingerprint into ``inputs``."""
    if image_text is False:
        return False
    if image_text is None and not has_side_text(feats):
        return False
    if image_text and "side_text" not in feats:
        raise SinetError(f"{features_path}: no side_text; --image-text needs image titles/tags")
    if not graph_path.exists() and image_text is None:
        console.warn(f"{features_path} has side text but {graph_path} does not exist; scoring without it "
                     "(build-graph writes the class embeddings it is compared with)")
        return False
    with store.open_artifact(graph_path, "graph") as ga:
        if "label_embeddings" not in ga:
            if image_text:
                raise SinetError(f"{graph_path}: no label_embeddings; rebuild it with sinet build-graph")
            console.warn(f"{features_path} has side text but {graph_path} has no label_embeddings; scoring "
                         "without it (rebuild graph.h5 with sinet build-graph to use it)")
            return False
        fused["label_emb"] = ga.read("label_embeddings").astype(np.float32)
        inputs["graph"] = ga.fingerprint
    return True


def run_scoring(stage, feats, features_path, target, suspects_path, protos, proto_class, slots, index, classes,
                params, inputs, append, max_suspects, chunk_rows, fused, device: str = "cpu") -> None:
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
        existing = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)
        new_mask = np.zeros(n, dtype=bool)
        for start, rows in feats.iter_rows(["ids"], big):
            new_mask[start : start + len(rows["ids"])] = ~is_member(id_hashes(rows["ids"]), existing)
        n_new = int(new_mask.sum())
        if n_new == 0:
            console.info(f"{target}: every id of {features_path} is already scored; nothing to do")
            return
        console.info(f"{target}: {n_old} ids already scored, scoring {n_new} new")
        optional = have
    total = n if new_mask is None else int(new_mask.sum())
    fill = {"clean_labels": -1, "paths": "", "splits": ""}  # appended rows of a file that lacks the field
    estimate = fused.get("estimate")
    writer = store.ArtifactWriter(target, "scores", params, inputs, mode="append" if append else "new")
    try:
        if not append:
            writer.write("classes", classes)
            if "thresholds" in fused:
                writer.write("open_set_threshold", fused["thresholds"].astype(np.float64))
            if "probe" in fused:
                writer.write("probe_W", fused["probe"].W)
                writer.write("probe_b", fused["probe"].b)
                writer.write("relabel_probe_W", fused["probe1"].W)
                writer.write("relabel_probe_b", fused["probe1"].b)
            if estimate is not None:
                writer.write("class_noise", estimate.class_noise.astype(np.float64))
                writer.write("noise_transition", estimate.transition.astype(np.float64))
                writer.write("outside_level", estimate.outside_level.astype(np.float64))
                writer.set_attr("noise_estimate", fused["estimate_info"])
            else:
                writer.write("class_noise", np.full(len(classes), np.nan))
                writer.set_attr("noise_estimate", {"overall": float("nan"), "method": "none", "rows": 0,
                                                   "why": "no probe (--probe-rows 0): no estimate, flag or suggestion"})
        pos = n_old
        read = ["ids", "labels", "features"] + [k for k in optional if k in feats]
        if "encoder" in fused:
            read.append("side_text")
        # reads run one block ahead and writes one block behind, each on its own thread; on an error
        # the reader is closed (its pending read waited for) before the file is
        with progress_bar("score-noise", total) as advance, store.BackgroundAppender(writer) as appender, \
                closing(feats.iter_rows(read, chunk_rows, prefetch=True)) as blocks:
            for start, rows in blocks:
                b = len(rows["ids"])
                block_rows = np.arange(start, start + b)
                if new_mask is not None:
                    keep = new_mask[start : start + b]
                    if not keep.any():
                        continue
                    rows = {k: v[keep] for k, v in rows.items()}
                    block_rows = block_rows[keep]
                labels = rows["labels"].astype(np.int64)
                s = stage.score_block(rows["features"], labels, protos, slots, proto_class, index,
                                      params["alpha"], params["beta"], probe=fused.get("probe"), rows=block_rows,
                                      device=device, relabel_probe=fused.get("probe1") if estimate else None,
                                      noise_model=fused.get("noise_model"))
                out = {"ids": rows["ids"], "labels": labels, "weight": s.weight, "distance": s.distance,
                       "nearest_class": s.nearest_class, "nearest_distance": s.nearest_distance}
                if fused["mode"] == "fused":
                    out.update(fused_components(stage, fused, rows, labels, slots, protos, s.label_probability,
                                                block_rows))
                    out["open_set"] = stage.open_set_factor(s.distance, labels, fused["thresholds"],
                                                            params["alpha"], params["beta"])
                    caption = (stage.caption_factor(out["text_share"], fused["text_floor"])
                               if "text_share" in out else None)
                    out["weight_eq6"] = s.weight
                    out["weight"] = stage.fused_weight(out["probe"] if "probe" in out else out["share"],
                                                       out["open_set"], caption)
                out.update(row_estimate(stage, estimate, s, labels, fused.get("thresholds")))
                for k in optional:
                    out[k] = rows[k] if k in rows else np.full(len(labels), fill[k])
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
        writer.set_attr("device", device)
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
    info = fused.get("estimate_info") or {}
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


# the per-row columns of the estimate: scored rows carry them, appended rows get them from the stored state
ROW_ESTIMATE = ("flagged", "suggested_class", "suggested_confidence")


def row_estimate(stage, estimate, s, labels: np.ndarray, thresholds: Optional[np.ndarray]) -> dict:
    """flagged, suggested_class and suggested_confidence of one block (docs/noise-estimate.md): outside
    every class by the round-2 probe and the distance (E2), the flag score, suggestion and confidence
    under the round-1 probe (E8, E9; score_block computed them with the estimate's noise model). A
    label outside the classes is flagged. Without a probe (--probe-rows 0) nothing is flagged and the
    suggestion is the nearest prototype's class, with confidence 0 (nothing measured it)."""
    if estimate is None or s.relabel is None:
        return {"flagged": np.zeros(len(labels), dtype=np.int8), "suggested_class": s.nearest_class,
                "suggested_confidence": np.zeros(len(labels), dtype=np.float32)}
    p_label, p_other = s.label_probability, s.other_probability
    top_class = np.where(p_label >= p_other, labels, s.other_class)
    u = stage.outside_rows(np.maximum(p_label, p_other), top_class, estimate.outside_level,
                           stage.far_from_class(s.distance, labels, thresholds))
    score, suggested, confidence = s.relabel
    invalid = (labels < 0) | (labels >= len(estimate.outside_level))
    score = np.where((u > 0) | invalid, np.inf, score).astype(np.float32)  # flagged whatever the threshold
    return {"flagged": stage.flag_rows(score, u, estimate.flag_threshold), "flag_score": score,
            "suggested_class": suggested, "suggested_confidence": (confidence * (1.0 - u)).astype(np.float32)}


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


def fit_fused(stage, fused: dict, feats, num_classes: int, probe_rows: int, folds: int, epochs: int, chunk: int,
              protos, slots, proto_class, index, alpha: float, beta: float, device: str = "cpu") -> None:
    """Fit the state of a run on a seeded sample of at most ``probe_rows`` labeled train rows (one
    streamed read gathers their features): the two-round out-of-fold probe, the open-set thresholds
    t_c (``fused["probe1"]``, ``fused["probe"]``, ``fused["thresholds"]``), and on the same sample the
    noise estimate, its noise process and the flag threshold (``fused["estimate"]``,
    ``fused["noise_model"]``, stages.score_noise.estimate_noise), in both score modes. Without a probe
    (``probe_rows`` 0) only the thresholds, from the rows whose prototype share says their label is the
    likelier one."""
    labels = feats.read("labels").astype(np.int64)
    ok = (labels >= 0) & (labels < num_classes)
    if "splits" in feats:
        ok &= feats.read("splits") == "train"
    cand = np.flatnonzero(ok)
    if probe_rows > 0 and len(cand) < 2 * folds:
        raise SinetError(f"only {len(cand)} labeled train rows: too few for a {folds}-fold probe (--probe-rows 0)")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(cand, min(probe_rows if probe_rows > 0 else THRESHOLD_SAMPLE_ROWS, len(cand)),
                              replace=False))
    x = feats.take("features", rows, max(chunk, 65536)).astype(np.float32)
    y = labels[rows]
    s = stage.score_block(x, y, protos, slots, proto_class, index, alpha, beta, device=device)
    distance = s.distance
    if probe_rows == 0:
        share = stage.labeled_share(stage.class_similarity(x, protos, slots), y, fused["temperature"],
                                    fused["background"])
        fused["thresholds"] = stage.open_set_thresholds(distance, y, share >= 0.5, num_classes, fused["quantile"])
        return
    fused["probe1"], fused["probe"], thresholds = stage.fit_two_round_probe(
        x, y, rows, num_classes, distance, alpha=alpha, beta=beta, folds=folds, epochs=epochs,
        quantile=fused["quantile"], device=device)
    # the open-set factor's thresholds (--score fused) and, in both modes, the estimate's "far" test
    fused["thresholds"] = thresholds
    if fused["mode"] == "fused" and "encoder" in fused:  # encoded once: the scoring pass reuses the shares
        fused["sample_text"] = (rows, text_shares(stage, fused, read_rows(feats, "side_text", rows, chunk), y))
    # the estimate's probability rows: the sample, at most ESTIMATE_CELLS / C of them (a uniform subsample)
    keep = min(len(rows), max(ESTIMATE_CELLS // max(num_classes, 1), 2 * folds))
    sub = np.sort(np.random.default_rng(1).choice(len(rows), keep, replace=False)) if keep < len(rows) else \
        np.arange(len(rows))
    probs = stage.probe_probabilities(fused["probe"], x[sub], rows[sub], device=device)
    relabel_probs = stage.probe_probabilities(fused["probe1"], x[sub], rows[sub], device=device)
    estimate = stage.estimate_noise(probs, y[sub], stage.far_from_class(distance[sub], y[sub], thresholds),
                                    np.bincount(labels[cand], minlength=num_classes), relabel_probs)
    fused["estimate"] = estimate
    fused["noise_model"] = estimate.model()
    fused["estimate_info"] = estimate_info(estimate, int(len(cand)))


def estimate_info(estimate, train_rows: int) -> dict:
    """scores.h5's ``noise_estimate`` attribute: the estimate's numbers and the scalars appended rows are
    flagged with (plain floats: numpy scalars would go through JSON as strings)."""
    return {"overall": float(estimate.overall), "method": NOISE_ESTIMATE, "rows": int(estimate.rows),
            "outside": float(estimate.outside), "train_rows": train_rows,
            "temperature": float(estimate.temperature), "flag_threshold": float(estimate.flag_threshold),
            "transition_alpha": float(estimate.alpha)}


ESTIMATE_CELLS = 1 << 24  # rows x classes of each of the estimate's two probability matrices (64 MB of float32)


def read_rows(feats, name: str, rows: np.ndarray, chunk: int) -> np.ndarray:
    """Values of a string row dataset at sorted positions ``rows``, read block by block."""
    out = []
    for start, block in feats.iter_rows([name], max(chunk, 65536)):
        lo, hi = np.searchsorted(rows, [start, start + len(block[name])])
        if hi > lo:
            out.append(np.asarray(block[name])[rows[lo:hi] - start])
    return np.concatenate(out) if out else np.zeros(0, dtype=str)


def text_shares(stage, fused: dict, text: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The caption's class share t_i of each row (NaN where the side text is blank)."""
    text = np.asarray(text).astype(str)
    has = np.char.str_len(np.char.strip(text)) > 0
    ts = np.full(len(labels), np.nan, dtype=np.float32)
    if has.any():
        emb = fused["encoder"].encode(text[has].tolist(), normalize_embeddings=True, batch_size=256)
        ts[has] = stage.text_share(np.asarray(emb, dtype=np.float32), fused["label_emb"], labels[has],
                                   fused["text_temperature"])
    return ts


def load_fused_state(target: Path, fused: dict, with_probe: bool) -> bool:
    """Put the probes, thresholds, estimate, noise process and flag threshold stored in ``target`` into
    ``fused``; False when it lacks them (then every row is rescored)."""
    from stages.score_noise import NoiseEstimate, Probe

    with store.open_artifact(target, "scores") as art:
        names = (["open_set_threshold"] if fused["mode"] == "fused" or with_probe else []) + (
            ["probe_W", "probe_b", "relabel_probe_W", "relabel_probe_b", "class_noise", "noise_transition",
             "outside_level"] if with_probe else [])
        info = art.json_attr("noise_estimate")
        if not all(n in art for n in names) or info is None or (
                with_probe and not {"temperature", "flag_threshold"} <= set(info)):
            return False
        if "open_set_threshold" in names:
            fused["thresholds"] = art.read("open_set_threshold").astype(np.float64)
        if with_probe:
            # the stored rows are not re-scored, so no row needs its out-of-fold model: every new row
            # gets the models' mean W and b (probe_label_probability)
            none = np.zeros(0, dtype=np.int64)
            for key, prefix in (("probe", "probe"), ("probe1", "relabel_probe")):
                fused[key] = Probe(W=art.read(f"{prefix}_W").astype(np.float32),
                                   b=art.read(f"{prefix}_b").astype(np.float32), sample_rows=none, sample_fold=none)
            fused["estimate"] = NoiseEstimate(
                class_noise=art.read("class_noise"), overall=float(info["overall"]),
                transition=art.read("noise_transition").astype(np.float64), temperature=float(info["temperature"]),
                flag_threshold=float(info["flag_threshold"]), outside_level=art.read("outside_level"),
                rows=int(info["rows"]), outside=float(info.get("outside", float("nan"))),
                alpha=float(info.get("transition_alpha", float("nan"))))
            fused["noise_model"] = fused["estimate"].model()
            fused["estimate_info"] = info
        else:
            fused["estimate_info"] = art.json_attr("noise_estimate")
    return True


def fused_components(stage, fused: dict, rows: dict, labels: np.ndarray, slots, protos,
                     label_probability: Optional[np.ndarray], block_rows: Optional[np.ndarray] = None) -> dict:
    """The per-row label-quality components of --score fused for one block (``label_probability``:
    the probe's, which score_block computed in its product; the caption shares of the sample rows,
    ``block_rows`` among them, were computed with the estimate and are not encoded again)."""
    out = {}
    if "probe" not in fused:  # the prototype share stands in for the probe (--probe-rows 0)
        sim = stage.class_similarity(rows["features"], protos, slots)
        out["share"] = stage.labeled_share(sim, labels, fused["temperature"], fused["background"])
    else:
        out["probe"] = label_probability
    if "encoder" in fused:
        ts = np.full(len(labels), np.nan, dtype=np.float32)
        todo = np.ones(len(labels), dtype=bool)
        if "sample_text" in fused and block_rows is not None:
            srows, sshare = fused["sample_text"]
            pos = np.minimum(np.searchsorted(srows, block_rows), max(len(srows) - 1, 0))
            hit = (srows[pos] == block_rows) if len(srows) else np.zeros(len(labels), dtype=bool)
            ts[hit] = sshare[pos[hit]]
            todo = ~hit
        if todo.any():
            ts[todo] = text_shares(stage, fused, np.asarray(rows["side_text"])[todo], labels[todo])
        out["text_share"] = ts
    return out


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
