"""make-prototypes (eq. 4-5) against a bare matrix product of the same shape.

Synthetic L2-normalized features, N=200,000 x D=1,280 (float16 on disk, written chunk by chunk
through ``store.ArtifactWriter``), C=1,000 classes around random centers with 30% of the labels
flipped, and a graph.h5 whose S_t is the cosine similarity of the centers. Default options
(probe-initialized prototypes: the file has no stored probabilities; one round; softmax psi).

Three contenders, interleaved, fastest of ``--repeats`` each:

* baseline: a bare float32 ``torch.mm`` of the same shape, (N x D) by (D x C), over the features
  already in memory as float32, in blocks of 16,384 rows into a reused output (faster here than
  one N x C product, so the stricter baseline);
* stage: ``stages.make_prototypes.make_prototypes`` - what the command calls - on the float16
  blocks already in memory (what the command's block cache replays after its first pass):
  the probe, eq. 4 over every row, eq. 5;
* command: ``sinet make-prototypes --force`` in-process, end to end: reading features.h5 (page
  cache warm), the stage, writing prototypes.h5 (per-row consistency, fingerprint) and the index.

The eq. 4 pass does one (B x D) by (D x C) product per block, so the stage cannot beat the
baseline; the ratio is the cost of everything else (probe, the exp/log-sum-exp and cross term of
eq. 4, the eq. 5 pass, the float16 conversion). Target: stage within 1.3x of the product.

With ``--device cuda`` a fourth contender copies the float16 blocks from host memory to the GPU
before each product: the stage streams its rows from host memory in three passes, so on a GPU,
where the product itself takes milliseconds, that copy (not the arithmetic) is the floor.

Run: python bench/bench_make_prototypes.py [--quick] [--device cuda] [--repeats 2]
"""

from __future__ import annotations

import argparse

import numpy as np

import benchlib as bl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    bl.prototype_size_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.n = min(args.n, 20_000)
    bl.check_device(args.device)
    import torch

    from stages import make_prototypes as stage
    from sinet_cli.app import app  # noqa: F401  (imports every command before timing)
    import faiss  # noqa: F401  (imported lazily by the command: keep imports out of the timing)
    from stages import score_noise  # noqa: F401

    with bl.scratch(args.work, "sinet-bench-proto-") as work:
        n, d, c = args.n, args.d, args.c
        print(f"# make-prototypes: N={n:,} D={d:,} C={c:,}, device {args.device}, torch threads "
              f"{torch.get_num_threads()}", flush=True)
        x16, labels, S_t = bl.prototype_inputs(work, n, d, c)
        dev = args.device
        block = 16384
        x32 = torch.from_numpy(x16.astype(np.float32)).to(dev)
        w = torch.randn(d, c, device=dev)
        out = torch.empty(block, c, device=dev)

        def matmul() -> None:
            for i in range(0, n, block):
                rows = x32[i : i + block]
                torch.mm(rows, w, out=out[: len(rows)])
            bl.sync(dev)

        def source():
            for i in range(0, n, block):
                yield i, x16[i : i + block]

        def run_stage() -> None:
            stage.make_prototypes(source, labels, S_t, stage.PrototypeConfig(), device=dev)
            bl.sync(dev)

        def command() -> None:
            bl.sinet("make-prototypes", "--features", work / "features.h5", "--graph", work / "graph.h5",
                     "--out", work / "out", "--device", dev, "--force")

        contenders = {"bare matmul": matmul, "stage (in memory)": run_stage, "command (from disk)": command}
        if dev != "cpu":  # the same product with the fp16 blocks copied over from host memory first
            def copy_matmul() -> None:
                for i in range(0, n, block):
                    rows = torch.from_numpy(x16[i : i + block]).to(dev).float()
                    torch.mm(rows, w, out=out[: len(rows)])
                bl.sync(dev)
            contenders["bare matmul + host copy"] = copy_matmul
        best = bl.best_of(contenders, args.repeats)
        base = best["bare matmul"]
        size = f"N={n // 1000}k D={d} C={c}" + (" QUICK" if args.quick else "")
        figures = [
            bl.figure(f"make-prototypes stage, in-memory fp16 blocks ({size}, {dev})", best["stage (in memory)"], "s",
                      "bare fp32 matmul NxD.DxC", base, best["stage (in memory)"] / base, "<=1.3x",
                      best["stage (in memory)"] / base <= 1.3),
            bl.figure(f"make-prototypes command incl. HDF5 read/write ({size}, {dev})", best["command (from disk)"],
                      "s", "bare fp32 matmul NxD.DxC", base, best["command (from disk)"] / base, "<=1.3x",
                      best["command (from disk)"] / base <= 1.3),
        ]
        if "bare matmul + host copy" in best:  # the stage streams its rows from host memory: a floor of its own
            copy_base = best["bare matmul + host copy"]
            figures.append(bl.figure(f"make-prototypes stage, against the product incl. host->{dev} copy ({size})",
                                     best["stage (in memory)"], "s", "fp16 blocks copied + matmul", copy_base,
                                     best["stage (in memory)"] / copy_base, "-", None))
        bl.emit(figures, args.json)


if __name__ == "__main__":
    main()
