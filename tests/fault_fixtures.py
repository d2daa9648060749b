"""Inputs for the fault tests and bench/fault_cases.py: PNG files of a declared size (decompression
bombs), a small crawl of real demo images as JPEG files with its manifest, a graph.h5 for it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

CLASSES = ["boot", "coat", "shirt"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` white pixels: a few hundred KB on disk for a
    20000 x 20000 image (400 MP, 1.2 GB decoded as RGB). Streamed: memory stays small."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter 0, then the packed bits
    comp = zlib.compressobj(9)
    parts = []
    block = row * 256
    for start in range(0, height, 256):
        parts.append(comp.compress(block if height - start >= 256 else row * (height - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


def demo_pixels() -> np.ndarray:
    from sinet_cli.datasets import load_demo

    return load_demo(noise="none").pixels


def write_crawl(root: Path, n_train: int = 6, n_val: int = 2, start: int = 0, size: int = 48,
                extra_lines: list[str] | None = None) -> Path:
    """``root/crawl.tsv``: ``n_train`` train and ``n_val`` val images per class of :data:`CLASSES`,
    JPEG files of real demo images under ``root/img``; image j of a class is the same file
    whatever ``n_train`` (a crawl that grows)."""
    from PIL import Image

    px = demo_pixels()
    lines = ["id\tpath\tlabel\tsplit"]
    for c, name in enumerate(CLASSES):
        for j in range(start, n_train + n_val):
            rel = f"img/{name}/{j:03d}.jpg"
            p = root / rel
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(px[(37 * c + j) % len(px)]).convert("RGB").resize((size, size)).save(p, quality=90)
            lines.append(f"{name}-{j}\t{rel}\t{name}\t{'val' if j < n_val else 'train'}")
    path = root / "crawl.tsv"
    path.write_text("\n".join(lines + (extra_lines or [])) + "\n")
    return path


def write_graph(path: Path, classes: list[str] = CLASSES) -> None:
    """graph.h5 for ``classes`` without WordNet or a text encoder (the tests' fixed graph)."""
    from sinet_cli import store

    C = len(classes)
    S = np.full((C, C), 0.2, dtype=np.float32) + 0.8 * np.eye(C, dtype=np.float32)
    store.write_artifact(path, "graph", {"classes": classes, "S_w": S, "S_l": S, "S_t": 2 * S}, {"test": True}, {})
