"""``sinet summary``: what a run found, read from its artifacts, and what it could not know.

With clean labels (the demos) it prints the detection ROC-AUC/AP against the truth and the
A/B/C/oracle accuracies. Without them (a real crawl) it prints what is known instead: the
estimated noise overall and per class (scores.h5 ``noise_estimate``, ``class_noise``), the flagged
count, the top suspects with their suggested class, confidence and side text, how each class
name was resolved (graph.h5 ``name_resolution``), and one line for each thing it cannot say.

The small readers here (noise estimate, side text, name resolution, skipped runs) are shared
with ``sinet report``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from stages.report import NO_ESTIMATE, pct

from .. import console, store
from ..app import app
from ..common import NO_VAL_HINT, DataOpt, OutOpt, WaitOpt, artifact_dir
from ..errors import SinetError
from ..locks import Plan, locked

SUSPECTS_SHOWN = 10  # top suspects printed (all of them are in suspects.tsv)
ALL_CLASSES = 30  # up to this many classes the per-class table lists every class
CLASSES_SHOWN = 20  # above it, the noisiest ones
TEXT_WIDTH = 60  # side text and class names are cut to this many characters


# -- readers shared with `sinet report` ---------------------------------------------------------


def _json_attr(art: store.Artifact, name: str) -> Any:
    """A JSON attribute, or None (with a warning) when it is not JSON."""
    try:
        return art.json_attr(name)
    except ValueError:
        console.warn(f"{art.path}: attribute {name} is not JSON; ignored")
        return None


def noise_estimate(scores: store.Artifact, num_classes: int) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """scores.h5's ``noise_estimate`` attribute ({"overall", "method", "rows"}) and ``class_noise``
    (C,) dataset, each None when absent or unusable (a warning says which)."""
    est = _json_attr(scores, "noise_estimate")
    if est is not None:
        try:  # numbers a writer stored as strings (numpy scalars through JSON) read as numbers
            est = {**est, "overall": float(est["overall"])}
            if "rows" in est:
                est["rows"] = int(est["rows"])
        except (TypeError, ValueError, KeyError):
            console.warn(f"{scores.path}: attribute noise_estimate is not {{\"overall\": rate, ...}}; ignored")
            est = None
    per_class = None
    if "class_noise" in scores:
        per_class = np.asarray(scores.read("class_noise"), dtype=np.float64)
        if per_class.shape != (num_classes,):
            console.warn(f"{scores.path}: class_noise has shape {per_class.shape}, expected ({num_classes},); ignored")
            per_class = None
    return est, per_class


def side_text_for(features: store.Artifact | None, ids: np.ndarray) -> np.ndarray | None:
    """features.h5 ``side_text`` of each id ("" where it has none), or None when it holds no text."""
    from stages.report import find_rows

    if features is None or "side_text" not in features:
        return None
    text = np.asarray(features.read("side_text")).astype(str)
    if not (text != "").any():
        return None
    pos = find_rows(features.read("ids"), ids)
    return np.where(pos >= 0, text[np.maximum(pos, 0)] if len(text) else "", "")


def name_resolution(graph: store.Artifact | None, names: np.ndarray) -> list[dict[str, str]] | None:
    """graph.h5's ``name_resolution`` attribute: one {"class", "synset", "source", "lemma"} per class in
    class order, or None when absent or not matching the classes (a warning says so)."""
    if graph is None:
        return None
    res = _json_attr(graph, "name_resolution")
    if res is None:
        return None
    if not isinstance(res, list) or len(res) != len(names) or not all(isinstance(r, dict) for r in res):
        console.warn(f"{graph.path}: attribute name_resolution does not list the {len(names)} classes; ignored")
        return None
    return [{k: str(r.get(k) or "") for k in ("class", "synset", "source", "lemma")} for r in res]


def resolution_line(res: list[dict[str, str]]) -> str:
    """'10 classes: 7 looked up by name, 2 from the class table, 1 unresolved ('x': text similarity only)'."""
    words = {"name": "looked up by name", "table": "from the class table", "parent": "placed below a parent",
             "none": "unresolved"}
    counts: dict[str, int] = {}
    for r in res:
        counts[r["source"] or "none"] = counts.get(r["source"] or "none", 0) + 1
    parts = [f"{n} {words.get(s, s)}" for s, n in sorted(counts.items(), key=lambda kv: (kv[0] == "none", -kv[1]))]
    line = f"{len(res)} classes: " + ", ".join(parts)
    missing = [r["class"] for r in res if (r["source"] or "none") == "none"]
    if missing:
        shown = ", ".join(repr(console.plain(m, 30)) for m in missing[:8])
        line += f" ({shown}{' and more' if len(missing) > 8 else ''}: text similarity only)"
    return line


def check_provenance(folder: Path, scores: store.Artifact | None = None, protos: store.Artifact | None = None,
                     graph: store.Artifact | None = None, feats: store.Artifact | None = None) -> str | None:
    """Which artifact of ``folder`` was not made from the others there (copied in from another run or
    dataset, or left stale by a rerun upstream) and what to rerun; None when they belong together.
    scores.h5 must come from this features.h5, prototypes.h5 (and graph.h5 when it used it), and
    prototypes.h5 from this graph.h5. prototypes.h5 may predate features.h5: cron appends rows to
    features.h5 and scores them against the prototypes it has."""
    def other(a: store.Artifact, key: str, b: store.Artifact | None) -> bool:
        fp = a.inputs.get(key)
        return b is not None and fp is not None and fp != b.fingerprint

    if scores is not None:
        for key, b in (("features", feats), ("prototypes", protos), ("graph", graph)):
            if other(scores, key, b):
                return (f"{scores.path} was not scored from this folder's {b.path} (it comes from another run or "
                        f"dataset, or {b.path.name} was rebuilt since); rerun sinet score-noise --out {folder}")
    if protos is not None and other(protos, "graph", graph):
        return (f"{protos.path} was not built from this folder's {graph.path} (another run or dataset, or graph.h5 "
                f"was rebuilt since); rerun sinet make-prototypes --out {folder}, then sinet score-noise")
    return None


def provenance_problem(folder: Path) -> str | None:
    """:func:`check_provenance` of the artifacts present in ``folder``."""
    arts: dict[str, store.Artifact | None] = {}
    try:
        for name, kind in (("scores", "scores"), ("protos", "prototypes"), ("graph", "graph"), ("feats", "features")):
            path = folder / f"{kind}.h5"
            arts[name] = store.open_artifact(path, kind) if path.exists() else None
        return check_provenance(folder, **arts)
    finally:
        for a in arts.values():
            if a is not None:
                a.close()


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    """``metrics.json["train"]``, {} when there is no file."""
    if not path.exists():
        return {}
    try:
        runs = json.loads(path.read_text()).get("train", {})
    except (OSError, ValueError, AttributeError) as e:
        raise SinetError(f"{path}: unreadable ({e})") from None
    return {k: v for k, v in runs.items() if isinstance(v, dict)} if isinstance(runs, dict) else {}


def skipped_line(runs: dict[str, dict[str, Any]]) -> str | None:
    """'not trained (A, B, C): no val split; add ...' for the runs train skipped, else None."""
    skipped = {k: v for k, v in runs.items() if v.get("skipped")}
    if not skipped:
        return None
    reasons = sorted({str(v["skipped"]) for v in skipped.values()})
    hint = next((str(v["hint"]) for v in skipped.values() if v.get("hint")), NO_VAL_HINT)
    return f"not trained ({', '.join(sorted(skipped))}): {'; '.join(reasons)}, nothing to evaluate a model on; {hint}"


# -- the tables ----------------------------------------------------------------------------------


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


def _accuracy_rows(runs: dict[str, dict[str, Any]]) -> tuple[list[list[str]], set[str]]:
    """Rows of the accuracy table and the kinds of labels the runs were evaluated against."""
    from stages.report import accuracies

    def fmt(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

    rows, evaluated = [], set()
    for a in accuracies(runs):  # metrics.json holds percentages
        evaluated.update(a.eval_labels)
        rows.append([a.model, fmt(a.top1), fmt(a.top5), str(a.n_train), ",".join(str(s) for s in a.seeds)])
    return rows, evaluated


def _scores_view(folder: Path) -> dict[str, Any] | None:
    """Everything summary prints from scores.h5 (+ features.h5, graph.h5), or None without scores.h5."""
    from stages import report as stage

    scores_path = folder / "scores.h5"
    if not scores_path.exists():
        return None
    feats = store.open_artifact(folder / "features.h5", "features") if (folder / "features.h5").exists() else None
    graph = store.open_artifact(folder / "graph.h5", "graph") if (folder / "graph.h5").exists() else None
    try:
        with store.open_artifact(scores_path, "scores") as s:
            names = np.asarray(s.read("classes")).astype(str)
            C = len(names)
            ids, labels = s.read("ids"), s.read("labels").astype(np.int64)
            v: dict[str, Any] = {
                "path": scores_path, "names": names, "ids": ids, "labels": labels,
                "weight": s.read("weight").astype(np.float64), "distance": s.read("distance").astype(np.float64),
                "nearest": s.read("nearest_class").astype(np.int64),
            }
            for name in ("flagged", "suggested_class", "suggested_confidence"):
                v[name] = s.read(name) if name in s else None
            v["estimate"], v["class_noise"] = noise_estimate(s, C)
            splits = s.read("splits") if "splits" in s else None
            if splits is None and feats is not None and "splits" in feats:
                pos = stage.find_rows(feats.read("ids"), ids)
                fs = np.asarray(feats.read("splits")).astype(str)
                splits = np.where(pos >= 0, fs[np.maximum(pos, 0)], "")
        cols = [k for k in ("flagged", "suggested_class", "suggested_confidence", "class_noise") if v[k] is not None]
        console.detail(f"{scores_path}: {len(ids)} rows, {C} classes; {', '.join(cols) or 'no'} noise columns; "
                       f"noise_estimate {'present' if v['estimate'] else 'absent'}")
        v["train"] = (np.asarray(splits).astype(str) == "train") if splits is not None else np.ones(len(ids), bool)
        v["side_text"] = side_text_for(feats, ids)
        v["resolution"] = name_resolution(graph, names)
        if graph is not None:
            console.detail(f"{graph.path}: name_resolution {'present' if v['resolution'] else 'absent'}")
    finally:
        for a in (feats, graph):
            if a is not None:
                a.close()
    return v


def _class_rows(v: dict[str, Any]) -> tuple[list[str], list[list[str]], int]:
    """Per-class table: noisiest first (by class_noise, else by flagged share); its header and the
    number of classes left out."""
    from stages import report as stage

    names, est = v["names"], v["class_noise"]
    C = len(names)
    order, n_train, flagged = stage.noisiest_classes(v["labels"], v["train"], C, v["flagged"], est)
    shown = order if C <= ALL_CLASSES else order[:CLASSES_SHOWN]
    header = ["class", "train images", "estimated noise", "flagged"]
    res = v["resolution"]
    if res is not None:
        header.append("WordNet (how)")
    rows = []
    for c in shown:
        row = [console.plain(names[c], TEXT_WIDTH), str(n_train[c]),
               pct(float(est[c])) if est is not None else "–", str(flagged[c]) if flagged is not None else "–"]
        if res is not None:
            r = res[c]
            row.append(f"{r['synset'] or '–'} ({r['source'] or 'none'})")
        rows.append(row)
    return header, rows, C - len(shown)


def _suspect_rows(v: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """Top suspects, worst first: the flagged training images when scores.h5 flags, else the
    lowest-weight ones; with the suggested class and its confidence and the image's side text."""
    from stages import report as stage

    names, labels, train = v["names"], v["labels"], v["train"]
    flagged = v["flagged"]
    pool = train & (np.asarray(flagged) != 0) if flagged is not None else train
    rows_idx = stage.worst_rows(v["weight"], v["distance"], SUSPECTS_SHOWN, pool)
    if flagged is not None:
        title = f"Top suspects: {len(rows_idx)} of {int(pool.sum())} flagged training images, lowest weight first"
    else:
        title = (f"Lowest-weight training images ({len(rows_idx)}; scores.h5 has no flagged column, rerun "
                 "score-noise)")
    suggested = v["suggested_class"] if v["suggested_class"] is not None else v["nearest"]
    header = ["id", "label", "suggested" if v["suggested_class"] is not None else "nearest prototype",
              "confidence", "weight"]
    if v["side_text"] is not None:
        header.append("side text")
    rows = []
    C = len(names)
    for r in rows_idx:
        s = int(suggested[r])
        conf = v["suggested_confidence"]
        row = [console.plain(v["ids"][r], 40), console.plain(names[labels[r]], 30),
               console.plain(names[s], 30) if 0 <= s < C else "–",
               f"{float(conf[r]):.2f}" if conf is not None else "–", f"{v['weight'][r]:.3f}"]
        if v["side_text"] is not None:
            row.append(console.plain(v["side_text"][r], TEXT_WIDTH) or "–")
        rows.append(row)
    return title, header, rows


