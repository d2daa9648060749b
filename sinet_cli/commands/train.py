"""``sinet train``: models A, B, C (paper table 1) and an oracle, on cached features or on images."""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

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
    load_table,
    resolve_device,
)
from ..locks import Plan, file_lock, locked
from ..errors import SinetError
from ..progress import progress_bar
from ..sideinfo import DEFAULT_BACKBONE, default_weights

DEFAULT_ALPHA, DEFAULT_BETA = 1.2, 1.5  # eq. 6 defaults (tables 4-5), used when scores.h5 does not record them

P_MODE, P_IN, P_OPT, P_IMG, P_ART = "Mode", "Inputs", "Optimization", "Images (--on images)", "Artifacts"
P_FT = "Fine-tuning (after --epochs)"


# ------------------------------------------------------------------------------------ helpers


def parse_steps(text: str | None, epochs: int) -> tuple[int, ...]:
    from stages import train as stage

    if text is None or not text.strip():
        return stage.scaled_lr_steps(epochs)
    try:
        steps = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise SinetError(f"--lr-steps {text!r}: expected comma-separated epochs, e.g. 30,60,80,90") from None
    if any(s < 1 for s in steps) or list(steps) != sorted(steps):
        raise SinetError(f"--lr-steps {text!r}: expected increasing epochs >= 1")
    return steps


SCORE_ROW_COLUMNS = ("flagged", "suggested_class", "suggested_confidence", "nearest_class")
SCORE_PROBE = ("probe_W", "probe_b")


def read_weights(scores_path: Path, source: Path | str, ids: np.ndarray, labels: np.ndarray,
                 extra: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict, str]:
    """w_i of every training image (matched by id), the scores' params and fingerprint. When ``extra``
    is a dict, the per-row columns of :data:`SCORE_ROW_COLUMNS` and the probe (:data:`SCORE_PROBE`)
    that scores.h5 holds are put in it (rows in the order of ``ids``)."""
    with store.open_artifact(scores_path, "scores") as art:
        sid, w, slab = art.read("ids"), art.read("weight").astype(np.float32), art.read("labels")
        params, fp = art.params, art.fingerprint
        if extra is not None:
            for name in SCORE_ROW_COLUMNS + SCORE_PROBE:
                if name in art:
                    extra[name] = art.read(name)
    order = np.argsort(sid, kind="stable")
    sorted_ids = sid[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sid) - 1, 0))
    found = (sorted_ids[pos] == ids) if len(sid) else np.zeros(len(ids), bool)
    if not found.all():
        miss = ids[~found]
        raise SinetError(
            f"{scores_path}: no weight for training image {str(miss[0])!r} of {source} ({len(miss)} of {len(ids)} "
            "training images missing; rerun sinet score-noise on these features)"
        )
    rows = order[pos]
    if extra is not None:
        for name in SCORE_ROW_COLUMNS:
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
        fid = art.read("ids")
        feats = art.read("features")
        fp = art.fingerprint
    index = {k: i for i, k in enumerate(fid)}
    missing = [k for k in ids if k not in index]
    if missing:
        raise SinetError(f"{features_path}: no feature for image {str(missing[0])!r} ({len(missing)} missing); rerun extract-features")
    return np.asarray(feats[[index[k] for k in ids]], dtype=np.float32), fp


