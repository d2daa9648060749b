"""Stage: train a classifier on noisily labeled images with per-image weights (SINet eq. 1, eq. 7, 3.4).

Two scales share one training loop:

* :func:`train_features` fits a head (linear, or a small MLP) on cached features g_i — CPU, seconds.
* :func:`train_images` trains / fine-tunes a full network on images, with random-resized-crop and
  flip augmentation, SGD with momentum and step decay, optional progressive resolution, and
  runs under ``torchrun`` (DDP) when a process group is initialized.

Targets are sparse per-image "mass" rows (:class:`Targets`): eq. 1 puts w_i on the noisy label
y_i; eq. 7 puts w_{i,c} on every class c; top-k label smoothing mixes the label with an initial
model's top-k predictions. The loss is always ``-sum_i sum_c T_{i,c} log p_{i,c}`` divided by a
*constant* (batch size x mean target mass over the training set, see :func:`loss_normalizer`), so it
stays an exact sum over images: a zero weight removes an image exactly, DDP gradient averaging
reproduces the single-process gradient, and modes A/B/C share one learning rate.

Every random draw is derived from (seed, epoch, rank, image): shuffling uses the permutation of
``DistributedSampler`` (seed + epoch), augmentation a generator per (seed, epoch, image), dropout a
generator reseeded at each epoch. A run killed after epoch k and resumed from its checkpoint
therefore ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

MODES = ("A", "B", "C", "oracle")
UNKNOWN, OUTSIDE = -1, -2  # clean-label codes of the dataset table: not known / belongs to no class
HEADS = ("linear", "mlp")
Progress = Callable[[int], None]
EpochCallback = Callable[[int, dict], None]


# --------------------------------------------------------------------------------------- targets


@dataclass
class Targets:
    """Per-image target mass, sparse: image i puts ``value[i, k]`` on class ``index[i, k]``.

    Eq. 1 is one entry per image, ``(y_i, w_i)``; eq. 7 is ``w_{i,c}`` for every class c. Repeated
    class indices in a row add up; zero values are inert.
    """

    index: np.ndarray  # (N, K) int64
    value: np.ndarray  # (N, K) float32

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        self.value = np.asarray(self.value, dtype=np.float32)
        if self.index.ndim == 1:
            self.index, self.value = self.index[:, None], self.value.reshape(-1, 1)
        if self.index.shape != self.value.shape or self.index.ndim != 2:
            raise ValueError(f"target index {self.index.shape} and value {self.value.shape} differ in shape")
        if not np.all(np.isfinite(self.value)) or (self.value < 0).any():
            raise ValueError("target weights must be finite and non-negative")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def mass(self) -> np.ndarray:
        """Total weight of each image (w_i for eq. 1, sum_c w_{i,c} for eq. 7)."""
        return self.value.astype(np.float64).sum(axis=1)

    def subset(self, rows: np.ndarray) -> "Targets":
        return Targets(self.index[rows], self.value[rows])

    def dense(self, num_classes: int, rows: np.ndarray | None = None) -> np.ndarray:
        idx, val = (self.index, self.value) if rows is None else (self.index[rows], self.value[rows])
        out = np.zeros((len(idx), num_classes), dtype=np.float32)
        np.add.at(out, (np.arange(len(idx))[:, None], idx), val)
        return out


def dense_targets(index: torch.Tensor, value: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) sparse rows -> (B, C) dense target masses."""
    out = torch.zeros(index.shape[0], num_classes, dtype=torch.float32, device=value.device)
    return out.scatter_add_(1, index, value.float())


def hard_targets(labels: np.ndarray, weights: np.ndarray | None = None) -> Targets:
    """Eq. 1's targets: weight w_i (1 when unweighted) on the label y_i."""
    labels = np.asarray(labels, dtype=np.int64)
    w = np.ones(len(labels), np.float32) if weights is None else np.asarray(weights, np.float32)
    if len(w) != len(labels):
        raise ValueError(f"{len(w)} weights for {len(labels)} labels")
    return Targets(labels[:, None], w[:, None])


def default_threshold(weights: np.ndarray) -> float:
    """Mode B's default: the median training weight, i.e. B keeps the more confident half."""
    return float(np.median(np.asarray(weights, dtype=np.float64)))


