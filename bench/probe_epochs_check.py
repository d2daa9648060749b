"""make-prototypes' probe: ``--probe-epochs 0`` (the class-mean classifier) against the default 1 epoch.

    python bench/probe_epochs_check.py --work /tmp/sinet-dt [--heldout]

For both demos and the four noise settings of ``detection_types.py`` (``--heldout``: its held-out
rates and noise seed 1), on the train split through the Python API: ``stages.build_prototypes``
with each epoch count, then ``stages.find_label_issues`` with ``score="paper"`` (eq. 6, which the
prototypes place) and the default ``score="fused"`` (with the captions as side text, as score-noise
uses them by default); prints the train-split ROC-AUC against the true noise mask and
build_prototypes' seconds. What the probe's epoch costs on a large set: bench/bench_make_prototypes.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import detection_types as dt
from sinet_cli import store

MODES = {"paper": {"score": "paper"}, "fused": {"score": "fused", "text": True}}


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
            with store.open_artifact(folder / "features.h5", "features") as a:
                train = a.read("splits") == "train"
                y, clean = a.read("labels")[train], a.read("clean_labels")[train]
            row = []
            for epochs in (1, 0):
                weights, seconds = dt.sinet_modes(folder, MODES, {"probe_epochs": epochs})
                for mode, (w, _) in weights.items():
                    row.append(f"epochs {epochs} {mode} {dt.detection(w, y, clean)[0]:.4f}")
                row.append(f"epochs {epochs} make-prototypes {seconds:.2f} s")
            print(f"{ds:10s} {setting:9s} {'held out' if args.heldout else 'design'} | " + " | ".join(row),
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
