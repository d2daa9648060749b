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
    load_table,
    require_two_classes,
    resolve_device,
)
from ..errors import Interrupted, SinetError
from ..locks import Plan, locked
from ..progress import progress_bar
from ..sideinfo import DEFAULT_BACKBONE, default_weights


def parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SinetError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_path(out: Path, i: int, n: int) -> Path:
    return out / f"features.shard-{i}-of-{n}.h5"


MEMORY_FORMATS = {"auto": None, "channels-last": True, "contiguous": False}  # --memory-format -> stage.extract
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
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (64 is fastest on CPU here).", rich_help_panel="Compute")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader decoding processes (image files; for shards each takes "
                                         "whole shards).", rich_help_panel="Compute")] = 2,
    device: DeviceOpt = "auto",
    memory_format: Annotated[str, typer.Option(help="auto (channels-last on the CPU: 1.2-1.6x faster there; "
                             "contiguous on a GPU), channels-last or contiguous.", rich_help_panel="Compute")] = "auto",
    dtype: Annotated[str, typer.Option(help="On-disk feature dtype: float16 or float32.", rich_help_panel="Artifacts")] = "float16",
    chunk_rows: Annotated[int, typer.Option(help="Rows per flushed (resumable) chunk.", rich_help_panel="Artifacts")] = 4096,
    shard: Annotated[
        Optional[str], typer.Option(help="i/n: extract only the i-th of n contiguous slices (then merge-features).",
                                    rich_help_panel="Compute")
    ] = None,
    max_pixels: Annotated[int, typer.Option(help="Largest image decoded, in pixels (width x height); a larger one is "
                          "skipped and recorded in skipped_ids. Default: PIL's own decompression-bomb threshold.",
                          rich_help_panel="Compute")] = MAX_PIXELS,
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Encode every image with a timm backbone into L2-normalized features (features.h5).

    Streams in chunks with bounded memory and resumes after a kill; unreadable images are logged
    with their id and skipped.

    Example: sinet extract-features --data demo --image-size 64
    """
    from stages import extract_features as stage

    if dtype not in ("float16", "float32"):
        raise SinetError(f"--dtype {dtype!r}: choose float16 or float32")
    if memory_format not in MEMORY_FORMATS:
        raise SinetError(f"--memory-format {memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    if max_pixels < 1:
        raise SinetError(f"--max-pixels {max_pixels}: must be >= 1")
    decode = stage.Decode(max_pixels=max_pixels)
    table = load_table(data, classes, noise, noise_rate, noise_seed, captions, label_field=label_field)
    require_two_classes(table.classes.names, f"--data {data}")
    shard_i, shard_n = parse_shard(shard)
    folder = artifact_dir(out, data)
    target = folder / "features.h5" if shard_n == 1 else shard_path(folder, shard_i, shard_n)
    weight_path = None if random_init else (weights or default_weights(backbone))
    if weights is not None and random_init:
        raise SinetError("--weights and --random-init exclude each other")
    params = {
        "backbone": backbone,
        "image_size": image_size,
        "probs": probs,
        "dtype": dtype,
        "random_init": random_init,
        "shard": [shard_i, shard_n],
    }
    if max_pixels != stage.MAX_PIXELS:  # recorded only when set: files from before the option stay up to date
        params["max_pixels"] = max_pixels
    inputs = {"dataset": table.fingerprint()}
    if weight_path is not None:
        inputs["weights"] = store.fingerprint_file(weight_path)
    if not force and store.is_up_to_date(target, "features", params, inputs):
        console.info(f"{target}: up to date, nothing to do (use --force to recompute)")
        return

    num_classes = len(table.classes) if probs else 0
    try:
        model, info = stage.build_backbone(backbone, weight_path, random_init=random_init, num_classes=num_classes)
    except ValueError as e:
        raise SinetError(str(e)) from None
    preprocess = stage.Preprocess.for_model(model, image_size)
    dev = resolve_device(device)

    n = len(table)
    lo, hi = shard_i * n // shard_n, (shard_i + 1) * n // shard_n
    writer = store.ArtifactWriter(target, "features", params, inputs, mode="resume")
    next_pos = int(writer.get_attr("next_position", lo)) if writer.resumed else lo
    skipped: list[list[str]] = store_json(writer.get_attr("skipped_json", "[]"))
    if writer.resumed:
        console.info(f"{target}: resuming at image {next_pos - lo} of {hi - lo} ({writer.rows_committed} rows kept)")
    fdtype = np.float16 if dtype == "float16" else np.float32
    buf: list = []

    def flush(upto: int) -> None:
        if not buf:
            writer.set_attr("next_position", upto)
            return
        pos = np.concatenate([b.positions[b.ok] for b in buf])
        rows = {
            "ids": table.ids[pos],
            "labels": table.labels[pos],
            "features": np.concatenate([b.features[b.ok] for b in buf]).astype(fdtype),
            "splits": table.splits[pos],
        }
        if table.paths is not None:
            rows["paths"] = table.paths[pos]
        if table.clean_labels is not None:
            rows["clean_labels"] = table.clean_labels[pos]
        if table.side_text is not None:
            rows["side_text"] = table.side_text[pos]
        if table.subset is not None:
            rows["subset"] = table.subset[pos]
        if probs:
            rows["probs"] = np.concatenate([b.probs[b.ok] for b in buf]).astype(np.float32)
        if len(pos):
            writer.append_rows(rows, next_position=upto, skipped_json=skipped)
        else:
            writer.set_attr("next_position", upto)
            writer.set_attr("skipped_json", skipped)
        buf.clear()

    archives = archive_images(stage, table)
    try:
        with progress_bar("extract-features", hi - next_pos) as advance:
            pending = 0
            for batch in stage.extract(
                model,
                preprocess,
                paths=None if table.pixels is not None or archives is not None else table.paths,
                pixels=table.pixels,
                archives=archives,
                positions=range(next_pos, hi),
                batch_size=batch_size,
                workers=workers,
                device=dev,
                with_probs=probs,
                channels_last=MEMORY_FORMATS[memory_format],
                progress=advance,
                decode=decode,
            ):
                for p in np.flatnonzero(~batch.ok):
                    image_id = table.ids[batch.positions[p]]
                    skipped.append([str(image_id), batch.reasons[p]])
                    where = f" ({table.paths[batch.positions[p]]})" if table.paths is not None else ""
                    console.warn(f"skipped image {image_id}{where}: {batch.reasons[p]}")
                buf.append(batch)
                pending += len(batch.positions)
                if pending >= chunk_rows:
                    flush(int(batch.positions[-1]) + 1)
                    pending = 0
            flush(hi)
        if writer.rows_committed == 0:
            raise SinetError(f"{target}: no image could be read ({len(skipped)} skipped"
                             f"{f'; the first: {skipped[0][1]}' if skipped else ''})")
        writer.write("classes", table.classes.names)
        if skipped:
            writer.write("skipped_ids", [s[0] for s in skipped])
            writer.write("skipped_reasons", [s[1] for s in skipped])
        writer.set_attr("backbone", info.__dict__)
        writer.set_attr("preprocess", preprocess.as_dict())
        writer.set_attr("decode", decode.as_dict())  # rescore decodes new images with the same recipe
        writer.set_attr("dataset_provenance", table.provenance)
        writer.set_attr("class_table", {"names": table.classes.names, "synsets": table.classes.synsets,
                                        "descriptions": table.classes.descriptions, "parents": table.classes.parents})
        fp = writer.commit()
    except BaseException as e:
        # keep the committed chunks: the next run resumes from them
        rows = writer.rows_committed
        writer.abort(keep_partial=True)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{target}: interrupted with {rows} rows written; run the same command again to resume "
                              f"(they are kept in {writer.partial.name})") from None
        raise
    console.info(
        f"{target}: {writer.rows_committed} images, {info.feature_dim}-d features"
        f"{f', {len(skipped)} skipped' if skipped else ''} (fingerprint {fp[:12]})"
    )


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
    paths = [shard_path(folder, i, shards) for i in range(shards)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SinetError(f"missing shard(s): {', '.join(missing)}")
    arts = [store.open_artifact(p, "features") for p in paths]
    try:
        first = arts[0]
        params = dict(first.params, shard=[0, 1], merged_from=shards)
        inputs = {f"shard{i}": a.fingerprint for i, a in enumerate(arts)}
        target = folder / "features.h5"
        for a in arts[1:]:
            if a.dims["D"] != first.dims["D"] or list(a.read("classes")) != list(first.read("classes")):
                raise SinetError(f"{a.path}: feature dim or classes differ from {first.path}")
            if {k: v for k, v in a.params.items() if k != "shard"} != {k: v for k, v in first.params.items() if k != "shard"}:
                raise SinetError(f"{a.path}: extracted with other parameters than {first.path}")
        if not force and store.is_up_to_date(target, "features", params, inputs):
            console.info(f"{target}: up to date, nothing to do")
            return
        writer = store.ArtifactWriter(target, "features", params, inputs, mode="new")
        try:
            row_names = [n for n in ("ids", "labels", "features", "splits", "paths", "clean_labels", "side_text", "subset",
                                     "probs")
                         if n in first]
            skipped_ids: list[str] = []
            skipped_reasons: list[str] = []
            for a in arts:
                for _, rows in a.iter_rows(row_names, 65536):
                    writer.append_rows(rows)
                if "skipped_ids" in a:
                    skipped_ids += list(a.read("skipped_ids"))
                    skipped_reasons += list(a.read("skipped_reasons"))
            writer.write("classes", first.read("classes"))
            if skipped_ids:
                writer.write("skipped_ids", skipped_ids)
                writer.write("skipped_reasons", skipped_reasons)
            for key in ("backbone", "preprocess", "decode", "dataset_provenance", "class_table"):
                if first.attr(key) is not None:
                    writer.set_attr(key, first.attr(key))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    finally:
        for a in arts:
            a.close()
    console.info(f"{target}: merged {shards} shards")
