"""``sinet extract-features`` and ``sinet merge-features``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import (
    ClassesOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    NoiseOpt,
    NoiseRateOpt,
    CaptionsOpt,
    LabelFieldOpt,
    NoiseSeedOpt,
    OutOpt,
    WaitOpt,
    artifact_dir,
    build_config,
    load_table,
    require_two_classes,
    resolve_device,
)
from ..errors import Interrupted, SinetError
from ..locks import Plan, locked
from ..progress import progress_bar
from ..sideinfo import DEFAULT_BACKBONE, default_weights


EngineOpt = Annotated[str, typer.Option(
    "--engine", help="local (this process) or ray: one Ray task per WebDataset shard (else per --part-rows images), "
    "on a local Ray cluster or the one at --ray-address; needs pip install 'sinet[ray]' (docs/ray.md).",
    rich_help_panel="Compute")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="--engine ray: the cluster to run on (auto, HOST:6379, ray://HOST:10001). Default: a "
    "local cluster of this machine.", rich_help_panel="Compute")]
RayRetriesOpt = Annotated[int, typer.Option(
    "--ray-retries", help="--engine ray: retries of a task whose worker died; a part failing after them is redone "
    "by the next run, the finished ones are kept.", rich_help_panel="Compute")]
PartRowsOpt = Annotated[int, typer.Option(
    "--part-rows", help="--engine ray: images per task for data without shards (a WebDataset shard is one task).",
    rich_help_panel="Compute")]
DEFAULT_PART_ROWS = 65536  # engines.ray_engine.DEFAULT_PART_ROWS (ray is not imported for --help)


def check_engine(engine: str) -> None:
    """``--engine``: local, or ray when Ray is installed (else a one-line error saying how to install it)."""
    from ..engines import ENGINES

    if engine not in ENGINES:
        raise SinetError(f"--engine {engine!r}: choose local or ray")
    if engine == "ray":
        from ..engines.ray_engine import require_ray

        require_ray()


def parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SinetError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_path(out: Path, i: int, n: int) -> Path:
    return out / f"features.shard-{i}-of-{n}.h5"


MAX_PIXELS = 89_478_485  # stages.extract_features.MAX_PIXELS (the default; torch is not imported for --help)


def _extract_plan(a: dict) -> Plan:
    if not a["data"]:
        from ..common import DATA_REQUIRED

        raise SinetError(DATA_REQUIRED)
    i, n = parse_shard(a["shard"])
    folder = artifact_dir(a["out"], a["data"])
    # a shard writes its own file: the n shards of one extraction run in parallel
    target = folder / "features.h5" if n == 1 else shard_path(folder, i, n)
    return Plan(writes=[target], wait=a["wait"],
                resume=f"{target} is unchanged; run the same command again: it resumes from the rows written so far")


@app.command("extract-features")
@locked("extract-features", _extract_plan)
def extract_features(
    data: DataOpt = None,
    classes: ClassesOpt = None,
    noise: NoiseOpt = "symmetric",
    noise_rate: NoiseRateOpt = 0.4,
    noise_seed: NoiseSeedOpt = 0,
    captions: CaptionsOpt = None,
    label_field: LabelFieldOpt = None,
    backbone: Annotated[str, typer.Option(help="Any timm model name.", rich_help_panel="Model")] = DEFAULT_BACKBONE,
    weights: Annotated[
        Optional[Path],
        typer.Option(help="State-dict file (loaded weights_only). Default: packaged ImageNet lite0 weights.",
                     rich_help_panel="Model"),
    ] = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Use random weights (tests, smoke runs).", rich_help_panel="Model")
    ] = False,
    image_size: Annotated[int, typer.Option(help="Input size in pixels.", rich_help_panel="Model")] = 64,
    probs: Annotated[
        bool,
        typer.Option("--probs", help="Also store class probabilities (the weights' classifier must have C outputs).",
                     rich_help_panel="Model"),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", rich_help_panel="Compute")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader decoding processes (image files; for shards each takes "
                                         "whole shards).", rich_help_panel="Compute")] = 2,
    device: DeviceOpt = "auto",
    memory_format: Annotated[str, typer.Option(help="auto (channels-last on the CPU, where it is faster: "
                             "bench/bench_extract_features.py; contiguous on a GPU), channels-last or contiguous.",
                             rich_help_panel="Compute")] = "auto",
    dtype: Annotated[str, typer.Option(help="On-disk feature dtype: float16 or float32.", rich_help_panel="Artifacts")] = "float16",
    chunk_rows: Annotated[int, typer.Option(help="Rows per flushed (resumable) chunk.", rich_help_panel="Artifacts")] = 4096,
    shard: Annotated[
        Optional[str], typer.Option(help="i/n: extract only the i-th of n contiguous slices (then merge-features).",
                                    rich_help_panel="Compute")
    ] = None,
    max_pixels: Annotated[int, typer.Option(help="Largest image decoded, in pixels (width x height); a larger one is "
                          "skipped and recorded in skipped_ids. Default: PIL's own decompression-bomb threshold.",
                          rich_help_panel="Compute")] = MAX_PIXELS,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_retries: RayRetriesOpt = 3,
    part_rows: PartRowsOpt = DEFAULT_PART_ROWS,
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Encode every image with a timm backbone into L2-normalized features (features.h5).

    Streams in chunks with bounded memory and resumes after a kill; unreadable images are logged
    with their id and skipped.

    Example: sinet extract-features --data demo --image-size 64
    """
    check_engine(engine)
    if engine == "ray" and shard:
        raise SinetError("--shard and --engine ray exclude each other: Ray splits the work into parts itself")
    from stages import extract_features as stage

    cfg = build_config(stage.ExtractConfig, backbone=backbone, image_size=image_size, probs=probs, dtype=dtype,
                       random_init=random_init, shard=parse_shard(shard), max_pixels=max_pixels,
                       batch_size=batch_size, workers=workers, memory_format=memory_format)
    table = load_table(data, classes, noise, noise_rate, noise_seed, captions, label_field=label_field)
    require_two_classes(table.classes.names, f"--data {data}")
    folder = artifact_dir(out, data)
    target = folder / "features.h5" if cfg.shard[1] == 1 else shard_path(folder, *cfg.shard)
    if weights is not None and random_init:
        raise SinetError("--weights and --random-init exclude each other")
    weight_path = None if random_init else (weights or default_weights(backbone))
    params, inputs = cfg.provenance(), {"dataset": table.fingerprint()}
    if weight_path is not None:
        inputs["weights"] = store.fingerprint_file(weight_path)
    if not force and store.is_up_to_date(target, "features", params, inputs):
        console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
        return
    try:
        model, info = stage.build_backbone(backbone, weight_path, random_init=random_init,
                                           num_classes=len(table.classes) if probs else 0)
    except ValueError as e:
        raise SinetError(str(e)) from None
    preprocess, decode = stage.Preprocess.for_model(model, image_size), stage.Decode(max_pixels=max_pixels)
    attrs = {"backbone": info.__dict__, "preprocess": preprocess.as_dict(),
             "decode": decode.as_dict()}  # rescore decodes new images with the same recipe
    if engine == "ray":
        from ..engines import ray_engine

        job = ray_engine.PartJob(backbone, None if weight_path is None else str(weight_path), random_init,
                                 len(table.classes) if probs else 0, image_size, decode.as_dict(), batch_size, workers,
                                 stage.MEMORY_FORMATS[memory_format])
        extract_on_ray(job, table, target, params, inputs, attrs, dtype=dtype, chunk_rows=chunk_rows,
                       feature_dim=info.feature_dim, address=ray_address, device=device, retries=ray_retries,
                       part_rows=part_rows)
        return
    extract_local(stage, model, preprocess, decode, table, target, params, inputs, attrs, cfg, device=device,
                  chunk_rows=chunk_rows, feature_dim=info.feature_dim)


