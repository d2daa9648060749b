"""``sinet export``: scores.h5 + features.h5 -> what a user acts on (docs/noise-estimate.md).

* ``ART/export/images.csv`` and ``images.parquet``: one row per scored image (id, path, split,
  label, weight, flagged, suggested_class, suggested_confidence, class_noise, decision, and
  side_text when the dataset has it), read by ``pandas.read_csv`` / ``read_parquet`` as they are;
* ``ART/export/cleaned.tsv``: a manifest (``id path label split [text]``, what ``--data
  manifest:`` reads) of the images kept by the decision rule, flagged ones relabeled or dropped.

The decision rule and the per-row columns are ``stages.export`` (``ExportConfig``, ``decide``,
``export_block``); this module streams the blocks from scores.h5 and features.h5 and writes the files.
Image paths in the manifest are relative to its folder: for a dataset of files,
through the symlink ``ART/export/images`` to the images' common folder; for a dataset held in
memory (the demos), the kept images are written there as PNG files. Every output is written to a
temporary name and renamed into place; the rows are streamed block by block.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import console, store
from ..app import app
from ..common import DataOpt, OutOpt, WaitOpt, artifact_dir
from ..errors import SinetError
from ..locks import Plan, locked
from ..progress import progress_bar

def _tsv_field(values: np.ndarray) -> list[str]:
    return [str(v).replace("\t", " ").replace("\n", " ").replace("\r", " ") for v in np.asarray(values).tolist()]


def _demo_pixels(data: str) -> dict[str, np.ndarray]:
    """id -> pixels of an embedded demo's images, its open-set junk included (the junk of one demo is
    the other's train images: ``<prefix>-junk-N`` is ``<prefix>-train-N``)."""
    from ..datasets import load_demo
    from ..datasets.demo import DEMOS

    name = data.partition(":")[0]
    own = load_demo(noise="none", name=name)
    out = dict(zip(own.ids.tolist(), own.pixels))
    junk = load_demo(noise="none", name=DEMOS[name][3])
    out.update({i.replace("-train-", "-junk-"): p for i, p in zip(junk.ids.tolist(), junk.pixels)
                if "-train-" in i})
    return out


def _plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    return Plan(writes=[folder / "export"], reads=[folder / "scores.h5", folder / "features.h5"], wait=a["wait"],
                units=[folder / "export"], resume=f"{folder / 'export'} is unchanged; run the same command again")


