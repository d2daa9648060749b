"""CPU testbed where label noise hurts: a small timm CNN trained from scratch on the demo images.

    python bench/train_testbed.py --work /tmp/sinet-tb                  # design grid (noise seed 0)
    python bench/train_testbed.py --work /tmp/sinet-tb --heldout        # held-out rates, noise seed 1
    python bench/train_testbed.py --work /tmp/sinet-tb --ablation fixmatch   # S_t: wordnet+text / text / none
    python bench/train_testbed.py --work /tmp/sinet-tb --table          # print the tables of what ran
    python bench/train_testbed.py --work /tmp/sinet-tb --runs-list      # every run: top-1, seconds, command

Per dataset (demo: Fashion-MNIST with MNIST junk; demo-mnist: MNIST with Fashion-MNIST junk) and
noise setting (uniform = symmetric 40%, confusion 30%, open-set 20%, mixed = symmetric 10% +
confusion 20% + open-set 10%; the settings of ``bench/detection_types.py``), the pipeline before
training runs once per setting and noise seed, with the packaged ImageNet lite0 weights at 64 px:
``sinet build-graph`` (per dataset and ``--sources``), ``extract-features``, ``make-prototypes``,
``score-noise`` (the default fused score). Then every training run is one command,

    sinet train --data D --noise SPEC --noise-seed N --on images --random-init --backbone test_resnet
                --image-size 28 --epochs 15 --batch-size 128 --min-crop 0.5 --mode M --seed S ...

a from-scratch CNN on the 28 x 28 pixels (timm's ``test_resnet``, 0.37M parameters), whose top-1
on the 1,000 clean validation images, command and wall time are appended to
``<work>/results.jsonl`` (a run already there is not repeated). Each run is a child process with
one torch thread under ``nice -n 10``; ``--jobs`` run at once. The table gives mean ± sample std
over the training seeds and the share of the A-to-oracle gap the best mode recovers.

``--heldout``: symmetric 20%, confusion 40%, open-set 30%, mixed 15/10/15%, noise seed 1 (the
held-out settings of ``bench/detection_types.py``); nothing in the modes' defaults was chosen on them.
``--heldout2``: symmetric 30%, confusion 20%, open-set 10%, mixed 20/10/5%, noise seed 2, a second
held-out set fixed after the modes' defaults (``correct``'s cleaned targets) were chosen.
``--ablation MODE``: MODE on the design settings with S_t from WordNet + text (the default graph),
from text only (``build-graph --sources text``) and with no graph (S_t = I: every class related
only to itself, so eq. 4's consistency sees no side information); prototypes, scores and training
are redone for each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DATASETS = ("demo", "demo-mnist")
SETTINGS = {  # the design settings of bench/detection_types.py (noise seed 0)
    "uniform": "symmetric:0.4",
    "confusion": "confusion:0.3",
    "openset": "openset:0.2",
    "mixed": "symmetric:0.1+confusion:0.2+openset:0.1",
}
HELDOUT = {  # bench/detection_types.py --heldout (noise seed 1)
    "uniform": "symmetric:0.2",
    "confusion": "confusion:0.4",
    "openset": "openset:0.3",
    "mixed": "symmetric:0.15+confusion:0.1+openset:0.15",
}
HELDOUT2 = {  # a second held-out set (noise seed 2), chosen after the modes' defaults were fixed
    "uniform": "symmetric:0.3",
    "confusion": "confusion:0.2",
    "openset": "openset:0.1",
    "mixed": "symmetric:0.2+confusion:0.1+openset:0.05",
}
# name -> sinet train options; the run is stored as train-<mode>-<name>-s<seed>
RUNS = {
    "A": ["--mode", "A"],
    "B": ["--mode", "B"],
    "C": ["--mode", "C"],
    "correct": ["--mode", "correct"],
    "correct-soft": ["--mode", "correct", "--correct-target", "soft"],
    "correct-hard": ["--mode", "correct", "--correct-target", "hard"],
    "correct-dist": ["--mode", "correct", "--correct-target", "distribution"],
    "fixmatch": ["--mode", "fixmatch"],
    "mixmatch": ["--mode", "mixmatch"],
    "graph": ["--mode", "graph"],
    "forward": ["--mode", "forward"],
    "forward-graph": ["--mode", "forward", "--transition-neighbours", "3"],
    "mixmatch-web": ["--mode", "mixmatch", "--mix-alpha", "0.5", "--lambda-u", "0"],
    "topk": ["--mode", "C", "--topk-smoothing", "3"],
    "topk-graph": ["--mode", "C", "--topk-smoothing", "3", "--topk-neighbours", "3"],
    "oracle": ["--mode", "oracle"],
}
DEFAULT_RUNS = ("A", "B", "C", "correct", "correct-soft", "fixmatch", "mixmatch", "graph", "oracle")
GRAPHS = {"wordnet+text": "wordnet,text", "text": "text", "none": None}
TRAIN = ["--on", "images", "--random-init", "--backbone", "test_resnet", "--image-size", "28", "--epochs", "15",
         "--batch-size", "128", "--min-crop", "0.5", "--workers", "0", "--device", "cpu"]


def sinet_cmd(*args: object) -> list[str]:
    return ["nice", "-n", "10", sys.executable, "-m", "sinet_cli", *map(str, args)]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CI="1",
                SINET_QUIET="1")


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout + p.stderr


def write_identity_graph(src: Path, dst: Path) -> None:
    """graph.h5 with S_t = S_w = I, S_l = 0: no side information (each class related only to itself)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from sinet_cli import store

    with store.open_artifact(src, "graph") as a:
        classes = list(a.read("classes"))
    eye = np.eye(len(classes), dtype=np.float32)
    store.write_artifact(dst, "graph", {"classes": classes, "S_w": eye, "S_l": np.zeros_like(eye), "S_t": eye},
                         {"sources": "none (S_t = I)"}, {})