def extract_local(stage, model, preprocess, decode, table, target: Path, params: dict, inputs: dict, attrs: dict,
                  cfg, *, device: str, chunk_rows: int, feature_dim: int) -> None:
    """extract-features in this process: resumes from the committed chunks of ``target``'s partial file,
    appends every batch through the store, and keeps what was committed when interrupted."""
    dev = resolve_device(device)
    batch_size, workers, probs, dtype = cfg.batch_size, cfg.workers, cfg.probs, cfg.dtype
    memory_format = cfg.memory_format
    lo, hi = cfg.rows(len(table))
    writer = store.ArtifactWriter(target, "features", params, inputs, mode="resume")
    start = int(writer.get_attr("next_position", lo)) if writer.resumed else lo
    skipped: list[list[str]] = store_json(writer.get_attr("skipped_json", "[]"))
    if writer.resumed:
        console.info(f"{target}: resuming at image {start - lo} of {hi - lo} ({writer.rows_committed} rows kept)")
    try:
        with progress_bar("extract-features", hi - start) as advance:
            batches = stage.extract(model, preprocess, **image_sources(stage, table), positions=range(start, hi),
                                    batch_size=batch_size, workers=workers, device=dev, with_probs=probs,
                                    channels_last=stage.MEMORY_FORMATS[memory_format], progress=advance,
                                    decode=decode)
            store.append_feature_batches(
                writer, table, batches, names=store.feature_row_names(table, probs), feature_dtype=dtype,
                chunk_rows=chunk_rows, on_skip=skip_logger(table, skipped), end=hi,
                marks=lambda upto: {"next_position": upto, "skipped_json": skipped})
        if writer.rows_committed == 0:
            raise SinetError(f"{target}: no image could be read ({len(skipped)} skipped"
                             f"{f'; the first: {skipped[0][1]}' if skipped else ''})")
        fp = store.finish_features(writer, table, skipped, attrs=attrs)
    except BaseException as e:
        # keep the committed chunks: the next run resumes from them
        rows = writer.rows_committed
        writer.abort(keep_partial=True)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{target}: interrupted with {rows} rows written; run the same command again to resume "
                              f"(they are kept in {writer.partial.name})") from None
        raise
    console.info(
        f"{target}: {writer.rows_committed} images, {feature_dim}-d features"
        f"{f', {len(skipped)} skipped' if skipped else ''} (fingerprint {fp[:12]})"
    )


