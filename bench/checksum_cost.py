"""What the integrity checks cost: Fletcher-32 checksums on write and read, and the finite check on
read, for features.h5-sized data.

    python bench/checksum_cost.py [--rows 200000] [--dim 512] [--repeats 3]

Writes ``rows`` x ``dim`` float16 features (plus ids and labels) through ArtifactWriter in
16,384-row blocks with and without checksums, then streams them back with Artifact.iter_rows with
and without checksums and with and without the finite check; runs interleaved, best of
``repeats`` each, on the page-cached file (the checks' CPU cost, not the disk's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sinet_cli import store  # noqa: E402


def write(path: Path, x: np.ndarray, checksums: bool) -> float:
    real = store._checksummed
    if not checksums:
        store._checksummed = lambda shape, dtype=None: {}
    try:
        t0 = time.perf_counter()
        w = store.ArtifactWriter(path, "features", {}, {})
        for s in range(0, len(x), 16384):
            blk = x[s : s + 16384]
            w.append_rows({"ids": [f"img{i}" for i in range(s, s + len(blk))], "labels": np.zeros(len(blk), np.int64),
                           "features": blk})
        w.write("classes", ["a", "b"])
        w.commit()
        return time.perf_counter() - t0
    finally:
        store._checksummed = real


def read(path: Path, finite: bool) -> float:
    real = store.FINITE
    if not finite:
        store.FINITE = {}
    try:
        t0 = time.perf_counter()
        with store.open_artifact(path, "features") as a:
            for _ in a.iter_rows(["features"], 16384):
                pass
        return time.perf_counter() - t0
    finally:
        store.FINITE = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float16)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain, summed = Path(tmp) / "plain.h5", Path(tmp) / "summed.h5"
        for _ in range(args.repeats):
            for name, fn in (("write, no checksum", lambda: write(plain, x, False)),
                             ("write, checksum", lambda: write(summed, x, True)),
                             ("read, no checksum, no finite check", lambda: read(plain, False)),
                             ("read, checksum, no finite check", lambda: read(summed, False)),
                             ("read, checksum and finite check", lambda: read(summed, True))):
                best[name] = min(best.get(name, float("inf")), fn())
    mb = x.nbytes / 2**20
    for name, t in best.items():
        print(f"{name:<38} {t:7.3f} s  ({mb / t:7.0f} MB/s of features)")
    print(f"write: checksums x{best['write, checksum'] / best['write, no checksum']:.2f}; read: checksums "
          f"x{best['read, checksum, no finite check'] / best['read, no checksum, no finite check']:.2f}, "
          f"+ finite check x{best['read, checksum and finite check'] / best['read, no checksum, no finite check']:.2f}")


if __name__ == "__main__":
    main()