@app.command("export")
@locked("export", _plan)
def export(
    data: DataOpt = None,
    relabel_at: Annotated[float, typer.Option(help="A flagged image is relabeled to the suggested class when the "
                                              "suggestion's confidence (the probability that the suggested class "
                                              "is the image's class) is at least this, else dropped.",
                                              rich_help_panel="Decision")] = 0.5,
    chunk_rows: Annotated[int, typer.Option(help="Rows per streamed block.", rich_help_panel="Compute")] = 65536,
    out: OutOpt = None,
    wait: WaitOpt = 0.0,
) -> None:
    """Write every scored image as CSV and Parquet (its label, weight, flag, suggested class and the
    estimated noise of its class) and a cleaned manifest: flagged images relabeled when the
    suggestion is confident enough, dropped otherwise. --data manifest:ART/export/cleaned.tsv reads it.

    Example: sinet export --data demo
    """
    from stages import export as stage

    try:
        config = stage.ExportConfig(relabel_at=relabel_at, chunk_rows=chunk_rows)
    except ValueError as e:
        raise SinetError(str(e)) from None
    folder = artifact_dir(out, data)
    scores_path, features_path = folder / "scores.h5", folder / "features.h5"
    target = folder / "export"
    target.mkdir(parents=True, exist_ok=True)
    tmp = {name: target / (name + store.PARTIAL_SUFFIX) for name in ("images.csv", "images.parquet", "cleaned.tsv")}
    images_tmp = target / ("images" + store.PARTIAL_SUFFIX)
    counts = np.zeros(3, dtype=np.int64)
    try:
        with store.open_artifact(scores_path, "scores") as sc, store.open_artifact(features_path, "features") as fe:
            if sc.inputs.get("features") != fe.fingerprint:
                raise SinetError(f"{scores_path} was not scored from this {features_path}; run sinet score-noise first")
            missing = [k for k in ("flagged", "suggested_class", "suggested_confidence", "class_noise") if k not in sc]
            if missing:
                raise SinetError(f"{scores_path} lacks {', '.join(missing)} (scored by an older sinet); "
                                 "rerun sinet score-noise --force")
            classes = sc.read("classes").astype(str)
            class_noise = sc.read("class_noise").astype(np.float64)
            in_memory = "paths" not in fe
            if in_memory and (data or "").partition(":")[0] not in ("demo", "demo-mnist"):
                raise SinetError(f"{features_path} has no image paths and --data {data or '(not given)'} is no "
                                 "embedded demo: pass the --data it was extracted from (demo or demo-mnist)")
            pixels = _demo_pixels(data) if in_memory else None
            root = None
            if not in_memory:  # the common folder of every image: the manifest's paths go through it
                for _, rows in fe.iter_rows(["paths"], config.chunk_rows):
                    root = stage.common_root(rows["paths"], root)
            fe_cols = ["ids"] + [k for k in ("paths", "splits", "side_text") if k in fe]
            has_text = "side_text" in fe
            n = sc.dims["N"]
            if fe.dims["N"] != n:
                raise SinetError(f"{scores_path} holds {n} rows, {features_path} {fe.dims['N']}; "
                                 "run sinet score-noise first")
            if images_tmp.exists() or images_tmp.is_symlink():
                _remove(images_tmp)
            if in_memory:
                images_tmp.mkdir()
            else:
                os.symlink(root, images_tmp)
            _write_rows(sc, fe, fe_cols, has_text, classes, class_noise, config, n, tmp, pixels, images_tmp, root,
                        counts)
        # the four outputs as one unit: a kill between the renames is completed by the next run
        store.commit_outputs(target, {target / "images": images_tmp, **{target / n: p for n, p in tmp.items()}})
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if images_tmp.exists() or images_tmp.is_symlink():
            _remove(images_tmp)
    kept = int(counts[0] + counts[1])
    console.info(f"{target}: {int(counts.sum())} images -> images.csv, images.parquet; cleaned.tsv keeps {kept} "
                 f"({counts[0]} not flagged, {counts[1]} flagged and relabeled at suggestion confidence >= "
                 f"{config.relabel_at:g}), drops {counts[2]} flagged below it")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def _write_rows(sc, fe, fe_cols, has_text, classes, class_noise, config, n, tmp, pixels, images_tmp, root,
                counts) -> None:
    """Stream scores.h5 and features.h5 block by block into the three files (stages.export.export_block)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    from stages import export as stage

    sc_cols = ["ids", "labels", "weight", "flagged", "suggested_class", "suggested_confidence"]
    names = np.asarray(classes, dtype=object)
    kinds = {"weight": pa.float64(), "flagged": pa.bool_(), "suggested_confidence": pa.float64(),
             "class_noise": pa.float64()}
    schema = pa.schema([(c, kinds.get(c, pa.string())) for c in stage.COLUMNS + (("side_text",) if has_text else ())])
    header = ["id", "path", "label", "split"] + (["text"] if has_text else [])
    with pq.ParquetWriter(tmp["images.parquet"], schema) as parquet, \
            pcsv.CSVWriter(str(tmp["images.csv"]), schema) as csv_out, open(tmp["cleaned.tsv"], "w") as tsv, \
            progress_bar("export", n) as advance:
        tsv.write("\t".join(header) + "\n")
        blocks = zip(sc.iter_rows(sc_cols, config.chunk_rows), fe.iter_rows(fe_cols, config.chunk_rows))
        for (start, s), (_, f) in blocks:
            ids = np.asarray(s["ids"]).astype(str)
            if not np.array_equal(ids, np.asarray(f["ids"]).astype(str)):
                raise SinetError(f"{sc.path} and {fe.path} list other ids at rows {start}..{start + len(ids) - 1}; "
                                 "run sinet score-noise --force")
            splits = np.asarray(f["splits"]).astype(str) if "splits" in f else np.full(len(ids), "train")
            paths = np.asarray(f["paths"]).astype(str) if "paths" in f else np.full(len(ids), "")
            text = np.asarray(f["side_text"]).astype(str) if has_text else None
            block = stage.export_block(s, ids, paths, splits, text, classes, class_noise, config.relabel_at)
            counts += np.bincount(block.decision, minlength=3)
            table = pa.Table.from_pydict(block.columns, schema=schema)
            parquet.write_table(table)
            csv_out.write_table(table)
            keep = block.keep
            rel = _manifest_paths(ids, paths, keep, pixels, images_tmp, root)
            cols = [_tsv_field(ids[keep]), rel, _tsv_field(names[block.new_label[keep]]), _tsv_field(splits[keep])]
            if has_text:
                cols.append(_tsv_field(text[keep]))
            tsv.write("".join("\t".join(r) + "\n" for r in zip(*cols)))
            advance(len(ids))


def _manifest_paths(ids: np.ndarray, paths: np.ndarray, keep: np.ndarray, pixels, images_tmp: Path,
                    root: Optional[str]) -> list[str]:
    """The manifest's image paths of the kept rows, relative to its folder (``images/...``): demo
    pixels written there as PNG, files reached through the ``images`` symlink to their common folder."""
    out = []
    if pixels is not None:
        from PIL import Image

        for i in ids[keep].tolist():
            if i not in pixels:
                raise SinetError(f"image {i!r}: not an image of the embedded demo; export the dataset it came from")
            name = f"{i}.png"
            Image.fromarray(np.asarray(pixels[i])).save(images_tmp / name)
            out.append(f"images/{name}")
        return out
    from stages.export import relative_image_paths

    return relative_image_paths(paths[keep].tolist(), root)
