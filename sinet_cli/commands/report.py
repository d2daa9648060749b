"""``sinet report``: graph.h5 + prototypes.h5 + scores.h5 (+ features.h5, metrics.json) ->
report/index.html, one self-contained page (plots and thumbnails embedded as PNG data URIs) with
the plots beside it as PNG files.

This module reads the artifacts into ``stages.report.ReportData``; ``stages.report.build_report``
computes the page (numbers, plots, thumbnails) and ``sinet_cli.report_html`` renders it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from stages.report import PLOTS, find_rows

from .. import console, store
from ..app import app
from ..common import DataOpt, ForceOpt, OutOpt, WaitOpt, artifact_dir
from ..errors import SinetError
from ..locks import Plan, locked
from .summary import (check_provenance, name_resolution, noise_estimate, read_runs, resolution_line, side_text_for,
                      skipped_line)

P_PAGE = "Page"
MODE_ORDER = {"A": 0, "B": 1, "C": 2, "oracle": 3}
# every file of the page, committed as one unit (store.commit_outputs)
PAGE_FILES = ("index.html", "classes.tsv", "report.json") + PLOTS


# -- loading -----------------------------------------------------------------------------------


def relative_to(folder: Path, path: Path) -> str:
    """``path`` as the page shows it: relative to the artifact folder (no local absolute path in the HTML)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


def provenance_of(name: str, art: store.Artifact, folder: Path) -> dict[str, Any]:
    return {"name": name, "path": relative_to(folder, art.path), "fingerprint": art.fingerprint,
            "created": art.attr("created"), "package_version": art.attr("package_version"), "params": art.params,
            "inputs": art.inputs}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The runs of ``metrics.json["train"]`` (written by ``sinet train``), A/B/C/oracle order."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        console.warn(f"{path}: unreadable ({e}); no accuracy table")
        return []
    runs = data.get("train", {}) if isinstance(data, dict) else {}
    out = []
    for run, m in runs.items() if isinstance(runs, dict) else []:
        if isinstance(m, dict):
            out.append({"run": run, **{k: m.get(k) for k in ("mode", "on", "seed", "top1", "top5", "n_train",
                                                               "eval_labels", "skipped")}})
    return sorted(out, key=lambda m: (MODE_ORDER.get(str(m.get("mode")), 9), str(m["run"])))


