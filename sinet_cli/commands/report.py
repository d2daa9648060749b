"""``sinet report``: graph.h5 + prototypes.h5 + scores.h5 (+ features.h5, metrics.json) ->
report/index.html, one self-contained page (plots and thumbnails embedded as PNG data URIs) with
the plots beside it as PNG files.

This module loads the artifacts, draws the plots with matplotlib (Agg) and the thumbnails with
PIL; the numbers come from ``stages.report`` and the page from ``sinet_cli.report_html``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from stages.report import find_rows

from .. import console, store
from ..app import app
from ..common import DataOpt, ForceOpt, OutOpt, WaitOpt, artifact_dir
from ..errors import SinetError
from ..locks import Plan, locked
from .summary import (NO_ESTIMATE, check_provenance, name_resolution, noise_estimate, read_runs, resolution_line,
                      side_text_for, skipped_line)

P_PAGE = "Page"
HEATMAP_LABELED = 60  # at most this many classes per heat map: with names on both axes
BOX_CLASSES = 40  # classes in the per-class weight box plot and the noise-rate bars
MODE_ORDER = {"A": 0, "B": 1, "C": 2, "oracle": 3}
# every file of the page, committed as one unit (store.commit_outputs)
PLOTS = ("noise-rate.png", "weights.png", "weights-by-class.png", "S_t.png", "S_w.png", "S_l.png")
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


# -- images ------------------------------------------------------------------------------------


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def placeholder(size: int) -> bytes:
    """A grey square with a cross: an image that could not be read."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 225)
    d = ImageDraw.Draw(img)
    d.line((6, 6, size - 7, size - 7), fill=150, width=2)
    d.line((6, size - 7, size - 7, 6), fill=150, width=2)
    return png_bytes(img)


