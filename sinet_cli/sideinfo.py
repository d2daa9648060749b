"""Offline assets for the CLI: :mod:`stages.assets` with its errors as one-line CLI errors, and the
libraries' own progress bars kept off when there is no terminal (:func:`sinet_cli.progress.quiet_libraries`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from stages import assets as _assets
from stages.assets import DEFAULT_BACKBONE, cache_dir  # noqa: F401  (re-exported)

from .errors import SinetError


def _one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _assets.AssetError as e:
            raise SinetError(str(e)) from None

    return call


default_weights = _one_line(_assets.default_weights)
default_text_encoder = _one_line(_assets.default_text_encoder)
wordnet_fingerprint = _one_line(_assets.wordnet_fingerprint)
wordnet = _one_line(_assets.wordnet)


def load_text_encoder(path: Path | str | None = None, device: str = "cpu"):
    """A frozen SentenceTransformer from a local folder (never from a hub); off a terminal the
    libraries' own progress bars stay off."""
    from .progress import quiet_libraries

    quiet_libraries()  # before sentence-transformers imports transformers
    return _one_line(_assets.load_text_encoder)(path, device)
