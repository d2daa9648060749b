"""The numbers a user acts on: estimated noise, the flagged set and the relabel suggestion, against
the truth and against cleanlab on the same features (docs/noise-estimate.md).

    python bench/label_issues.py --work /tmp/sinet-li                       # design settings (noise seed 0)
    python bench/label_issues.py --work /tmp/sinet-li --heldout             # held-out settings (noise seed 1)
    python bench/label_issues.py --work /tmp/sinet-li --rows "demo sym20"   # one row (its command)
    python bench/label_issues.py --work /tmp/sinet-li --anchor-share 0.3    # E3's one constant changed

Rows: the embedded demo (Fashion-MNIST, MNIST junk) and demo-mnist (MNIST, Fashion-MNIST junk) with
symmetric 20% and 40%, class confusion 30%, open-set 20% and a mix (symmetric 10% + confusion 20% +
open-set 10%), noise seed 0; and ``folder``: an image folder of 1,000 of the demo's images (100 a
class) written as PNG files under ordinary class-name folders (``tshirt``, ``ankle_boot``, ...),
20% of them moved into a wrong folder, read with ``--data imagefolder:DIR`` (the reader knows no
clean label: the bench keeps the truth itself). ``--heldout``: rates and noise draws the estimator
was not designed on (noise seed 1: symmetric 30%, confusion 40%, open-set 30%, mix 15/10/15%, and
the folder with 30% moved, other images).

Each demo's clean images are extracted once (``<work>/<demo>-base``, as bench/detection_types.py
does) and a setting's features.h5 is assembled by id from them, without side text. sinet: the
Python API on the train split, ``stages.build_prototypes`` and ``stages.find_label_issues`` with
default options (the numbers make-prototypes and score-noise write on it). cleanlab: 5-fold CV scikit-learn
``LogisticRegression(max_iter=200)`` pred_probs on the same train features (cached per setting),
``count.num_label_issues`` for its estimate, ``filter.find_label_issues`` (defaults) for its flagged
set, the pred_probs argmax for its relabel. All on the train split; open-set images count as noisy;
relabel accuracy is over the closed-set noisy images (true class known). Run it under ``nice``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchlib as bl  # noqa: E402
import stages  # noqa: E402
from benchlib import sinet  # noqa: E402
from detection_types import base_features  # noqa: E402
from sinet_cli import store  # noqa: E402
from sinet_cli.datasets import load_demo  # noqa: E402
from sinet_cli.datasets.demo import DEMOS  # noqa: E402

DESIGN = {"sym20": "symmetric:0.2", "sym40": "symmetric:0.4", "conf30": "confusion:0.3", "open20": "openset:0.2",
          "mix": "symmetric:0.1+confusion:0.2+openset:0.1"}
HELDOUT = {"sym30": "symmetric:0.3", "conf40": "confusion:0.4", "open30": "openset:0.3",
           "mix2": "symmetric:0.15+confusion:0.1+openset:0.15"}
FOLDER_MOVED = {0: 0.2, 1: 0.3}  # noise seed -> share of the folder's files moved into a wrong folder
# the demo's classes as a user names folders
FOLDER_NAMES = {"T-shirt/top": "tshirt", "Trouser": "trouser", "Pullover": "pullover", "Dress": "dress",
                "Coat": "coat", "Sandal": "sandal", "Shirt": "shirt", "Sneaker": "sneaker", "Bag": "bag",
                "Ankle boot": "ankle_boot"}


def demo_setting(ds: str, name: str, spec: str, seed: int, work: Path) -> Path:
    """features.h5 (no side text) of one demo noise setting, assembled by id from the two extracted
    clean image sets (the open-set junk of one demo is the other demo's train images), + graph.h5."""
    graph = work / f"{ds}-graph" / "graph.h5"
    if not graph.exists():
        sinet("build-graph", "--data", ds, "--out", graph.parent)
    folder = work / "runs" / f"{ds}-{name}-s{seed}"
    if (folder / "features.h5").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t = load_demo(noise=spec, rate=0.0, seed=seed, name=ds)
    own, junk = base_features(ds, work), base_features(DEMOS[ds][3], work)
    pos = {i: k for k, i in enumerate(own["ids"])}
    jpos = {i: k for k, i in enumerate(junk["ids"])}
    feats = np.empty((len(t.ids), own["features"].shape[1]), dtype=own["features"].dtype)
    for r, i in enumerate(t.ids):
        feats[r] = own["features"][pos[i]] if i in pos else junk["features"][jpos[i.replace("-junk-", "-train-")]]
    data = {"ids": t.ids, "labels": t.labels, "features": feats, "classes": own["classes"], "splits": t.splits,
            "clean_labels": t.clean_labels}
    store.write_artifact(folder / "features.h5", "features", data, {"noise": spec, "seed": seed}, {})
    shutil.copyfile(graph, folder / "graph.h5")
    return folder


def image_folder(seed: int, work: Path, per_class: int = 100) -> tuple[Path, dict[str, str]]:
    """An image folder of demo images (PNG) under class-name folders, FOLDER_MOVED[seed] of them in a
    wrong folder; returns the folder and {image id as imagefolder names it: true folder name}."""
    from PIL import Image

    root = work / f"folder-s{seed}" / "images"
    truth_path = root.parent / "truth.json"
    if truth_path.exists():
        return root, json.loads(truth_path.read_text())
    t = load_demo(noise="none", name="demo")
    names = [FOLDER_NAMES[n] for n in t.classes.names]
    rng = np.random.default_rng([seed, 18])
    train = np.flatnonzero(t.splits == "train")
    picks = np.concatenate([rng.choice(train[t.clean_labels[train] == c], per_class, replace=False)
                            for c in range(len(names))])
    moved = np.zeros(len(picks), dtype=bool)
    moved[rng.choice(len(picks), int(round(FOLDER_MOVED[seed] * len(picks))), replace=False)] = True
    if root.exists():
        shutil.rmtree(root)
    truth = {}
    for k, i in enumerate(picks):
        true = int(t.clean_labels[i])
        folder = (true + int(rng.integers(1, len(names)))) % len(names) if moved[k] else true
        path = root / names[folder] / f"{t.ids[i]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(t.pixels[i]).save(path)
        truth[f"train/{names[folder]}/{path.name}"] = names[true]
    truth_path.write_text(json.dumps(truth))
    return root, truth


def folder_setting(seed: int, work: Path) -> tuple[Path, np.ndarray]:
    """Artifacts of the image folder (extract-features, build-graph, make-prototypes) and the true
    label of each features.h5 row."""
    root, truth = image_folder(seed, work)
    art = root.parent / "art"
    data = f"imagefolder:{root}"
    if not (art / "features.h5").exists():
        sinet("extract-features", "--data", data, "--out", art)
    if not (art / "graph.h5").exists():
        sinet("build-graph", "--data", data, "--out", art)  # names such as tshirt or ankle_boot resolve by themselves
    with store.open_artifact(art / "features.h5", "features") as a:
        ids, classes = a.read("ids"), list(a.read("classes"))
    clean = np.array([classes.index(truth[i]) for i in ids])
    return art, clean


def cleanlab_probs(folder: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    cache = folder / "cl_probs.npy"
    if cache.exists():
        return np.load(cache), float("nan")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    t0 = time.perf_counter()
    probs = cross_val_predict(LogisticRegression(max_iter=200), x, y,  # capped (busy 2-core machine)
                              cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    np.save(cache, probs)
    return probs, time.perf_counter() - t0


def prf(flagged: np.ndarray, noisy: np.ndarray) -> tuple[float, float, float]:
    tp = int((flagged & noisy).sum())
    p, r = tp / max(int(flagged.sum()), 1), tp / max(int(noisy.sum()), 1)
    return p, r, 2 * p * r / max(p + r, 1e-12)


def evaluate(folder: Path, clean: np.ndarray | None = None) -> dict:
    """Score ``folder``'s train split with sinet's defaults (the Python API) and cleanlab; ``clean``:
    the true label of each features.h5 row (default: its clean_labels)."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues

    with store.open_artifact(folder / "features.h5", "features") as a:
        train = a.read("splits") == "train" if "splits" in a else np.ones(a.dims["N"], dtype=bool)
        if clean is None:
            clean = a.read("clean_labels")
    data, graph = bl.train_split(folder / "features.h5"), bl.class_graph(folder / "graph.h5")
    x, y, clean = data["features"], data["labels"], np.asarray(clean)[train]
    protos = stages.build_prototypes(x, y, graph=graph)
    t0 = time.perf_counter()
    issues = stages.find_label_issues(x, y, graph=graph, prototypes=protos)
    seconds = time.perf_counter() - t0
    flagged, sug, conf = issues.flagged, issues.suggested_class, issues.suggested_confidence
    noisy = y != clean
    closed = noisy & (clean >= 0)
    probs, cl_seconds = cleanlab_probs(folder, x, y)
    cl_flag = find_label_issues(y, probs)
    ours, theirs = prf(flagged, noisy), prf(cl_flag, noisy)
    return {
        "rows": int(len(y)), "true_noise": float(noisy.mean()), "open_set": float((clean < 0).mean()),
        "est_ours": float(issues.noise_rate), "est_cleanlab": num_label_issues(y, probs) / len(y),
        "flagged_ours": int(flagged.sum()), "flagged_cleanlab": int(cl_flag.sum()),
        "precision_ours": ours[0], "recall_ours": ours[1], "f1_ours": ours[2],
        "precision_cleanlab": theirs[0], "recall_cleanlab": theirs[1], "f1_cleanlab": theirs[2],
        "relabel_ours": float((sug[closed] == clean[closed]).mean()) if closed.any() else float("nan"),
        "relabel_cleanlab": float((probs.argmax(1)[closed] == clean[closed]).mean()) if closed.any() else float("nan"),
        "closed_noisy": int(closed.sum()), "seconds_score_noise": seconds, "seconds_cleanlab_cv": cl_seconds,
        "decisions": decisions(y, clean, flagged, sug, conf),
    }


RELABEL_AT = (0.3, 0.5, 0.7, 0.9)


def decisions(y: np.ndarray, clean: np.ndarray, flagged: np.ndarray, sug: np.ndarray, conf: np.ndarray) -> dict:
    """sinet export's rule (not flagged: keep; flagged, confidence >= t: relabel; else drop) at each t,
    and dropping every flagged image: the label accuracy of the kept images (open-set images have no
    right label), the share kept, the share of the relabeled ones given their true class."""
    out = {"noisy": float(np.mean(y == clean)),
           "drop": [float(np.mean((y == clean)[~flagged])), float((~flagged).mean())]}
    for t in RELABEL_AT:
        rel = flagged & (conf >= t)
        keep = ~flagged | rel
        new = np.where(rel, sug, y)
        out[str(t)] = [float(np.mean(new[keep] == clean[keep])), float(keep.mean()),
                       float(np.mean(sug[rel] == clean[rel])) if rel.any() else float("nan")]
    return out


def decision_table(results: dict) -> str:
    head = ("| row | noisy labels: accuracy | drop every flagged | " +
            " | ".join(f"relabel at >= {t}" for t in RELABEL_AT) + " |")
    lines = [head, "|" + "---|" * (3 + len(RELABEL_AT))]
    for k, r in results.items():
        d = r.get("decisions")
        if d is None:
            continue
        cells = [f"{d['noisy']:.3f}", f"{d['drop'][0]:.3f} ({d['drop'][1]:.2f})"]
        cells += [f"{d[str(t)][0]:.3f} ({d[str(t)][1]:.2f}; {d[str(t)][2]:.2f})" for t in RELABEL_AT]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    head = ("| row | true | est. ours | est. cleanlab | flagged ours / cleanlab | P ours | R ours | F1 ours | "
            "P cl | R cl | F1 cl | relabel ours | relabel cl |")
    lines = [head, "|" + "---|" * 13]
    for k, r in results.items():
        lines.append(f"| {k} | {r['true_noise']:.1%} | {r['est_ours']:.1%} | {r['est_cleanlab']:.1%} | "
                     f"{r['flagged_ours']} / {r['flagged_cleanlab']} | {r['precision_ours']:.3f} | "
                     f"{r['recall_ours']:.3f} | {r['f1_ours']:.3f} | {r['precision_cleanlab']:.3f} | "
                     f"{r['recall_cleanlab']:.3f} | {r['f1_cleanlab']:.3f} | {r['relabel_ours']:.3f} | "
                     f"{r['relabel_cleanlab']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sinet-bench-label-issues"))
    ap.add_argument("--heldout", action="store_true", help="the held-out settings (noise seed 1)")
    ap.add_argument("--rows", default="", help="comma list of row names (default: all), e.g. 'demo sym20,folder'")
    ap.add_argument("--anchor-share", type=float, default=None,
                    help="the anchors' share of E3 (default: stages.score_noise.ANCHOR_SHARE); results go to "
                         "label_issues-s<seed>-share<S>.json")
    args = ap.parse_args()
    if args.anchor_share is not None:
        import stages.score_noise as sn

        sn.ANCHOR_SHARE = args.anchor_share
    seed = 1 if args.heldout else 0
    settings = HELDOUT if args.heldout else DESIGN
    names = [f"{ds} {s}" for ds in ("demo", "demo-mnist") for s in settings] + ["folder"]
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()] or names
    unknown = set(wanted) - set(names)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; rows are {names}")
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / (f"label_issues-s{seed}.json" if args.anchor_share is None
                       else f"label_issues-s{seed}-share{args.anchor_share:g}.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    for row in wanted:
        if row == "folder":
            art, clean = folder_setting(seed, args.work)
            results[f"folder {FOLDER_MOVED[seed]:.0%} moved"] = evaluate(art, clean)
        else:
            ds, setting = row.split()
            results[row] = evaluate(demo_setting(ds, setting, settings[setting], seed, args.work))
        out.write_text(json.dumps(results, indent=1) + "\n")
        last = results.get(row, results.get(f"folder {FOLDER_MOVED[seed]:.0%} moved"))
        print(f"[{row}] " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}),
              flush=True)
    share = "" if args.anchor_share is None else f", anchor share {args.anchor_share:g}"
    print(f"\nnoise seed {seed} ({'held out' if args.heldout else 'design'}){share}, train split\n")
    print(table(results))
    print("\nsinet export's decision rule: label accuracy of the kept train images (share kept; share of the "
          "relabeled given their true class)\n")
    print(decision_table(results))


if __name__ == "__main__":
    main()
