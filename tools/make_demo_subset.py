"""Rebuild the embedded demo subset from Debian's `dataset-fashion-mnist` package.

Run once by a maintainer (`apt-get install dataset-fashion-mnist`); the result is committed
under sinet_cli/datasets/data/. Fashion-MNIST: Zalando SE, 2017, MIT (Expat) licence.
"""
import gzip
import sys
from pathlib import Path

import numpy as np

SRC = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "sinet_cli" / "datasets" / "data" / "fashion_mnist_subset.npz"
PER_CLASS_TRAIN, PER_CLASS_VAL = 500, 100


def idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)) for c in range(10)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    if not SRC.exists():
        sys.exit(f"{SRC}: missing; apt-get install dataset-fashion-mnist")
    rng = np.random.default_rng(20200523)
    tr_x = idx(SRC / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    tr_y = idx(SRC / "train-labels-idx1-ubyte.gz", 8)
    te_x = idx(SRC / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    te_y = idx(SRC / "t10k-labels-idx1-ubyte.gz", 8)
    tr_i, te_i = pick(tr_y, PER_CLASS_TRAIN, rng), pick(te_y, PER_CLASS_VAL, rng)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        train_images=tr_x[tr_i], train_labels=tr_y[tr_i].astype(np.int64), train_source_index=tr_i,
        val_images=te_x[te_i], val_labels=te_y[te_i].astype(np.int64), val_source_index=te_i,
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