def demo_pixels(provenance: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, pixels) of the embedded demo that features.h5 was extracted from, or None."""
    from ..datasets.demo import DEMOS, load_demo

    if not isinstance(provenance, dict) or provenance.get("reader") not in DEMOS:
        return None
    try:
        table = load_demo(noise=str(provenance.get("noise", "symmetric")), rate=float(provenance.get("rate", 0.4)),
                          seed=int(provenance.get("seed", 0)), confusion_pairs=provenance.get("confusion_pairs"),
                          name=provenance["reader"])
    except (ValueError, KeyError, TypeError) as e:
        console.warn(f"cannot rebuild the demo images from the recorded provenance ({e}); no thumbnails")
        return None
    return table.ids, table.pixels




# -- the command -----------------------------------------------------------------------------


def _plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    target = a["report_dir"] or folder / "report"
    reads = [folder / n for n in ("features.h5", "graph.h5", "prototypes.h5", "scores.h5", "metrics.json")]
    return Plan(writes=[target], reads=reads, wait=a["wait"], units=[target],
                resume=f"{target} is unchanged; run the same command again")


@app.command("report")
@locked("report", _plan)
def report(
    data: DataOpt = None,
    report_dir: Annotated[
        Optional[Path], typer.Option("--report-dir", help="Folder of the page (default: <artifact folder>/report).",
                                     rich_help_panel="Artifacts")
    ] = None,
    low_weight: Annotated[
        str, typer.Option("--low-weight", help="Which weights count as low (suspected noise, w <= T): 'auto' (T = "
                          "Otsu's cut of the training weights into a low and a high group), a number T (0: exactly "
                          "the images eq. 6 gives weight 0), or 'qP' (T = the P-quantile of the training weights, "
                          "e.g. q0.2).", rich_help_panel=P_PAGE)
    ] = "auto",
    max_classes: Annotated[
        int, typer.Option(help="Classes shown with images: the noisiest ones (every class is in the searchable index).",
                          rich_help_panel=P_PAGE)
    ] = 50,
    per_class: Annotated[
        int, typer.Option(help="Suspect images and typical images shown per class.", rich_help_panel=P_PAGE)
    ] = 8,
    thumb_size: Annotated[int, typer.Option(help="Thumbnail size in pixels.", rich_help_panel=P_PAGE)] = 48,
    top_suspects: Annotated[
        int, typer.Option(help="Rows of the top-suspects table (flagged images, worst first, with their suggested "
                          "class and side text).", rich_help_panel=P_PAGE)
    ] = 50,
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Write an HTML report of the noise found: the estimated noise overall and per class, the top
    suspects with their suggested class and side text, weight distributions, how the class names
    were resolved, the class relation graphs, the most suspect and the most typical images of the
    noisiest classes, accuracies of the trained models (or why there are none) and the provenance
    of every artifact. One self-contained file that opens offline.

    Example: sinet report --out artifacts/shop
    """
    from stages import report as stage

    from .. import report_html as html

    try:
        config = stage.ReportConfig(low_weight=low_weight, max_classes=max_classes, per_class=per_class,
                                    thumb_size=thumb_size, top_suspects=top_suspects)
    except ValueError as e:
        raise SinetError(str(e)) from None
    folder = artifact_dir(out, data)
    target_dir = report_dir or folder / "report"
    paths = {k: folder / f"{k}.h5" for k in ("graph", "prototypes", "scores", "features")}
    metrics_path, manifest = folder / "metrics.json", target_dir / "report.json"
    arts: dict[str, store.Artifact] = {}
    try:
        for kind, path in paths.items():
            if kind != "features" or path.exists():
                arts[kind] = store.open_artifact(path, kind)
        params = config.params()
        inputs = {k: arts[k].fingerprint for k in ("graph", "prototypes", "scores", "features") if k in arts}
        if metrics_path.exists():
            inputs["metrics"] = store.fingerprint_file(metrics_path)
        stale = check_provenance(folder, arts["scores"], arts["prototypes"], arts["graph"], arts.get("features"))
        if stale:
            raise SinetError(stale)
        if not force and up_to_date(manifest, target_dir / "index.html", params, inputs) and \
                store.outputs_current(target_dir, [target_dir / n for n in PAGE_FILES]):
            console.info(f"{target_dir / 'index.html'}: up to date, nothing to do (use --force to rebuild)")
            return
        report_data = read_report_data(folder, arts, metrics_path, inputs)
        report_data.provenance.append({"name": "report", "path": relative_to(folder, target_dir / "index.html"),
                                       "params": params, "inputs": inputs})
        res = stage.build_report(config, report_data)
        console.detail(f"{paths['scores']}: low weight w <= {res.threshold:.4g}; " + detail_line(report_data))
        text = html.render(res.page)
        target_dir.mkdir(parents=True, exist_ok=True)
        # every file of the page as one unit: a kill between the renames is completed by the next run
        staged = {target_dir / name: store.write_bytes(target_dir / name, png, stage=True)
                  for name, (png, _) in res.page.plots.items()}
        staged[target_dir / "classes.tsv"] = store.write_text(target_dir / "classes.tsv", res.classes_tsv, stage=True)
        staged[target_dir / "index.html"] = store.write_text(target_dir / "index.html", text, stage=True)
        staged[manifest] = store.write_json(manifest, {"params": params, "inputs": inputs,
                                                       "bytes": len(text.encode())}, stage=True)
        store.commit_outputs(target_dir, staged, params, inputs)
    finally:
        for a in arts.values():
            a.close()
    msg = (f"{target_dir / 'index.html'}: {len(report_data.names)} classes, {len(res.page.sections)} shown with "
           f"images, estimated noise {html.pct(res.estimated)}")
    if report_data.clean is not None:
        msg += f" (true {html.pct(res.true)})"
    console.info(msg + f", {len(text.encode()) / 1e6:.1f} MB")