def subset_train_rows(splits: np.ndarray, subsets: np.ndarray | None, name: str = "all") -> np.ndarray:
    """Positions of the rows a phase trains on: split ``train``, and ``subsets == name`` unless
    ``name`` is ``all`` (e.g. Clothing1M's ``noisy`` and ``clean`` training sets, paper table 8).

    Raises:
        ValueError: ``name`` is not ``all`` but no subsets are recorded, or no train row has it.
    """
    train = np.asarray(splits) == "train"
    if name == "all":
        return np.flatnonzero(train)
    if subsets is None:
        raise ValueError("no subsets are recorded (only the Clothing1M and WebVision readers write them)")
    subsets = np.asarray(subsets).astype(str)
    rows = np.flatnonzero(train & (subsets == name))
    if len(rows) == 0:
        known = sorted(set(subsets[train].tolist()))
        listed = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
        raise ValueError(f"no train rows of subset {name!r} (train subsets here: {listed or 'none'})")
    return rows


def select_rows(
    mode: str,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    clean_labels: np.ndarray | None = None,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, labels and per-image weights each mode trains on (paper table 1).

    A: every image, unweighted. B: images with ``w > threshold``, unweighted. C: every image,
    weighted by w_i (SINet). oracle: every image with its clean label, unweighted; every clean
    label must be known (``UNKNOWN`` = -1 is an error), images of no class (``OUTSIDE`` = -2) are
    left out.
    Returns ``(rows, labels[rows], w[rows])``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if mode == "A":
        return np.arange(n), labels, np.ones(n, np.float32)
    if mode == "oracle":
        clean = None if clean_labels is None else np.asarray(clean_labels, dtype=np.int64)
        if clean is None or (clean == UNKNOWN).any():
            unknown = n if clean is None else int((clean == UNKNOWN).sum())
            raise ValueError(f"mode oracle needs the clean label of every training image ({unknown} unknown)")
        rows = np.flatnonzero(clean >= 0)  # images of no class (OUTSIDE, open-set noise) are left out
        return rows, clean[rows], np.ones(len(rows), np.float32)
    if mode not in ("B", "C"):
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if weights is None:
        raise ValueError(f"mode {mode} needs per-image weights")
    w = np.asarray(weights, dtype=np.float32)
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} images")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if mode == "C":
        return np.arange(n), labels, w
    t = default_threshold(w) if threshold is None else float(threshold)
    rows = np.flatnonzero(w > t)
    if len(rows) == 0:
        raise ValueError(f"mode B: no image has a weight above the threshold {t:g} (max {w.max():g})")
    return rows, labels[rows], np.ones(len(rows), np.float32)


def class_distances(
    features: np.ndarray,
    prototypes: np.ndarray,
    prototype_class: np.ndarray,
    num_classes: int,
    chunk_rows: int = 65536,
) -> np.ndarray:
    """||v_c - g_i||_2 for every image i and class c; with several prototypes per class, the nearest.

    Classes without a prototype get ``inf`` (so their weight is 0).
    """
    protos = torch.from_numpy(np.asarray(prototypes, dtype=np.float32))
    pcls = np.asarray(prototype_class, dtype=np.int64)
    if len(pcls) != len(protos):
        raise ValueError(f"{len(pcls)} prototype classes for {len(protos)} prototypes")
    if len(pcls) and (pcls.min() < 0 or pcls.max() >= num_classes):
        raise ValueError(f"prototype class outside 0..{num_classes - 1}")
    out = np.empty((len(features), num_classes), dtype=np.float32)
    pcls_t = torch.from_numpy(pcls)
    for s in range(0, len(features), chunk_rows):
        g = torch.from_numpy(np.asarray(features[s : s + chunk_rows], dtype=np.float32))
        d = torch.cdist(g, protos)  # (b, P)
        per_class = torch.full((len(g), num_classes), float("inf"))
        per_class.scatter_reduce_(1, pcls_t.expand(len(g), -1), d, reduce="amin", include_self=True)
        out[s : s + len(g)] = per_class.numpy()
    return out


