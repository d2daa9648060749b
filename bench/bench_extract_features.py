"""extract-features on the demo: images/s of the command against the backbone's bare forward pass.

For each ``--sizes`` (default 64 and 112 px), interleaved, fastest of ``--repeats``:

* baseline: the packaged ImageNet ``tf_efficientnet_lite0`` (the command's default backbone and
  weights) on the same images already decoded *and preprocessed* into float tensors
  (3 x size x size, built before timing), ``forward_features`` + pooled head, batch 64 (the
  command's default ``--batch-size``), ``torch.inference_mode``, as the command runs the model:
  ``stages.extract_features.prepare_for_inference``: batch norms folded into the convs and the
  TF-"SAME" convs' padding made static for the image size, and on the CPU channels-last memory
  format (``--memory-format auto``); nothing else;
* the plain model's bare forward (unfolded, padded per call, contiguous: a second figure, no
  target: what those inference steps gain); on a GPU, where channels-last is off by default,
  also the bare forward with it (a third figure: whether to turn it on there);
* command: ``sinet extract-features --data demo --image-size SIZE --force`` in-process, end to end:
  building the demo table (noise injection), loading the weights, preprocessing every batch
  (resize, crop, normalize), the forward pass, L2 normalization, writing features.h5 in chunks and
  its fingerprint. Its images/s counts all of that.

The command runs on the first ``--images`` images of the demo (``--shard 0/K``, one count per
size; default the whole demo, 6,000 images, at 64 px and 2,000 at 112 px, to keep ``make bench``
short), the baseline on the same images; 0 = the whole demo. The command's fixed costs (building
the demo table, loading the weights, the inference copy and its check, the file's fingerprint:
about 0.5 s) count against it. Target: command >= 85% of the bare images/s.

Run: python bench/bench_extract_features.py [--sizes 64,112] [--images 0,2000] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import copy

import benchlib as bl

BATCH = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    ap.add_argument("--sizes", default="64,112")
    ap.add_argument("--images", default="0,2000", help="images of the demo per size (0: all)")
    ap.add_argument("--batch", type=int, default=BATCH, help="batch size of both contenders")
    args = ap.parse_args()
    batch = args.batch
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.images.split(",")]
    counts = (counts + counts[-1:] * len(sizes))[: len(sizes)]
    if args.quick:
        counts = [500] * len(sizes)
    bl.check_device(args.device)
    import torch

    from sinet_cli.app import app  # noqa: F401
    from sinet_cli.datasets import load_demo
    from sinet_cli.sideinfo import DEFAULT_BACKBONE, default_weights
    from stages import extract_features as stage

    table = load_demo(noise="symmetric", rate=0.4, seed=0)
    n_all = len(table)
    model, _ = stage.build_backbone(DEFAULT_BACKBONE, default_weights(DEFAULT_BACKBONE))
    model = model.to(args.device).eval()
    plain = copy.deepcopy(model)
    figures = []
    print(f"# extract-features: the demo ({n_all:,} images), batch {batch}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    with bl.scratch(args.work, "sinet-bench-extract-") as work:
        for size, count in zip(sizes, counts):
            shards = 1 if count <= 0 or count >= n_all else max(1, round(n_all / count))
            n = n_all // shards  # the command's --shard 0/K covers rows [0, n_all // K)
            pre = stage.Preprocess.for_model(model, size)
            x = torch.cat([pre(torch.from_numpy(table.pixels[i : min(i + batch, n)])) for i in range(0, n, batch)])
            # as stage.extract runs it: channels-last on the CPU, then (on the first batch) batch norms
            # folded and the TF-"SAME" convs' padding made static
            on_cpu = torch.device(args.device).type == "cpu"
            if on_cpu:
                plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                model, done = stage.prepare_for_inference(plain_cl if on_cpu else plain,
                                                          x[: stage.FOLD_CHECK_ROWS].to(args.device))
            print(f"  {size}px: model as the command runs it: {done}", flush=True)

            @torch.inference_mode()
            def bare(m: torch.nn.Module = model) -> None:  # noqa: B008 (bound now: this size's model)
                for i in range(0, n, batch):
                    xb = x[i : i + batch].to(args.device)
                    m.forward_head(m.forward_features(xb), pre_logits=True)
                bl.sync(args.device)

            out = work / f"size{size}"
            cmd = ["extract-features", "--data", "demo", "--image-size", size, "--batch-size", batch, "--out", out,
                   "--device", args.device, "--force"]
            if shards > 1:
                cmd += ["--shard", f"0/{shards}"]
            contenders = {f"bare forward {size}px": bare, f"command {size}px": lambda: bl.sinet(*cmd),
                          f"bare forward, plain model {size}px": lambda: bare(plain)}
            if not on_cpu:  # channels-last is off on a GPU (the CPU's default): measure it there
                model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
                contenders[f"bare forward, channels-last {size}px"] = lambda: bare(model_cl)
            best = bl.best_of(contenders, args.repeats)
            ips_bare, ips_cmd = n / best[f"bare forward {size}px"], n / best[f"command {size}px"]
            q = " QUICK" if args.quick else ""
            figures.append(bl.figure(f"extract-features command, demo {n:,} images at {size}px ({args.device}{q})",
                                     ips_cmd, "img/s", "bare forward on pre-decoded tensors", ips_bare,
                                     ips_cmd / ips_bare, ">=0.85x", ips_cmd / ips_bare >= 0.85))
            ips_plain = n / best[f"bare forward, plain model {size}px"]
            figures.append(bl.figure(f"extract-features bare forward at {size}px, as the command runs the model",
                                     ips_bare, "img/s", "plain model (BN unfolded, padded, contiguous)", ips_plain,
                                     ips_bare / ips_plain, "-", None))
            if f"bare forward, channels-last {size}px" in best:
                ips_cl = n / best[f"bare forward, channels-last {size}px"]
                figures.append(bl.figure(f"extract-features bare forward at {size}px in channels-last "
                                         f"({args.device}: not the command's default)", ips_cl, "img/s",
                                         "as the command runs the model", ips_bare, ips_cl / ips_bare, "-", None))
            del x
        bl.emit(figures, args.json)


if __name__ == "__main__":
    main()
