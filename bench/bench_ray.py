"""extract-features end to end: one process (``--engine local``) against Ray with 2 local workers
(``--engine ray`` on ``ray.init(num_cpus=2)``), from WebDataset shards and from the same JPEGs as files.

The inputs are bench_webdataset.py's (demo images upscaled to ``--width`` x ``--height``, JPEG, as
files and in ``--per-shard``-image shards). Every contender runs the real command in this process
(``sinet extract-features ... --force``), interleaved, fastest of ``--repeats``:

* local, files / shards: ``--workers 0`` (decoding in the process, torch's default threads: one per core);
* local, shards, 1 torch thread: as a Ray task runs (on 2 shared cores torch's spinning OpenMP
  threads can cost more than the second core gives: this line tells that apart from the parallelism);
* ray, files / shards: one task per shard (files: ``--part-rows`` = a shard's worth), 2 tasks at a
  time, each on one core (Ray sets one torch thread per task) with ``--workers 0``.

The Ray cluster is started once, before the timed runs (its start is reported on its own line), and
its workers keep their backbone between runs, as a long extraction's workers do after their first
part; the first (cold) Ray run is reported too. Ratios are Ray / local on the same input. On a
machine whose cores one process already keeps busy, Ray's ratio to the one-thread local run shows
its overhead (tasks, object transfers, part files, the merge), not a speed-up; what Ray adds is
machines, each running tasks like these.

Run: python bench/bench_ray.py [--images 1200] [--image-size 64] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import benchlib as bl
from bench_webdataset import write_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--per-shard", type=int, default=150, help="images per shard (one Ray task each)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    n = 240 if args.quick else args.images
    per_shard = min(args.per_shard, max(1, n // 4))

    import ray

    from sinet_cli.sideinfo import DEFAULT_BACKBONE

    q = " QUICK" if args.quick else ""
    figures = []
    with bl.scratch(args.work, "sinet-bench-ray-") as work:
        manifest, pattern = write_inputs(work, n, per_shard, args.width, args.height)
        n_shards = -(-n // per_shard)
        print(f"# {n:,} JPEGs of {args.width}x{args.height}, {n_shards} shards of {per_shard}; {DEFAULT_BACKBONE} "
              f"(random init) at {args.image_size} px, batch {args.batch}; {os.cpu_count()} CPUs", flush=True)
        common = ["--backbone", DEFAULT_BACKBONE, "--random-init", "--image-size", args.image_size, "--device", "cpu",
                  "--workers", "0", "--batch-size", args.batch, "--force"]

        def run(data: str, out: str, *extra: object):
            return lambda: bl.sinet("extract-features", "--data", data, *common, *extra, "--out", work / out)

        def one_thread(fn):
            def wrapped():
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    return fn()
                finally:
                    torch.set_num_threads(threads)
            return wrapped

        # the workers import this source tree, as this process does (benchlib puts it first on sys.path)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(bl.ROOT), os.environ.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        t_start = time.perf_counter() - t0
        try:
            files, shards = f"manifest:{manifest}", pattern
            contenders = {
                "local, shards": run(shards, "ls"), "ray, shards": run(shards, "rs", "--engine", "ray"),
                "local, shards, 1 thread": one_thread(run(shards, "l1")),
                "local, files": run(files, "lf"),
                "ray, files": run(files, "rf", "--engine", "ray", "--part-rows", per_shard),
            }
            t_cold = bl.timed(contenders["ray, shards"])[1]  # workers start, import torch, build the backbone
            best = bl.best_of(contenders, args.repeats)
        finally:
            ray.shutdown()
        for what in ("shards", "files"):
            ips_ray, ips_local = n / best[f"ray, {what}"], n / best[f"local, {what}"]
            figures.append(bl.figure(f"extract-features from {what}, Ray 2 local workers ({n:,} images, "
                                     f"{args.image_size} px{q})", ips_ray, "img/s", "one process (--engine local)",
                                     ips_local, ips_ray / ips_local, "-", None, "2 CPUs shared"))
        ips_s, ips_1 = n / best["ray, shards"], n / best["local, shards, 1 thread"]
        figures.append(bl.figure(f"extract-features from shards, Ray 2 local workers{q}", ips_s, "img/s",
                                 "one process, 1 torch thread (as a task)", ips_1, ips_s / ips_1, "-", None))
        ips_f = n / best["ray, files"]
        figures.append(bl.figure(f"Ray: shards against files{q}", ips_s, "img/s", "files, --part-rows a shard's worth",
                                 ips_f, ips_s / ips_f, "-", None))
        figures.append(bl.figure(f"Ray: first run (cold workers), shards{q}", n / t_cold, "img/s",
                                 "warm workers", ips_s, (n / t_cold) / ips_s, "-", None,
                                 f"local cluster start {t_start:.1f} s, not counted"))
        bl.emit(figures, args.json)


if __name__ == "__main__":
    main()
