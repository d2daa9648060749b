"""``sinet train``: models A, B, C (paper table 1) and an oracle, on cached features or on images."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

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
    NoiseSeedOpt,
    OutOpt,
    WaitOpt,
    artifact_dir,
    build_config,
    load_table,
    resolve_device,
)
from ..locks import Plan, file_lock, locked
from ..errors import SinetError
from ..progress import progress_bar
from ..sideinfo import DEFAULT_BACKBONE, default_weights


P_MODE, P_IN, P_OPT, P_IMG, P_ART = "Mode", "Inputs", "Optimization", "Images (--on images)", "Artifacts"
P_FT = "Fine-tuning (after --epochs)"


# ------------------------------------------------------------------------------------ helpers


def parse_steps(text: str | None) -> tuple[int, ...] | None:
    """--lr-steps as epochs (None: not given, the paper's scaled to --epochs)."""
    if text is None or not text.strip():
        return None
    try:
        steps = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise SinetError(f"--lr-steps {text!r}: expected comma-separated epochs, e.g. 30,60,80,90") from None
    if any(s < 1 for s in steps) or list(steps) != sorted(steps):
        raise SinetError(f"--lr-steps {text!r}: expected increasing epochs >= 1")
    return steps


def read_weights(stage, scores_path: Path, source: Path | str, ids: np.ndarray, labels: np.ndarray,
                 extra: dict[str, np.ndarray]) -> tuple[np.ndarray, dict, str]:
    """w_i of every training image (matched by id), the scores' params and fingerprint. The per-row
    columns of ``stage.SCORE_ROW_COLUMNS`` and the probe (``stage.SCORE_PROBE``) that scores.h5 holds
    are put in ``extra`` (rows in the order of ``ids``)."""
    with store.open_artifact(scores_path, "scores") as art:
        sid, w, slab = art.read("ids"), art.read("weight").astype(np.float32), art.read("labels")
        params, fp = art.params, art.fingerprint
        for name in stage.SCORE_ROW_COLUMNS + stage.SCORE_PROBE:
            if name in art:
                extra[name] = art.read(name)
    rows, found = store.match_ids(sid, ids)
    if not found.all():
        miss = ids[~found]
        raise SinetError(
            f"{scores_path}: no weight for training image {str(miss[0])!r} of {source} ({len(miss)} of {len(ids)} "
            "training images missing; rerun sinet score-noise on these features)"
        )
    for name in stage.SCORE_ROW_COLUMNS:
        if name in extra:
            extra[name] = extra[name][rows]
    bad = np.flatnonzero(slab[rows] != labels)
    if len(bad):
        i = bad[0]
        raise SinetError(
            f"{scores_path}: image {str(ids[i])!r} has label {slab[rows[i]]} there but {labels[i]} in {source} "
            f"({len(bad)} differ); the scores belong to another labeling, rerun sinet score-noise"
        )
    return w[rows], params, fp


def read_features_for(features_path: Path, ids: np.ndarray) -> tuple[np.ndarray, str]:
    with store.open_artifact(features_path, "features") as art:
        fid, feats, fp = art.read("ids"), art.read("features"), art.fingerprint
    rows = store.rows_of_ids(features_path, fid, ids, "rerun extract-features")
    return np.asarray(feats[rows], dtype=np.float32), fp


def subset_rows(stage, source: Path | str, splits: np.ndarray, subsets: np.ndarray | None, name: str,
                option: str) -> np.ndarray:
    """Train-split rows of subset ``name`` (all train rows for ``all``), or a one-line error naming ``source``."""
    if name == "all":
        rows = np.flatnonzero(splits == "train")
        if len(rows) == 0:
            raise SinetError(f"{source}: no rows with split 'train'")
        return rows
    try:
        return stage.subset_train_rows(splits, subsets, name)
    except ValueError as e:
        raise SinetError(f"{source}: {option} {name}: {e}") from None


def merge_shared_metrics(path: Path, run: str, entry: dict[str, Any]) -> None:
    """Set ``metrics.json["train"][run]`` keeping everything else (other runs, other stages' keys)."""
    with file_lock(path, None, "train"):
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                console.warn(f"{path}: unreadable, starting a new one")
                data = {}
        data.setdefault("train", {})[run] = entry
        store.write_json(path, data)


def record_shared_entry(path: Path, run: str, run_metrics: Path) -> None:
    """Put the run's entry (kept in its own metrics.json) into the shared metrics.json when a run
    that committed its model was stopped before it merged it there."""
    try:
        entry = json.loads(run_metrics.read_text()).get("shared_entry")
        have = json.loads(path.read_text()).get("train", {}).get(run) if path.exists() else None
    except (OSError, ValueError, AttributeError):
        entry, have = None, None
    if entry is not None and store.canonical_json(have) != store.canonical_json(entry):
        merge_shared_metrics(path, run, entry)
        console.info(f"{path}: recorded run {run}, which an interrupted run had not")


def bar_for(rank: int):
    """The stage's progress-bar factory: a rich bar on rank 0, nothing on the other DDP processes."""

    @contextmanager
    def bar(desc: str, total: int) -> Iterator:
        if rank != 0:
            yield None
            return
        with progress_bar(desc, total) as adv:
            yield adv

    return bar


def save_model(path: Path, state_dict: dict, stage: bool = False) -> Path:
    """torch.save through the store (``stage``: left at its temporary name for commit_outputs);
    serialized in memory first, so a failed write is an OSError naming the file."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return store.write_bytes(path, buf.getvalue(), stage=stage)


def _summary(stats: dict) -> str:
    return f"top-1 {stats['top1']:.2f} %, top-5 {stats['top5']:.2f} %"


def _moved(mode_stats: dict) -> str:
    """' (207 relabeled, 1761 dropped)': what a correction or semi-supervised mode did to the labels."""
    words = {"corrected": "relabeled", "dropped": "dropped", "unlabeled": "unlabeled"}
    parts = [f"{mode_stats[k]} {w}" for k, w in words.items() if k in mode_stats]
    return f" ({', '.join(parts)})" if parts else ""


@dataclass
class Rows:
    """The dataset a run trains on, from features.h5 (--on features) or --data (--on images)."""

    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    clean: np.ndarray | None
    subsets: np.ndarray | None
    classes: list[str]
    source: Path | str  # what error messages name
    inputs: dict
    features: np.ndarray | None = None  # --on features
    table: Any = None  # --on images


def read_rows(opts, features_path: Path, data: str | None, table_args: tuple) -> Rows:
    if opts.on == "images":
        t = load_table(data, *table_args)
        return Rows(t.ids, t.labels, t.splits, t.clean_labels, t.subset, list(t.classes.names), f"--data {data}",
                    {"dataset": t.fingerprint()}, table=t)
    with store.open_artifact(features_path, "features") as art:
        n = art.dims["N"]
        want_subsets = "subset" in art and (opts.train_subset != "all" or opts.finetune_subset)
        return Rows(art.read("ids"), art.read("labels"), art.read("splits") if "splits" in art else np.full(n, "train"),
                    art.read("clean_labels") if "clean_labels" in art else None,
                    art.read("subset") if want_subsets else None, list(art.read("classes")), features_path,
                    {"features": art.fingerprint}, features=art.read("features"))


class Sources:
    """What only some modes read, loaded on first use, each recording its input fingerprint."""

    def __init__(self, stage, opts, d: Rows, rows_ids: np.ndarray, x: np.ndarray | None, features_path: Path,
                 prototypes: Path, graph: Path, scores_params: dict, params: dict):
        self.stage, self.opts, self.d, self.ids, self.x = stage, opts, d, rows_ids, x
        self.features_path, self.prototypes_path, self.graph_path = features_path, prototypes, graph
        self.scores_params, self.params = scores_params, params

    def features(self) -> np.ndarray:
        if self.x is None:
            self.x, self.d.inputs["features"] = read_features_for(self.features_path, self.ids)
        return self.x

    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        p = store.read_prototypes(self.prototypes_path)
        store.check_classes(p.path, p.classes, self.d.source, self.d.classes, "rebuild the prototypes")
        self.d.inputs["prototypes"] = p.fingerprint
        return p.prototypes, p.prototype_class

    def eq7_weights(self) -> np.ndarray:
        a, b = self.opts.eq6(self.scores_params)
        self.params.update(alpha=a, beta=b)
        pv, pc = self.prototypes()
        try:
            return self.stage.prototype_class_weights(self.features(), pv, pc, len(self.d.classes), alpha=a, beta=b)
        except ValueError as e:
            raise SinetError(str(e)) from None

    def neighbours(self, k: int) -> np.ndarray:
        g = store.read_graph(self.graph_path)
        store.check_classes(g.path, g.classes, self.d.source, self.d.classes, "rebuild the graph")
        self.d.inputs["graph"] = g.fingerprint
        try:
            return self.stage.graph_neighbours(g.S_t, k)
        except ValueError as e:
            raise SinetError(f"{g.path}: {e}") from None


def _plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    run_dir = folder / ("train-" + a["mode"] + (f"-{a['suffix']}" if a["suffix"] else ""))
    reads = [a["features"] or folder / "features.h5", a["scores"] or folder / "scores.h5",
             a["prototypes"] or folder / "prototypes.h5", folder / "graph.h5"]
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    return Plan(writes=[run_dir] if writer else [], reads=reads, wait=a["wait"], units=[run_dir] if writer else [],
                resume=f"{run_dir}: the last finished epoch is kept; run the same command again to resume from it")


@app.command("train")
@locked("train", _plan)
def train(
    mode: Annotated[str, typer.Option(help="A: all images, unweighted. B: only images with w > --threshold, "
                                      "unweighted. C: weighted by w (SINet, eq. 1). correct: unflagged images train on "
                                      "their label, flagged ones with a confident suggested class on it, the rest are "
                                      "dropped. fixmatch / mixmatch: the same, the dropped images become unlabeled "
                                      "data (pseudo-labels between two "
                                      "augmentations / DivideMix's MixMatch). graph: the doubt 1 - w goes to the "
                                      "label's neighbours in S_t by eq. 7. forward: all images, the output passed "
                                      "through the noise transition estimated from the probe. oracle: the clean "
                                      "labels (only when known). Equations: docs/training-modes.md.",
                                      rich_help_panel=P_MODE)] = "C",
    on: Annotated[str, typer.Option(help="features: a head on cached features (CPU, fast). images: a full timm "
                                    "model on images (GPU; several with torchrun).", rich_help_panel=P_MODE)] = "features",
    threshold: Annotated[Optional[float], typer.Option(
        help="Mode B / top-k smoothing: confident images have w above this. Default: the median training "
             "weight (B keeps the more confident half). Modes correct, fixmatch, mixmatch: images with w <= "
             "this are flagged (default: scores.h5's flags).", rich_help_panel=P_MODE)] = None,
    soft_targets: Annotated[bool, typer.Option("--soft-targets", help="Mode C: eq. 7's per-class weights "
                            "w_ic = max(0, alpha - ||v_c - g_i||)^beta from prototypes.h5 instead of eq. 1.",
                            rich_help_panel=P_MODE)] = False,
    soft_mix: Annotated[float, typer.Option(help="--soft-targets: share of the target moved onto the label "
                        "(0: eq. 7 as is, 1: eq. 1).", rich_help_panel=P_MODE)] = 0.0,
    soft_keep: Annotated[int, typer.Option(help="--soft-targets, --correct-target distribution: keep each "
                         "image's K largest class weights (all when K >= classes).", rich_help_panel=P_MODE)] = 16,
    alpha: Annotated[Optional[float], typer.Option(help="--soft-targets: eq. 6 alpha (default: scores.h5's, "
                     "else 1.2).", rich_help_panel=P_MODE)] = None,
    beta: Annotated[Optional[float], typer.Option(help="--soft-targets: eq. 6 beta (default: scores.h5's, "
                    "else 1.5).", rich_help_panel=P_MODE)] = None,
    topk_smoothing: Annotated[int, typer.Option(help="K > 0: top-k label smoothing (3.4): a model trained on "
                              "the confident images predicts the others; their targets mix the label with "
                              "its top-K predictions.", rich_help_panel=P_MODE)] = 0,
    topk_mix: Annotated[float, typer.Option(help="Top-k smoothing: weight of the predictions in the target "
                        "(1 - it stays on the label); 0.5 trusts both equally.", rich_help_panel=P_MODE)] = 0.5,
    topk_epochs: Annotated[Optional[int], typer.Option(help="Epochs of the initial top-k model (default "
                           "--epochs).", rich_help_panel=P_MODE)] = None,
    correct_target: Annotated[str, typer.Option(help="--mode correct: cleaned (keep the unflagged images, relabel "
                              "flagged ones with a confident suggestion, drop the rest), soft (w on the label, the "
                              "rest of the mass on the suggestion), hard (only the suggestion), or distribution (every "
                              "image: w on the label, 1 - w over the other classes by the probe's probabilities).",
                              rich_help_panel=P_MODE)] = "cleaned",
    min_confidence: Annotated[float, typer.Option(help="--mode correct, fixmatch, mixmatch: smallest confidence "
                              "of a suggestion that is used (cleaned: its confidence given that the label is "
                              "wrong, eq. T2c).",
                              rich_help_panel=P_MODE)] = 0.5,
    lambda_u: Annotated[Optional[float], typer.Option(help="--mode fixmatch / mixmatch: weight of the unlabeled "
                        "loss (default 1 for fixmatch, as FixMatch; 25 for mixmatch, as DivideMix on CIFAR-10).",
                        rich_help_panel=P_MODE)] = None,
    pseudo_confidence: Annotated[float, typer.Option(help="--mode fixmatch: a pseudo-label counts when its "
                                 "probability reaches this (FixMatch: 0.95).", rich_help_panel=P_MODE)] = 0.95,
    sharpen: Annotated[float, typer.Option(help="--mode mixmatch: sharpening temperature T.",
                       rich_help_panel=P_MODE)] = 0.5,
    mix_alpha: Annotated[float, typer.Option(help="--mode mixmatch: mixup lambda ~ Beta(alpha, alpha).",
                         rich_help_panel=P_MODE)] = 4.0,
    rampup: Annotated[float, typer.Option(help="--mode mixmatch: share of the epochs over which lambda_u rises "
                      "linearly to its value.", rich_help_panel=P_MODE)] = 0.1,
    graph_neighbours: Annotated[int, typer.Option(help="--mode graph: neighbours of each class in S_t that may "
                                "receive an image's doubt.", rich_help_panel=P_MODE)] = 3,
    topk_neighbours: Annotated[int, typer.Option(help="K > 0: top-k smoothing puts mass only on the label and "
                               "its K nearest classes in S_t (graph.h5).", rich_help_panel=P_MODE)] = 0,
    transition_neighbours: Annotated[int, typer.Option(help="--mode forward, K > 0: a class's labels may only "
                                     "flip to its K nearest classes in S_t (graph.h5); 0: to any class.",
                                     rich_help_panel=P_MODE)] = 0,
    suffix: Annotated[str, typer.Option(help="Run name suffix: output in train-<mode>-<suffix>/ and that key "
                      "in metrics.json (e.g. seed1, topk).", rich_help_panel=P_MODE)] = "",
    data: DataOpt = None,
    classes: ClassesOpt = None,
    noise: NoiseOpt = "symmetric",
    noise_rate: NoiseRateOpt = 0.4,
    noise_seed: NoiseSeedOpt = 0,
    captions: CaptionsOpt = None,
    features: Annotated[Optional[Path], typer.Option(help="features.h5 (default: in the artifact folder).",
                        rich_help_panel=P_IN)] = None,
    scores: Annotated[Optional[Path], typer.Option(help="scores.h5 with w_i (default: in the artifact folder).",
                      rich_help_panel=P_IN)] = None,
    prototypes: Annotated[Optional[Path], typer.Option(help="prototypes.h5 for --soft-targets and --mode graph "
                          "(default: in the artifact folder).", rich_help_panel=P_IN)] = None,
    graph: Annotated[Optional[Path], typer.Option(help="graph.h5 (S_t) for --mode graph and --topk-neighbours "
                     "(default: in the artifact folder).", rich_help_panel=P_IN)] = None,
    head: Annotated[str, typer.Option(help="--on features: linear or mlp (hidden layer, ReLU).",
                    rich_help_panel=P_OPT)] = "linear",
    hidden: Annotated[int, typer.Option(help="--head mlp: hidden units.", rich_help_panel=P_OPT)] = 512,
    dropout: Annotated[float, typer.Option(help="Dropout after pooling (paper: 0.25).", rich_help_panel=P_OPT)] = 0.25,
    epochs: Annotated[int, typer.Option(help="Training epochs (paper: 100).", rich_help_panel=P_OPT)] = 100,
    lr: Annotated[float, typer.Option(help="Initial SGD learning rate (paper: 0.1).", rich_help_panel=P_OPT)] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=P_OPT)] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.", rich_help_panel=P_OPT)] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Global batch size (all processes together).",
                          rich_help_panel=P_OPT)] = 256,
    lr_steps: Annotated[Optional[str], typer.Option(help="Epochs after which the lr is multiplied by "
                        "--lr-gamma, e.g. 30,60,80,90 (default: the paper's 30, 60, 80, 90 percent of --epochs).",
                        rich_help_panel=P_OPT)] = None,
    lr_gamma: Annotated[float, typer.Option(help="Step-decay factor.", rich_help_panel=P_OPT)] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of initialization, shuffling, augmentation and dropout.",
                    rich_help_panel=P_OPT)] = 0,
    backbone: Annotated[str, typer.Option(help="Any timm model name.", rich_help_panel=P_IMG)] = DEFAULT_BACKBONE,
    weights: Annotated[Optional[Path], typer.Option(help="Backbone state dict to start from (loaded "
                       "weights_only). Default: the packaged ImageNet lite0 weights.", rich_help_panel=P_IMG)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Start from random weights.",
                           rich_help_panel=P_IMG)] = False,
    image_size: Annotated[int, typer.Option(help="Training input size (paper: 224).", rich_help_panel=P_IMG)] = 224,
    train_subset: Annotated[str, typer.Option(help="Train only on the train rows of this subset: all, or a "
                            "subset recorded in features.h5 / the dataset, e.g. noisy (Clothing1M's 1M noisy "
                            "set, the paper's table 8).", rich_help_panel=P_IN)] = "all",
    finetune_subset: Annotated[Optional[str], typer.Option(help="After --epochs, continue training the same "
                               "model on the train rows of this subset, unweighted, with their labels, e.g. "
                               "clean (Clothing1M's clean set, table 8). Needs --finetune-epochs.",
                               rich_help_panel=P_FT)] = None,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of the fine-tuning phase: on --finetune-subset, "
                               "and/or (--on images) at --finetune-size.", rich_help_panel=P_FT)] = 0,
    finetune_lr: Annotated[Optional[float], typer.Option(help="Learning rate while fine-tuning, constant "
                           "(default: the last lr of the main schedule).", rich_help_panel=P_FT)] = None,
    finetune_size: Annotated[int, typer.Option(help="--on images, progressive resolution: fine-tune at this "
                             "larger size after --epochs.", rich_help_panel=P_FT)] = 0,
    min_crop: Annotated[float, typer.Option(help="Random-resized-crop: smallest area fraction.",
                        rich_help_panel=P_IMG)] = 0.08,
    workers: Annotated[int, typer.Option(help="Image decoding processes per training process.",
                       rich_help_panel=P_IMG)] = 2,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Train a classifier with per-image weights w_i from scores.h5 (eq. 1) and report top-1/top-5 on the
    clean validation split (metrics.json).

    Resumes from its last finished epoch after a kill. Under torchrun, --on images trains with DDP.

    Example: sinet train --mode C --on features --head mlp
    """
    args = dict(locals())  # the options, before anything else is bound
    from stages import train as stage

    opts = build_config(stage.TrainOptions, **{f.name: args[f.name] for f in dataclasses.fields(stage.TrainOptions)
                                               if f.name != "lr_steps"}, lr_steps=parse_steps(lr_steps))
    folder = artifact_dir(out, data)
    features_path, run_dir = features or folder / "features.h5", folder / f"train-{opts.run}"
    table_args = (classes, noise, noise_rate, noise_seed, captions)
    if skipped_without_val(opts, folder, run_dir, features_path, data, table_args):
        return
    d = read_rows(opts, features_path, data, table_args)
    va = np.flatnonzero(d.splits == "val")
    tr = subset_rows(stage, d.source, d.splits, d.subsets, train_subset, "--train-subset")
    ft = None if finetune_subset is None else subset_rows(stage, d.source, d.splits, d.subsets, finetune_subset,
                                                          "--finetune-subset")
    tr_clean = None if d.clean is None else d.clean[tr]
    w_train, scores_params, score_extra = None, {}, {}
    if opts.needs_scores:
        w_train, scores_params, d.inputs["scores"] = read_weights(stage, scores or folder / "scores.h5", d.source,
                                                                  d.ids[tr], d.labels[tr], score_extra)
    thr, rows, y, w = training_rows(stage, opts, d, tr, w_train, tr_clean)
    params = opts.provenance(thr)
    weight_path = image_weights(opts, weights, d.inputs)
    x = None if d.features is None else np.asarray(d.features[tr][rows], np.float32)
    src = Sources(stage, opts, d, d.ids[tr][rows], x, features_path, prototypes or folder / "prototypes.h5",
                  graph or folder / "graph.h5", scores_params, params)
    proto = None
    if soft_targets:  # eq. 7: distances of each training image to every class prototype
        a, b = opts.eq6(scores_params)
        params.update(soft_targets=True, soft_mix=soft_mix, soft_keep=soft_keep, alpha=a, beta=b)
        proto = (*src.prototypes(), a, b)
        src.features()
    plan = stage.plan_mode(opts, y=y, w=w, score_extra=score_extra, scores_params=scores_params, params=params,
                           features_of_rows=src.features, eq7_weights=src.eq7_weights, neighbours_of=src.neighbours)
    if not force and already_trained(opts, folder, run_dir, params, d.inputs):
        return
    dev, rank, world = resolve_device(device), 0, 1
    if on == "images":
        dev, rank, world = stage.init_distributed(dev)
    t0 = time.time()
    try:
        ph = phases(stage, opts, run_dir, params, d.inputs, force, rank, plan, proto, src, y, w, w_train, rows, thr,
                    None if tr_clean is None else tr_clean[rows], len(d.classes))
        if on == "features":
            result, val_pred, ft_result = stage.run_features(
                opts, ph, y, w, x, len(d.classes), None if ft is None else
                (np.asarray(d.features[ft], np.float32), d.labels[ft]),
                np.asarray(d.features[va], np.float32) if len(va) else None, device=dev, bar=bar_for(rank), run=opts.run)
        else:
            result, val_pred, ft_result = train_on_images(stage, opts, ph, d, tr[rows], va, y, w, ft, weight_path,
                                                          dev, bar_for(rank))
    except ValueError as e:
        raise SinetError(str(e)) from None
    finally:
        stage.leave_distributed(world)
    if rank == 0:
        record_run(stage, opts, folder, run_dir, d, ph, result, val_pred, ft_result, va, ft, rows, y, tr_clean, thr,
                   params, round(time.time() - t0, 2))


def training_rows(stage, opts, d: Rows, tr: np.ndarray, w_train: np.ndarray | None,
                  tr_clean: np.ndarray | None) -> tuple[float | None, np.ndarray, np.ndarray, np.ndarray]:
    """The threshold of mode B and top-k smoothing (given, else the median weight), and the training
    rows the mode keeps with their labels and weights (``stage.select_rows``)."""
    thr = None
    if opts.mode == "B" or opts.topk_smoothing:
        thr = stage.default_threshold(w_train) if opts.threshold is None else float(opts.threshold)
    try:
        rows, y, w = stage.select_rows(opts.mode, d.labels[tr], w_train, tr_clean, thr)
    except ValueError as e:
        raise SinetError(f"{d.source}: {e}") from None
    return thr, rows, y, w


def already_trained(opts, folder: Path, run_dir: Path, params: dict, inputs: dict) -> bool:
    """True (and said) when run_dir holds this run's model and metrics for the same params and inputs;
    the shared metrics.json then gets its entry back if a kill came between the two writes."""
    metrics_path = run_dir / "metrics.json"
    if not store.is_up_to_date(metrics_path, store.JSON_RECORD, params, inputs, unit=run_dir,
                               files=[run_dir / "model.pt"]):
        return False
    record_shared_entry(folder / "metrics.json", opts.run, metrics_path)
    console.info(f"{run_dir}: up to date, nothing to do (use --force to retrain)")
    return True


def skipped_without_val(opts, folder: Path, run_dir: Path, features_path: Path, data: str | None,
                        table_args: tuple) -> bool:
    """No val split: nothing to evaluate a model on; one line, and metrics.json records the skip so
    that make's target exists and summary/report say why there is no accuracy."""
    from ..common import NO_VAL_HINT, NOT_TRAINED, missing_val_split

    no_val = missing_val_split(opts.on, features_path, data, *table_args)
    if no_val is None:
        return False
    merge_shared_metrics(folder / "metrics.json", opts.run, {"mode": opts.mode, "on": opts.on, "seed": opts.seed,
                                                             "top1": None, "top5": None, "skipped": NOT_TRAINED,
                                                             "hint": NO_VAL_HINT})
    console.info(f"{run_dir}: not trained: {no_val} has {NOT_TRAINED} to evaluate on; {NO_VAL_HINT}")
    return True


def image_weights(opts, weights: Path | None, inputs: dict) -> Path | None:
    """--on images: the backbone's starting weights (None: random init), recorded as an input."""
    if opts.on != "images":
        return None
    if weights is not None and opts.random_init:
        raise SinetError("--weights and --random-init exclude each other")
    weight_path = None if opts.random_init else (weights or default_weights(opts.backbone))
    if weight_path is not None:
        inputs["weights"] = store.fingerprint_file(weight_path)
    return weight_path


def phases(stage, opts, run_dir: Path, params: dict, inputs: dict, force: bool, rank: int, plan, proto, src,
           y: np.ndarray, w: np.ndarray, w_train: np.ndarray | None, rows: np.ndarray, thr: float | None,
           clean: np.ndarray | None, num_classes: int):
    """The run's targets, phase settings and checkpoint keys (resuming a killed run where it stopped)."""
    cfg, ft_cfg = opts.configs()
    ckpt, ft_ckpt = run_dir / "checkpoint.pt", run_dir / "finetune.pt"
    if force:
        for p in (ckpt, run_dir / "topk-init.pt", ft_ckpt):
            p.unlink(missing_ok=True)
    run_key = store.fingerprint_arrays(store.canonical_json(params), store.canonical_json(inputs))
    # the main phase does not depend on the fine-tuning options: keyed without them, so a changed
    # --finetune-epochs/--finetune-lr resumes from the finished main phase instead of redoing it
    main_key = run_key if ft_cfg is None else store.fingerprint_arrays(
        store.canonical_json({k: v for k, v in params.items() if not k.startswith("finetune_")}),
        store.canonical_json(inputs))
    done = stage.checkpoint_epoch(ckpt, main_key) if ckpt.exists() else None
    if rank == 0 and ckpt.exists():
        if done is None:
            console.warn(f"{ckpt}: from other parameters or inputs, starting over")
        else:
            console.info(f"{ckpt}: resuming after epoch {done} of {cfg.total_epochs}")
    if proto is not None:
        pv, pc, a, b = proto
        targets = stage.soft_targets(src.features(), y, pv, pc, num_classes, alpha=a, beta=b, mix=opts.soft_mix,
                                     keep=opts.soft_keep)
    else:
        targets = stage.hard_targets(y, w)
    targets, mode_stats = stage.mode_targets(opts, plan, targets, y=y, w=w, clean=clean)
    transition = stage.forward_transition(opts, plan, y, num_classes, clean, mode_stats)
    ph = stage.Phases(targets, cfg, ft_cfg, ckpt, main_key, run_key + "-finetune",
                      (run_key if opts.on == "features" else main_key) + "-init", run_dir / "topk-init.pt", ft_ckpt,
                      confident=None if not opts.topk_smoothing else w_train[rows] > thr,
                      allowed=stage.neighbour_classes(y, plan.neighbours) if opts.topk_neighbours else None,
                      semi=opts.semi(), unlabeled=plan.unlabeled if opts.semi() is not None else None,
                      transition=transition, mode_stats=mode_stats)
    return ph


def train_on_images(stage, opts, ph, d: Rows, positions: np.ndarray, va: np.ndarray, y: np.ndarray, w: np.ndarray,
                    ft: np.ndarray | None, weight_path: Path | None, dev: str, bar):
    """Build the timm backbone as extract-features does (its stage), then the image phases."""
    import torch

    from stages import extract_features as fx

    torch.manual_seed(opts.seed)
    net, _info = fx.build_backbone(opts.backbone, weight_path, random_init=opts.random_init, num_classes=0,
                                   seed=opts.seed)
    source = stage.ImageSource(paths=d.table.paths, pixels=d.table.pixels)
    return stage.run_images(opts, ph, net, lambda size: fx.Preprocess.for_model(net, size), source, positions, va,
                            y, w, len(d.classes), None if ft is None else (ft, d.labels[ft]), device=dev, bar=bar)


def record_run(stage, opts, folder: Path, run_dir: Path, d: Rows, ph, result, val_pred, ft_result, va: np.ndarray,
               ft: np.ndarray | None, rows: np.ndarray, y: np.ndarray, tr_clean: np.ndarray | None,
               thr: float | None, params: dict, seconds: float) -> None:
    """metrics.json and model.pt of the run (one unit), its entry in the shared metrics.json, one line."""
    stats, eval_labels = stage.evaluation(val_pred, d.labels[va], None if d.clean is None else d.clean[va])
    if val_pred is None:
        console.warn(f"{d.source}: no rows with split 'val'; no accuracy reported")
    selected_noise = None
    if tr_clean is not None:
        known = tr_clean[rows] != stage.UNKNOWN
        if known.any():
            selected_noise = float(np.mean(y[known] != tr_clean[rows][known]))
    ft_cfg = ph.ft_cfg
    finetune_info = None if ft_cfg is None else {
        "subset": opts.finetune_subset, "epochs": ft_cfg.epochs, "lr": ft_cfg.lr, "n_train": int(len(ft)),
        "image_size": ft_cfg.image_size if opts.on == "images" else None,
        "resumed_from_epoch": ft_result.resumed_from, "history": ft_result.history,
    }
    metrics = {
        "run": opts.run, "mode": opts.mode, "on": opts.on, **stats, "eval_labels": eval_labels,
        "train_subset": opts.train_subset, "n_train": int(len(rows)), "n_val": int(len(va)), "threshold": thr,
        "mean_weight": float(ph.targets_used.mass.mean()), "train_noise_rate": selected_noise,
        "mode_stats": ph.mode_stats, "seconds": seconds, "resumed_from_epoch": result.resumed_from,
        "history": result.history, "finetune": finetune_info, "classes": d.classes, "params": params,
        "inputs": d.inputs,
    }
    shared_entry = {
        "mode": opts.mode, "on": opts.on, "seed": opts.seed, "top1": stats["top1"], "top5": stats["top5"],
        "n_train": int(len(rows)), "train_subset": opts.train_subset, "finetune_subset": opts.finetune_subset,
        "n_finetune": None if ft is None else int(len(ft)), "eval_labels": eval_labels, "run_dir": str(run_dir),
        "params": params,
    }
    metrics["shared_entry"] = shared_entry  # what the shared metrics.json gets: a rerun adds it if a kill came first
    run_dir.mkdir(parents=True, exist_ok=True)
    # model.pt and metrics.json of the run as one unit (a kill between the renames is completed by the next run)
    model_path, metrics_path = run_dir / "model.pt", run_dir / "metrics.json"
    store.commit_outputs(run_dir, {model_path: save_model(model_path, result.model.state_dict(), stage=True),
                                   metrics_path: store.write_json(metrics_path, metrics, stage=True)})
    merge_shared_metrics(folder / "metrics.json", opts.run, shared_entry)
    acc = _summary(stats) if stats["top1"] is not None else "no validation split"
    on_what = f"{len(rows)} images" + ("" if opts.train_subset == "all" else f" of subset {opts.train_subset}")
    on_what += _moved(ph.mode_stats)
    if ft is not None:
        on_what += f", fine-tuned {ft_cfg.epochs} epochs on {len(ft)} of subset {opts.finetune_subset}"
    console.info(f"{run_dir}: model {opts.run} on {on_what}, {acc} on {len(va)} {eval_labels} val images")
