"""Noise detection on the embedded demo: sinet (make-prototypes + score-noise) vs cleanlab.

One command:

    python bench/detection.py                       # features/graph from artifacts/demo, else built
    python bench/detection.py --features F.h5 --graph G.h5 --work /tmp/detbench

For each noise setting (default: symmetric 40%, confusion 30%) the labels of one features file are
re-injected with ``sinet_cli.datasets.load_demo`` (the images, hence the features, are the same;
only the noisy labels differ), then on the *train split*:

* sinet: the Python API, ``stages.make_prototypes`` and ``stages.find_label_issues`` (the numbers
  ``sinet make-prototypes`` and ``sinet score-noise`` write) with default parameters (the fused
  score: docs/method.md); detection score 1 - w_i against the true noise mask (labels != clean
  labels); the paper's eq. 6 alone (``eq6_weight``) as a column; the flagged rows and suggestions.
* cleanlab: 5-fold cross-validated scikit-learn LogisticRegression probabilities on the same
  features, ``cleanlab.rank.get_label_quality_scores`` (score 1 - quality) and
  ``cleanlab.filter.find_label_issues`` (a yes/no mask: precision and recall).
* a sweep of eq. 6 over alpha in {0.8, 1.0, 1.2, 1.4} and beta in {1.0, 1.5, 2.0, 2.5} (the paper's
  tables 4-5), computed with the stage's ``noise_weight`` from the stored distances. For a fixed
  alpha, w is a decreasing function of the distance until it clips at 0, so ROC-AUC and AP can only
  change with alpha through the ties at w = 0, and never with beta (a monotone transform).

Wall times are for each API call and for cleanlab's cross-validation + ranking. Writes a JSON of every number to ``<work>/detection.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import sinet  # noqa: E402
from sinet_cli import store  # noqa: E402
from sinet_cli.datasets import load_demo  # noqa: E402
import stages  # noqa: E402
from stages import score_noise as sn  # noqa: E402

ALPHAS = (0.8, 1.0, 1.2, 1.4)
BETAS = (1.0, 1.5, 2.0, 2.5)


def ensure_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    features = args.features or ROOT / "artifacts" / "demo" / "features.h5"
    if not features.exists():
        print(f"[bench] {features} missing: extracting demo features into {work / 'base'}", flush=True)
        sinet("extract-features", "--data", "demo", "--out", work / "base")
        features = work / "base" / "features.h5"
    graph = args.graph or ROOT / "artifacts" / "demo" / "graph.h5"
    if not graph.exists():
        print(f"[bench] {graph} missing: building the demo graph into {work / 'base'}", flush=True)
        sinet("build-graph", "--data", "demo", "--out", work / "base")
        graph = work / "base" / "graph.h5"
    return features, graph


def reinject(features: Path, noise: str, rate: float, seed: int) -> dict:
    """The rows of ``features`` with the noisy and clean labels of ``load_demo(noise, rate, seed)``."""
    table = load_demo(noise=noise, rate=rate, seed=seed)
    pos = {i: k for k, i in enumerate(table.ids)}
    with store.open_artifact(features, "features") as a:
        data = {name: a.read(name) for name in a.file.keys()}
    rows = np.array([pos.get(i, -1) for i in data["ids"]])
    train = data["splits"] == "train"
    if (rows[train] < 0).any():
        raise SystemExit(f"{features}: train ids that load_demo does not know (another demo version?)")
    # noise is injected into the train split only; validation rows keep their (clean) labels
    found = rows >= 0
    data["labels"] = np.where(found, table.labels[rows], data["labels"])
    data["clean_labels"] = np.where(found, table.clean_labels[rows],
                                    data.get("clean_labels", data["labels"]))
    return data


def cleanlab_detection(x: np.ndarray, y: np.ndarray, noisy: np.ndarray, folds: int, seed: int) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=1000)
    probs = cross_val_predict(clf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")
    t_cv = time.perf_counter() - t0
    quality = get_label_quality_scores(y, probs)
    issues = find_label_issues(y, probs)
    seconds = time.perf_counter() - t0
    return {
        "roc_auc": sn.roc_auc(noisy, 1 - quality),
        "average_precision": sn.average_precision(noisy, 1 - quality),
        "issues": int(issues.sum()),
        "issues_precision": float(noisy[issues].mean()) if issues.any() else float("nan"),
        "issues_recall": float(issues[noisy].mean()),
        "cv_accuracy_noisy": float((probs.argmax(1) == y).mean()),
        "seconds": seconds,
        "seconds_cv": t_cv,
    }


def run_setting(name: str, noise: str, rate: float, features: Path, graph: Path, work: Path, args) -> dict:
    data = reinject(features, noise, rate, args.seed)
    with store.open_artifact(graph, "graph") as g:
        class_graph = stages.ClassGraph(classes=list(g.read("classes")), similarity=g.read("S_t"))
    train = data["splits"] == "train"
    # the train split alone, as make-prototypes and score-noise use it (prototypes and the probe's sample)
    x = data["features"][train].astype(np.float32)
    lab, clean = data["labels"][train].astype(np.int64), data["clean_labels"][train].astype(np.int64)
    t0 = time.perf_counter()
    protos = stages.build_prototypes(x, lab, graph=class_graph)
    t_proto = time.perf_counter() - t0
    t0 = time.perf_counter()
    issues = stages.find_label_issues(x, lab, graph=class_graph, prototypes=protos)
    t_score = time.perf_counter() - t0
    w, w6, d, flagged = issues.weight, issues.eq6_weight, issues.distance, issues.flagged
    noisy = lab != clean
    p = np.nan_to_num(protos.consistency, nan=0.0)
    result = {
        "noise": noise, "rate": rate, "train_rows": int(train.sum()), "noise_rate": float(noisy.mean()),
        "sinet": {
            "roc_auc": sn.roc_auc(noisy, 1 - w),
            "average_precision": sn.average_precision(noisy, 1 - w),
            "eq6_roc_auc": sn.roc_auc(noisy, 1 - w6),
            "consistency_p": {"roc_auc": sn.roc_auc(noisy, -p), "average_precision": sn.average_precision(noisy, -p)},
            "noise_estimate": issues.noise_rate,
            "suspects": int(flagged.sum()),
            "suspects_precision": float(noisy[flagged].mean()) if flagged.any() else float("nan"),
            "suspects_recall": float(flagged[noisy].mean()),
            "relabel_accuracy_on_noisy": float((issues.suggested_class[noisy] == clean[noisy]).mean()),
            "seconds_make_prototypes": t_proto,
            "seconds_score_noise": t_score,
        },
    }
    result["cleanlab"] = cleanlab_detection(x, lab, noisy, args.folds, args.seed)
    sweep = {}
    for a in ALPHAS:
        for b in BETAS:
            ww = sn.noise_weight(d, a, b)
            sweep[f"{a},{b}"] = {"roc_auc": sn.roc_auc(noisy, 1 - ww), "average_precision":
                                 sn.average_precision(noisy, 1 - ww), "zero_weight": float((ww == 0).mean())}
    result["sweep"] = sweep
    result["distance_roc_auc"] = sn.roc_auc(noisy, d)
    return result


def print_report(results: dict) -> None:
    print()
    print("Noise detection on the demo train split (score: 1 - w for sinet, 1 - label quality for cleanlab)")
    print(f"{'setting':<16}{'noisy':>7} | {'sinet AUC':>9} {'AP':>6} {'time':>7} | "
          f"{'cleanlab AUC':>12} {'AP':>6} {'time':>7} | {'sinet p AUC':>11} {'eq.6 AUC':>9}")
    for name, r in results.items():
        s, c = r["sinet"], r["cleanlab"]
        t = s["seconds_make_prototypes"] + s["seconds_score_noise"]
        print(f"{name:<16}{r['noise_rate']:>7.1%} | {s['roc_auc']:>9.4f} {s['average_precision']:>6.4f} {t:>6.1f}s | "
              f"{c['roc_auc']:>12.4f} {c['average_precision']:>6.4f} {c['seconds']:>6.1f}s | "
              f"{s['consistency_p']['roc_auc']:>11.4f} {s['eq6_roc_auc']:>9.4f}")
    print()
    print("Flagged sets: sinet find_label_issues (flagged) vs cleanlab find_label_issues")
    for name, r in results.items():
        s, c = r["sinet"], r["cleanlab"]
        print(f"{name:<16} sinet {s['suspects']:>5} flagged, precision {s['suspects_precision']:.3f} recall "
              f"{s['suspects_recall']:.3f}, suggested class right on {s['relabel_accuracy_on_noisy']:.1%} of noisy | "
              f"cleanlab {c['issues']:>5} flagged, precision {c['issues_precision']:.3f} recall {c['issues_recall']:.3f}")
    for name, r in results.items():
        print()
        print(f"eq. 6 sweep, {name}: ROC-AUC (AP) [share of train rows with w = 0]")
        print("alpha / beta".rjust(12) + "".join(f"{b:>22}" for b in BETAS))
        for a in ALPHAS:
            cells = [r["sweep"][f"{a},{b}"] for b in BETAS]
            print(f"{a:>12}" + "".join(f"{c['roc_auc']:>9.4f} ({c['average_precision']:.4f}) [{c['zero_weight']:.1%}]"
                                       .rjust(22) for c in cells))
        print(f"{'distance':>12}   ROC-AUC {r['distance_roc_auc']:.4f} (no clipping)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=Path, help="demo features.h5 (default artifacts/demo/features.h5)")
    ap.add_argument("--graph", type=Path, help="demo graph.h5 (default artifacts/demo/graph.h5, else built)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sinet-bench-detection"))
    ap.add_argument("--settings", default="symmetric:0.4,confusion:0.3", help="noise:rate,... (load_demo kinds)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--folds", type=int, default=5, help="cleanlab cross-validation folds")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    features, graph = ensure_inputs(args, args.work)
    print(f"[bench] features {features}, graph {graph}", flush=True)
    results = {}
    for item in args.settings.split(","):
        noise, rate = item.split(":")
        name = f"{noise}-{rate}"
        results[name] = run_setting(name, noise, float(rate), features, graph, args.work, args)
    print_report(results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    out = args.work / "detection.json"
    out.write_text(json.dumps({"commit": commit.strip(), "features": str(features), "graph": str(graph),
                               "results": results}, indent=2, default=float) + "\n")
    print(f"\n[bench] wrote {out}")


if __name__ == "__main__":
    main()
