"""``sinet rescore``: features + scores for the newly crawled images only (run it from cron).

A new crawl (``--data imagefolder:DIR`` or ``manifest:FILE.tsv``, usually the same growing folder
or manifest) is compared with ``features.h5`` by image id. Only ids not in it are decoded and
encoded, with the backbone, weights and preprocessing recorded in ``features.h5``; their rows are
appended to it atomically (``features.h5.partial``, then a rename), and score-noise then weights
them against the existing prototypes (it scores only ids that ``scores.h5`` lacks), flags them and
suggests their class with the probes, noise process and flag threshold stored in
``scores.h5`` (docs/noise-estimate.md), so a new image is judged as it would have been in the first
run. Prototypes are not rebuilt: ``make all`` / ``sinet make-prototypes`` does that when wanted. With
``--data webdataset:new/*.tar`` only the new shards are read.

Safe under cron: one run at a time per artifact folder (``features.h5.lock``; a busy lock is a
one-line error and exit status 75 (EX_TEMPFAIL) unless ``--wait``), no progress output without a terminal, and
a run with nothing new changes nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import (DATA_HELP, CaptionsOpt, ClassesOpt, DeviceOpt, LabelFieldOpt, OutOpt, artifact_dir, load_table,
                      resolve_device)
from .extract import DEFAULT_PART_ROWS, EngineOpt, PartRowsOpt, RayAddressOpt, RayRetriesOpt, check_engine
from ..locks import Plan, file_lock, locked
from ..errors import SinetError, StorageError, is_storage_error
from ..progress import progress_bar

PANEL_CRON = "Cron"


def normalized(value: Any) -> Any:
    return json.loads(store.canonical_json(value))


def recorded_weights(art: store.Artifact, override: Path | None) -> Path | None:
    """The weight file features.h5 was extracted with (None: random init), checked by content."""
    params = art.params
    if params.get("random_init"):
        if override is not None:
            raise SinetError(f"{art.path} was extracted with --random-init; --weights does not apply")
        return None
    info = art.json_attr("backbone", {}) or {}
    path = override or (Path(info["weights"]) if info.get("weights") else None)
    if path is None:
        raise SinetError(f"{art.path} does not record its weight file; pass --weights FILE")
    if not path.is_file():
        raise SinetError(f"{path}: weight file of {art.path} not found; pass --weights FILE with the same weights")
    expected = art.inputs.get("weights")
    if expected is not None and store.fingerprint_file(path) != expected:
        raise SinetError(
            f"{path}: not the weights {art.path} was extracted with (content differs); new features would not be "
            "comparable — pass --weights with the original file, or re-extract everything"
        )
    return path


def _plan(a: dict) -> Plan:
    # everything rescore and the score-noise it runs read or write, locked before either reads
    folder = artifact_dir(a["out"], a["data"])
    if not (folder / "features.h5").is_file():  # before any lock file is made in a folder that is not one
        raise SinetError(f"{folder / 'features.h5'}: not found; build the artifacts first (make all, or "
                         "extract-features, build-graph, make-prototypes)")
    return Plan(writes=[folder / "features.h5", folder / "scores.h5"],
                reads=[folder / "prototypes.h5", folder / "graph.h5"], wait=a["wait"], units=[folder / "scores.h5"],
                resume="features.h5 and scores.h5 keep what was committed; run the same command again (it adds "
                       "the images not added yet)")


@app.command("rescore")
@locked("rescore", _plan)
def rescore(
    data: Annotated[str, typer.Option("--data", help="The new crawl: " + DATA_HELP, rich_help_panel="Dataset")],
    classes: ClassesOpt = None,
    captions: CaptionsOpt = None,
    label_field: LabelFieldOpt = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(help="Where the backbone weights are now, if the file recorded in features.h5 moved (its "
                     "content must be the same).", rich_help_panel="Model"),
    ] = None,
    alpha: Annotated[
        Optional[float], typer.Option(help="eq. 6 alpha (default: the one scores.h5 was made with, else 1.2).",
                                      rich_help_panel="Weighting (eq. 6)")
    ] = None,
    beta: Annotated[
        Optional[float], typer.Option(help="eq. 6 beta (default: the one scores.h5 was made with, else 1.5).",
                                      rich_help_panel="Weighting (eq. 6)")
    ] = None,
    retry_skipped: Annotated[
        bool, typer.Option("--retry-skipped", help="Try again the images an earlier run could not read "
                           "(by default they stay in skipped_ids and are not retried).", rich_help_panel=PANEL_CRON)
    ] = False,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for another rescore run on the same artifacts (default: fail "
                            "at once).", rich_help_panel=PANEL_CRON)
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", rich_help_panel="Compute")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader decoding processes.", rich_help_panel="Compute")] = 2,
    chunk_rows: Annotated[int, typer.Option(help="Rows per appended block.", rich_help_panel="Compute")] = 4096,
    device: DeviceOpt = "auto",
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_retries: RayRetriesOpt = 3,
    part_rows: PartRowsOpt = DEFAULT_PART_ROWS,
    out: OutOpt = None,
) -> None:
    """Extract features for the images of a new crawl that features.h5 lacks (same backbone, weights and
    image size as recorded in it), append them, and score them against the existing prototypes.

    For cron: locked per artifact folder, quiet without a terminal, a run with nothing new does nothing.

    Example: sinet rescore --data imagefolder:/data/incoming --out artifacts/shop
    """
    if batch_size < 1 or chunk_rows < 1 or workers < 0:
        raise SinetError("--batch-size and --chunk-rows must be >= 1, --workers >= 0")
    check_engine(engine)
    folder = artifact_dir(out, data)
    features_path = folder / "features.h5"
    if not features_path.is_file():
        raise SinetError(f"{features_path}: not found; build the artifacts first (make all, or extract-features, "
                         "build-graph, make-prototypes)")
    scoring_options_readable(folder)  # before features.h5 grows rows it could not score
    try:
        with file_lock(features_path, wait, "rescore"):
            t0 = time.monotonic()
            table = new_crawl(data, classes, captions, label_field, features_path, retry_skipped)
            ray_opts = None if engine == "local" else {"address": ray_address, "retries": ray_retries,
                                                  "part_rows": part_rows}
            if table is not None:
                append_new(table, data, features_path, folder, weights, retry_skipped, batch_size, workers,
                           chunk_rows, device, ray_opts)
            score_new(folder, alpha, beta, max(0.0, wait - (time.monotonic() - t0)), device, ray_opts)
    except (OSError, RuntimeError, ValueError) as e:  # disk full, CUDA, a library's refusal: one line for cron
        if is_storage_error(e):
            raise StorageError.from_os_error(e) from None
        raise SinetError(f"rescore {data}: {type(e).__name__}: {e}") from None


def new_crawl(data: str, classes: Path | None, captions: str | None, label_field: str | None, features_path: Path,
              retry_skipped: bool):
    """The table of the crawl ``data``; for WebDataset shards only of those features.h5 has no row of
    (a shard is recorded whole, so the recorded ones are not even opened), None when every shard is
    recorded. With ``retry_skipped`` every shard is read (the images to retry are in recorded ones)."""
    kind, _, pattern = data.partition(":")
    if kind != "webdataset" or retry_skipped:
        return load_table(data, classes, captions=captions, label_field=label_field)
    from ..datasets import ClassTable
    from ..datasets.webdataset import expand_pattern, read_webdataset

    if captions not in (None, "", "none"):
        raise SinetError(f"--captions {captions}: synthetic captions exist for the demos only, not --data {data}")
    shards = expand_pattern(pattern)
    done = recorded_shards(features_path)
    fresh = [s for s in shards if shard_key(s) not in done]
    if not fresh:
        console.info(f"{features_path}: nothing new in {data} (all {len(shards)} shards already in it)")
        return None
    return read_webdataset(pattern, ClassTable.from_tsv(classes) if classes else None,
                           label_field="label" if label_field is None else label_field, shards=fresh)


def shard_key(shard: str) -> str:
    """A shard as it is compared with the ones recorded: a local path absolute, a URL as it is."""
    from ..datasets.webdataset import is_url

    return shard if is_url(shard) else os.path.abspath(shard)


def recorded_shards(features_path: Path, chunk: int = 65536) -> set[str]:
    """The shards features.h5 holds rows of (its ``paths`` ``<shard>#<member>``, read in blocks)."""
    found: set[str] = set()
    with store.open_artifact(features_path, "features") as art:
        if "paths" not in art:
            return found
        for _, rows in art.iter_rows(["paths"], chunk):
            paths = np.asarray(rows["paths"], dtype=str)
            heads = np.char.partition(paths, "#")
            for shard in np.unique(heads[heads[:, 1] == "#", 0]):
                found.add(shard_key(str(shard)))
    return found


def append_new(table, data: str, features_path: Path, folder: Path, weights: Path | None, retry_skipped: bool,
               batch_size: int, workers: int, chunk_rows: int, device: str, ray_opts: dict | None = None) -> int:
    """Append the rows of ``table`` whose ids features.h5 lacks; returns the number appended.
    ``ray_opts`` (address, retries, part_rows): extract them as Ray tasks (``--engine ray``)."""
    with store.open_artifact(features_path, "features") as art:
        stored = list(art.read("classes"))
        # labels are indices into the class list: other classes would make them mean other things
        store.check_classes(f"--data {data}", table.classes.names, features_path, stored,
                            "pass --classes with the class table the artifacts were built for, or rebuild them")
        check_prototypes(folder / "prototypes.h5", features_path, stored, art.dims["D"])
        have = store.ids_in(art, table.ids)
        skipped_ids = list(art.read("skipped_ids")) if "skipped_ids" in art else []
        skipped_reasons = list(art.read("skipped_reasons")) if "skipped_reasons" in art else []
        had_skipped = "skipped_ids" in art
        tried = (store.match_ids(np.asarray(skipped_ids, dtype=str), table.ids)[1]
                 if skipped_ids and not retry_skipped else None)
        new = ~have if tried is None else ~have & ~tried
        positions = np.flatnonzero(new)
        if len(positions) == 0:
            extra = f", {int(tried.sum())} unreadable ones not retried" if tried is not None and tried.any() else ""
            console.info(f"{features_path}: nothing new in {data} ({len(table)} images, all already in it{extra})")
            return 0
        params, inputs = art.params, art.inputs
        info = art.json_attr("backbone", {}) or {}
        preprocess_rec = art.json_attr("preprocess")
        decode_rec = art.json_attr("decode")  # the pixel limit and JPEG draft mode the file was extracted with
        rows_in_file = [f.name for f in store.SCHEMAS["features"] if f.dims[0] == "N" and f.name in art]
        feature_dtype = art.dataset("features").dtype
        dim = art.dims["D"]
        weight_path = recorded_weights(art, weights)
        appended_before = (art.json_attr("appended", {}) or {}).get("rows", 0)
        n_before = art.dims["N"]
        features_fp = art.fingerprint

    from stages import extract_features as stage  # only now: an idle cron run does not load torch for it

    from .extract import image_sources

    probs = bool(params.get("probs"))
    try:
        model, _ = stage.build_backbone(params["backbone"], weight_path, random_init=bool(params.get("random_init")),
                                        num_classes=len(stored) if probs else 0)
    except (KeyError, ValueError) as e:
        raise SinetError(f"{features_path}: cannot rebuild its backbone {info.get('name', '?')!r} ({e})") from None
    preprocess = stage.Preprocess.for_model(model, params.get("image_size"))
    if preprocess_rec is not None and normalized(preprocess.as_dict()) != normalized(preprocess_rec):
        raise SinetError(f"{features_path}: recorded preprocessing {preprocess_rec} differs from this timm's "
                         f"{preprocess.as_dict()}; re-extract everything")
    if model.num_features != dim:
        raise SinetError(f"{features_path}: holds {dim}-d features but {params['backbone']} gives {model.num_features}")
    if skipped_ids and retry_skipped:  # retried images leave the skipped list; they re-enter it if they fail again
        keep = ~store.match_ids(table.ids[positions], np.asarray(skipped_ids, dtype=str))[1]
        skipped_ids = [s for s, k in zip(skipped_ids, keep) if k]
        skipped_reasons = [r for r, k in zip(skipped_reasons, keep) if k]
    n_skipped = 0

    def warn_skip(position: int, reason: str) -> None:
        where = f" ({table.paths[position]})" if table.paths is not None else ""
        console.warn(f"skipped image {table.ids[position]}{where}: {reason}")

    def on_skip(position: int, reason: str) -> None:
        nonlocal n_skipped
        skipped_ids.append(str(table.ids[position]))
        skipped_reasons.append(reason)
        n_skipped += 1
        warn_skip(position, reason)

    decode = stage.Decode.from_dict(decode_rec)
    parts = None
    if ray_opts is not None:  # every part file first: features.h5 is copied for the append only once they are all there
        from ..engines import ray_engine

        job = ray_engine.PartJob(params["backbone"], None if weight_path is None else str(weight_path),
                                 bool(params.get("random_init")), len(stored) if probs else 0, params.get("image_size"),
                                 decode.as_dict(), batch_size, workers)
        parts_dir = folder / "rescore.parts"
        plan = ray_engine.plan_parts(table, positions, ray_opts["part_rows"])
        parts = ray_engine.extract_parts(
            job, table, plan, parts_dir, params=params,
            inputs={"features": features_fp, "dataset": table.fingerprint()}, names=rows_in_file,
            feature_dtype=feature_dtype, chunk_rows=chunk_rows, attrs={}, feature_dim=dim, address=ray_opts["address"],
            device=device, retries=ray_opts["retries"], on_skip=warn_skip)

    writer = store.ArtifactWriter(features_path, "features", params, inputs, mode="append")
    try:
        if parts is None:
            with progress_bar("rescore: extract", len(positions)) as advance:
                batches = stage.extract(model, preprocess, **image_sources(stage, table), positions=positions,
                                        batch_size=batch_size, workers=workers, device=resolve_device(device),
                                        with_probs=probs, progress=advance, decode=decode)
                n_new = store.append_feature_batches(writer, table, batches, names=rows_in_file,
                                                     feature_dtype=feature_dtype, chunk_rows=chunk_rows,
                                                     on_skip=on_skip)
        else:
            n_new, part_skipped = append_part_files(writer, parts, rows_in_file)
            skipped_ids += part_skipped[0]  # recorded in the part files (those of an earlier run too)
            skipped_reasons += part_skipped[1]
            n_skipped = len(part_skipped[0])
        if skipped_ids or had_skipped:  # (emptied when every retried image could be read)
            writer.write("skipped_ids", skipped_ids)
            writer.write("skipped_reasons", skipped_reasons)
        writer.set_attr("appended", {
            "rows": int(appended_before) + n_new,
            "last": {"data": data, "dataset": table.fingerprint(), "rows": n_new, "skipped": n_skipped,
                     "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        })
        fp = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if parts is not None:
        import shutil

        shutil.rmtree(parts[0].parent, ignore_errors=True)
    console.info(
        f"{features_path}: appended {n_new} new images of {data}"
        f"{f', {n_skipped} unreadable skipped' if n_skipped else ''}; {n_before + n_new} in all (fingerprint {fp[:12]})"
    )
    return n_new


def append_part_files(writer: store.ArtifactWriter, paths: list[Path], names: list[str]
                      ) -> tuple[int, tuple[list[str], list[str]]]:
    """Append the rows of Ray's part files to features.h5; returns the number of rows appended and
    the parts' skipped images (ids, reasons)."""
    arts = [store.open_artifact(p, "features") for p in paths]
    try:
        before = writer.rows_committed
        skipped = store.append_parts(writer, arts, names)
        return writer.rows_committed - before, skipped
    finally:
        for a in arts:
            a.close()


def check_prototypes(proto_path: Path, features_path: Path, classes: list[str], dim: int) -> None:
    """Fail before touching features.h5 when the new rows could not be scored."""
    torn = store.unit_problem(proto_path, [proto_path, proto_path.with_suffix(".faiss")], "make-prototypes")
    if torn:
        raise SinetError(torn)
    with store.open_artifact(proto_path, "prototypes") as pa:
        p_classes = list(pa.read("classes"))
        p_dim = pa.dims["D"]
    if p_classes != classes:
        raise SinetError(f"{proto_path} was built for other classes than {features_path}; run make-prototypes first")
    if p_dim != dim:
        raise SinetError(f"{proto_path} holds {p_dim}-d prototypes but {features_path} {dim}-d features")


def scoring_options_readable(folder: Path) -> None:
    """The options scores.h5 records are what new rows are scored with: an unreadable (truncated,
    damaged) scores.h5 is an error, never a silent rebuild with default options."""
    path = folder / "scores.h5"
    if path.exists() and store.read_provenance(path) is None:
        raise SinetError(f"{path}: unreadable (truncated or damaged), so the options it was scored with are unknown; "
                         f"rebuild it with the options you want (sinet score-noise --out {folder} --force ...), then "
                         "run rescore again")


def score_new(folder: Path, alpha: float | None, beta: float | None, wait: float,
              device: str = "auto", ray_opts: dict | None = None) -> None:
    """score-noise's run with the options scores.h5 was made with (so that it only appends), on
    rescore's ``--device`` (with ``ray_opts``, as Ray tasks): it scores the ids scores.h5 lacks, and
    says so when there are none."""
    from stages.score_noise import ScoreConfig

    from .score import run_score_noise

    # read under rescore's lock on scores.h5: the options of the scores.h5 there now, not of one a
    # run that held the lock while this one waited has since replaced
    scoring_options_readable(folder)
    prev = store.read_provenance(folder / "scores.h5")
    recorded = prev["params"] if prev is not None and prev.get("kind") == "scores" else {}
    try:
        config = ScoreConfig.from_params(recorded, alpha=alpha, beta=beta)
    except (TypeError, ValueError) as e:
        raise SinetError(f"{folder / 'scores.h5'}: its recorded options do not make a score ({e})") from None
    run_score_noise(folder, config, wait=wait, device=device, ray_opts=ray_opts)