def graph_file(work: Path, ds: str, graph: str) -> Path:
    """graph.h5 of a dataset for one choice of side information, built once."""
    path = work / "graphs" / f"{ds}-{graph}" / "graph.h5"
    if path.exists():
        return path
    if GRAPHS[graph] is None:
        write_identity_graph(graph_file(work, ds, "wordnet+text"), path)
    else:
        run(sinet_cmd("build-graph", "--data", ds, "--sources", GRAPHS[graph], "--out", path.parent))
    return path


def prepare(work: Path, ds: str, setting: str, spec: str, noise_seed: int, graph: str) -> tuple[Path, dict]:
    """The artifact folder of one setting: features (once per setting and noise seed), the graph,
    prototypes and scores (once per graph). Returns the folder and the seconds each step took."""
    base = work / f"{ds}-{setting}-n{noise_seed}"
    folder = base if graph == "wordnet+text" else base / f"graph-{graph}"
    times: dict[str, float] = {}
    data = ["--data", ds, "--noise", spec, "--noise-seed", noise_seed]
    if not (base / "features.h5").exists():
        times["extract-features"], _ = run(sinet_cmd("extract-features", *data, "--image-size", 64, "--out", base))
    folder.mkdir(parents=True, exist_ok=True)
    if folder != base and not (folder / "features.h5").exists():
        os.link(base / "features.h5", folder / "features.h5")  # artifacts are replaced, never edited in place
    if not (folder / "scores.h5").exists():
        shutil.copyfile(graph_file(work, ds, graph), folder / "graph.h5")
        times["make-prototypes"], _ = run(sinet_cmd("make-prototypes", "--out", folder))
        times["score-noise"], _ = run(sinet_cmd("score-noise", "--out", folder))
    return folder, times


def train_command(ds: str, spec: str, noise_seed: int, folder: Path, name: str, seed: int,
                  epochs: int | None) -> list[str]:
    opts = list(TRAIN)
    if epochs is not None:
        opts[opts.index("--epochs") + 1] = str(epochs)
    return sinet_cmd("train", "--data", ds, "--noise", spec, "--noise-seed", noise_seed, *opts, *RUNS[name],
                     "--seed", seed, "--suffix", f"{name}-s{seed}", "--out", folder)


def load_results(path: Path) -> dict[str, dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["key"]] = r
    return out


def run_grid(args, settings: dict[str, str], noise_seed: int, graphs: list[str], names: list[str]) -> None:
    results_path = args.work / "results.jsonl"
    done = load_results(results_path)
    jobs = []
    for ds in args.datasets:
        for setting in args.settings:
            spec = settings[setting]
            for graph in graphs:
                folder, times = prepare(args.work, ds, setting, spec, noise_seed, graph)
                if times:
                    print(f"{ds} {setting} n{noise_seed} {graph}: " +
                          ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), flush=True)
                for seed in args.seeds:
                    for name in names:
                        key = f"{ds}|{setting}|{spec}|n{noise_seed}|{graph}|{name}|s{seed}|e{args.epochs or 15}"
                        if key not in done:
                            jobs.append((key, ds, setting, spec, graph, name, seed, folder))
    print(f"{len(jobs)} training runs to do ({len(done)} already in {results_path})", flush=True)

    def one(job) -> None:
        key, ds, setting, spec, graph, name, seed, folder = job
        cmd = train_command(ds, spec, noise_seed, folder, name, seed, args.epochs)
        seconds, _ = run(cmd)
        mode = RUNS[name][1]
        m = json.loads((folder / f"train-{mode}-{name}-s{seed}" / "metrics.json").read_text())
        rec = {"key": key, "dataset": ds, "setting": setting, "noise": spec, "noise_seed": noise_seed,
               "graph": graph, "run": name, "seed": seed, "top1": m["top1"], "top5": m["top5"],
               "seconds": round(seconds, 1), "train_seconds": m["seconds"], "mode_stats": m.get("mode_stats"),
               "command": " ".join(cmd[3:]).replace(sys.executable + " -m sinet_cli", "sinet")}
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{ds:<10} {setting:<9} n{noise_seed} {graph:<12} {name:<12} s{seed}  top-1 {m['top1']:6.2f}  "
              f"{seconds:6.1f} s", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, j) for j in jobs]:
            f.result()