def extract_on_ray(job, table, target: Path, params: dict, inputs: dict, attrs: dict, *, dtype: str, chunk_rows: int,
                   feature_dim: int, address: str | None, device: str, retries: int, part_rows: int) -> None:
    """extract-features on Ray: one part file per shard (or run of ``part_rows`` images) under
    ``features.parts/``, then merged into ``target`` in dataset order and the part folder removed."""
    import shutil

    from ..engines import ray_engine

    parts = ray_engine.plan_parts(table, np.arange(len(table)), part_rows)
    folder = target.parent / "features.parts"
    skipped: list[list[str]] = []
    paths = ray_engine.extract_parts(
        job, table, parts, folder, params=params, inputs=inputs, names=store.feature_row_names(table, job.num_classes > 0),
        feature_dtype=dtype, chunk_rows=chunk_rows, attrs=attrs, feature_dim=feature_dim, address=address,
        device=device, retries=retries, on_skip=skip_logger(table, skipped))
    arts = [store.open_artifact(p, "features") for p in paths]
    try:
        rows = sum(a.dims["N"] for a in arts)
        n_skipped = sum(len(a.read("skipped_ids")) for a in arts if "skipped_ids" in a)
        if rows == 0:
            raise SinetError(f"{target}: no image could be read ({n_skipped} skipped)")
        fp = store.merge_features(target, arts, params, inputs)
    finally:
        for a in arts:
            a.close()
    shutil.rmtree(folder, ignore_errors=True)
    console.info(f"{target}: {rows} images in {len(parts)} Ray parts, {feature_dim}-d features"
                 f"{f', {n_skipped} skipped' if n_skipped else ''} (fingerprint {fp[:12]})")


def skip_logger(table, skipped: list[list[str]]):
    """``on_skip`` of the append loop: records ``[id, reason]`` and warns with the image's path."""

    def on_skip(position: int, reason: str) -> None:
        image_id = table.ids[position]
        skipped.append([str(image_id), reason])
        where = f" ({table.paths[position]})" if table.paths is not None else ""
        console.warn(f"skipped image {image_id}{where}: {reason}")

    return on_skip


def image_sources(stage, table) -> dict:
    """Where ``stage.extract`` reads the table's images: pixels, WebDataset archives, or files."""
    archives = archive_images(stage, table)
    return {"paths": None if table.pixels is not None or archives is not None else table.paths,
            "pixels": table.pixels, "archives": archives}


def archive_images(stage, table):
    """``stage.ArchiveImages`` of a table read from WebDataset shards (paths ``<shard>#<member>``);
    None for any other table."""
    if table.provenance.get("reader") != "webdataset" or table.paths is None:
        return None
    from ..datasets.webdataset import archive_members, read_members

    archives, archive_of, members = archive_members(table.paths)
    return stage.ArchiveImages(archives, archive_of, members, read_members)


def store_json(raw: object) -> list:
    import json

    return json.loads(raw) if isinstance(raw, (str, bytes)) else []


def _merge_plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    return Plan(writes=[folder / "features.h5"], reads=[shard_path(folder, i, a["shards"]) for i in range(a["shards"])],
                wait=a["wait"], resume=f"{folder / 'features.h5'} is unchanged; run the same command again")


@app.command("merge-features")
@locked("merge-features", _merge_plan)
def merge_features(
    shards: Annotated[int, typer.Option(help="Number of shards n written with --shard i/n.")],
    data: DataOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Merge features.shard-i-of-n.h5 files (from --shard i/n runs) into features.h5, in order.

    Example: sinet merge-features --data demo --shards 2
    """
    folder = artifact_dir(out, data)
    target = folder / "features.h5"
    paths = [shard_path(folder, i, shards) for i in range(shards)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SinetError(f"missing shard(s): {', '.join(missing)}")
    arts = [store.open_artifact(p, "features") for p in paths]
    try:
        first = arts[0]
        params = dict(first.params, shard=[0, 1], merged_from=shards)
        inputs = {f"shard{i}": a.fingerprint for i, a in enumerate(arts)}
        for a in arts[1:]:
            if a.dims["D"] != first.dims["D"]:
                raise SinetError(f"{a.path}: feature dim differs from {first.path}")
            store.check_classes(a.path, a.read("classes"), first.path, first.read("classes"),
                                "extract every shard for the same class table")
            if {k: v for k, v in a.params.items() if k != "shard"} != {k: v for k, v in first.params.items() if k != "shard"}:
                raise SinetError(f"{a.path}: extracted with other parameters than {first.path}")
        if not force and store.is_up_to_date(target, "features", params, inputs):
            console.info(f"{target}: up to date, nothing to do")
            return
        store.merge_features(target, arts, params, inputs)
    finally:
        for a in arts:
            a.close()
    console.info(f"{target}: merged {shards} shards")
