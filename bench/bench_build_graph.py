"""Timing of ``sinet build-graph`` on the 1,000 ImageNet classes (and 5,000 WordNet classes).

Classes: ImageNet-1k's synsets and glosses from timm's ``ImageNetInfo``; with ``--with-5000``
also a 5,000-class table: the ImageNet synsets, then their WordNet hyponyms, then the hyponyms
of their hypernyms (siblings and cousins), in a fixed order, until 5,000.

Prints, per class count C: seconds for S_w (ancestor maps + the vectorized C x C distances),
S_w with Wu-Palmer, S_l (encoding the descriptions + eq. 2), and the whole command end to end
(``sinet build-graph --classes TABLE --force``, WordNet and the encoder already loaded, graph.h5
written), plus how the S_w time grows with C, and nltk's own pairwise ``path_similarity`` on a
sample, extrapolated to C^2 / 2 pairs, for comparison.

Run: python bench/bench_build_graph.py [--with-5000] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SINET_QUIET", "1")

from sinet_cli import sideinfo  # noqa: E402
from sinet_cli.datasets import ClassTable  # noqa: E402
from stages import build_graph as stage  # noqa: E402


def imagenet_classes(wn):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names, wnids, descs, syns = [], [], [], []
    seen: set[str] = set()
    for i in range(1000):
        wnid = info.index_to_label_name(i)
        detailed = info.label_name_to_description(wnid, detailed=True)
        lemmas, _, gloss = detailed.partition(": ")
        name = lemmas.split(", ")[0]
        if name in seen:  # 'crane' (bird / machine), 'maillot' twice
            name = f"{name} ({wnid})"
        seen.add(name)
        names.append(name)
        wnids.append(wnid)
        descs.append(gloss)
        syns.append(wn.synset_from_pos_and_offset("n", int(wnid[1:])))
    return names, wnids, descs, syns


def extend_to(wn, syns, target):
    """ImageNet synsets, then their hyponyms, then their hypernyms' hyponyms, up to ``target``."""
    have = list(syns)
    seen = set(syns)
    down = lambda s: s.hyponyms() + s.instance_hyponyms()  # noqa: E731
    for pool in (
        [h for s in syns for h in s.closure(down)],
        [h for s in syns for p in s.hypernyms() for h in p.closure(down)],
    ):
        for h in sorted(set(pool) - seen, key=lambda s: s.offset()):
            if len(have) >= target:
                return have
            have.append(h)
            seen.add(h)
    return have


def table_for(syns, names=(), descs=()) -> ClassTable:
    """A class table: the given names/descriptions first, then lemma names and glosses (unique)."""
    names, descs = list(names), list(descs)
    used = set(names)
    for s in syns[len(names):]:
        n = s.lemma_names()[0].replace("_", " ")
        n = n if n not in used else f"{n} ({s.name()})"
        used.add(n)
        names.append(n)
        descs.append(s.definition())
    ids = [f"n{s.offset():08d}" for s in syns]
    return ClassTable(names, ids, descs, [None] * len(syns), "<bench>")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_sw(syns, sim="path"):
    def run():
        maps, wup = stage.wordnet_hierarchy(syns, with_depths=sim == "wup")
        return stage.hierarchy_similarity(maps, sim=sim, **(wup or {}))

    return timed(run)


def nltk_pairwise_estimate(syns, sample=60):
    rng = np.random.default_rng(0)
    pick = [syns[i] for i in rng.choice(len(syns), size=min(sample, len(syns)), replace=False)]
    t = time.perf_counter()
    n = 0
    for i, a in enumerate(pick):
        for b in pick[i + 1:]:
            a.path_similarity(b)
            n += 1
    per_pair = (time.perf_counter() - t) / n
    C = len(syns)
    return per_pair * C * (C - 1) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-5000", action="store_true", help="also the 5,000-class table")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from sinet_cli.app import app  # noqa: F401  (registers the command)

    wn, t_wn = timed(sideinfo.wordnet)
    enc_dir = sideinfo.default_text_encoder()
    model, t_enc = timed(lambda: sideinfo.load_text_encoder(str(enc_dir), device=args.device))
    import torch

    print(f"# setup: WordNet load {t_wn:.1f} s, encoder load {t_enc:.1f} s (once per process); "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")

    names, wnids, descs, syns = imagenet_classes(wn)
    tables = {1000: (table_for(syns, names, descs), syns)}
    if args.with_5000:
        big = extend_to(wn, syns, 5000)
        tables[5000] = (table_for(big, names, descs), big)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for C, (table, ss) in tables.items():
            S_w, t_sw = bench_sw(ss, "path")
            _, t_wup = bench_sw(ss, "wup")
            texts = [stage.description_text(n, d, "user") for n, d in zip(table.names, table.descriptions)]
            (S_l, t_l) = timed(lambda: stage.cosine_similarity(stage.encode_sentences(model, texts)))
            path = Path(tmp) / f"classes{C}.tsv"
            table.to_tsv(path)
            from sinet_cli.app import main as sinet_main

            argv = sys.argv
            sys.argv = ["sinet", "build-graph", "--classes", str(path), "--out", str(Path(tmp) / f"o{C}"),
                        "--device", args.device, "--force"]
            try:
                _, t_total = timed(lambda: _run(sinet_main))
            finally:
                sys.argv = argv
            t_nltk = nltk_pairwise_estimate(ss)
            rows.append((C, t_sw, t_wup, t_l, t_total, t_nltk))
            print(f"C={C}: S_w {t_sw:.2f} s (wup {t_wup:.2f} s), S_l {t_l:.2f} s, total {t_total:.2f} s; "
                  f"nltk pairwise path_similarity would take ~{t_nltk:.0f} s", flush=True)

        # growth of S_w with C (the C x C part is quadratic, the ancestor maps linear)
        _, big = max(tables.items())[1]
        print("\n# S_w (path) seconds by C")
        prev = None
        for C in (250, 500, 1000, 2000, 5000):
            if C > len(big):
                break
            _, t = bench_sw(big[:C])
            growth = f"  x{t / prev[1]:.1f} for x{C / prev[0]:.1f} classes" if prev else ""
            print(f"C={C:5d}: {t:6.2f} s{growth}")
            prev = (C, t)

    print("\n| C | S_w path (s) | S_w wup (s) | S_l (s) | total command (s) | nltk pairwise est. (s) |")
    print("|---|---|---|---|---|---|")
    for C, t_sw, t_wup, t_l, t_total, t_nltk in rows:
        print(f"| {C} | {t_sw:.2f} | {t_wup:.2f} | {t_l:.2f} | {t_total:.2f} | {t_nltk:.0f} |")


def _run(main_fn) -> None:
    try:
        main_fn()
    except SystemExit as e:
        if e.code:
            raise


if __name__ == "__main__":
    main()
