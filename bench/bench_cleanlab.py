"""Detection on the demo's real features: sinet (build_prototypes + find_label_issues) against cleanlab.

Reuses ``bench/detection.py`` (imported, ``run_setting``): for each noise setting (default
symmetric 40% and class-confusion 30%) the demo's features get that setting's noisy and true labels
(the images, hence the features, are the same for every setting), then on the train split:

* sinet: the Python API, ``stages.build_prototypes`` + ``stages.find_label_issues`` with default
  options (the numbers make-prototypes and score-noise write: probe-initialized prototypes, the
  fused score); suspicion 1 - w_i;
* cleanlab: 5-fold cross-validated scikit-learn ``LogisticRegression(max_iter=1000)`` probabilities
  on the same features, ``cleanlab.rank.get_label_quality_scores`` (suspicion 1 - quality) and
  ``cleanlab.filter.find_label_issues``.

Both times are wall times of their detection path on features already extracted; sinet's also
needs graph.h5 (build-graph, once per class table: not timed here, see bench_build_graph.py).
Every import (torch, FAISS, scikit-learn, cleanlab) is done before timing. ROC-AUC and AP are
against the true noise mask (labels != clean labels) of the train rows.

Inputs: ``--features``/``--graph``; else ``artifacts/demo/features.h5`` / ``graph.h5`` when they
exist (``make demo``); else they are built into the scratch folder (extract-features at 64 px and
build-graph on the demo: a few minutes on 2 cores).
Targets: sinet at least 5x faster and a higher ROC-AUC than cleanlab, in every setting.

Run: python bench/bench_cleanlab.py [--features F.h5] [--graph G.h5] [--settings symmetric:0.4,confusion:0.3]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import benchlib as bl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    ap.add_argument("--features", type=Path, help="demo features.h5 (any noise setting: labels are re-injected)")
    ap.add_argument("--graph", type=Path, help="demo graph.h5")
    ap.add_argument("--settings", default="symmetric:0.4,confusion:0.3")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--folds", type=int, default=5, help="cleanlab cross-validation folds")
    args = ap.parse_args()
    if args.device != "cpu":
        print(f"# the detection commands run on the CPU here ({args.device} not used)")

    import cleanlab.filter  # noqa: F401  (every import before timing)
    import cleanlab.rank  # noqa: F401
    import faiss  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import torch  # noqa: F401

    import detection
    from sinet_cli import store
    from stages import api  # noqa: F401

    with bl.scratch(args.work, "sinet-bench-cleanlab-") as work:
        demo = bl.ROOT / "artifacts" / "demo"
        features = args.features or (demo / "features.h5" if (demo / "features.h5").exists() else None)
        graph = args.graph or (demo / "graph.h5" if (demo / "graph.h5").exists() else None)
        if features is None:
            print(f"  setup: extracting the demo's features into {work / 'base'}", flush=True)
            bl.sinet("extract-features", "--data", "demo", "--out", work / "base")
            features = work / "base" / "features.h5"
        if graph is None:
            print(f"  setup: building the demo's graph into {work / 'base'}", flush=True)
            bl.sinet("build-graph", "--data", "demo", "--out", work / "base")
            graph = work / "base" / "graph.h5"
        # private copies: artifacts/demo may be rewritten by a concurrent `make demo`
        (work / "in").mkdir(exist_ok=True)
        features = Path(shutil.copyfile(features, work / "in" / "features.h5"))
        graph = Path(shutil.copyfile(graph, work / "in" / "graph.h5"))
        with store.open_artifact(features, "features") as a:
            print(f"# detection: features {a.dims['N']:,} x {a.dims['D']} ({a.params.get('backbone')}, "
                  f"{a.params.get('image_size')} px), graph {graph}", flush=True)

        figures = []
        for item in args.settings.split(","):
            noise, rate = item.split(":")
            name = f"{noise}-{rate}"
            r = detection.run_setting(name, noise, float(rate), features, graph, work, args)
            s, c = r["sinet"], r["cleanlab"]
            t_s = s["seconds_make_prototypes"] + s["seconds_score_noise"]
            print(f"  {name}: sinet {t_s:.2f} s (make-prototypes {s['seconds_make_prototypes']:.2f} s, score-noise "
                  f"{s['seconds_score_noise']:.2f} s) ROC-AUC {s['roc_auc']:.4f} AP {s['average_precision']:.4f} | "
                  f"cleanlab {c['seconds']:.2f} s (CV {c['seconds_cv']:.2f} s) ROC-AUC {c['roc_auc']:.4f} "
                  f"AP {c['average_precision']:.4f}", flush=True)
            label = f"{noise} {float(rate):.0%}, {r['train_rows']:,} train rows"
            figures.append(bl.figure(f"detection speed, sinet vs cleanlab ({label})", t_s, "s",
                                     "cleanlab 5-fold LR + ranking", c["seconds"], c["seconds"] / t_s,
                                     ">=5x faster", c["seconds"] / t_s >= 5, "ratio = cleanlab / sinet"))
            figures.append(bl.figure(f"detection ROC-AUC, sinet vs cleanlab ({label})", s["roc_auc"], "AUC",
                                     "cleanlab", c["roc_auc"], s["roc_auc"] / c["roc_auc"], "higher AUC",
                                     s["roc_auc"] > c["roc_auc"],
                                     f"AP sinet {s['average_precision']:.3f} vs cleanlab {c['average_precision']:.3f}"))
        bl.emit(figures, args.json)


if __name__ == "__main__":
    main()