def read_report_data(folder: Path, arts: dict[str, store.Artifact], metrics_path: Path,
                     inputs: dict[str, str]) -> Any:
    """What the page is made from, read from the open artifacts; optional per-row fields come from
    scores.h5, else from features.h5 matched by id."""
    from stages import report as stage

    scores, feats, graph = arts["scores"], arts.get("features"), arts["graph"]
    names = scores.read("classes")
    C = len(names)
    for kind in ("graph", "prototypes"):
        o = arts[kind].read("classes")
        if len(o) != C or (o != names).any():
            raise SinetError(f"{scores.path} and {arts[kind].path} disagree on the classes ({C} vs {len(o)}); "
                             "rebuild the stale one")
    ids = scores.read("ids")
    labels = scores.read("labels").astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= C):
        raise SinetError(f"{scores.path}: label outside 0..{C - 1}")
    fpos = find_rows(feats.read("ids"), ids) if feats is not None else None

    def field(name: str, fill: Any) -> np.ndarray | None:
        if name in scores:
            return scores.read(name)
        if feats is not None and name in feats:
            col = feats.read(name)
            return np.where(fpos >= 0, col[np.maximum(fpos, 0)] if len(col) else fill, fill)
        return None

    splits, clean, paths = field("splits", ""), field("clean_labels", -1), field("paths", "")
    train = (splits == "train") if splits is not None else np.ones(len(ids), dtype=bool)
    if not train.any():
        raise SinetError(f"{scores.path}: no scored row of the train split")
    if clean is not None:
        clean = clean.astype(np.int64)
        if not (clean[train] != stage.UNKNOWN).any():
            clean = None
    # score-noise's calibrated estimate, flag and suggestion (absent in scores.h5 from older runs)
    estimate, class_est = noise_estimate(scores, C)

    def optional(name: str, dtype: Any) -> np.ndarray | None:
        return scores.read(name).astype(dtype) if name in scores else None

    side_text = side_text_for(feats, ids)
    resolution = name_resolution(graph, names)
    demo = None
    if paths is None or not np.any(paths != ""):
        paths = None
        demo = demo_pixels(feats.json_attr("dataset_provenance") if feats is not None else None)
    runs = read_metrics(metrics_path) if metrics_path.exists() else []
    provenance = [provenance_of(name, arts[kind], folder) for name, kind in
                  (("graph.h5", "graph"), ("prototypes.h5", "prototypes"), ("scores.h5", "scores"),
                   ("features.h5", "features")) if kind in arts]
    if metrics_path.exists():
        provenance.append({"name": "metrics.json", "path": relative_to(folder, metrics_path),
                           "fingerprint": inputs["metrics"], "params": {"runs": [m["run"] for m in runs]},
                           "inputs": {}})
    return stage.ReportData(
        title=folder.name, names=names, ids=ids, labels=labels, weight=scores.read("weight").astype(np.float64),
        distance=scores.read("distance").astype(np.float64), nearest=scores.read("nearest_class").astype(np.int64),
        S={k: graph.read(k) for k in ("S_t", "S_w", "S_l")}, splits=splits, clean=clean, paths=paths, demo=demo,
        estimate=estimate, class_noise=class_est, flagged=optional("flagged", np.int64),
        suggested=optional("suggested_class", np.int64), confidence=optional("suggested_confidence", np.float64),
        side_text=side_text, resolution=resolution, detection=scores.json_attr("detection", {}) or {}, runs=runs,
        skipped=skipped_line(read_runs(metrics_path)) if metrics_path.exists() else None, provenance=provenance,
        resolution_line=resolution_line(resolution) if resolution is not None else "")


def detail_line(d: Any) -> str:
    """What -v says about the optional fields a page was made with."""
    def state(x: Any) -> str:
        return "present" if x is not None else "absent"

    return (f"noise estimate {'from scores.h5' if d.estimate is not None else 'absent'}; class_noise "
            f"{state(d.class_noise)}; flagged {state(d.flagged)}; side text {state(d.side_text)}")


def up_to_date(manifest: Path, page: Path, params: dict, inputs: dict) -> bool:
    if not (manifest.exists() and page.exists()):
        return False
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return (store.canonical_json(m.get("params")) == store.canonical_json(params)
            and store.canonical_json(m.get("inputs")) == store.canonical_json(inputs))
