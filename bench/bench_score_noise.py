"""score-noise (eq. 6 and the default score) against merely reading its inputs, and its peak memory at 1M and 5M rows.

Speed: a synthetic features.h5 of N=1,000,000 x D=512 float16 rows (written chunk by chunk
through ``store.ArtifactWriter``) with ``ids``, ``labels``, ``clean_labels`` and ``splits`` (so the
command also computes its detection metrics: the demo's case, the most work), C=14 classes
(Clothing1M's size) and one prototype per class (the class centers, as prototypes.h5 +
prototypes.faiss). Interleaved, fastest of ``--repeats``:

* baseline: reading the datasets the command reads (ids, labels, features, clean_labels, splits)
  with ``Artifact.iter_rows`` in blocks of 16,384 rows (the command's ``--chunk-rows``), page
  cache warm, nothing else;
* command: ``sinet score-noise --force --score paper`` in-process: the same reads, eq. 6 and the
  nearest prototype per row, writing scores.h5 (and its content fingerprint) and suspects.tsv
  (the command reads the next block and writes the last one on background threads);
* the default ``--score fused`` the same way: it adds the two-round probe on a 20,000-row sample
  and, per block, the probe's probabilities and the open-set factor (docs/method.md, "Scoring beyond eq. 6").

Target: within 1.5x of the read. A second figure (no target) puts the command against reading
plus eq. 6 itself (``stages.score_noise.score_block`` on the same blocks, one after the other, as
the command calls it: torch on one thread on 2 cores; the own-class distance and the nearest
prototype come from one product of each row with every prototype): the ratio is what the command
adds around the scoring (writing scores.h5 and its fingerprint, the metrics, suspects.tsv), less
what its reading and writing threads hide.
``--with-1000-classes`` adds the same at C=1,000, where the nearest-prototype product
(N x D by D x C) is the work: its figure is against reading plus a FAISS flat search of the
same rows (the same product inside FAISS).

Memory: ``python -m sinet_cli score-noise`` as a child process on N=1,000,000 and N=5,000,000
rows of D=256 (2.5 GB on disk at 5M; the free space of the scratch folder is checked first); peak
RSS from ``wait4``'s ru_maxrss of that child. Target: under 2 GB at both. Twice: with clean labels
and splits (the demos' case: the detection metrics keep N-length columns of labels, weights,
distances, ...: 21 bytes a row, plus the metrics' sorted copies) and without (a crawl: nothing
N-length is kept, and the suspect ranking is bounded by --max-suspects). The features never stay
in memory.

``--device cuda``: the command's products (probe fit, per-block scoring) on the GPU; the baseline
read stays on the CPU (the command reads there too).

Run: python bench/bench_score_noise.py [--quick] [--skip-rss] [--with-1000-classes] [--device cuda] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

import benchlib as bl

READ = ["ids", "labels", "features", "clean_labels", "splits"]
CHUNK = 16384


def make_input(folder: Path, n: int, d: int, c: int, with_clean: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    centers = bl.synthetic_centers(c, d)
    _, t = bl.timed(lambda: bl.write_features(folder / "features.h5", n, d, c, centers=centers, with_clean=with_clean,
                                              with_splits=with_clean))
    bl.write_prototypes(folder, centers)
    mb = (folder / "features.h5").stat().st_size / 2**20
    print(f"  setup: {folder / 'features.h5'} N={n:,} D={d} C={c}: {mb:,.0f} MB written chunk by chunk in {t:.1f} s",
          flush=True)


def speed(folder: Path, repeats: int, with_search: bool, device: str = "cpu") -> dict[str, float]:
    from sinet_cli import store

    def read() -> None:
        with store.open_artifact(folder / "features.h5", "features") as a:
            for _ in a.iter_rows(READ, CHUNK):
                pass

    def read_search() -> None:
        index = store.read_faiss_index(folder / "prototypes.faiss")
        with store.open_artifact(folder / "features.h5", "features") as a:
            for _, rows in a.iter_rows(READ, CHUNK):
                index.search(rows["features"].astype(np.float32), 1)

    def read_score() -> None:
        import torch

        from stages import score_noise as stage

        with store.open_artifact(folder / "prototypes.h5", "prototypes") as pa:
            protos = np.ascontiguousarray(pa.read("prototypes"), dtype=np.float32)
            proto_class = pa.read("prototype_class").astype(np.int64)
            num_classes = len(pa.read("classes"))
        index = store.read_faiss_index(folder / "prototypes.faiss")
        slots = stage.class_slots(proto_class, num_classes)
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads <= 2 else threads)  # as the command runs it
        try:
            with store.open_artifact(folder / "features.h5", "features") as a:
                for _, rows in a.iter_rows(READ, CHUNK):
                    stage.score_block(rows["features"], rows["labels"].astype(np.int64), protos, slots, proto_class,
                                      index, device=device)
        finally:
            torch.set_num_threads(threads)

    def command() -> None:
        bl.sinet("score-noise", "--features", folder / "features.h5", "--prototypes", folder / "prototypes.h5",
                 "--out", folder / "out", "--force", "--score", "paper", "--device", device)

    def command_default() -> None:
        bl.sinet("score-noise", "--features", folder / "features.h5", "--prototypes", folder / "prototypes.h5",
                 "--out", folder / "out", "--force", "--device", device)

    fns = {"read": read, "read + eq. 6 scoring": read_score, "command": command, "command, default score": command_default}
    if with_search:
        fns["read + FAISS search"] = read_search
    return bl.best_of(fns, repeats)


def peak_rss(folder: Path) -> tuple[float, float]:
    rss, wall, rc = bl.child_peak_rss([sys.executable, "-m", "sinet_cli", "score-noise", "--features",
                                       str(folder / "features.h5"), "--prototypes", str(folder / "prototypes.h5"),
                                       "--out", str(folder / "out"), "--force"])
    if rc != 0:
        raise SystemExit(f"score-noise exited {rc} on {folder}")
    print(f"  peak RSS {rss:,.0f} MB, {wall:.1f} s (child process, interpreter start included)", flush=True)
    return rss, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--c", type=int, default=14)
    ap.add_argument("--rss-n", default="1000000,5000000", help="row counts of the peak-RSS runs (D=256)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--with-1000-classes", action="store_true", help="also the speed figure at C=1,000")
    args = ap.parse_args()
    bl.check_device(args.device)
    rss_n = [int(x) for x in args.rss_n.split(",")]
    if args.quick:
        args.n = min(args.n, 100_000)
        rss_n = [min(x, 100_000 * (i + 1)) for i, x in enumerate(rss_n)]
    from sinet_cli.app import app  # noqa: F401  (imports every command before timing)
    import faiss  # noqa: F401
    import torch  # noqa: F401
    from stages import score_noise  # noqa: F401

    figures = []
    q = " QUICK" if args.quick else ""
    with bl.scratch(args.work, "sinet-bench-score-") as work:
        free = shutil.disk_usage(work).free
        need = (max(rss_n) * 256 * 2 + args.n * args.d * 2) * 1.3
        print(f"# score-noise: scratch {work}, {free / 2**30:.1f} GB free, about {need / 2**30:.1f} GB needed", flush=True)
        if free < need:
            raise SystemExit(f"{work}: {free / 2**30:.1f} GB free, need about {need / 2**30:.1f} GB")

        cases = [(args.c, False)] + ([(1000, True)] if args.with_1000_classes else [])
        for c, with_search in cases:
            folder = work / f"speed-c{c}"
            make_input(folder, args.n, args.d, c)
            best = speed(folder, args.repeats, with_search, args.device)
            size = f"N={args.n / 1e6:g}M D={args.d} C={c}{q}" + ("" if args.device == "cpu" else f", {args.device}")
            base_name = "read + FAISS search" if with_search else "read"
            base = best[base_name]
            figures.append(bl.figure(f"score-noise --score paper command ({size})", best["command"], "s",
                                     f"HDF5 {base_name} of the same datasets", base, best["command"] / base,
                                     "<=1.5x", best["command"] / base <= 1.5))
            cd = best["command, default score"]
            figures.append(bl.figure(f"score-noise default (--score fused) command ({size})", cd, "s",
                                     f"HDF5 {base_name} of the same datasets", base, cd / base, "<=1.5x", cd / base <= 1.5,
                                     f"probe fit + per-block probe: ~{max(cd - best['command'], 0):.2f} s over eq. 6"))
            rs = best["read + eq. 6 scoring"]
            figures.append(bl.figure(f"score-noise command ({size}) vs read + scoring", best["command"], "s",
                                     "HDF5 read + score_block (eq. 6, nearest)", rs, best["command"] / rs, "-", None,
                                     f"scoring alone ~{max(rs - best['read'], 0):.2f} s"))
            if with_search:
                figures.append(bl.figure(f"score-noise command ({size}) vs read only", best["command"], "s",
                                         "HDF5 read", best["read"], best["command"] / best["read"], "<=1.5x",
                                         best["command"] / best["read"] <= 1.5, "search-bound"))
            shutil.rmtree(folder, ignore_errors=True)

        if not args.skip_rss:
            # with clean labels (the demos: the metrics keep N-length columns) and without (a crawl)
            for with_clean, case in ((True, "with clean labels"), (False, "no clean labels")):
                rss = {}
                for n in rss_n:
                    folder = work / f"rss-{n}"
                    make_input(folder, n, 256, args.c, with_clean)
                    rss[n], _ = peak_rss(folder)
                    shutil.rmtree(folder, ignore_errors=True)
                lo, hi = min(rss_n), max(rss_n)
                per_m = (rss[hi] - rss[lo]) / ((hi - lo) / 1e6) if hi > lo else 0.0
                for n in rss_n:
                    figures.append(bl.figure(
                        f"score-noise peak RSS, {case} (N={n / 1e6:g}M D=256 C={args.c}{q})", rss[n], "MB",
                        f"peak RSS at N={lo / 1e6:g}M", rss[lo], rss[n] / rss[lo], "<2048 MB", rss[n] < 2048,
                        f"+{per_m:.0f} MB per extra 1M rows" if n == hi and hi > lo else ""))
        bl.emit(figures, args.json)


if __name__ == "__main__":
    main()