def _plan(a: dict) -> Plan:
    folder = artifact_dir(a["out"], a["data"])
    reads = [folder / n for n in ("features.h5", "graph.h5", "prototypes.h5", "scores.h5", "metrics.json")]
    return Plan(reads=reads, wait=a["wait"], resume="nothing was changed")


@app.command("summary")
@locked("summary", _plan)
def summary(data: DataOpt = None, out: OutOpt = None, wait: WaitOpt = 0.0) -> None:
    """Print what a run found: the estimated noise overall and per class, the flagged count, the top
    suspects with their suggested class and side text, the class name resolution, and - when clean
    labels and a val split exist - detection quality and the A/B/C/oracle accuracies. Says what is
    not known (no clean labels, no val split, no noise estimate).

    Example: sinet summary --out artifacts/shop
    """
    folder = artifact_dir(out, data)
    stale = provenance_problem(folder)
    if stale:
        raise SinetError(stale)
    det = _detection_rows(folder)
    runs = read_runs(folder / "metrics.json")
    acc, evaluated = _accuracy_rows(runs)
    v = _scores_view(folder)
    if v is None and not det and not runs:
        raise SinetError(f"{folder}: no scores.h5, prototypes.h5 or metrics.json to summarize")

    unknown: list[str] = []
    if v is not None:
        est, n_tr = v["estimate"], int(v["train"].sum())
        head = f"Noise ({v['path']})"
        if est is not None:
            line = (f"estimated noise {pct(float(est['overall']))} ({console.plain(est.get('method', '?'), 60)}, "
                    f"over {int(est.get('rows', n_tr))} training images)")
        else:
            line = NO_ESTIMATE
        if v["flagged"] is not None:
            line += f"; flagged {int((v['train'] & (np.asarray(v['flagged']) != 0)).sum())} of {n_tr}"
        console.out(head)
        console.out(" " + line)
        if v["resolution"] is not None:
            console.out(" class names: " + resolution_line(v["resolution"]))
        header, rows, left = _class_rows(v)
        console.table("Per class, noisiest first" + (f" ({len(rows)} of {len(rows) + left}; every class in "
                                                     "report/classes.tsv)" if left else ""), header, rows)
        title, header, rows = _suspect_rows(v)
        if rows:
            console.table(title + (f" (all in {folder / 'suspects.tsv'})" if v["flagged"] is not None else ""),
                          header, rows)
    if det:
        console.table(f"Noise detection against the clean labels ({folder})", ["signal", "ROC-AUC", "AP", "noise"], det)
    elif v is not None:
        unknown.append("no clean labels: no ROC-AUC/AP of the detection against the truth and no true noise rate")
    if acc:
        kinds = evaluated - {"clean_labels"}
        if not kinds:
            title = "Clean validation accuracy (%)"
        elif kinds == {"labels"}:
            title = "Validation accuracy (%), against the given val labels (no clean labels)"
        else:
            title = "Validation accuracy (%), partly against the given val labels"
        console.table(title, ["model", "top-1", "top-5", "train images", "seeds"], acc)
    skipped = skipped_line(runs)
    if skipped:
        unknown.append(skipped)
    elif not acc and runs:
        unknown.append("no accuracy: the runs in metrics.json were not evaluated (no val split)")
    elif not acc:
        unknown.append("no accuracy: no model trained (make train, or sinet train)")
    for line in unknown:
        console.out("not known: " + line)
    outputs = [(what, folder / rel) for what, rel in (
        ("report", "report/index.html"), ("suspects", "suspects.tsv"), ("images", "export/images.csv"),
        ("images", "export/images.parquet"), ("cleaned manifest", "export/cleaned.tsv"),
        ("metrics", "metrics.json")) if (folder / rel).exists()]
    if outputs:
        width = max(len(w) for w, _ in outputs)
        console.out("outputs:")
        for what, path in outputs:
            # report/ and export/ are committed as units: say so when a run was stopped half way
            torn = ("  (incomplete: an interrupted run; run it again)"
                    if path.parent != folder and store.commit_pending(path.parent) else "")
            console.out(f" {what:<{width}}  {path}{torn}")
