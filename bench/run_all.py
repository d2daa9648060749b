"""Run every benchmark (``make bench``) and print, last, one line per figure: the figure, its
baseline measured in the same run, the ratio, and the target.

Each benchmark runs as its own child process (a fresh interpreter: no memory or thread state
carried from one to the next) and writes its figures as JSON; build-graph's figures are read from
``bench_build_graph.py --with-5000``'s output. The machine is shared, so every figure is a ratio
to a baseline timed in the same process run, interleaved with it; absolute seconds are printed
for reference only. The load average at the start and the end is printed with the table: with
other work on 2 cores, multi-threaded code (torch, FAISS) loses more than single-threaded
baselines (HDF5 reads), so ratios measured under load are pessimistic.

    python bench/run_all.py                   # the sizes of the targets (~10 min on 2 idle cores)
    python bench/run_all.py --quick           # small sizes: a smoke run of every script (~3 min)
    python bench/run_all.py --only prototypes,score --device cuda

GPU (``--device cuda``) is passed to the benchmarks that have a device (make-prototypes,
score-noise, extract-features, build-graph); the cleanlab comparison and the WebDataset reading run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

BENCHES = ("prototypes", "score", "extract", "cleanlab", "graph", "webdataset", "ray")


def run_script(name: str, argv: list[str], json_path: Path, log: list[str]) -> list[dict]:
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, *argv, "--json", str(json_path)], cwd=HERE)
    log.append(f"{name}: {time.perf_counter() - t0:.0f} s" + (f" (exit {rc})" if rc else ""))
    if rc != 0 or not json_path.exists():
        return [bl.figure(f"{name} benchmark", float("nan"), "", "", None, None, "-", None,
                          f"FAILED: exit status {rc}, see its output above")]
    return json.loads(json_path.read_text())


def run_build_graph(device: str, quick: bool, log: list[str]) -> list[dict]:
    argv = ["bench_build_graph.py", "--device", device] + ([] if quick else ["--with-5000"])
    print(f"\n=== graph: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True)
    print(proc.stdout, end="")
    log.append(f"graph: {time.perf_counter() - t0:.0f} s" + (f" (exit {proc.returncode})" if proc.returncode else ""))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], end="")
        return [bl.figure("build-graph benchmark", float("nan"), "", "", None, None, "-", None,
                          f"FAILED: exit status {proc.returncode}")]
    # | C | S_w path (s) | S_w wup (s) | S_l (s) | total command (s) | nltk pairwise est. (s) |
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 5, line)
        if m:
            c, sw, _wup, sl, total, nltk = m.groups()
            rows[int(c)] = {"S_w": float(sw), "S_l": float(sl), "total": float(total), "nltk": float(nltk)}
    figures = []
    c0 = min(rows) if rows else None
    for c, r in sorted(rows.items()):
        figures.append(bl.figure(f"build-graph command, C={c:,} ({device})", r["total"], "s",
                                 "nltk pairwise path_similarity, est.", r["nltk"], r["total"] / r["nltk"], "-", None,
                                 f"S_w {r['S_w']:.2f} s, S_l {r['S_l']:.2f} s"))
        if c != c0:
            r0 = rows[c0]
            figures.append(bl.figure(f"build-graph growth C={c0:,} -> {c:,} (x{c / c0:g} classes, x{(c / c0) ** 2:g} "
                                     f"pairs)", r["total"], "s", f"C={c0:,}", r0["total"], r["total"] / r0["total"],
                                     "-", None, f"S_w x{r['S_w'] / r0['S_w']:.1f}, S_l x{r['S_l'] / r0['S_l']:.1f}"))
    return figures


def table(figures: list[dict]) -> str:
    def num(v) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"

    head = ("figure", "value", "baseline (same run)", "base value", "ratio", "target", "")
    rows = [head]
    for f in figures:
        rows.append((f["figure"], f"{num(f['value'])} {f['unit']}".strip(), f["baseline"] or "-", num(f["baseline_value"]),
                     "n/a" if f["ratio"] is None else f"{f['ratio']:.2f}x", f["target"],
                     {True: "MET", False: "MISSED", None: ""}[f["met"]] + (f"  {f['note']}" if f.get("note") else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run; the targets need the defaults)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir under $TMPDIR)")
    args = ap.parse_args()
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(BENCHES)})")
    if args.device.startswith("cuda"):
        bl.check_device(args.device)

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    q = ["--quick"] if args.quick else []
    dev = ["--device", args.device]
    figures: list[dict] = []
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sinet-bench-", dir=args.work) as tmp:
        tmp = Path(tmp)
        if "prototypes" in only:
            figures += run_script("prototypes", ["bench_make_prototypes.py", *q, *dev], tmp / "p.json", log)
        if "score" in only:
            figures += run_script("score", ["bench_score_noise.py", *q, *dev, "--work", str(tmp / "score")],
                                  tmp / "s.json", log)
        if "extract" in only:
            figures += run_script("extract", ["bench_extract_features.py", *q, *dev, "--repeats", "3"], tmp / "e.json",
                                  log)
        if "cleanlab" in only:
            figures += run_script("cleanlab", ["bench_cleanlab.py", "--work", str(tmp / "cleanlab")], tmp / "c.json", log)
        if "graph" in only:
            figures += run_build_graph(args.device, args.quick, log)
        if "webdataset" in only:  # decoding runs on the CPU whatever the device
            figures += run_script("webdataset", ["bench_webdataset.py", *q, "--repeats", "3"], tmp / "w.json", log)
        if "ray" in only:  # --engine ray: needs pip install 'sinet[ray]'
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                log.append("ray: skipped (Ray not installed)")
            else:
                figures += run_script("ray", ["bench_ray.py", *q, "--repeats", "2"], tmp / "r.json", log)
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()

    print("\n" + "=" * 100)
    print(f"sinet benchmarks{' (QUICK: not the target sizes)' if args.quick else ''}: {total / 60:.1f} min in all "
          f"({'; '.join(log)}); {os.cpu_count()} CPUs, load average {load0[0]:.1f} at the start, {load1[0]:.1f} "
          f"at the end; device {args.device}")
    print(table(figures))


if __name__ == "__main__":
    main()
