"""How class names resolve in WordNet by themselves, and what that does to the demo's graphs.

1. Every class name of four lists through ``stages.build_graph.resolve_class_name``: the demo
   (Fashion-MNIST), demo-mnist (spelled digits, and the digits 0-9 an MNIST image folder has),
   Clothing1M's 14 names from its category_names_eng.txt, and ``CRAWL``: ordinary product / crawl
   class names. For the first three the packaged class table's synset (or its parent) is the
   reference; for ``CRAWL`` the reference is the sense a person would mean in a product crawl
   (written down below, ``None`` where WordNet 3.0 has no such noun). Printed per name: the
   choice, the rule, the number of noun senses, and whether it is the reference.
   A second column shows what a *context* rule would choose instead of the first noun sense: of
   an ambiguous name's noun senses, the one with the highest summed path similarity to the other
   classes' best-matching senses (ties: the first). It is computed here only, for comparison.
2. The demo's and demo-mnist's graphs built from the class names alone (no synset column)
   against the packaged tables': Pearson and Spearman correlation of the off-diagonal entries of
   S_w, S_l and S_t, and how often each class's nearest class by S_t is the same.

Run: python bench/name_resolution.py [--no-graphs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SINET_QUIET", "1")

from sinet_cli.commands import graph as cmd  # noqa: E402
from sinet_cli.datasets import ClassTable  # noqa: E402
from sinet_cli.datasets.clothing1m import clothing1m_classes  # noqa: E402
from sinet_cli.datasets.demo import demo_classes  # noqa: E402
from stages.build_graph import resolve_class_name  # noqa: E402

CLOTHING1M_FILE = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
                   "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]
# ordinary product / crawl class names -> the synset a person means (None: WordNet 3.0 has no such noun)
CRAWL = {
    "sneakers": "sneaker.n.01", "dresses": "dress.n.01", "T-Shirt": "tee_shirt.n.01", "tshirt": "tee_shirt.n.01",
    "Pullover": "pullover.n.01", "Trouser": "trouser.n.01", "ankle_boot": "boot.n.01", "sandal": "sandal.n.01",
    "bag": "bag.n.04", "Down Coat": "coat.n.01", "Knitwear": "knitwear.n.01", "Windbreaker": "windbreaker.n.01",
    "jeans": "jean.n.01", "shorts": "short_pants.n.01", "skirt": "skirt.n.02", "blouse": "blouse.n.01",
    "hoodie": None, "cardigan": "cardigan.n.01", "blazer": "blazer.n.01", "raincoat": "raincoat.n.01",
    "bikini": "bikini.n.02", "pajamas": "pajama.n.02", "socks": "sock.n.01", "scarf": "scarf.n.01",
    "gloves": "glove.n.02", "baseball cap": "baseball_cap.n.01", "sunglasses": "sunglasses.n.01",
    "watch": "watch.n.01", "necklace": "necklace.n.01", "earrings": "earring.n.01", "backpack": "backpack.n.01",
    "handbag": "bag.n.04", "wallet": "wallet.n.01", "belt": "belt.n.02", "high heels": None,
    "flip-flops": "flip-flop.n.02", "shoes": "shoe.n.01", "tank top": "tank_top.n.01",
    "leggings": "legging.n.01", "polo shirt": "polo_shirt.n.01", "laptop": "laptop.n.01",
    "mouse": "mouse.n.04", "table": "table.n.02", "mug": "mug.n.04", "Zalando": None,
}


def canonical(wn, ident: str | None) -> str | None:
    if ident is None or "." not in ident:
        return ident
    return wn.synset(ident).name()


def context_choice(wn, names: list[str]) -> dict[str, str | None]:
    """The comparison rule: each ambiguous name's noun sense closest to the other classes (see above)."""
    res = {n: resolve_class_name(n, wn) for n in names}
    cands: dict[str, list] = {}
    for n, r in res.items():
        if r.synset is None:
            continue
        cands[n] = wn.synsets(r.lemma, pos="n") if r.rule != "synset id" and r.senses > 1 else [wn.synset(r.synset)]
        if not cands[n] or cands[n][0].name() != r.synset:  # the lemma's senses are not what the rule chose
            cands[n] = [wn.synset(r.synset)]
    out: dict[str, str | None] = {}
    for n, r in res.items():
        if n not in cands or len(cands[n]) == 1:
            out[n] = r.synset
            continue
        scores = []
        for s in cands[n]:
            total = 0.0
            for m, others in cands.items():
                if m != n:
                    total += max((s.path_similarity(t) or 0.0) for t in others)
            scores.append(total)
        out[n] = cands[n][int(np.argmax(scores))].name()  # argmax: ties go to the first (most frequent) sense
    return out