def thumbnail_from_pixels(pixels: np.ndarray, size: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    return png_bytes(img.resize((size, size), Image.Resampling.BICUBIC))


def thumbnail_from_path(path: str, size: int) -> bytes | None:
    """Open and downscale an image file; None when it cannot be read (never fatal)."""
    import warnings

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():  # PIL warns above its limit, and still decodes: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:  # refused from the header, as extract-features does
                return None
            img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
            img = ImageOps.exif_transpose(img)
            img = img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            if img.mode == "RGB":  # 256-colour palette: a third of the bytes, invisible at thumbnail size
                img = img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
            return png_bytes(img)
    except Exception:  # missing, truncated, not an image, decompression bomb: all only a placeholder
        return None


class ThumbSource:
    """Thumbnails of rows by path (datasets of image files) or by id (the embedded demos)."""

    def __init__(self, size: int, paths: np.ndarray | None, demo: Any = None):
        self.size = size
        self.paths = paths
        self.demo = demo  # (ids, pixels) of the embedded demo, or None
        self._placeholder: bytes | None = None
        self.missing = 0

    def placeholder(self) -> bytes:
        if self._placeholder is None:
            self._placeholder = placeholder(self.size)
        return self._placeholder

    def get(self, rows: np.ndarray, ids: np.ndarray) -> list[tuple[bytes, bool]]:
        """(png, ok) per row."""
        out: list[tuple[bytes, bool]] = []
        demo_pos = find_rows(self.demo[0], ids) if self.demo is not None else None
        for k, r in enumerate(rows):
            png = None
            if self.paths is not None and self.paths[r]:
                png = thumbnail_from_path(str(self.paths[r]), self.size)
            elif demo_pos is not None and demo_pos[k] >= 0:
                png = thumbnail_from_pixels(self.demo[1][demo_pos[k]], self.size)
            if png is None:
                self.missing += 1
            out.append((png or self.placeholder(), png is not None))
        return out


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


# -- plots -------------------------------------------------------------------------------------


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def plot_noise_rates(stage, noise, order: np.ndarray, names: np.ndarray, has_truth: bool,
                     estimate_label: str = "estimated (low weight)") -> bytes:
    import matplotlib.pyplot as plt

    top = order[: min(BOX_CLASSES, len(order))]
    wide = len(names) > len(top)
    fig, axes = plt.subplots(1, 2 if wide or has_truth else 1, figsize=(11 if (wide or has_truth) else 6,
                                                                         max(3.0, 0.2 * len(top) + 1.2)),
                             squeeze=False)
    ax = axes[0, 0]
    y = np.arange(len(top))[::-1]
    ax.barh(y, 100 * np.nan_to_num(noise.estimated[top]), color="#4c72b0", height=0.7, label=estimate_label)
    if has_truth:
        ax.plot(100 * noise.true[top], y, "o", color="#d62728", ms=4, label="true (clean labels)")
    ax.set_yticks(y, [_short(str(names[c])) for c in top], fontsize=8)
    ax.set_xlabel("noise rate (%)")
    ax.set_title(f"{'the ' + str(len(top)) + ' noisiest' if wide else 'all'} classes", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 100)
    if wide or has_truth:
        ax2 = axes[0, 1]
        if has_truth:
            known = ~np.isnan(noise.true) & ~np.isnan(noise.estimated)
            ax2.scatter(100 * noise.true[known], 100 * noise.estimated[known], s=8 if known.sum() > 200 else 18,
                        alpha=0.6, color="#4c72b0")
            ax2.plot([0, 100], [0, 100], "--", color="#999", lw=1)
            ax2.set_xlabel("true noise rate (%)")
            ax2.set_ylabel("estimated noise rate (%)")
            ax2.set_title(f"every class ({int(known.sum())})", fontsize=10)
            ax2.set_xlim(0, 100)
            ax2.set_ylim(0, 100)
        else:
            est = noise.estimated[~np.isnan(noise.estimated)]
            ax2.hist(100 * est, bins=20, range=(0, 100), color="#4c72b0")
            ax2.set_xlabel("estimated noise rate (%)")
            ax2.set_ylabel("classes")
            ax2.set_title(f"every class ({len(est)})", fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def plot_weights(stage, weight: np.ndarray, noisy: np.ndarray | None, threshold: float) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    upper = float(np.nanmax(weight)) if len(weight) else 1.0
    if noisy is not None:
        edges, counts = stage.weight_histogram(weight, 40, upper, groups=noisy.astype(np.int64))
        counts = np.vstack([counts, np.zeros((2 - len(counts), counts.shape[1]), dtype=counts.dtype)])
        width = np.diff(edges)
        ax.bar(edges[:-1], counts[0], width, align="edge", color="#2ca02c", alpha=0.8, label="correctly labeled")
        ax.bar(edges[:-1], counts[1], width, bottom=counts[0], align="edge", color="#d62728", alpha=0.8,
               label="mislabeled")
        ax.legend(fontsize=8)
    else:
        edges, counts = stage.weight_histogram(weight, 40, upper)
        ax.bar(edges[:-1], counts, np.diff(edges), align="edge", color="#4c72b0")
    if threshold > 0:
        ax.axvline(threshold, color="#333", ls="--", lw=1)
    n0 = int(np.sum(~(np.asarray(weight) > 0)))
    ax.set_title(f"weights of {len(weight)} training images ({n0} with w = 0)", fontsize=10)
    ax.set_xlabel("weight w (scores.h5)")
    ax.set_ylabel("images")
    fig.tight_layout()
    return _fig_png(fig)


def plot_weights_by_class(stage, weight: np.ndarray, labels: np.ndarray, classes: np.ndarray, names: np.ndarray,
                          threshold: float) -> bytes:
    import matplotlib.pyplot as plt

    q = stage.class_quantiles(weight, labels, classes)
    stats = [{"whislo": r[0], "q1": r[1], "med": r[2], "q3": r[3], "whishi": r[4], "label": _short(str(names[c]))}
             for c, r in zip(classes, q) if not np.isnan(r).any()][::-1]
    fig, ax = plt.subplots(figsize=(5.4, max(3.0, 0.2 * len(stats) + 1.2)))
    if stats:
        ax.bxp(stats, orientation="horizontal", showfliers=False, widths=0.6, patch_artist=True,
               boxprops={"facecolor": "#c6d4e8"}, medianprops={"color": "#d62728"})
        ax.tick_params(axis="y", labelsize=8)
    if threshold > 0:
        ax.axvline(threshold, color="#333", ls="--", lw=1)
    ax.set_xlabel("weight w (box: quartiles, whiskers: 5th-95th percentile)")
    ax.set_title(f"weights per class ({'the ' + str(len(stats)) + ' noisiest' if len(names) > len(stats) else 'all'})",
                 fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def plot_heatmap(S: np.ndarray, subset: np.ndarray, names: np.ndarray, title: str) -> bytes:
    import matplotlib.pyplot as plt

    M = np.asarray(S, dtype=np.float32)[np.ix_(subset, subset)]
    n = len(subset)
    side = min(11.0, max(3.0, 0.17 * n + 1.6))
    fig, ax = plt.subplots(figsize=(side + 0.6, side))
    im = ax.imshow(M, cmap="viridis", interpolation="nearest")
    labels = [_short(str(names[c]), 18) for c in subset]
    fs = 8 if n <= 25 else 6
    ax.set_xticks(np.arange(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(n), labels, fontsize=fs)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _fig_png(fig)  # bbox_inches="tight" fits the labels: no tight_layout pass over 120 labels


# -- writing -----------------------------------------------------------------------------------


def classes_tsv(names: np.ndarray, noise, order: np.ndarray, near_idx: np.ndarray,
                flagged: np.ndarray | None = None, resolution: list[dict[str, str]] | None = None) -> str:
    """The per-class numbers as TSV; ``flagged``, ``synset`` and ``name_source`` are empty when
    scores.h5 / graph.h5 do not record them."""
    def clean(s: str) -> str:
        return str(s).replace("\t", " ").replace("\n", " ").replace("\r", " ")

    lines = ["class\ttrain_images\tlow_weight\testimated_noise\ttrue_noise\tnearest_classes\tflagged\tsynset\t"
             "name_source"]
    for c in order:
        true = "" if np.isnan(noise.true[c]) else f"{noise.true[c]:.4f}"
        est = "" if np.isnan(noise.estimated[c]) else f"{noise.estimated[c]:.4f}"
        res = resolution[c] if resolution is not None else {}
        lines.append(f"{clean(names[c])}\t{noise.n_train[c]}\t{noise.n_low[c]}\t{est}\t{true}\t"
                     + ",".join(clean(names[n]) for n in near_idx[c])
                     + f"\t{'' if flagged is None else flagged[c]}\t{clean(res.get('synset', ''))}\t"
                       f"{clean(res.get('source', ''))}")
    return "\n".join(lines) + "\n"


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
    import matplotlib

    matplotlib.use("Agg")
    from stages import report as stage

    from .. import report_html as html

    low_rule = parse_low_weight(low_weight)
    if max_classes < 0 or per_class < 0 or top_suspects < 0:
        raise SinetError("--max-classes, --per-class and --top-suspects must be >= 0")
    if not 8 <= thumb_size <= 256:
        raise SinetError(f"--thumb-size {thumb_size}: choose 8..256 pixels")
    folder = artifact_dir(out, data)
    target_dir = report_dir or folder / "report"
    graph_path, proto_path, scores_path = folder / "graph.h5", folder / "prototypes.h5", folder / "scores.h5"
    features_path, metrics_path = folder / "features.h5", folder / "metrics.json"

    graph = store.open_artifact(graph_path, "graph")
    protos = store.open_artifact(proto_path, "prototypes")
    scores = store.open_artifact(scores_path, "scores")
    feats = store.open_artifact(features_path, "features") if features_path.exists() else None
    try:
        params = {"low_weight": low_rule, "max_classes": max_classes, "per_class": per_class,
                  "thumb_size": thumb_size, "top_suspects": top_suspects}
        inputs = {"graph": graph.fingerprint, "prototypes": protos.fingerprint, "scores": scores.fingerprint}
        if feats is not None:
            inputs["features"] = feats.fingerprint
        if metrics_path.exists():
            inputs["metrics"] = store.fingerprint_file(metrics_path)
        manifest = target_dir / "report.json"
        stale = check_provenance(folder, scores, protos, graph, feats)
        if stale:
            raise SinetError(stale)
        if not force and up_to_date(manifest, target_dir / "index.html", params, inputs) and \
                store.outputs_current(target_dir, [target_dir / n for n in PAGE_FILES]):
            console.info(f"{target_dir / 'index.html'}: up to date, nothing to do (use --force to rebuild)")
            return

        names = scores.read("classes")
        C = len(names)
        for other, art in ((graph_path, graph), (proto_path, protos)):
            o = art.read("classes")
            if len(o) != C or (o != names).any():
                raise SinetError(f"{scores_path} and {other} disagree on the classes ({C} vs {len(o)}); "
                                 "rebuild the stale one")
        ids = scores.read("ids")
        labels = scores.read("labels").astype(np.int64)
        weight = scores.read("weight").astype(np.float64)
        distance = scores.read("distance").astype(np.float64)
        nearest = scores.read("nearest_class").astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= C):
            raise SinetError(f"{scores_path}: label outside 0..{C - 1}")

        # optional per-row fields: from scores.h5, else from features.h5 matched by id
        fpos = find_rows(feats.read("ids"), ids) if feats is not None else None

        def field(name: str, fill: Any) -> np.ndarray | None:
            if name in scores:
                return scores.read(name)
            if feats is not None and name in feats:
                col = feats.read(name)
                return np.where(fpos >= 0, col[np.maximum(fpos, 0)] if len(col) else fill, fill)
            return None

        splits = field("splits", "")
        clean = field("clean_labels", -1)
        paths = field("paths", "")
        train = (splits == "train") if splits is not None else np.ones(len(ids), dtype=bool)
        if not train.any():
            raise SinetError(f"{scores_path}: no scored row of the train split")
        if clean is not None:
            clean = clean.astype(np.int64)
            if not (clean[train] != stage.UNKNOWN).any():
                clean = None
        has_truth = clean is not None
        # score-noise's calibrated estimate, flag and suggestion (absent in scores.h5 from older runs)
        estimate, class_est = noise_estimate(scores, C)
        flagged = scores.read("flagged").astype(np.int64) if "flagged" in scores else None
        suggested = scores.read("suggested_class").astype(np.int64) if "suggested_class" in scores else None
        confidence = (scores.read("suggested_confidence").astype(np.float64) if "suggested_confidence" in scores
                      else None)
        side_text = side_text_for(feats, ids)
        resolution = name_resolution(graph, names)
        suggest = suggested if suggested is not None else nearest

        threshold, rule_text = resolve_low_weight(stage, low_rule, weight[train])
        noise = stage.class_noise(labels, weight, C, threshold, clean, train)
        est_all, true_all = stage.overall_rates(noise)
        if class_est is not None:  # the per-class rates shown are the calibrated ones
            noise = dataclasses.replace(noise, estimated=np.where(noise.n_train > 0, class_est, np.nan))
            n = noise.n_train
            known = ~np.isnan(noise.estimated)
            est_all = float((noise.estimated[known] * n[known]).sum() / n[known].sum()) if n[known].sum() else est_all
        if estimate is not None:
            est_all = float(estimate["overall"])
        flagged_per_class = None if flagged is None else stage.flagged_per_class(labels, flagged, C, train)
        console.detail(f"{scores_path}: low weight w <= {threshold:.4g}; noise estimate "
                       f"{'from scores.h5' if estimate is not None else 'absent'}; class_noise "
                       f"{'present' if class_est is not None else 'absent'}; flagged "
                       f"{'present' if flagged is not None else 'absent'}; side text "
                       f"{'present' if side_text is not None else 'absent'}")
        order = stage.noise_order(noise)
        order = order[noise.n_train[order] > 0] if (noise.n_train > 0).any() else order
        S = {k: graph.read(k) for k in ("S_t", "S_w", "S_l")}
        near_idx, near_sim = stage.nearest_classes(S["S_t"], 3)

        # thumbnails: image files when the rows have paths, else the embedded demo's pixels
        demo = None
        if paths is None or not np.any(paths != ""):
            paths = None
            demo = demo_pixels(feats.json_attr("dataset_provenance") if feats is not None else None)
        thumbs = ThumbSource(thumb_size, paths, demo)
        detailed = order[:max_classes]
        suspect_rows = stage.extremes_per_class(labels, weight, detailed, per_class, secondary=-distance, rows=train)
        typical_rows = stage.extremes_per_class(labels, distance, detailed, per_class, rows=train)

        def suggestion(r: int, long: bool = False, bare: bool = False) -> str:
            s = int(suggest[r])
            name = str(names[s]) if 0 <= s < C else "none"
            if confidence is None or bare:
                return name
            return f"{name} ({confidence[r]:.0%}{' confidence' if long else ''})"

        def thumb_list(rows: np.ndarray, kind: str) -> list[html.Thumb]:
            out = []
            for r, (png, ok) in zip(rows, thumbs.get(rows, ids[rows])):
                status = ""
                truth = ""
                if has_truth and clean[r] != stage.UNKNOWN:
                    status = "noisy" if clean[r] != labels[r] else "clean"
                    truth = "; true: " + (str(names[clean[r]]) if 0 <= clean[r] < C else "none (open-set)")
                if kind == "suspect":
                    caption = f"→{suggestion(r)}"
                    sub = f"w {weight[r]:.2f}" + (" ⚑" if flagged is not None and flagged[r] else "")
                else:
                    caption, sub = f"d {distance[r]:.2f}", ""
                text = f"; text: {console.plain(side_text[r], 200)}" if side_text is not None and side_text[r] else ""
                title = (f"{ids[r]}: label {names[labels[r]]}, suggested {suggestion(r, True)}, "
                         f"w {weight[r]:.3f}, d {distance[r]:.3f}{truth}{text}{'' if ok else ' (image unreadable)'}")
                out.append(html.Thumb(png, caption, title, status, sub))
            return out

        def row_of(c: int) -> html.ClassRow:
            return html.ClassRow(
                index=int(c), name=str(names[c]), n_train=int(noise.n_train[c]), n_low=int(noise.n_low[c]),
                estimated=float(noise.estimated[c]), true=None if np.isnan(noise.true[c]) else float(noise.true[c]),
                nearest=[(str(names[n]), float(s)) for n, s in zip(near_idx[c], near_sim[c])],
                detailed=int(c) in shown,
                n_flagged=None if flagged_per_class is None else int(flagged_per_class[c]),
                resolution=None if resolution is None else resolution[c])

        full_order = stage.noise_order(noise)
        shown = set(int(c) for c in detailed)
        rows = [row_of(c) for c in full_order]
        by_class = {r.index: r for r in rows}
        sections = [html.ClassSection(int(c), str(names[c]), by_class[int(c)], thumb_list(s, "suspect"),
                                      thumb_list(t, "typical"))
                    for c, s, t in zip(detailed, suspect_rows, typical_rows)]

        # plots
        w_train, l_train = weight[train], labels[train]
        noisy_train = None
        if has_truth:
            c_tr = clean[train]
            known = c_tr != stage.UNKNOWN
            noisy_train = (c_tr != l_train)[known]
            w_hist = w_train[known]
        else:
            w_hist = w_train
        if C <= HEATMAP_LABELED:
            subset = np.arange(C)
            heat_note = f"All {C} classes, names on both axes."
        else:
            subset = stage.focus_classes(order, near_idx, HEATMAP_LABELED)
            heat_note = (f"{C} classes are too many to read: the heat maps show {len(subset)} of them, the noisiest "
                         "classes each followed by its nearest classes (S_t).")
        quality = stage.rule_quality(noise)
        if class_est is not None or estimate is not None:
            method = str((estimate or {}).get("method", "score-noise's estimate"))
            rows_est = (estimate or {}).get("rows")
            lead = (f"Estimated noise rate = {method} (scores.h5 "
                    f"{' and '.join(n for n, x in (('noise_estimate', estimate), ('class_noise', class_est)) if x is not None)}"
                    f"{f', over {rows_est} training images' if isinstance(rows_est, int) else ''})"
                    + ("" if class_est is not None else "; per class: the share of its training images with a low "
                       "weight") + ". Low weight: w ≤ ")
        else:
            lead = "Estimated noise rate of a class = share of its training images with a low weight: w ≤ "
        rule = (f"{lead}{threshold:.4g} ({rule_text})."
                + (f" On the images with a known clean label, {html.pct(quality[0])} of the low-weight images are "
                   f"mislabeled and they hold {html.pct(quality[1])} of the mislabeled ones." if quality else "")
                + (" True noise rate = share of its training images (with a known clean label) whose clean "
                         "label differs from the given one; open-set images count as noise." if has_truth else ""))
        plots = {
            "noise-rate.png": (plot_noise_rates(stage, noise, order, names, has_truth,
                                                "estimated" if class_est is not None else "estimated (low weight)"),
                               "Estimated noise rate per class" + (" beside the true rate" if has_truth else "")),
            "weights.png": (plot_weights(stage, w_hist, noisy_train, threshold),
                            "Distribution of the weights of the training images"
                            + (" (with a known clean label), split by the truth" if has_truth else "")),
            "weights-by-class.png": (plot_weights_by_class(stage, w_train, l_train, order[:BOX_CLASSES], names,
                                                           threshold), "Weights per class, noisiest first"),
        }
        for k, desc in (("S_t", "S_t = S_l + S_w (eq. 3)"), ("S_w", "S_w: hierarchy"), ("S_l", "S_l: label text (eq. 2)")):
            plots[f"{k}.png"] = (plot_heatmap(S[k], subset, names, desc), f"Class relation graph {desc}")

        all_runs = read_metrics(metrics_path) if metrics_path.exists() else []
        metrics = [m for m in all_runs if not m.get("skipped")]
        skipped = skipped_line(read_runs(metrics_path)) if metrics_path.exists() else None
        provenance = [provenance_of("graph.h5", graph, folder), provenance_of("prototypes.h5", protos, folder),
                      provenance_of("scores.h5", scores, folder)]
        if feats is not None:
            provenance.append(provenance_of("features.h5", feats, folder))
        if metrics_path.exists():
            provenance.append({"name": "metrics.json", "path": relative_to(folder, metrics_path),
                               "fingerprint": inputs["metrics"], "params": {"runs": [m["run"] for m in all_runs]},
                               "inputs": {}})
        provenance.append({"name": "report", "path": relative_to(folder, target_dir / "index.html"), "params": params,
                           "inputs": inputs})
        detection = scores.json_attr("detection", {}) or {}
        summary = [("artifacts", folder.name), ("classes", str(C)),
                   ("training images", f"{int(noise.n_train.sum())} scored"),
                   ("estimated noise (all classes)", html.pct(est_all)
                    + ("" if estimate is None else f" ({console.plain(estimate.get('method', '?'), 80)})"))]
        if flagged is not None:
            summary.append(("flagged (suspected mislabeled)",
                            f"{int((train & (flagged != 0)).sum())} of {int(train.sum())} training images"))
        if has_truth:
            summary.append(("true noise (all classes)", html.pct(true_all)))
        if resolution is not None:
            summary.append(("class names", resolution_line(resolution)))
        # what this page cannot say, and why
        unknown = []
        if estimate is None and class_est is None:
            unknown.append(f"{NO_ESTIMATE[0].upper()}{NO_ESTIMATE[1:]}: the estimated rates here are the share of "
                           "low-weight images.")
        if not has_truth:
            unknown.append("No clean labels: no ROC-AUC/AP of the detection against the truth, no true noise rate.")
        if skipped:
            unknown.append(skipped[0].upper() + skipped[1:] + ".")
        elif not metrics:
            unknown.append("No accuracy: no model was trained and evaluated (metrics.json has no evaluated run).")
        pool = train & (flagged != 0) if flagged is not None else train
        top_rows = stage.worst_rows(weight, distance, top_suspects, pool)
        suspects = [html.Suspect(png, str(ids[r]), str(names[labels[r]]), suggestion(r, bare=True),
                                 None if confidence is None else float(confidence[r]), float(weight[r]),
                                 "" if side_text is None else str(side_text[r]), ok)
                    for r, (png, ok) in zip(top_rows, thumbs.get(top_rows, ids[top_rows]))]
        suspects_note = (f"The {len(top_rows)} most suspect of the {int(pool.sum())} flagged training images "
                         "(score-noise's is-label-issue flag; all of them in suspects.tsv), lowest weight first."
                         if flagged is not None else
                         f"The {len(top_rows)} lowest-weight training images (scores.h5 has no flagged column: "
                         "rerun score-noise).")
        suspects_note += (" Suggested: score-noise's suggested class and its confidence." if suggested is not None
                          else " Suggested: the class of the nearest prototype.")
        notes = []
        if splits is None:
            notes.append("No split information (no splits in scores.h5 or features.h5): every scored image is "
                         "counted as a training image.")
        if thumbs.missing:
            notes.append(f"{thumbs.missing} thumbnail(s) could not be read and show a crossed placeholder.")
        if paths is None and demo is None:
            notes.append("No image source (no paths and not an embedded demo): thumbnails are placeholders.")
        page = html.Page(
            title=f"sinet report: {folder.name}", summary=summary, rule=rule, thumb_size=thumb_size, plots=plots,
            rows=rows, sections=sections, heatmap_note=heat_note, heatmaps_in_a_row=len(subset) <= 25, metrics=metrics,
            detection={k: v for k, v in detection.items() if isinstance(v, dict)}, provenance=provenance,
            has_truth=has_truth, notes=notes, unknown=unknown, suspects=suspects, suspects_note=suspects_note,
            resolution=resolution or [], side_text=side_text is not None)
        text = html.render(page)
        target_dir.mkdir(parents=True, exist_ok=True)
        # every file of the page as one unit: a kill between the renames is completed by the next run
        staged = {target_dir / name: store.write_bytes(target_dir / name, png, stage=True)
                  for name, (png, _) in plots.items()}
        staged[target_dir / "classes.tsv"] = store.write_text(
            target_dir / "classes.tsv", classes_tsv(names, noise, full_order, near_idx, flagged_per_class, resolution),
            stage=True)
        staged[target_dir / "index.html"] = store.write_text(target_dir / "index.html", text, stage=True)
        staged[manifest] = store.write_json(manifest, {"params": params, "inputs": inputs,
                                                       "bytes": len(text.encode())}, stage=True)
        store.commit_outputs(target_dir, staged, params, inputs)
    finally:
        for a in (graph, protos, scores, feats):
            if a is not None:
                a.close()
    size = len(text.encode())
    msg = (f"{target_dir / 'index.html'}: {C} classes, {len(sections)} shown with images, estimated noise "
           f"{html.pct(est_all)}")
    if has_truth:
        msg += f" (true {html.pct(true_all)})"
    console.info(msg + f", {size / 1e6:.1f} MB")


def parse_low_weight(text: str) -> str | float:
    """``auto`` | a number >= 0 | ``qP`` with 0 <= P <= 1 -> "auto", a float, or "qP" normalized."""
    s = str(text).strip().lower()
    if s == "auto":
        return "auto"
    try:
        if s.startswith("q"):
            p = float(s[1:])
            if not 0 <= p <= 1:
                raise ValueError
            return f"q{p:g}"
        v = float(s)
        if not v >= 0:
            raise ValueError
        return v
    except ValueError:
        raise SinetError(f"--low-weight {text!r}: expected auto, a weight >= 0 (e.g. 0.1) or qP with 0 <= P <= 1 "
                         "(e.g. q0.2)") from None


def resolve_low_weight(stage, rule: str | float, w_train: np.ndarray) -> tuple[float, str]:
    """The numeric threshold T of the rule and the words the page states it with."""
    if rule == "auto":
        return stage.otsu_threshold(w_train), "T from Otsu's method: the cut that best separates the training " \
            "weights into a low and a high group; --low-weight sets another rule"
    if isinstance(rule, str):
        p = float(rule[1:])
        w = w_train[~np.isnan(w_train)]
        return (float(np.quantile(w, p)) if len(w) else 0.0), f"T = the {p:g} quantile of the training weights"
    if rule == 0:
        return 0.0, "weight 0: the distance to the class prototype is at least alpha of eq. 6"
    return float(rule), "T set with --low-weight"


def up_to_date(manifest: Path, page: Path, params: dict, inputs: dict) -> bool:
    if not (manifest.exists() and page.exists()):
        return False
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return (store.canonical_json(m.get("params")) == store.canonical_json(params)
            and store.canonical_json(m.get("inputs")) == store.canonical_json(inputs))
