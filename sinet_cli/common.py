"""Options and helpers shared by the commands: dataset selection, artifact paths, devices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import SinetError

DATA_HELP = (
    "Dataset: 'demo' (embedded Fashion-MNIST), 'demo-mnist' (embedded MNIST), 'manifest:FILE.tsv', 'imagefolder:DIR',"
    " 'clothing1m:DIR', 'webvision:DIR' or 'mini-webvision:DIR' (the published layouts), or"
    " 'webdataset:PATTERN' (WebDataset .tar shards: brace ranges such as crawl/{00000..00099}.tar, globs,"
    " fsspec URLs; labels from each sample's JSON, else the shard's folder)."
)

DataOpt = Annotated[str, typer.Option("--data", help=DATA_HELP, rich_help_panel="Dataset")]
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


def dataset_name(data: str) -> str:
    kind, _, arg = data.partition(":")
    if kind in ("demo", "demo-mnist") or not arg:
        return kind
    if kind == "webdataset":
        from .datasets.webdataset import dataset_name as shards_name

        return shards_name(arg)
    name = Path(arg).stem if Path(arg).suffix else Path(arg).name
    return f"mini-{name}" if kind == "mini-webvision" else name  # not the full WebVision's folder


def artifact_dir(out: Path | None, data: str) -> Path:
    if out is not None:
        return out
    root = Path(os.environ.get("SINET_ARTIFACTS", "artifacts"))
    return root / dataset_name(data)


def load_table(data: str, classes: Path | None = None, noise: str = "symmetric", noise_rate: float = 0.4,
               noise_seed: int = 0, captions: str | None = None, label_field: str | None = None):
    """Read the dataset named by ``--data`` into a :class:`DatasetTable` (``captions``: demo only, SYNTHETIC;
    ``label_field``: webdataset only, default ``label``)."""
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