def soft_targets(
    features: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    prototype_class: np.ndarray,
    num_classes: int,
    *,
    alpha: float = 1.2,
    beta: float = 1.5,
    mix: float = 0.0,
    keep: int | None = None,
) -> Targets:
    """Eq. 7's per-class weights, optionally mixed with the label.

    ``w_{i,c} = max(0, alpha - ||v_c - g_i||_2)^beta`` for every class c (eq. 6 applied to all
    classes), and the target row is ``(1 - mix) * w_{i,.} + mix * w_{i,y_i} * onehot(y_i)``:
    ``mix=0`` is eq. 7, ``mix=1`` is eq. 1 with eq. 6's weight. ``keep`` limits each row to its
    ``keep`` largest class weights (all classes when None or >= C) to bound memory for many classes.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"soft-target mix {mix} outside [0, 1]")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha ({alpha}) and beta ({beta}) must be positive")
    labels = np.asarray(labels, dtype=np.int64)
    d = class_distances(features, prototypes, prototype_class, num_classes)
    w = np.maximum(0.0, alpha - d) ** beta  # eq. 7 weights w_{i,c} (eq. 6 for every class c)
    w = w.astype(np.float32)
    own = w[np.arange(len(w)), labels]
    if keep is None or keep >= num_classes:
        idx = np.broadcast_to(np.arange(num_classes), w.shape)
        val = w
    else:
        idx = np.argpartition(-w, keep - 1, axis=1)[:, :keep]
        val = np.take_along_axis(w, idx, axis=1)
    index = np.concatenate([idx, labels[:, None]], axis=1)
    value = np.concatenate([(1.0 - mix) * val, (mix * own)[:, None]], axis=1)
    return Targets(index, value)


def topk_smoothed_targets(
    labels: np.ndarray,
    weights: np.ndarray,
    smooth: np.ndarray,
    pred_index: np.ndarray,
    pred_prob: np.ndarray,
    mix: float,
) -> Targets:
    """Top-k label smoothing (sec. 3.4): ``(1 - mix) * onehot(y_i) + mix * topk(p_i) / sum topk(p_i)``.

    Applied to the rows where ``smooth`` is True (the images the initial model was not trained on);
    the other rows keep their one-hot label. Each row is then scaled by its weight w_i.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"top-k mix {mix} outside [0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    p = np.asarray(pred_prob, dtype=np.float64)
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    m = np.where(np.asarray(smooth, bool), mix, 0.0)
    index = np.concatenate([labels[:, None], np.asarray(pred_index, np.int64)], axis=1)
    value = np.concatenate([(1.0 - m)[:, None], m[:, None] * p], axis=1) * w[:, None]
    return Targets(index, value.astype(np.float32))


# ------------------------------------------------------------------------------------------ loss


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, norm: float) -> torch.Tensor:
    """Eq. 1: ``sum_i w_i * CE(y_i, G(x_i))``, divided by the constant ``norm``."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (weights.float() * ce).sum() / norm  # eq. 1


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, norm: float) -> torch.Tensor:
    """Eq. 7: ``-sum_i sum_c w_{i,c} log p_{i,c}`` (p = softmax), divided by the constant ``norm``.

    With one-hot rows scaled by w_i this is exactly eq. 1.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return -(targets * logp).sum() / norm  # eq. 7


def loss_normalizer(targets: Targets, batch_size: int) -> float:
    """The constant the summed loss is divided by: ``batch_size * mean_i(mass_i)`` over the training set.

    A constant (not the batch's own sum of weights) keeps the loss a plain sum over images, as in
    eq. 1: an image with w_i = 0 contributes exactly nothing, and the per-rank losses of DDP add up
    to the single-process loss. Dividing by the mean weight makes the expected gradient scale of
    weighted training (C, eq. 7) equal to unweighted training (A, B), so all modes share a learning
    rate; for A and B (w = 1) it is the usual batch mean.
    """
    m = float(targets.mass.mean()) if len(targets) else 0.0
    if not m > 0:
        raise ValueError("every training weight is zero: nothing to train on")
    return float(batch_size) * m


# ----------------------------------------------------------------------------------------- models


