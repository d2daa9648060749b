"""make-prototypes' probe: ``--probe-epochs 0`` (the class-mean classifier) against the default 1 epoch.

    python bench/probe_epochs_check.py --work /tmp/sinet-dt [--heldout]

For both demos and the four noise settings of ``detection_types.py`` (``--heldout``: its held-out
rates and noise seed 1), make-prototypes with each epoch count, then score-noise ``--score paper``
(eq. 6, which the prototypes place) and the default ``--score fused``; prints the train-split
ROC-AUC against the true noise mask and make-prototypes' seconds. The probe's one epoch costs
~0.45 s of the make-prototypes bench (N=200k, C=1,000); this shows what it buys.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import detection_types as dt
from benchlib import sinet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sinet-bench-detection-types"))
    ap.add_argument("--heldout", action="store_true")
    args = ap.parse_args()
    if args.heldout:
        dt.SETTINGS.update(dt.HELDOUT)
        dt.NOISE_SEED = 1
    args.work.mkdir(parents=True, exist_ok=True)
    for ds in ("demo", "demo-mnist"):
        for setting in dt.SETTINGS:
            folder = dt.prepare(ds, setting, args.work)
            row = []
            for epochs in ("1", "0"):
                t = time.perf_counter()
                sinet("make-prototypes", "--out", folder, "--force", "--probe-epochs", epochs)
                seconds = time.perf_counter() - t
                for mode in ("paper", "fused"):
                    sinet("score-noise", "--out", folder, "--force", "--score", mode)
                    row.append(f"epochs {epochs} {mode} {dt.weight_detection(folder)[0]:.4f}")
                row.append(f"epochs {epochs} make-prototypes {seconds:.2f} s")
            print(f"{ds:10s} {setting:9s} {'held out' if args.heldout else 'design'} | " + " | ".join(row),
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
