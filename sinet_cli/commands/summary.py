"""``sinet summary``: the one table a person reads at the end of a run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .. import console, store
from ..app import app
from ..common import DataOpt, OutOpt, artifact_dir
from ..errors import SinetError


def _detection_rows(folder: Path) -> list[list[str]]:
    rows = []
    for name, kind, key in (("prototypes.h5", "prototypes", "consistency"), ("scores.h5", "scores", None)):
        path = folder / name
        if not path.exists():
            continue
        with store.open_artifact(path, kind) as art:
            detection = art.json_attr("detection", {}) or {}
        for signal, m in detection.items():
            if key is not None and signal != key:
                continue
            if not m:
                continue
            rows.append([f"{name}: {signal}", f"{m['roc_auc']:.4f}", f"{m['average_precision']:.4f}",
                         f"{m.get('noise_rate', float('nan')):.1%}"])
    return rows


def _accuracy_rows(folder: Path) -> list[list[str]]:
    path = folder / "metrics.json"
    if not path.exists():
        return []
    try:
        runs: dict[str, Any] = json.loads(path.read_text()).get("train", {})
    except (OSError, ValueError) as e:
        raise SinetError(f"{path}: unreadable ({e})") from None
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for entry in runs.values():
        label = entry["mode"] + ("" if entry.get("on", "features") == "features" else f" ({entry['on']})")
        by_mode.setdefault(label, []).append(entry)
    order = {"A": 0, "B": 1, "C": 2, "oracle": 3}
    rows = []
    for label in sorted(by_mode, key=lambda m: (order.get(m.split()[0], 9), m)):
        entries = [e for e in by_mode[label] if e.get("top1") is not None]
        if not entries:
            continue
        t1 = [e["top1"] for e in entries]  # metrics.json holds percentages
        t5 = [e["top5"] for e in entries]

        def fmt(v: list[float]) -> str:
            return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

        seeds = ",".join(str(e.get("seed", "?")) for e in entries)
        rows.append([label, fmt(t1), fmt(t5), str(entries[0].get("n_train", "")), seeds])
    return rows


@app.command("summary")
def summary(data: DataOpt = "demo", out: OutOpt = None) -> None:
    """Print noise-detection quality and the A/B/C/oracle accuracies of a dataset's artifacts.

    Example: sinet summary --data demo
    """
    folder = artifact_dir(out, data)
    det, acc = _detection_rows(folder), _accuracy_rows(folder)
    if not det and not acc:
        raise SinetError(f"{folder}: no scores.h5, prototypes.h5 or metrics.json to summarize")
    if det:
        console.table(f"Noise detection ({folder})", ["signal", "ROC-AUC", "AP", "noise"], det)
    if acc:
        console.table("Clean validation accuracy (%)", ["model", "top-1", "top-5", "train images", "seeds"], acc)