def mean_std(v: list[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def print_tables(work: Path, focus: str = "correct") -> None:
    res = list(load_results(work / "results.jsonl").values())
    groups: dict[tuple, dict[str, list[float]]] = {}
    secs: dict[tuple, dict[str, list[float]]] = {}
    # the oracle trains on the clean labels of the same 5,000 training images, which no noise setting
    # changes (open-set junk rows are left out): one run per dataset and training seed serves every row
    oracle: dict[tuple, dict[int, float]] = {}
    for r in res:
        g = (r["noise_seed"], r["graph"], r["dataset"], r["setting"], r["noise"])
        if r["run"] == "oracle":
            oracle.setdefault((r["noise_seed"], r["graph"], r["dataset"]), {}).setdefault(r["seed"], r["top1"])
            groups.setdefault(g, {})
        else:
            groups.setdefault(g, {}).setdefault(r["run"], []).append(r["top1"])
        secs.setdefault(g, {}).setdefault(r["run"], []).append(r["seconds"])
    for g, cell in groups.items():
        if g[:3] in oracle:
            cell["oracle"] = list(oracle[g[:3]].values())
    for table in sorted({(g[0], g[1]) for g in groups}):
        rows = sorted(g for g in groups if (g[0], g[1]) == table)
        names = [n for n in RUNS if any(n in groups[g] for g in rows)]
        print(f"\nnoise seed {table[0]}, S_t from {table[1]}: top-1 (%) on the clean validation images, "
              "mean ± std over training seeds")
        head = (f"| dataset | setting | " + " | ".join(names) +
                f" | best mode | gap recovered | {focus}: gap recovered | {focus} - A |")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for g in rows:
            cell = groups[g]
            means = {n: statistics.mean(v) for n, v in cell.items()}
            modes = [n for n in means if n not in ("A", "B", "C", "oracle")]
            best = max(modes, key=means.get) if modes else None
            gap = "-"
            if best and "A" in means and "oracle" in means and means["oracle"] > means["A"]:
                gap = f"{(means[best] - means['A']) / (means['oracle'] - means['A']):.0%}"
            fgap = fdiff = "-"
            if focus in means and "A" in means:
                fdiff = f"{means[focus] - means['A']:+.2f}"
                if "oracle" in means and means["oracle"] > means["A"]:
                    fgap = f"{(means[focus] - means['A']) / (means['oracle'] - means['A']):.0%}"
            print(f"| {g[2]} | {g[3]} ({g[4]}) | " + " | ".join(mean_std(cell.get(n, [])) for n in names) +
                  f" | {best or '-'} | {gap} | {fgap} | {fdiff} |")
        print("wall seconds per run (mean): " + ", ".join(
            f"{n} {statistics.mean([s for g in rows for s in secs[g].get(n, [])]):.0f}"
            for n in names if any(n in secs[g] for g in rows)))


def print_runs(work: Path) -> None:
    """Every run: top-1, wall seconds and its command (tab-separated)."""
    print("top1\tseconds\tcommand")
    for r in load_results(work / "results.jsonl").values():
        print(f"{r['top1']:.2f}\t{r['seconds']:.0f}\t{r['command']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sinet-train-testbed"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"of {', '.join(RUNS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="override the testbed's 15 epochs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--heldout", action="store_true", help="held-out rates, noise seed 1")
    ap.add_argument("--heldout2", action="store_true", help="the second held-out set, noise seed 2")
    ap.add_argument("--ablation", metavar="RUN", help="RUN with S_t from wordnet+text, text, none")
    ap.add_argument("--table", action="store_true", help="only print the tables of results.jsonl")
    ap.add_argument("--focus", default="correct", help="the mode whose gap recovered and difference to A "
                    "the tables show beside the best mode's")
    ap.add_argument("--runs-list", action="store_true", help="only print every run's top-1, seconds and command")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.datasets = args.datasets.split(",")
    args.settings = args.settings.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.runs_list:
        print_runs(args.work)
        return
    if not args.table:
        settings, noise_seed = (HELDOUT, 1) if args.heldout else (HELDOUT2, 2) if args.heldout2 else (SETTINGS, 0)
        if args.ablation:
            run_grid(args, settings, noise_seed, list(GRAPHS), [args.ablation])
        else:
            run_grid(args, settings, noise_seed, ["wordnet+text"], args.runs.split(","))
    print_tables(args.work, args.focus)


if __name__ == "__main__":
    main()