def build_head(kind: str, in_dim: int, num_classes: int, *, dropout: float = 0.25, hidden: int = 512,
               seed: int = 0) -> nn.Module:
    """Classifier on pooled features: dropout (the paper's 0.25 after pooling), then linear or MLP."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout {dropout} outside [0, 1)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, num_classes))


class ImageClassifier(nn.Module):
    """A timm backbone, its adaptive pooling, dropout after pooling (sec. 3.4) and a new linear classifier.

    The pooling makes the classifier independent of the input size, so a model trained at one
    resolution can be fine-tuned at a larger one (adaptive spatial resolution, sec. 3.4).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, dropout: float = 0.25, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = nn.Linear(int(backbone.num_features), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.fc(self.dropout(pooled))


# ------------------------------------------------------------------------------------ config / ckpt


@dataclass
class TrainConfig:
    """Optimization settings. Defaults follow the paper (sec. 3.4): SGD, momentum 0.9, lr 0.1 decayed
    x0.1 at 30/60/80/90 % of the epochs."""

    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    lr_steps: tuple[int, ...] = (30, 60, 80, 90)  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    seed: int = 0
    # images only
    image_size: int = 224
    finetune_size: int = 0  # > 0: fine-tune at this size after `epochs` (adaptive resolution)
    finetune_epochs: int = 0
    finetune_lr: float | None = None  # default: the lr of the last main epoch
    min_crop: float = 0.08  # random-resized-crop minimum area fraction

    def __post_init__(self) -> None:
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("need lr > 0, weight decay >= 0 and 0 <= momentum < 1")
        if any(s < 1 for s in self.lr_steps):
            raise ValueError(f"lr steps must be epochs >= 1, got {list(self.lr_steps)}")
        if self.finetune_epochs < 0 or (self.finetune_epochs and self.finetune_size < 1):
            raise ValueError("fine-tuning needs a positive --finetune-size")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min crop {self.min_crop} outside (0, 1]")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    def lr_at(self, epoch: int) -> float:
        """Step decay over the main epochs (0-based ``epoch``); fine-tuning epochs use ``finetune_lr``."""
        main = self.lr * self.lr_gamma ** sum(epoch >= s for s in self.lr_steps)
        if epoch < self.epochs:
            return main
        if self.finetune_lr is not None:
            return self.finetune_lr
        return self.lr * self.lr_gamma ** sum(self.epochs - 1 >= s for s in self.lr_steps)

    def size_at(self, epoch: int) -> int:
        return self.image_size if epoch < self.epochs or not self.finetune_epochs else self.finetune_size


def finetune_config(cfg: TrainConfig, epochs: int, lr: float | None = None, image_size: int | None = None) -> TrainConfig:
    """Settings of a fine-tuning phase that continues a finished main phase on other rows (e.g.
    Clothing1M's clean set after the weighted noisy training, paper table 8).

    ``epochs`` epochs at the constant learning rate ``lr`` (default: the lr of the last main epoch,
    so the fine-tuning does not undo the decay), input size ``image_size`` (default: the main
    phase's final size); every other setting, the seed included, is the main phase's.
    """
    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    if lr is not None and lr <= 0:
        raise ValueError(f"fine-tuning lr must be > 0, got {lr}")
    last = cfg.total_epochs - 1
    return TrainConfig(
        epochs=epochs, lr=cfg.lr_at(last) if lr is None else float(lr), momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, lr_steps=(), lr_gamma=cfg.lr_gamma, seed=cfg.seed,
        image_size=cfg.size_at(last) if image_size is None else int(image_size), min_crop=cfg.min_crop,
    )


def scaled_lr_steps(epochs: int, fractions: Sequence[float] = (0.3, 0.6, 0.8, 0.9)) -> tuple[int, ...]:
    """The paper's decay points (30, 60, 80, 90 of 100 epochs) scaled to ``epochs``."""
    steps = sorted({max(1, round(f * epochs)) for f in fractions})
    return tuple(s for s in steps if s < epochs)


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """``torch.save`` of tensors and plain values to ``<path>.partial``, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``), or None when absent."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]}); delete it to restart") from None


def checkpoint_epoch(path: Path | str, run_key: str) -> int | None:
    """Epochs done by the checkpoint at ``path`` when it belongs to ``run_key``; None when absent or foreign."""
    state = load_checkpoint(path)
    if state is None or state.get("run_key") != run_key:
        return None
    return int(state["epoch"])


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


# ---------------------------------------------------------------------------------- training loop


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0  # epochs restored from the checkpoint


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _fit(
    net: nn.Module,
    module: nn.Module,
    cfg: TrainConfig,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    *,
    num_classes: int,
    norm: float,
    n_train: int,
    mass_mean: float,
    device: str,
    checkpoint: Path | None,
    run_key: str,
    progress: Progress | None,
    on_epoch_end: EpochCallback | None,
) -> TrainResult:
    rank, world = _dist()
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cfg.lr_at(e) / cfg.lr)
    history: list[dict[str, float]] = []
    start = 0
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None and state.get("run_key") == run_key:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
        start = int(state["epoch"])
        history = list(state.get("history", []))
    for epoch in range(start, cfg.total_epochs):
        # dropout draws from the global generator: reseed it per (seed, epoch, rank) so an epoch
        # replays identically after a resume
        torch.manual_seed(_mix_seed(cfg.seed, epoch, rank))
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for x, t_index, t_value in batches(epoch):
            x = x.to(device, non_blocking=True)
            targets = dense_targets(t_index.to(device), t_value.to(device), num_classes)
            loss = soft_cross_entropy(net(x), targets, norm)  # eq. 7 (eq. 1 for one-hot rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * norm
            if progress:
                progress(len(x))
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        # mean weighted CE per image, comparable across world sizes
        history.append({"epoch": epoch + 1, "lr": lr, "loss": float(loss_sum) / (n_train * mass_mean)})
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, {
                "run_key": run_key,
                "epoch": epoch + 1,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "history": history,
            })
        if world > 1:
            torch.distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history[-1])
    return TrainResult(module, history, start)


def train_features(
    features: np.ndarray,
    targets: Targets,
    num_classes: int,
    cfg: TrainConfig,
    *,
    head: str = "linear",
    hidden: int = 512,
    dropout: float = 0.25,
    device: str = "cpu",
    checkpoint: Path | str | None = None,
    run_key: str = "",
    progress: Progress | None = None,
    on_epoch_end: EpochCallback | None = None,
    model: nn.Module | None = None,
) -> TrainResult:
    """Fit a head on cached features (one row per training image, aligned with ``targets``).

    Resumes from ``checkpoint`` when it holds a run with the same ``run_key``; writes it after every
    epoch. ``on_epoch_end(epoch, stats)`` runs after the checkpoint is written. ``model``: continue
    training this head (e.g. the result of a main phase, for fine-tuning) instead of a new one; the
    optimizer starts afresh.
    """
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature rows for {len(targets)} targets")
    if len(features) == 0:
        raise ValueError("no training images")
    x_all = torch.from_numpy(np.asarray(features, dtype=np.float32))
    t_index = torch.from_numpy(targets.index)
    t_value = torch.from_numpy(targets.value)
    if model is None:
        model = build_head(head, x_all.shape[1], num_classes, dropout=dropout, hidden=hidden, seed=cfg.seed)
    model = model.to(device)
    x_all = x_all.to(device)
    n = len(x_all)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator()
        g.manual_seed(cfg.seed + epoch)  # the permutation DistributedSampler draws
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            yield x_all[idx.to(device)], t_index[idx], t_value[idx]

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # a head's ops are too small to gain from threads; they only add contention
    try:
        return _fit(model, model, cfg, batches, num_classes=num_classes,
                    norm=loss_normalizer(targets, cfg.batch_size), n_train=n, mass_mean=float(targets.mass.mean()),
                    device=device, checkpoint=Path(checkpoint) if checkpoint else None, run_key=run_key,
                    progress=progress, on_epoch_end=on_epoch_end)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def predict_features(model: nn.Module, features: np.ndarray, *, batch_size: int = 4096, device: str = "cpu") -> np.ndarray:
    """Logits (N, C) of a head over cached features."""
    model.eval()
    out = []
    for s in range(0, len(features), batch_size):
        x = torch.from_numpy(np.asarray(features[s : s + batch_size], dtype=np.float32)).to(device)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def topk_predictions(logits: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax probabilities of the k most likely classes, most likely first."""
    lg = torch.as_tensor(logits).float()
    p = torch.softmax(lg, dim=1)
    val, idx = p.topk(min(k, p.shape[1]), dim=1)
    return idx.numpy(), val.numpy()


def topk_accuracy(pred_index: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Share of images whose label is among the first k predicted classes, for each k (in %)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no images to evaluate")
    return {f"top{k}": float(100.0 * (pred_index[:, :k] == labels[:, None]).any(axis=1).mean()) for k in ks}


# ---------------------------------------------------------------------------------------- images


class ImageSource:
    """Images by dataset position: decoded files (``paths``) or in-memory ``pixels`` (N x H x W[x3])."""

    def __init__(self, paths: Sequence[str] | None = None, pixels: np.ndarray | None = None):
        if paths is None and pixels is None:
            raise ValueError("an image source needs paths or pixels")
        self.paths, self.pixels = paths, pixels

    def load_uint8(self, pos: int, short_side: int, interpolation: str = "bicubic") -> torch.Tensor:
        """Image ``pos`` as uint8 (H, W, C), C = 1 (grayscale pixels) or 3. A file whose shorter side
        is longer than ``short_side`` is resized (PIL, ``interpolation``) so that side is
        ``short_side``, the long side truncated as torchvision's Resize does (timm's eval transform)."""
        if self.pixels is not None:
            arr = torch.from_numpy(np.ascontiguousarray(self.pixels[pos]))
        else:
            from PIL import Image

            path = self.paths[pos]
            resample = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if min(im.size) > short_side:
                        if im.width <= im.height:
                            size = (short_side, int(short_side * im.height / im.width))
                        else:
                            size = (int(short_side * im.width / im.height), short_side)
                        im = im.resize(size, resample)
                    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {str(e)[:120]})") from None
        return arr.unsqueeze(-1) if arr.ndim == 2 else arr

    def load(self, pos: int, short_side: int) -> torch.Tensor:
        """Image ``pos`` as float (3, H, W) in [0, 1]; files are resized so the shorter side is ``short_side``."""
        x = self.load_uint8(pos, short_side).permute(2, 0, 1).float().div_(255.0)
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def random_resized_crop_flip(img: torch.Tensor, size: int, min_scale: float, g: torch.Generator,
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized-crop (area in [min_scale, 1], aspect in ``ratio``) to size x size, then a random
    horizontal flip; all draws from ``g``."""
    _, h, w = img.shape
    area = h * w

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    ch, cw, top, left = h, w, 0, 0
    for _ in range(10):
        target = area * u(min_scale, 1.0)
        aspect = math.exp(u(math.log(ratio[0]), math.log(ratio[1])))
        cw_, ch_ = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw_ <= w and 0 < ch_ <= h:
            ch, cw = ch_, cw_
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            break
    crop = img[:, top : top + ch, left : left + cw]
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if float(torch.rand((), generator=g)) < 0.5:
        out = out.flip(-1)
    return out.clamp_(0, 1)


class TrainImages(Dataset):
    """Augmented training images with their targets; the weights travel inside each sample.

    Item ``i >= len(self)`` is padding added by :class:`PaddedDistributedSampler`: the image
    ``i - len(self)`` with zero weight, so padding never changes the loss.
    """

    def __init__(self, source: ImageSource, positions: np.ndarray, targets: Targets, mean: Sequence[float],
                 std: Sequence[float], min_crop: float, seed: int):
        if len(positions) != len(targets):
            raise ValueError(f"{len(positions)} images for {len(targets)} targets")
        self.source, self.positions, self.targets = source, np.asarray(positions), targets
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.min_crop, self.seed = min_crop, seed
        self.epoch, self.size = 0, 224

    def set_epoch(self, epoch: int, size: int) -> None:
        self.epoch, self.size = epoch, size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pad = i >= len(self.positions)
        j = i - len(self.positions) if pad else i
        g = torch.Generator()
        g.manual_seed(_mix_seed(self.seed, self.epoch, j))  # same augmentation on any rank / after resume
        img = self.source.load(int(self.positions[j]), short_side=math.ceil(self.size / 0.875))
        x = (random_resized_crop_flip(img, self.size, self.min_crop, g) - self.mean) / self.std
        value = torch.from_numpy(self.targets.value[j])
        return x, torch.from_numpy(self.targets.index[j]), value * 0 if pad else value


class PaddedDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (same permutation: seed + epoch) whose padding is marked, not duplicated.

    The plain sampler repeats images to give every rank as many samples; here a repeated image ``j``
    is emitted as ``j + N`` and :class:`TrainImages` returns it with zero weight, so the summed loss
    over all ranks equals the single-process loss exactly.
    """

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        indices += [indices[i % n] + n for i in range(self.total_size - n)]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def train_images(
    model: nn.Module,
    source: ImageSource,
    positions: np.ndarray,
    targets: Targets,
    num_classes: int,
    cfg: TrainConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    workers: int = 0,
    checkpoint: Path | str | None = None,
    run_key: str = "",
    progress: Progress | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` (images -> logits, e.g. :class:`ImageClassifier`) on the images at ``positions``.

    Under an initialized process group (``torchrun``) the model is wrapped in DDP and each rank
    reads its share through :class:`PaddedDistributedSampler`; ``cfg.batch_size`` is the global
    batch and must be divisible by the world size. Epochs ``>= cfg.epochs`` run at
    ``cfg.finetune_size`` (progressive resolution).
    """
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    if len(positions) == 0:
        raise ValueError("no training images")
    local_bs = cfg.batch_size // world
    model = model.to(device)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    ds = TrainImages(source, positions, targets, mean, std, cfg.min_crop, cfg.seed)
    sampler = PaddedDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ds.set_epoch(epoch, cfg.size_at(epoch))
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=local_bs, sampler=sampler, num_workers=workers, drop_last=False,
                          pin_memory=device.startswith("cuda"))

    norm = loss_normalizer(targets, local_bs)  # per rank; DDP's gradient mean over ranks -> batch_size * mean w
    return _fit(net, model, cfg, batches, num_classes=num_classes, norm=norm, n_train=len(positions),
                mass_mean=float(targets.mass.mean()), device=device,
                checkpoint=Path(checkpoint) if checkpoint else None, run_key=run_key, progress=progress,
                on_epoch_end=on_epoch_end)


@torch.no_grad()
def predict_images_topk(
    model: nn.Module,
    source: ImageSource,
    positions: np.ndarray,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    k: int = 5,
    decode_size: int,
    decode_interpolation: str = "bicubic",
    batch_size: int = 256,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes and probabilities for the images at ``positions`` (eval transform, no augmentation).

    ``transform`` maps one uint8 image ``(1, H, W, C)`` to the model's input ``(1, 3, s, s)``
    (extract-features' ``Preprocess``: timm's eval transform); files are decoded with their shorter
    side at most ``decode_size`` (``decode_interpolation``), in-memory pixels as they are.

    Under a process group each rank predicts every world-th image and the results are summed
    across ranks, so every rank returns the full arrays.
    """
    rank, world = _dist()
    model = model.to(device).eval()
    n = len(positions)
    mine = np.arange(rank, n, world)
    # class index + 1 (0 = no prediction, e.g. k > C), so that a sum over ranks merges the shards
    idx_all = torch.zeros((n, k), dtype=torch.int64, device=device)
    val_all = torch.zeros((n, k), dtype=torch.float32, device=device)
    for s in range(0, len(mine), batch_size):
        rows = mine[s : s + batch_size]
        # one image at a time: files differ in size (each is resized and cropped by the transform)
        x = torch.cat([transform(source.load_uint8(int(positions[r]), decode_size, decode_interpolation)[None])
                       for r in rows])
        logits = model(x.to(device)).float()
        p = torch.softmax(logits, dim=1)
        kk = min(k, p.shape[1])
        v, i = p.topk(kk, dim=1)
        rows_t = torch.from_numpy(rows).to(device)
        idx_all[rows_t, :kk] = i + 1
        val_all[rows_t, :kk] = v
        if progress:
            progress(len(rows))
    if world > 1:
        torch.distributed.all_reduce(idx_all)
        torch.distributed.all_reduce(val_all)
    return idx_all.cpu().numpy() - 1, val_all.cpu().numpy()