def read_prototypes(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    with store.open_artifact(path, "prototypes") as art:
        pc = list(art.read("classes"))
        if pc != list(classes):
            raise SinetError(f"{path}: classes differ from the training data's; rebuild the prototypes")
        return art.read("prototypes").astype(np.float32), art.read("prototype_class"), art.fingerprint





def read_graph_neighbours(stage, path: Path, classes: list[str], k: int) -> tuple[np.ndarray, str]:
    """The ``k`` nearest classes of every class in graph.h5's S_t, and the graph's fingerprint."""
    with store.open_artifact(path, "graph") as art:
        if list(art.read("classes")) != list(classes):
            raise SinetError(f"{path}: classes differ from the training data's; rebuild the graph")
        S_t, fp = art.read("S_t"), art.fingerprint
    try:
        return stage.graph_neighbours(S_t, k), fp
    except ValueError as e:
        raise SinetError(f"{path}: {e}") from None


def flags_of(stage, extra: dict, w: np.ndarray, y: np.ndarray, scores_params: dict,
             threshold: float | None = None) -> tuple[np.ndarray, str]:
    """Which training images are flagged: w <= ``threshold`` when given; else scores.h5's ``flagged``
    when stored; else the suspect rule of score-noise (w <= 0.5 with the default score, w = 0 with
    eq. 6 alone, or a nearer prototype of another class). Returns the mask and where it came from."""
    if threshold is not None:
        return np.asarray(w) <= threshold, f"w <= {threshold:g}"
    if "flagged" in extra:
        return extra["flagged"].astype(bool), "scores.h5 flagged"
    below = 0.5 if scores_params.get("score") == "fused" else 0.0
    return stage.suspect_flags(w, y, extra.get("nearest_class"), below), f"w <= {below:g} or a nearer prototype"


@dataclass
class ModePlan:
    """What a mode beyond weighting needs besides w (docs/training-modes.md)."""

    flagged: np.ndarray | None = None  # eq. T1 (or scores.h5's flags)
    suggestion: tuple[np.ndarray, np.ndarray] | None = None  # (s_i, q_i), eq. T2 (or scores.h5's)
    distribution: np.ndarray | None = None  # P (N, C) for --correct-target distribution and mode forward
    class_weights: np.ndarray | None = None  # eq. 7's w_ic for mode graph
    neighbours: np.ndarray | None = None  # S_t neighbours of every class


def plan_mode(stage, mode: str, *, y: np.ndarray, w: np.ndarray, score_extra: dict, scores_params: dict, params: dict,
              features_of_rows: Callable[[], np.ndarray], eq7_weights: Callable[[], np.ndarray],
              neighbours_of: Callable[[int], np.ndarray], threshold: float | None, correct_target: str,
              min_confidence: float, soft_keep: int, graph_neighbours: int, topk_neighbours: int,
              transition_neighbours: int, semi) -> ModePlan:
    """Flags, suggestions, eq. 7 weights and graph neighbours a mode needs, each from the first source
    that has it; records the choices (and the mode's knobs) in ``params``."""
    plan = ModePlan()
    if mode in ("correct", *stage.SEMI_MODES):
        plan.flagged, params["flags"] = flags_of(stage, score_extra, w, y, scores_params, threshold)
    have_probe = all(k in score_extra for k in SCORE_PROBE)

    def probe() -> np.ndarray:
        return stage.probe_probabilities(features_of_rows(), score_extra["probe_W"], score_extra["probe_b"])

    if mode == "correct":
        params["correct_target"] = correct_target
        if correct_target == "distribution":  # the whole distribution: the probe's, else eq. 7's
            params["soft_keep"] = soft_keep
            plan.distribution = probe() if have_probe else stage.prototype_probabilities(eq7_weights())
            params["suggestions"] = "scores.h5 probe" if have_probe else "prototypes (eq. 7)"
        else:
            params["min_confidence"] = min_confidence
            if "suggested_class" in score_extra and "suggested_confidence" in score_extra:
                plan.suggestion = (score_extra["suggested_class"], score_extra["suggested_confidence"])
                params["suggestions"] = "scores.h5 suggested_class"
            else:
                p = probe() if have_probe else stage.prototype_probabilities(eq7_weights())
                plan.suggestion = stage.relabel_suggestions(p, y)  # eq. T2
                params["suggestions"] = "scores.h5 probe" if have_probe else "prototypes (eq. 7)"
    if semi is not None:
        params.update(semi.params())
    if mode == "forward":  # eq. F1 from the probe's probabilities (else eq. 7's), over S_t neighbours if asked
        plan.distribution = probe() if have_probe else stage.prototype_probabilities(eq7_weights())
        params["suggestions"] = "scores.h5 probe" if have_probe else "prototypes (eq. 7)"
        params["transition_neighbours"] = transition_neighbours
        if transition_neighbours:
            plan.neighbours = neighbours_of(transition_neighbours)
    if mode == "graph":
        plan.neighbours = neighbours_of(graph_neighbours)
        plan.class_weights = eq7_weights()
        params["graph_neighbours"] = graph_neighbours
    if topk_neighbours:
        plan.neighbours = neighbours_of(topk_neighbours)
        params["topk_neighbours"] = topk_neighbours
    return plan


def mode_targets(stage, mode: str, plan: ModePlan, targets, *, y: np.ndarray, w: np.ndarray,
                 clean: np.ndarray | None, min_confidence: float, soft: bool, soft_keep: int) -> tuple[Any, dict]:
    """The targets of ``mode`` (``targets`` as built for C / eq. 7 otherwise) and its ``mode_stats``,
    with how well the moved labels match the true ones where ``clean`` labels are known (the demos)."""
    stats: dict[str, Any] = {}
    if plan.flagged is not None:
        stats["flagged"] = int(plan.flagged.sum())
    known = None if clean is None else clean >= 0
    if mode == "correct" and plan.distribution is not None:
        targets = stage.distribution_targets(y, w, plan.distribution, keep=soft_keep)  # eq. T3d
        moved = float(targets.value[:, 1:].sum())
        stats["moved_mass"] = moved
        if known is not None and moved > 0:
            on_true = targets.value[:, 1:] * (targets.index[:, 1:] == clean[:, None]) * known[:, None]
            stats["moved_right"] = float(on_true.sum() / moved)
    elif mode == "correct":
        try:
            targets, fixed = stage.corrected_targets(y, w, plan.flagged, *plan.suggestion,
                                                     min_confidence=min_confidence, soft=soft)  # eq. T3
        except ValueError as e:
            raise SinetError(str(e)) from None
        stats["corrected"] = int(fixed.sum())
        if known is not None and (fixed & known).any():
            sel = fixed & known
            stats["corrected_right"] = float(np.mean(plan.suggestion[0][sel] == clean[sel]))
    elif mode == "graph":
        targets = stage.graph_targets(y, w, plan.class_weights, plan.neighbours)  # eq. T4
    elif mode in stage.SEMI_MODES:
        targets = stage.hard_targets(y, np.where(plan.flagged, 0.0, w))  # the labeled images keep eq. 1
        stats["unlabeled"] = int(plan.flagged.sum())
    elif mode == "forward":
        targets = stage.hard_targets(y)  # every image, its noisy label: T carries the noise (eq. F2)
    return targets, stats


def forward_transition(stage, mode: str, plan: ModePlan, y: np.ndarray, num_classes: int,
                       clean: np.ndarray | None, stats: dict) -> np.ndarray | None:
    """Mode forward's transition matrix (eq. F1); in ``stats`` its diagonal and, where the true labels
    are known, the true one's (the demos)."""
    if mode != "forward":
        return None
    T = stage.transition_matrix(plan.distribution, y, num_classes,
                                plan.neighbours if plan.neighbours is not None else None)
    stats["transition_diagonal"] = [round(float(v), 4) for v in np.diag(T)]
    if clean is not None and (clean >= 0).any():
        k = clean >= 0
        true = np.zeros((num_classes, num_classes))
        np.add.at(true, (clean[k], y[k]), 1.0)
        true = true / np.maximum(true.sum(axis=1, keepdims=True), 1.0)
        stats["true_transition_diagonal"] = [round(float(v), 4) for v in np.diag(true)]
        stats["transition_error"] = float(np.abs(T - true).sum(axis=1).mean())  # mean L1 per row
    return T


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


def finished_run(metrics_path: Path, model_path: Path, params: dict, inputs: dict) -> bool:
    if not (metrics_path.exists() and model_path.exists()):
        return False
    try:
        m = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        return False
    return store.canonical_json(m.get("params")) == store.canonical_json(params) and store.canonical_json(
        m.get("inputs")
    ) == store.canonical_json(inputs)


def initial_config(cfg, epochs: int | None, lr_steps_text: str | None):
    """The top-k smoothing's initial model: same settings, its own epochs, no fine-tuning phase."""
    import dataclasses

    from stages import train as stage

    n = epochs or cfg.epochs
    steps = stage.scaled_lr_steps(n) if lr_steps_text is None else tuple(s for s in cfg.lr_steps if s < n)
    return dataclasses.replace(cfg, epochs=n, lr_steps=steps, finetune_epochs=0, finetune_size=0)


@contextmanager
def _bar(desc: str, total: int, quiet: bool) -> Iterator:
    if quiet:
        yield None
        return
    with progress_bar(desc, total) as adv:
        yield adv


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


# ------------------------------------------------------------------------------------ command


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
                                      "unweighted. C: weighted by w (SINet, eq. 1). correct: flagged images with a "
                                      "confident suggested class train on it, the rest as C. fixmatch / mixmatch: "
                                      "flagged images become unlabeled data (pseudo-labels between two "
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
    correct_target: Annotated[str, typer.Option(help="--mode correct: soft (w on the label, the rest of the "
                              "mass on the suggestion), hard (only the suggestion), or distribution (every image: "
                              "w on the label, 1 - w over the other classes by the probe's probabilities).",
                              rich_help_panel=P_MODE)] = "soft",
    min_confidence: Annotated[float, typer.Option(help="--mode correct: smallest confidence of a suggestion "
                              "that is used.", rich_help_panel=P_MODE)] = 0.5,
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
    from stages import train as stage

    if mode not in stage.MODES:
        raise SinetError(f"--mode {mode!r}: choose one of {', '.join(stage.MODES)}")
    if on not in ("features", "images"):
        raise SinetError(f"--on {on!r}: choose features or images")
    if soft_targets and mode != "C":
        raise SinetError("--soft-targets replaces mode C's eq. 1 by eq. 7: use it with --mode C")
    if topk_smoothing < 0:
        raise SinetError("--topk-smoothing must be >= 0")
    if topk_smoothing and mode not in ("A", "C"):
        raise SinetError(f"--topk-smoothing smooths the labels of the non-confident images: use --mode A or C, not {mode}")
    if topk_smoothing and soft_targets:
        raise SinetError("--topk-smoothing and --soft-targets both replace the targets: choose one")
    if topk_neighbours < 0 or (topk_neighbours and not topk_smoothing):
        raise SinetError("--topk-neighbours K restricts --topk-smoothing: give both, K >= 1")
    if correct_target not in ("soft", "hard", "distribution"):
        raise SinetError(f"--correct-target {correct_target!r}: choose soft, hard or distribution")
    if graph_neighbours < 1:
        raise SinetError("--graph-neighbours must be >= 1")
    if transition_neighbours < 0:
        raise SinetError("--transition-neighbours must be >= 0")
    if suffix and not suffix.replace("-", "").replace("_", "").isalnum():
        raise SinetError(f"--suffix {suffix!r}: letters, digits, - and _ only")
    if finetune_subset is not None and finetune_epochs < 1:
        raise SinetError(f"--finetune-subset {finetune_subset}: give the fine-tuning length with --finetune-epochs N")
    if on == "features" and finetune_size:
        raise SinetError("--finetune-size applies to --on images")
    if on == "features" and finetune_epochs and finetune_subset is None:
        raise SinetError("--finetune-epochs on features needs --finetune-subset (what to fine-tune on)")
    if on == "images" and finetune_epochs and finetune_subset is None and finetune_size < 1:
        raise SinetError("--finetune-epochs needs --finetune-size (progressive resolution) or --finetune-subset")
    try:
        # with --finetune-subset the fine-tuning is a phase of its own on other rows (ft_cfg); without
        # it, progressive resolution stays inside the main loop (cfg.finetune_*)
        in_loop = finetune_subset is None
        cfg = stage.TrainConfig(
            epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
            lr_steps=parse_steps(lr_steps, epochs), lr_gamma=lr_gamma, seed=seed, image_size=image_size,
            finetune_size=finetune_size if in_loop else 0, finetune_epochs=finetune_epochs if in_loop else 0,
            finetune_lr=finetune_lr if in_loop else None, min_crop=min_crop,
        )
        ft_cfg = None if in_loop else stage.finetune_config(cfg, finetune_epochs, finetune_lr, finetune_size or None)
    except ValueError as e:
        raise SinetError(str(e)) from None

    folder = artifact_dir(out, data)
    features_path = features or folder / "features.h5"
    scores_path = scores or folder / "scores.h5"
    needs_scores = mode not in ("A", "oracle") or topk_smoothing > 0
    semi = None
    if mode in stage.SEMI_MODES:
        try:
            semi = stage.SemiConfig(mode, lambda_u=lambda_u, confidence=pseudo_confidence, temperature=sharpen,
                                    mix_alpha=mix_alpha, rampup=rampup)
        except ValueError as e:
            raise SinetError(str(e)) from None
    run = mode + (f"-{suffix}" if suffix else "")
    run_dir = folder / f"train-{run}"

    # no val split: nothing to evaluate a model on; one line, and metrics.json records the skip
    # so that make's target exists and summary/report say why there is no accuracy
    from ..common import NO_VAL_HINT, NOT_TRAINED, missing_val_split

    no_val = missing_val_split(on, features_path, data, classes, noise, noise_rate, noise_seed, captions)
    if no_val is not None:
        merge_shared_metrics(folder / "metrics.json", run, {"mode": mode, "on": on, "seed": seed, "top1": None,
                                                            "top5": None, "skipped": NOT_TRAINED, "hint": NO_VAL_HINT})
        console.info(f"{run_dir}: not trained: {no_val} has {NOT_TRAINED} to evaluate on; {NO_VAL_HINT}")
        return

    # ---- the training / validation rows
    if on == "features":
        with store.open_artifact(features_path, "features") as art:
            ids, labels = art.read("ids"), art.read("labels")
            class_names = list(art.read("classes"))
            splits = art.read("splits") if "splits" in art else np.full(len(ids), "train")
            clean = art.read("clean_labels") if "clean_labels" in art else None
            subsets = art.read("subset") if "subset" in art and (train_subset != "all" or finetune_subset) else None
            feats_all = art.read("features")
            source_fp = art.fingerprint
        source_name: Path | str = features_path
        inputs = {"features": source_fp}
    else:
        table = load_table(data, classes, noise, noise_rate, noise_seed, captions)
        ids, labels, splits, clean, subsets = table.ids, table.labels, table.splits, table.clean_labels, table.subset
        class_names = list(table.classes.names)
        source_name = f"--data {data}"
        inputs = {"dataset": table.fingerprint()}
    num_classes = len(class_names)
    va = np.flatnonzero(splits == "val")
    tr = subset_rows(stage, source_name, splits, subsets, train_subset, "--train-subset")
    ft = None if finetune_subset is None else subset_rows(stage, source_name, splits, subsets, finetune_subset,
                                                          "--finetune-subset")
    tr_clean = None if clean is None else clean[tr]

    w_train = None
    scores_params: dict = {}
    score_extra: dict[str, np.ndarray] = {}
    if needs_scores:
        w_train, scores_params, inputs["scores"] = read_weights(scores_path, source_name, ids[tr], labels[tr],
                                                                score_extra)
    thr = None
    if mode == "B" or topk_smoothing:
        thr = stage.default_threshold(w_train) if threshold is None else float(threshold)
    try:
        rows, y, w = stage.select_rows(mode, labels[tr], w_train, tr_clean, thr)
    except ValueError as e:
        raise SinetError(f"{source_name}: {e}") from None

    params: dict[str, Any] = {
        "on": on, "mode": mode, "threshold": thr, "seed": seed, "epochs": epochs, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "batch_size": batch_size, "lr_steps": list(cfg.lr_steps), "lr_gamma": lr_gamma,
        "dropout": dropout, "topk_smoothing": topk_smoothing,
    }
    if topk_smoothing:
        params.update(topk_mix=topk_mix, topk_epochs=topk_epochs or epochs)
    if train_subset != "all":  # recorded only when set: runs from before the option stay up to date
        params["train_subset"] = train_subset
    if on == "features":
        params.update(head=head, hidden=hidden if head == "mlp" else None)
    else:
        params.update(backbone=backbone, random_init=random_init, image_size=image_size,
                      finetune_size=finetune_size if finetune_epochs else 0, finetune_epochs=finetune_epochs,
                      finetune_lr=finetune_lr if finetune_epochs else None, min_crop=min_crop)
        if weights is not None and random_init:
            raise SinetError("--weights and --random-init exclude each other")
        weight_path = None if random_init else (weights or default_weights(backbone))
        if weight_path is not None:
            inputs["weights"] = store.fingerprint_file(weight_path)
    if finetune_subset is not None:
        params.update(finetune_subset=finetune_subset, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr)

    # ---- eq. 7 soft targets: distances of each training image to every class prototype
    proto = None
    if soft_targets:
        a = alpha if alpha is not None else float(scores_params.get("alpha", DEFAULT_ALPHA))
        b = beta if beta is not None else float(scores_params.get("beta", DEFAULT_BETA))
        params.update(soft_targets=True, soft_mix=soft_mix, soft_keep=soft_keep, alpha=a, beta=b)
        proto_path = prototypes or folder / "prototypes.h5"
        pv, pc, inputs["prototypes"] = read_prototypes(proto_path, class_names)
        if on == "features":
            g = np.asarray(feats_all[tr][rows], np.float32)
        else:
            g, inputs["features"] = read_features_for(features_path, ids[tr][rows])
        proto = (g, pv, pc, a, b)

    # ---- modes beyond weighting (docs/training-modes.md): flags, suggestions, graph neighbours
    g_rows = proto[0] if proto is not None else None

    def features_of_rows() -> np.ndarray:
        nonlocal g_rows
        if g_rows is None:
            if on == "features":
                g_rows = np.asarray(feats_all[tr][rows], np.float32)
            else:
                g_rows, inputs["features"] = read_features_for(features_path, ids[tr][rows])
        return g_rows

    def eq7_weights() -> np.ndarray:
        a = alpha if alpha is not None else float(scores_params.get("alpha", DEFAULT_ALPHA))
        b = beta if beta is not None else float(scores_params.get("beta", DEFAULT_BETA))
        params.update(alpha=a, beta=b)
        pv, pc, inputs["prototypes"] = read_prototypes(prototypes or folder / "prototypes.h5", class_names)
        try:
            return stage.prototype_class_weights(features_of_rows(), pv, pc, num_classes, alpha=a, beta=b)
        except ValueError as e:
            raise SinetError(str(e)) from None

    def neighbours_of(k: int) -> np.ndarray:
        nb, inputs["graph"] = read_graph_neighbours(stage, graph or folder / "graph.h5", class_names, k)
        return nb

    plan = plan_mode(stage, mode, y=y, w=w, score_extra=score_extra, scores_params=scores_params, params=params,
                     features_of_rows=features_of_rows, eq7_weights=eq7_weights, neighbours_of=neighbours_of,
                     threshold=threshold, correct_target=correct_target, min_confidence=min_confidence,
                     soft_keep=soft_keep, graph_neighbours=graph_neighbours, topk_neighbours=topk_neighbours,
                     transition_neighbours=transition_neighbours, semi=semi)

    metrics_path, model_path, ckpt_path = run_dir / "metrics.json", run_dir / "model.pt", run_dir / "checkpoint.pt"
    if not force and finished_run(metrics_path, model_path, params, inputs) and \
            store.outputs_current(run_dir, [model_path, metrics_path]):
        record_shared_entry(folder / "metrics.json", run, metrics_path)
        console.info(f"{run_dir}: up to date, nothing to do (use --force to retrain)")
        return
    ft_ckpt_path = run_dir / "finetune.pt"
    if force:
        for p in (ckpt_path, run_dir / "topk-init.pt", ft_ckpt_path):
            p.unlink(missing_ok=True)
    run_key = store.fingerprint_arrays(store.canonical_json(params), store.canonical_json(inputs))
    # the main phase does not depend on the fine-tuning options: keyed without them, so a changed
    # --finetune-epochs/--finetune-lr resumes from the finished main phase instead of redoing it
    main_key = run_key if ft_cfg is None else store.fingerprint_arrays(
        store.canonical_json({k: v for k, v in params.items() if not k.startswith("finetune_")}),
        store.canonical_json(inputs))
    ft_key = run_key + "-finetune"

    dev = resolve_device(device)
    rank, world = 0, 1
    if on == "images":
        dev, rank, world = _init_distributed(dev)
    done = stage.checkpoint_epoch(ckpt_path, main_key) if ckpt_path.exists() else None
    if rank == 0 and ckpt_path.exists():
        if done is None:
            console.warn(f"{ckpt_path}: from other parameters or inputs, starting over")
        else:
            console.info(f"{ckpt_path}: resuming after epoch {done} of {cfg.total_epochs}")

    t0 = time.time()
    if proto is not None:
        g, pv, pc, a, b = proto
        try:
            targets = stage.soft_targets(g, y, pv, pc, num_classes, alpha=a, beta=b, mix=soft_mix, keep=soft_keep)
        except ValueError as e:
            raise SinetError(str(e)) from None
    else:
        targets = stage.hard_targets(y, w)
    targets, mode_stats = mode_targets(stage, mode, plan, targets, y=y, w=w,
                                       clean=None if tr_clean is None else tr_clean[rows],
                                       min_confidence=min_confidence, soft=correct_target == "soft", soft_keep=soft_keep)
    unlabeled = plan.flagged if semi is not None else None
    allowed = stage.neighbour_classes(y, plan.neighbours) if topk_neighbours else None
    transition = forward_transition(stage, mode, plan, y, num_classes, None if tr_clean is None else tr_clean[rows],
                                    mode_stats)

    try:
        if on == "features":
            x_train = np.asarray(feats_all[tr][rows], np.float32)
            if topk_smoothing:
                conf = w_train[rows] > thr
                init_cfg = initial_config(cfg, topk_epochs, lr_steps)
                with progress_bar("train top-k initial model", init_cfg.total_epochs * int(conf.sum())) as adv:
                    init = stage.train_features(x_train[conf], stage.hard_targets(y[conf]), num_classes, init_cfg,
                                                head=head, hidden=hidden, dropout=dropout, device=dev,
                                                checkpoint=run_dir / "topk-init.pt", run_key=run_key + "-init",
                                                progress=adv)
                pi, pp = stage.topk_predictions(stage.predict_features(init.model, x_train, device=dev), topk_smoothing,
                                                allowed)
                targets = stage.topk_smoothed_targets(y, w, ~conf, pi, pp, topk_mix)
            with progress_bar(f"train {run}", cfg.total_epochs * len(rows)) as adv:
                result = stage.train_features(x_train, targets, num_classes, cfg, head=head, hidden=hidden,
                                              dropout=dropout, device=dev, checkpoint=ckpt_path, run_key=main_key,
                                              progress=adv, semi=semi, unlabeled=unlabeled, transition=transition)
            ft_result = None
            if ft_cfg is not None:
                with progress_bar(f"fine-tune {run} on {finetune_subset}", ft_cfg.total_epochs * len(ft)) as adv:
                    ft_result = stage.train_features(
                        np.asarray(feats_all[ft], np.float32), stage.hard_targets(labels[ft]), num_classes, ft_cfg,
                        device=dev, checkpoint=ft_ckpt_path, run_key=ft_key, progress=adv, model=result.model)
                result.model = ft_result.model
            val_pred = None
            if len(va):
                val_pred, _ = stage.topk_predictions(
                    stage.predict_features(result.model, np.asarray(feats_all[va], np.float32), device=dev), 5)
        else:
            finetune = None if ft_cfg is None else (ft, stage.hard_targets(labels[ft]), ft_cfg, ft_ckpt_path, ft_key)
            result, val_pred, ft_result = _train_on_images(
                stage, table, tr[rows], va, y, w, targets, num_classes, cfg, run_dir, ckpt_path, main_key, finetune,
                backbone=backbone, weight_path=weight_path, random_init=random_init, dropout=dropout, dev=dev,
                workers=workers, rank=rank, topk=(topk_smoothing, topk_mix, topk_epochs, thr,
                                                  None if not topk_smoothing else w_train[rows], allowed),
                lr_steps_text=lr_steps, semi=semi, unlabeled=unlabeled, transition=transition)
    except ValueError as e:
        raise SinetError(str(e)) from None
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank != 0:
        return

    stats: dict[str, Any] = {"top1": None, "top5": None}
    eval_labels = "none"
    if val_pred is not None:
        # the clean label where known, else the given one; validation images of no class are left out
        c_val = clean[va] if clean is not None else np.full(len(va), stage.UNKNOWN)
        y_val = np.where(c_val >= 0, c_val, labels[va])
        keep = c_val != stage.OUTSIDE
        n_clean = int((c_val >= 0).sum())
        eval_labels = "clean_labels" if n_clean == keep.sum() else ("labels" if n_clean == 0 else "mixed")
        if keep.any():
            stats = stage.topk_accuracy(val_pred[keep], y_val[keep], ks=(1, 5))
    else:
        console.warn(f"{source_name}: no rows with split 'val'; no accuracy reported")
    selected_noise = None
    if tr_clean is not None:
        known = tr_clean[rows] != stage.UNKNOWN
        if known.any():
            selected_noise = float(np.mean(y[known] != tr_clean[rows][known]))
    finetune_info = None
    if ft_cfg is not None:
        finetune_info = {
            "subset": finetune_subset, "epochs": ft_cfg.epochs, "lr": ft_cfg.lr, "n_train": int(len(ft)),
            "image_size": ft_cfg.image_size if on == "images" else None,
            "resumed_from_epoch": ft_result.resumed_from, "history": ft_result.history,
        }
    metrics = {
        "run": run, "mode": mode, "on": on, **stats, "eval_labels": eval_labels, "train_subset": train_subset,
        "n_train": int(len(rows)), "n_val": int(len(va)), "threshold": thr, "mean_weight": float(targets.mass.mean()),
        "train_noise_rate": selected_noise, "mode_stats": mode_stats, "seconds": round(time.time() - t0, 2),
        "resumed_from_epoch": result.resumed_from, "history": result.history, "finetune": finetune_info,
        "classes": class_names, "params": params, "inputs": inputs,
    }
    shared_entry = {
        "mode": mode, "on": on, "seed": seed, "top1": stats["top1"], "top5": stats["top5"], "n_train": int(len(rows)),
        "train_subset": train_subset, "finetune_subset": finetune_subset,
        "n_finetune": None if ft is None else int(len(ft)),
        "eval_labels": eval_labels, "run_dir": str(run_dir), "params": params,
    }
    metrics["shared_entry"] = shared_entry  # what the shared metrics.json gets: a rerun adds it if a kill came first
    run_dir.mkdir(parents=True, exist_ok=True)
    # model.pt and metrics.json of the run as one unit (a kill between the renames is completed by the next run)
    store.commit_outputs(run_dir, {model_path: save_model(model_path, result.model.state_dict(), stage=True),
                                   metrics_path: store.write_json(metrics_path, metrics, stage=True)})
    merge_shared_metrics(folder / "metrics.json", run, shared_entry)
    acc = _summary(stats) if stats["top1"] is not None else "no validation split"
    on_what = f"{len(rows)} images" + ("" if train_subset == "all" else f" of subset {train_subset}")
    if ft is not None:
        on_what += f", fine-tuned {ft_cfg.epochs} epochs on {len(ft)} of subset {finetune_subset}"
    console.info(f"{run_dir}: model {run} on {on_what}, {acc} on {len(va)} {eval_labels} val images")


def _init_distributed(dev: str) -> tuple[str, int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return dev, 0, 1
    import torch
    import torch.distributed as dist

    if dev.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return dev, dist.get_rank(), dist.get_world_size()


def _train_on_images(stage, table, positions, va, y, w, targets, num_classes, cfg, run_dir, ckpt_path, run_key,
                     finetune, *, backbone, weight_path, random_init, dropout, dev, workers, rank, topk, lr_steps_text,
                     semi=None, unlabeled=None, transition=None):
    """Build the timm model (extract-features' build_backbone), train it (DDP under torchrun), fine-tune it
    on ``finetune = (positions, targets, config, checkpoint, run key)`` when given, predict val."""
    import torch

    from stages import extract_features as fx

    kwargs = {"random_init": random_init, "num_classes": 0}
    if "seed" in inspect.signature(fx.build_backbone).parameters:
        kwargs["seed"] = cfg.seed
    torch.manual_seed(cfg.seed)
    try:
        net, _info = fx.build_backbone(backbone, weight_path, **kwargs)
    except ValueError as e:
        raise SinetError(str(e)) from None
    model = stage.ImageClassifier(net, num_classes, dropout=dropout, seed=cfg.seed)
    pp = fx.Preprocess.for_model(net, cfg.image_size)
    final_size = cfg.size_at(cfg.total_epochs - 1) if finetune is None else finetune[2].image_size
    eval_pp = fx.Preprocess.for_model(net, final_size)
    source = stage.ImageSource(paths=table.paths, pixels=table.pixels)
    k, mix, k_epochs, thr, w_sel, allowed = topk
    quiet = rank != 0
    if k:
        conf = w_sel > thr
        init_cfg = initial_config(cfg, k_epochs, lr_steps_text)
        init_model = copy.deepcopy(model)
        with _bar("train top-k initial model", init_cfg.total_epochs * int(conf.sum()), quiet) as adv:
            stage.train_images(init_model, source, positions[conf], stage.hard_targets(y[conf]), num_classes, init_cfg,
                               mean=pp.mean, std=pp.std, device=dev, workers=workers,
                               checkpoint=run_dir / "topk-init.pt", run_key=run_key + "-init", progress=adv)
        eval_init = fx.Preprocess.for_model(net, init_cfg.image_size)
        pi, pv = stage.predict_images_topk(init_model, source, positions, eval_init, k=k, decode_size=eval_init.resize,
                                           decode_interpolation=eval_init.interpolation, device=dev, allowed=allowed)
        targets = stage.topk_smoothed_targets(y, w, ~conf, pi, pv, mix)
    with _bar("train", cfg.total_epochs * len(positions), quiet) as adv:
        result = stage.train_images(model, source, positions, targets, num_classes, cfg, mean=pp.mean, std=pp.std,
                                    device=dev, workers=workers, checkpoint=ckpt_path, run_key=run_key,
                                    progress=adv, semi=semi, unlabeled=unlabeled, transition=transition)
    ft_result = None
    if finetune is not None:
        ft_pos, ft_targets, ft_cfg, ft_ckpt, ft_key = finetune
        with _bar("fine-tune", ft_cfg.total_epochs * len(ft_pos), quiet) as adv:
            ft_result = stage.train_images(result.model, source, ft_pos, ft_targets, num_classes, ft_cfg, mean=pp.mean,
                                           std=pp.std, device=dev, workers=workers, checkpoint=ft_ckpt,
                                           run_key=ft_key, progress=adv)
        result.model = ft_result.model
    val_pred = None
    if len(va):
        val_pred, _ = stage.predict_images_topk(result.model, source, va, eval_pp, k=5, decode_size=eval_pp.resize,
                                                decode_interpolation=eval_pp.interpolation, device=dev)
    return result, val_pred, ft_result
