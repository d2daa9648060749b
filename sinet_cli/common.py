"""Options and helpers shared by the commands: dataset selection, artifact paths, devices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from . import console
from .errors import SinetError

DATA_HELP = (
    "Dataset: 'demo' (embedded Fashion-MNIST), 'demo-mnist' (embedded MNIST), 'manifest:FILE.tsv', 'imagefolder:DIR',"
    " 'clothing1m:DIR', 'webvision:DIR' or 'mini-webvision:DIR' (the published layouts), or"
    " 'webdataset:PATTERN' (WebDataset .tar shards: brace ranges such as crawl/{00000..00099}.tar, globs,"
    " fsspec URLs; labels from each sample's JSON, else the shard's folder)."
)

# No default: a command that reads a dataset says so instead of silently using the demo; a command
# that reads only artifacts takes --out ART alone (--data then only names the default folder).
DataOpt = Annotated[Optional[str], typer.Option("--data", help=DATA_HELP, rich_help_panel="Dataset")]
DATA_REQUIRED = "--data is required, e.g. --data demo or --data imagefolder:DIR"
ClassesOpt = Annotated[
    Optional[Path],
    typer.Option("--classes", help="Class table TSV (name, synset, description, parent).", rich_help_panel="Dataset"),
]
NoiseOpt = Annotated[
    str,
    typer.Option("--noise", help="Demo only: none, symmetric, confusion, openset, or a mix such as "
                 "'confusion:0.2+openset:0.1'.", rich_help_panel="Dataset"),
]
NoiseRateOpt = Annotated[
    float, typer.Option("--noise-rate", help="Demo only: share of training labels corrupted.", rich_help_panel="Dataset")
]
NoiseSeedOpt = Annotated[int, typer.Option("--noise-seed", help="Demo only: noise seed.", rich_help_panel="Dataset")]
CaptionsOpt = Annotated[
    Optional[str],
    typer.Option("--captions", help="Demo only: 'synthetic:W[:E]' gives train images SYNTHETIC captions (side_text) "
                 "built from their true class, a share W naming a wrong class and E empty (seeded by --noise-seed); "
                 "for testing --image-text. Default: none.", rich_help_panel="Dataset"),
]
LabelFieldOpt = Annotated[
    Optional[str],
    typer.Option("--label-field", help="webdataset only: the JSON field holding each sample's label, a class name or "
                 "an index into --classes (default: label). Samples without it are labelled by their shard's folder "
                 "name; '' labels every sample by its folder.", rich_help_panel="Dataset"),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--out",
        help="Artifact folder (default: $SINET_ARTIFACTS or ./artifacts, then the dataset name).",
        rich_help_panel="Artifacts",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Recompute even when the output is up to date.", rich_help_panel="Artifacts")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.", rich_help_panel="Compute")]
WaitOpt = Annotated[
    float, typer.Option("--wait", help="Seconds to wait while another run holds an artifact this command reads or "
                        "writes (default: fail at once with exit status 75, for cron to retry).",
                        rich_help_panel="Artifacts")
]


def dataset_name(data: str) -> str:
    if not data:
        raise SinetError(DATA_REQUIRED)
    kind, _, arg = data.partition(":")
    if kind in ("demo", "demo-mnist") or not arg:
        return kind
    if kind == "webdataset":
        from .datasets.webdataset import dataset_name as shards_name

        return shards_name(arg)
    name = Path(arg).stem if Path(arg).suffix else Path(arg).name
    return f"mini-{name}" if kind == "mini-webvision" else name  # not the full WebVision's folder


def artifact_dir(out: Path | None, data: str | None) -> Path:
    """``--out``, else ``$SINET_ARTIFACTS`` (or ./artifacts) / the dataset's name; neither given is
    a one-line error."""
    if out is not None:
        return out
    if not data:
        raise SinetError("no artifact folder: pass --out ART (or --data, e.g. --data demo, for the default "
                         "artifacts/NAME)")
    root = Path(os.environ.get("SINET_ARTIFACTS", "artifacts"))
    return root / dataset_name(data)


def load_table(data: str | None, classes: Path | None = None, noise: str = "symmetric", noise_rate: float = 0.4,
               noise_seed: int = 0, captions: str | None = None, label_field: str | None = None):
    """Read the dataset named by ``--data`` into a :class:`DatasetTable` (``captions``: demo only, SYNTHETIC;
    ``label_field``: webdataset only, default ``label``)."""
    if not data:
        raise SinetError(DATA_REQUIRED)
    table = _load_table(data, classes, noise, noise_rate, noise_seed, captions, label_field)
    if console.verbosity() >= console.VERBOSE:
        splits, counts = np.unique(np.asarray(table.splits), return_counts=True)
        console.detail(f"--data {data}: {len(table)} images, {len(table.classes)} classes, "
                       + ", ".join(f"{n} {s}" for s, n in zip(splits, counts))
                       + ("" if table.clean_labels is None else ", clean labels"))
    return table


def require_two_classes(names: list[str], source: str) -> None:
    """A label is noise when the image belongs to another class: with one class nothing can be
    wrong, and every stage would run on to a meaningless result. One line naming the source."""
    if len(names) < 2:
        only = f" ({names[0]!r})" if names else ""
        raise SinetError(f"{source}: {len(names)} class{only}; sinet needs at least two classes to tell which labels "
                         "are wrong (add the other classes' images, or a class table with --classes)")


def _load_table(data: str, classes: Path | None, noise: str, noise_rate: float, noise_seed: int,
                captions: str | None, label_field: str | None):
    from .datasets import ClassTable, load_demo, read_imagefolder, read_manifest

    kind, _, arg = data.partition(":")
    if label_field is not None and kind != "webdataset":
        raise SinetError(f"--label-field {label_field}: applies to --data webdataset:PATTERN only, not {kind}")
    class_table = ClassTable.from_tsv(classes) if classes else None
    if kind in ("demo", "demo-mnist"):
        try:
            return load_demo(noise=noise, rate=noise_rate, seed=noise_seed, name=kind, captions=captions)
        except ValueError as e:
            raise SinetError(f"--data demo: {e}") from None
    if captions not in (None, "", "none"):
        raise SinetError(f"--captions {captions}: synthetic captions exist for the demos only, not --data {data}")
    if not arg:
        raise SinetError(f"--data {data!r}: expected KIND:PATH, e.g. manifest:train.tsv")
    if kind == "webdataset":  # the pattern is passed as written: Path() would fold a URL's '//'
        from .datasets.webdataset import read_webdataset

        return read_webdataset(arg, class_table, label_field="label" if label_field is None else label_field)
    if kind == "manifest":
        return read_manifest(Path(arg), class_table)
    if kind == "imagefolder":
        return read_imagefolder(Path(arg), class_table)
    readers = _extra_readers()
    if kind in readers:
        return readers[kind](Path(arg), class_table)
    raise SinetError(f"--data {data!r}: unknown dataset kind {kind!r} (demo, manifest, imagefolder, webdataset{''.join(', ' + k for k in readers)})")


def _extra_readers() -> dict:
    """Readers of published layouts: ``reader(path, class_table_or_None) -> DatasetTable``."""
    from .datasets.clothing1m import read_clothing1m
    from .datasets.webvision import read_mini_webvision, read_webvision

    return {"clothing1m": read_clothing1m, "webvision": read_webvision, "mini-webvision": read_mini_webvision}


def resolve_device(device: str) -> str:
    """``--device`` as a torch device string: cpu, cuda or cuda:N; auto = cuda when there is one.
    Anything else, or a GPU this machine lacks, is a one-line error before any work starts."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SinetError(f"--device {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise SinetError(f"--device {device}: sinet runs on cpu or cuda (cuda:N), not {dev.type}")
    if not torch.cuda.is_available():
        raise SinetError(f"--device {device}: CUDA is not available on this machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SinetError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


# -- train without a val split ------------------------------------------------------------------

NOT_TRAINED = "no val split"
NO_VAL_HINT = ("add a val split: rows with split 'val' in a manifest, or DIR/train/<class>/ and DIR/val/<class>/ "
               "folders; with a clean_label column the accuracy is against the truth")


def missing_val_split(on: str, features_path: Path, data: str | None = None, classes: Path | None = None,
                      noise: str = "symmetric", noise_rate: float = 0.4, noise_seed: int = 0,
                      captions: str | None = None) -> str | None:
    """What ``sinet train`` would read (features.h5 for ``--on features``, else ``--data``) when it has
    no row of the val split, else None. Without a val split a trained model cannot be evaluated, so
    train skips instead of reporting a model nobody can judge. A missing features.h5 is left to the
    command's own error."""
    from . import store

    if on == "features":
        if not Path(features_path).exists():
            return None
        with store.open_artifact(features_path, "features") as art:
            if "splits" in art and (art.read("splits") == "val").any():
                return None
        return str(features_path)
    table = load_table(data, classes, noise, noise_rate, noise_seed, captions)
    return None if (np.asarray(table.splits) == "val").any() else f"--data {data}"


def build_config(cls, what: str = "", **options):
    """``cls(**options)``: a stage's config dataclass, whose own validation (``__post_init__``) raises
    ValueError; that becomes the one-line CLI error (prefixed with ``what``, e.g. the command)."""
    try:
        return cls(**options)
    except ValueError as e:
        raise SinetError(f"{what}: {e}" if what else str(e)) from None