def resolve_list(wn, title: str, names: list[str], reference: dict[str, tuple[str | None, bool]]) -> None:
    """reference: name -> (synset or parent synset or lemma-less id, placed below it?)."""
    ctx = context_choice(wn, names)
    rows, hits, resolved, ctx_hits = [], 0, 0, 0
    for n in names:
        r = resolve_class_name(n, wn)
        ref, _ = reference.get(n, (None, False))
        ref = canonical(wn, ref)
        got = r.synset
        ok = got == ref or (ref is None and got is None)
        ctx_ok = ctx[n] == ref or (ref is None and ctx[n] is None)
        resolved += got is not None
        hits += ok
        ctx_hits += ctx_ok
        rows.append(f"  {n!r:16} {r.describe():72} ref {ref or '-':18} {'ok' if ok else 'DIFF'}"
                    + ("" if ctx[n] == got else f"   context: {ctx[n]} ({'ok' if ctx_ok else 'DIFF'})"))
    print(f"{title}: {resolved}/{len(names)} resolved, {hits}/{len(names)} as the reference; "
          f"context rule {ctx_hits}/{len(names)}")
    print("\n".join(rows))


def offdiag(S: np.ndarray) -> np.ndarray:
    return S[~np.eye(len(S), dtype=bool)]


def compare_graphs(table: ClassTable, title: str, work: Path) -> None:
    import scipy.stats as st

    from sinet_cli.app import main

    out = {}
    for kind, t in (("table", table), ("names", ClassTable.from_names(table.names))):
        tsv = work / f"{title}-{kind}.tsv"
        t.to_tsv(tsv)
        try:
            main(["build-graph", "--classes", str(tsv), "--device", "cpu", "--force", "--out", str(work / f"{title}-{kind}")])
        except SystemExit as e:
            if e.code:
                raise
        from sinet_cli import store

        with store.open_artifact(work / f"{title}-{kind}" / "graph.h5", "graph") as art:
            out[kind] = {k: art.read(k) for k in ("S_w", "S_l", "S_t")}
    print(f"{title}: graphs from the class names alone vs from the packaged table")
    for k in ("S_w", "S_l", "S_t"):
        a, b = offdiag(out["table"][k]), offdiag(out["names"][k])
        print(f"  {k}: Pearson {st.pearsonr(a, b)[0]:.3f}  Spearman {st.spearmanr(a, b)[0]:.3f}  "
              f"mean |diff| {np.abs(a - b).mean():.3f}  identical {np.allclose(a, b)}")
    nearest = {}
    for kind in out:
        S = out[kind]["S_t"].copy()
        np.fill_diagonal(S, -np.inf)
        nearest[kind] = S.argmax(1)
    same = int((nearest["table"] == nearest["names"]).sum())
    print(f"  nearest class by S_t the same for {same}/{len(table)} classes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-graphs", action="store_true", help="only the name lists")
    args = ap.parse_args()
    wn = cmd._wordnet()

    def table_ref(t: ClassTable) -> dict[str, tuple[str | None, bool]]:
        return {n: (s, False) if s else (p, True) for n, s, p in zip(t.names, t.synsets, t.parents)}

    demo, mnist, c1m = demo_classes("demo"), demo_classes("demo-mnist"), clothing1m_classes()
    resolve_list(wn, "demo (Fashion-MNIST)", demo.names, table_ref(demo))
    resolve_list(wn, "demo-mnist (spelled)", mnist.names, table_ref(mnist))
    digits = [str(d) for d in range(10)]
    resolve_list(wn, "MNIST folder names 0-9", digits, {str(d): (s, False) for d, s in enumerate(mnist.synsets)})
    resolve_list(wn, "Clothing1M category_names_eng.txt", CLOTHING1M_FILE, table_ref(c1m))
    resolve_list(wn, f"crawl names ({len(CRAWL)})", list(CRAWL), {n: (s, False) for n, s in CRAWL.items()})
    if not args.no_graphs:
        with tempfile.TemporaryDirectory() as tmp:
            compare_graphs(demo, "demo", Path(tmp))
            compare_graphs(mnist, "demo-mnist", Path(tmp))


if __name__ == "__main__":
    main()
