"""Where make-prototypes spends its time: each phase of the stage timed on its own, next to the
bare matrix product of bench_make_prototypes.py (same synthetic data, same blocks).

Phases: the probe's subsample and row gather, the probe itself (softmax regression), eq. 4's pass
(consistency_scores), eq. 5's pass (prototypes_from_consistency). ``--all-threads`` also times the
stage with its small elementwise work forced onto every torch thread, whatever
``stages.make_prototypes._small_ops`` picks (one thread at <= 2 torch threads, where each small
parallel region waits for a free busy core; all of them above): the comparison shows what that
policy gains or costs on the machine at hand.

Run: python bench/profile_make_prototypes.py [--n 200000] [--device cpu] [--all-threads]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import numpy as np

import benchlib as bl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    bl.prototype_size_args(ap)
    ap.add_argument("--all-threads", action="store_true")
    args = ap.parse_args()
    bl.check_device(args.device)
    import torch

    from stages import make_prototypes as mp

    n, d, c, dev = args.n, args.d, args.c, args.device
    with bl.scratch(args.work, "sinet-profile-proto-") as work:
        x16, labels, S_t = bl.prototype_inputs(work, n, d, c)
    block = 16384

    def source():
        for i in range(0, n, block):
            yield i, x16[i : i + block]

    cfg = mp.PrototypeConfig()
    x32 = torch.from_numpy(x16.astype(np.float32)).to(dev)
    w = torch.randn(d, c, device=dev)
    out = torch.empty(block, c, device=dev)

    def matmul() -> None:
        for i in range(0, n, block):
            torch.mm(x32[i : i + block], w, out=out[: min(block, n - i)])
        bl.sync(dev)

    def phases() -> dict[str, float]:
        t: dict[str, float] = {}
        pos, t["probe subsample"] = bl.timed(lambda: mp.subsample(labels, cfg.probe_rows, cfg.seed))
        x, t["probe row gather"] = bl.timed(lambda: mp.gather_rows(source, pos))
        _, t["probe fit"] = bl.timed(lambda: mp.fit_linear_probe(
            x, labels[pos], c, epochs=cfg.probe_epochs, lr=cfg.probe_lr, batch_size=cfg.probe_batch,
            scale=cfg.probe_scale, seed=cfg.seed, device=dev))
        (V0, _), t["initial prototypes (all of the above)"] = bl.timed(
            lambda: mp.initial_prototypes(source, labels, c, cfg, device=dev))
        p, t["eq. 4 pass"] = bl.timed(lambda: mp.consistency_scores(
            source, labels, V0, S_t, psi=cfg.psi, temperature=cfg.temperature, gamma=cfg.gamma, eps=cfg.eps,
            device=dev))
        k = mp.resolve_k(cfg.topk, np.bincount(labels, minlength=c))
        _, t["eq. 5 pass"] = bl.timed(lambda: mp.prototypes_from_consistency(source, labels, p, c, k, device=dev))
        _, t["stage"] = bl.timed(lambda: (mp.make_prototypes(source, labels, S_t, cfg, device=dev), bl.sync(dev)))
        _, t["bare matmul"] = bl.timed(matmul)
        return t

    print(f"# N={n:,} D={d:,} C={c:,}, device {dev}, torch threads {torch.get_num_threads()}")
    runs = [("as shipped", None)]
    if args.all_threads:
        @contextmanager
        def every_thread(k, device):  # experiment only: the stage's small ops on every thread
            yield
        runs.append(("small ops on every thread", every_thread))
    original = mp._threads
    for name, patch in runs:
        mp._threads = patch or original
        try:
            phases()  # warm-up
            best = phases()
            for _ in range(max(0, args.repeats - 1)):
                best = {k: min(v, t) for (k, v), t in zip(best.items(), phases().values())}
        finally:
            mp._threads = original
        print(f"\n{name} (fastest of {max(1, args.repeats)}):")
        for k, v in best.items():
            print(f"  {k:40s} {v:7.3f} s   {v / best['bare matmul']:5.2f}x matmul")


if __name__ == "__main__":
    main()
