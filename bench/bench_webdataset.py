"""Reading images for extraction: WebDataset tar shards against the same JPEGs as files.

The images are the embedded demo's, upscaled (bilinear) to ``--width`` x ``--height`` RGB and saved
as JPEG (quality 90), once as files and once as members of ``--per-shard``-image shards (with a
caption and a JSON label, as img2dataset writes them). Upscaled 28 px images hold little detail, so
their JPEGs are smaller and decode faster than photographs of the same size: per-image decoding
costs here are a lower bound, which makes the reading overheads show more, not less.

Contenders, interleaved, fastest of ``--repeats``, each producing the pipeline's uint8 batches
(decoded, resized to the ``--image-size`` preprocessing's resize, cut to its square; no model):

* files: ``FileImages`` in a DataLoader (``--data manifest:`` / ``imagefolder:``), 0 and 2 workers;
* shards: ``ArchiveStream`` (``--data webdataset:``), each shard streamed once, whole shards per
  worker, 0 and 2 workers. The ratio shards / files is the figure, per worker count.

Also measured, for the record: the reader pass (``load_table``: every shard's headers, JSON and
captions, image bytes seeked over) against the manifest reader on the same images; the cost of
resuming inside a shard without an offset index (walking the headers up to the shard's last member)
against decoding that shard; and our tar member reading against the ``webdataset`` package's own
pipeline (bytes only, no decoding).

Run: python bench/bench_webdataset.py [--images 2000] [--image-size 224] [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path

import benchlib as bl


def write_inputs(work: Path, n: int, per_shard: int, width: int, height: int) -> tuple[Path, str]:
    """n JPEGs as files (and a manifest), the same bytes in shards; returns (manifest, webdataset pattern)."""
    import webdataset as wds
    from PIL import Image

    from sinet_cli.datasets import load_demo

    demo = load_demo(noise="none")
    names = demo.classes.names
    (work / "img").mkdir(parents=True, exist_ok=True)
    (work / "shards").mkdir(exist_ok=True)
    lines = ["id\tpath\tlabel\tsplit"]
    writer = None
    for k in range(n):
        if k % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(work / "shards" / f"{k // per_shard:05d}.tar"))
        i = k % len(demo.pixels)
        buf = io.BytesIO()
        Image.fromarray(demo.pixels[i]).convert("RGB").resize((width, height), Image.BILINEAR).save(buf, "JPEG",
                                                                                                      quality=90)
        data = buf.getvalue()
        key = f"{k:09d}"
        (work / "img" / f"{key}.jpg").write_bytes(data)
        label = names[int(demo.labels[i])]
        writer.write({"__key__": key, "jpg": data, "txt": f"a photo of a {label.lower()}",
                      "json": {"label": label, "url": f"https://example.com/{key}.jpg"}})
        lines.append(f"{k // per_shard:05d}/{key}\t{work / 'img' / (key + '.jpg')}\t{label}\ttrain")
    writer.close()
    (work / "m.tsv").write_text("\n".join(lines) + "\n")
    return work / "m.tsv", f"webdataset:{work}/shards/*.tar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bl.common_args(ap)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=500, help="images per shard")
    ap.add_argument("--image-size", type=int, default=224, help="the extract-features --image-size decoded for")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    n = 400 if args.quick else args.images
    per_shard = min(args.per_shard, max(1, n // 4))

    from sinet_cli.common import load_table
    from sinet_cli.datasets import webdataset as wdr
    from sinet_cli.sideinfo import DEFAULT_BACKBONE
    from stages import extract_features as stage

    import torch

    # one torch thread, as DataLoader workers run: with 0 workers the batches are collated in this
    # process, and on 2 shared cores a 2-thread torch.stack ran 5-10x slower than 1 thread (spinning
    # OpenMP threads), which measured the machine's load rather than the reading
    torch.set_num_threads(1)
    model, _ = stage.build_backbone(DEFAULT_BACKBONE, None, random_init=True)
    pre = stage.Preprocess.for_model(model, args.image_size)
    figures = []
    q = " QUICK" if args.quick else ""
    with bl.scratch(args.work, "sinet-bench-wds-") as work:
        manifest, pattern = write_inputs(work, n, per_shard, args.width, args.height)
        n_shards = -(-n // per_shard)
        jpeg_kb = sum(f.stat().st_size for f in (work / "img").iterdir()) / n / 1024
        print(f"# {n:,} JPEGs of {args.width}x{args.height} ({jpeg_kb:.1f} KB each), {n_shards} shards of {per_shard}; "
              f"decoded to {pre.resize} px (--image-size {args.image_size}), batch {args.batch}", flush=True)

        files_table, shards_table = load_table(f"manifest:{manifest}"), load_table(pattern)
        assert files_table.ids.tolist() == shards_table.ids.tolist()
        archives, archive_of, members = wdr.archive_members(shards_table.paths)
        source = stage.ArchiveImages(archives, archive_of, members, wdr.read_members)
        positions = range(n)

        def files(workers: int) -> None:
            for _ in stage._batches_from_files(files_table.paths, positions, pre.resize, args.batch, workers,
                                               crop_size=pre.size):
                pass

        def shards(workers: int) -> None:
            for _ in stage._batches_from_archives(source, positions, pre.resize, args.batch, workers,
                                                  crop_size=pre.size):
                pass

        # the decoded pixels are the same either way
        a = next(stage._batches_from_files(files_table.paths, range(8), pre.resize, 8, 0, crop_size=pre.size))[0]
        b = next(stage._batches_from_archives(source, range(8), pre.resize, 8, 0, crop_size=pre.size))[0]
        assert bool((a == b).all()), "shards and files decode differently"

        for w in (0, 2):  # warm-up (first PIL decodes, worker start-up paths): not timed
            next(iter(stage._batches_from_files(files_table.paths, range(2 * args.batch), pre.resize, args.batch, w,
                                                crop_size=pre.size)))
            next(iter(stage._batches_from_archives(source, range(2 * args.batch), pre.resize, args.batch, w,
                                                   crop_size=pre.size)))
        best = bl.best_of({"files, 0 workers": lambda: files(0), "shards, 0 workers": lambda: shards(0),
                           "files, 2 workers": lambda: files(2), "shards, 2 workers": lambda: shards(2)}, args.repeats)
        for w in (0, 2):
            ips_f, ips_s = n / best[f"files, {w} workers"], n / best[f"shards, {w} workers"]
            figures.append(bl.figure(f"reading WebDataset shards to uint8 batches, {w} DataLoader workers "
                                     f"({n:,} JPEGs, {pre.resize} px{q})", ips_s, "img/s",
                                     "the same JPEGs as files", ips_f, ips_s / ips_f, "-", None))
        ips2, ips0 = n / best["shards, 2 workers"], n / best["shards, 0 workers"]
        figures.append(bl.figure("reading shards, 2 workers against 0", ips2, "img/s", "0 workers (one process)", ips0,
                                 ips2 / ips0, "-", None, f"{os.cpu_count()} CPUs, shared"))

        # the reader pass that builds the table, against the manifest reader
        best = bl.best_of({"reader pass, shards": lambda: load_table(pattern),
                           "reader pass, manifest": lambda: load_table(f"manifest:{manifest}")}, args.repeats)
        figures.append(bl.figure(f"webdataset reader pass (headers, JSON, captions) over {n_shards} shards{q}",
                                 n / best["reader pass, shards"], "rows/s", "manifest reader, same rows",
                                 n / best["reader pass, manifest"],
                                 best["reader pass, manifest"] / best["reader pass, shards"], "-", None))

        # resuming inside a shard: the headers before the first wanted member are walked (no offset
        # index); against decoding the whole shard
        shard0 = archives[0]
        last = str(members[per_shard - 1])

        def walk() -> None:
            assert [m for m, _, _ in wdr.read_members(shard0, [last])] == [last]

        def decode_shard() -> None:
            for _ in stage._batches_from_archives(source, range(per_shard), pre.resize, args.batch, 0,
                                                  crop_size=pre.size):
                pass

        best = bl.best_of({"header walk to the last member": walk, "decode the shard": decode_shard}, args.repeats)
        t_walk, t_dec = best["header walk to the last member"], best["decode the shard"]
        figures.append(bl.figure(f"resume inside a {per_shard}-image shard without an offset index: header walk",
                                 t_walk * 1000, "ms", "decoding that shard (ms)", t_dec * 1000, t_walk / t_dec, "-",
                                 None, "the share of a shard's decode time a resume spends finding its place"))

        # our member reading (tarfile, seeking) against the webdataset package's pipeline, bytes only
        import webdataset as wds

        shard_files = [str(p) for p in sorted((work / "shards").glob("*.tar"))]
        every = {}
        for s in shard_files:
            with tarfile.open(s) as tf:
                every[s] = [m.name for m in tf.getmembers() if m.isreg()]

        def ours() -> None:
            for s in shard_files:
                for _ in wdr.read_members(s, every[s]):
                    pass

        def package() -> None:
            for _ in wds.WebDataset(shard_files, shardshuffle=False, empty_check=False):
                pass

        best = bl.best_of({"sinet's reader": ours, "webdataset.WebDataset": package}, args.repeats)
        t_ours, t_pkg = best["sinet's reader"], best["webdataset.WebDataset"]
        figures.append(bl.figure(f"tar member bytes, sinet's reader (tarfile){q}", n / t_ours, "img/s",
                                 "webdataset.WebDataset pipeline", n / t_pkg, t_pkg / t_ours, "-", None,
                                 "all members read, nothing decoded"))
        bl.emit(figures, args.json)


if __name__ == "__main__":
    main()
