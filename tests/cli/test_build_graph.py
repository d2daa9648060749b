"""build-graph: hierarchy distances (vs. nltk), eq. 2 / eq. 3, the BiLSTM text head, the command."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from sinet_cli import store
from sinet_cli import sideinfo
from sinet_cli.datasets.demo import demo_classes
from stages import build_graph as stage


@pytest.fixture(scope="module")
def wn():
    return sideinfo.wordnet()


@pytest.fixture(scope="module")
def encoder():
    return sideinfo.load_text_encoder(str(sideinfo.default_text_encoder()), device="cpu")


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real entry point (``sinet ...``); return exit code, stdout, stderr."""
    from sinet_cli.app import main

    monkeypatch.setattr(sys, "argv", ["sinet", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write_tsv(path, rows, header=("name", "synset", "description", "parent")):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- S_w on real WordNet -----------------------------------------------------------------------


def test_fashion_wordnet_hierarchy_ranks_look_alikes_close(wn):
    table = demo_classes()
    synsets = [stage.synset_by_id(wn, s) for s in table.synsets]
    assert all(s is not None for s in synsets)
    maps, wup = stage.wordnet_hierarchy(synsets, with_depths=True)
    ix = {n: i for i, n in enumerate(table.names)}
    for sim in ("path", "wup", "exp"):
        S = stage.hierarchy_similarity(maps, sim=sim, tau=2.0, **wup)
        assert S.shape == (10, 10) and np.allclose(S, S.T) and np.allclose(np.diag(S), 1)
        assert S[ix["Shirt"], ix["T-shirt/top"]] > S[ix["Shirt"], ix["Sandal"]], sim
        assert S[ix["Sandal"], ix["Sneaker"]] > S[ix["Sandal"], ix["Dress"]], sim


def test_distances_and_similarities_equal_nltk_on_a_sample(wn):
    # ImageNet classes (offset ids as in ImageNet's synsets.txt) from fish, dogs, cats, vehicles, food, places
    wnids = ["n01440764", "n01443537", "n01484850", "n02091134", "n02099601", "n02123045", "n02690373",
             "n04285008", "n07920052", "n09472597", "n03028079", "n11939491", "n07873807", "n04254680"]
    nouns = [stage.synset_by_id(wn, w) for w in wnids]
    assert all(s is not None for s in nouns)
    # instance hypernyms, multiple inheritance, a hypernym of another class, duplicates
    nouns += [wn.synset(n) for n in ("paris.n.01", "einstein.n.01", "chef.n.01", "fireman.n.01",
                                     "dog.n.01", "animal.n.01", "entity.n.01", "dog.n.01")]
    maps, wup = stage.wordnet_hierarchy(nouns, with_depths=True)
    D = stage.hierarchy_distances(maps)
    P = stage.hierarchy_similarity(maps, sim="path")
    W = stage.hierarchy_similarity(maps, sim="wup", **wup)
    textbook = stage.hierarchy_similarity(maps, sim="wup", node_depth=wup["node_depth"])  # hypernym-edge lengths
    assert np.all(textbook <= W + 1e-6) and np.allclose(np.diag(textbook), 1)
    for i, a in enumerate(nouns):
        for j, b in enumerate(nouns):
            assert D[i, j] == a.shortest_path_distance(b), (a, b)
            assert P[i, j] == pytest.approx(a.path_similarity(b), abs=1e-6)
            if a != b:  # nltk's use_min_depth LCS can make wup(x, x) < 1 (whippet: 0.72); ours is 1
                assert W[i, j] == pytest.approx(a.wup_similarity(b), abs=1e-6), (a, b)
    # verbs live in separate trees: nltk joins them (and nouns) through a simulated root
    mixed = [wn.synset(n) for n in ("run.v.01", "walk.v.01", "think.v.01", "dog.n.01", "eat.v.01")]
    maps, _ = stage.wordnet_hierarchy(mixed)
    P = stage.hierarchy_similarity(maps, sim="path")
    for i, a in enumerate(mixed):
        for j, b in enumerate(mixed):
            assert P[i, j] == pytest.approx(a.path_similarity(b), abs=1e-6), (a, b)


def test_lookup_accepts_names_and_offsets(wn):
    assert stage.synset_by_id(wn, "n02084071").name() == "dog.n.01"
    assert stage.synset_by_id(wn, "02084071-n").name() == "dog.n.01"
    assert stage.synset_by_id(wn, "dog.n.01").name() == "dog.n.01"
    for bad in ("dog.n.99", "nonsense", "n99999999", ""):
        assert stage.synset_by_id(wn, bad) is None


def test_unknown_class_gets_identity_row_and_distance_matrix_input():
    maps = [{"a": 0, "r": 1}, None, {"b": 0, "r": 1}]
    S = stage.hierarchy_similarity(maps)
    assert np.allclose(S, [[1, 0, 1 / 3], [0, 1, 0], [1 / 3, 0, 1]])
    d = np.array([[0, 2, np.inf], [2, 0, 1], [np.inf, 1, 0]])
    assert np.allclose(stage.hierarchy_similarity(distances=d, sim="exp", tau=2.0),
                       np.exp(-np.array([[0, 2, np.inf], [2, 0, 1], [np.inf, 1, 0]]) / 2.0))
    with pytest.raises(ValueError, match="unknown hierarchy similarity"):
        stage.hierarchy_similarity(maps, sim="cosine")


def test_taxonomy_tree_distance_and_cycle():
    parents = {"cola": ["soda"], "lemonade": ["soda"], "soda": ["drinks"], "chips": ["snacks"],
               "crisps": ["snacks"], "pretzel": ["snacks"]}
    maps, depths = stage.taxonomy_ancestors(["cola", "lemonade", "chips", "soda", "nowhere"], parents)
    assert maps[4] is None
    D = stage.hierarchy_distances(maps)
    assert D[0, 1] == 2 and D[0, 3] == 1
    assert D[0, 2] == 3 + 2  # cola -> soda -> drinks -> *ROOT* <- snacks <- chips
    assert depths["cola"] == (3, 3) and depths[stage.ROOT] == (0, 0)
    with pytest.raises(ValueError, match="cycle: .*a -> b -> c -> a|cycle: .*b -> c -> a -> b|cycle: .*c -> a -> b -> c"):
        stage.taxonomy_ancestors(["a"], {"a": ["b"], "b": ["c"], "c": ["a"], "x": ["a"]})


def test_distances_scale_with_a_chain_of_shared_ancestors():
    # 300 classes on a comb: class i hangs under spine node i; spine i -> spine i-1. d(i, j) = |i - j| + 2
    C = 300
    maps = [{f"c{i}": 0, **{f"s{k}": i - k + 1 for k in range(i + 1)}} for i in range(C)]
    D = stage.hierarchy_distances(maps)
    i, j = np.meshgrid(np.arange(C), np.arange(C), indexing="ij")
    expect = np.abs(i - j) + 2.0
    np.fill_diagonal(expect, 0)
    assert np.array_equal(D, expect)  # distances > 255 exercise the wide-integer path


@pytest.mark.parametrize("depth", [40, 63, 64, 70, 200, 16001])
def test_deep_chains_do_not_overflow(depth):
    # two chains of `depth` edges under one root, and a class at mid height: d = 2 * depth and depth
    a = {f"a{i}": i for i in range(depth)} | {"root": depth}
    b = {f"b{i}": i for i in range(depth)} | {"root": depth}
    c = {"c": 0, "root": depth // 2}
    D = stage.hierarchy_distances([a, b, c])
    assert D[0, 1] == 2 * depth and D[0, 2] == depth + depth // 2 and D[1, 0] == 2 * depth


# -- eq. 2 and eq. 3 ---------------------------------------------------------------------------


def test_eq2_eq3_by_hand():
    v = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    r = 1 / math.sqrt(2)
    S_l = np.array([[1, r, 0], [r, 1, r], [0, r, 1]])
    S_w = np.array([[1, 0.5, 0.25], [0.5, 1, 1 / 3], [0.25, 1 / 3, 1]])
    got = stage.cosine_similarity(v)
    assert np.allclose(got, S_l, atol=1e-6)
    g = stage.relation_graphs(3, S_w, {"text": got})
    assert np.allclose(g.S_t, S_l + S_w, atol=1e-6) and g.sources == ["hierarchy", "text"]
    assert g.S_t.dtype == np.float32
    # switched-off sources contribute zeros; several text sources sum (CN + CD)
    only_w = stage.relation_graphs(3, S_w)
    assert np.allclose(only_w.S_l, 0) and np.allclose(only_w.S_t, S_w)
    only_l = stage.relation_graphs(3, None, {"text": got, "name": np.eye(3)})
    assert np.allclose(only_l.S_w, 0) and np.allclose(only_l.S_t, S_l + np.eye(3), atol=1e-6)
    with pytest.raises(ValueError, match="zero"):
        stage.cosine_similarity(np.array([[1.0, 0.0], [0.0, 0.0]]))


# -- the BiLSTM text head ----------------------------------------------------------------------


def test_text_head_training_lowers_its_loss_and_moves_embeddings(wn, encoder):
    table = demo_classes()
    synsets = [stage.synset_by_id(wn, s) for s in table.synsets]
    descs, srcs, _, _ = stage.choose_descriptions(table.names, table.descriptions, synsets)
    texts = [stage.description_text(n, d, s) for n, d, s in zip(table.names, descs, srcs)]
    per_class = [stage.head_texts(n, t, d, None, s) for n, t, d, s in zip(table.names, texts, descs, synsets)]
    assert all(len(t) >= 3 for t in per_class)
    kw = dict(hidden=32, batch_classes=10, seed=0)
    enc = stage.encode_tokens(encoder)
    untrained = stage.train_text_head(per_class, texts, enc, steps=0, **kw)
    trained = stage.train_text_head(per_class, texts, enc, steps=25, **kw)
    again = stage.train_text_head(per_class, texts, enc, steps=25, **kw)
    assert trained.embeddings.shape == (10, 64)
    assert untrained.eval_loss_before == pytest.approx(trained.eval_loss_before)  # same seeded init
    assert trained.eval_loss_after < trained.eval_loss_before - 0.1
    assert np.mean(trained.losses[-5:]) < np.mean(trained.losses[:5])
    change = np.linalg.norm(trained.embeddings - untrained.embeddings) / np.linalg.norm(untrained.embeddings)
    assert change > 0.05
    assert np.allclose(trained.embeddings, again.embeddings)  # seeded


# -- the command ---------------------------------------------------------------------------------


def test_cli_demo_hierarchy_only_then_up_to_date(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a"
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--data", "demo", "--sources", "wordnet",
                            "--out", str(out))
    assert code == 0, err
    with store.open_artifact(out / "graph.h5", "graph") as art:
        names = list(art.read("classes"))
        S_w, S_l, S_t = art.read("S_w"), art.read("S_l"), art.read("S_t")
        assert art.params["sources"] == ["hierarchy"] and art.read("hierarchy_known").tolist() == [1] * 10
    assert np.allclose(S_l, 0) and np.array_equal(S_t, S_w)
    assert S_w[names.index("Shirt"), names.index("T-shirt/top")] == pytest.approx(0.5)  # d = 1
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--data", "demo", "--sources", "wordnet",
                            "--out", str(out))
    assert code == 0 and "up to date" in err


def test_cli_demo_full_graph_with_text(tmp_path, monkeypatch, capsys, encoder):
    out = tmp_path / "b"
    code, stdout, err = run_main(monkeypatch, capsys, "build-graph", "--data", "demo", "--sources", "CD+HW",
                                 "--device", "cpu", "--show", "2", "--out", str(out))
    assert code == 0, err
    assert "T-shirt/top" in stdout and "CD + HW" in err
    with store.open_artifact(out / "graph.h5", "graph") as art:
        names = list(art.read("classes"))
        S_w, S_l, S_t = art.read("S_w"), art.read("S_l"), art.read("S_t")
        assert list(art.read("description_source")) == ["wordnet"] * 10
        assert art.read("descriptions")[names.index("Shirt")] == "a garment worn on the upper half of the body"
        emb = art.read("label_embeddings")
    assert np.allclose(S_t, S_l + S_w, atol=1e-6)
    assert np.allclose(S_l, stage.cosine_similarity(emb), atol=1e-6) and not np.allclose(S_l, 0)
    i = names.index("Sandal")
    assert S_t[i, names.index("Sneaker")] > S_t[i, names.index("Dress")]


def test_cli_bilstm_head_and_name_source(tmp_path, monkeypatch, capsys, encoder):
    out = tmp_path / "c"
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--data", "demo", "--sources", "text,name",
                            "--text-head", "bilstm", "--head-steps", "5", "--head-hidden", "16",
                            "--device", "cpu", "--out", str(out))
    assert code == 0, err
    with store.open_artifact(out / "graph.h5", "graph") as art:
        assert art.read("label_embeddings").shape == (10, 32)
        assert np.allclose(art.read("S_w"), 0)
        assert art.json_attr("text_head")["steps"] == 5 and "InfoNCE" in art.json_attr("text_head")["objective"]
        assert art.params["text_head"] == "bilstm"
        assert art.attr("strategy") == "CN+CD"


def test_cli_unknown_synset_warns_and_looks_the_name_up_strict_stops(tmp_path, monkeypatch, capsys):
    tsv = write_tsv(tmp_path / "classes.tsv", [("dog", "n02084071", "", ""), ("cat", "cat.n.01", "", ""),
                                               ("wolf", "wolf.n.99", "", ""), ("zorblax", "zorblax.n.01", "", "")])
    out = tmp_path / "o"
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--sources", "wordnet",
                            "--strict", "--out", str(out))
    assert code == 1 and not (out / "graph.h5").exists()
    assert err.count("\n") == 1 and "'wolf'" in err and "wolf.n.99" in err and str(tsv) in err
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--sources", "wordnet",
                            "--out", str(out))
    assert code == 0, err
    assert "wolf.n.99" in err and "looked up by name" in err  # reported, then resolved from the name
    assert err.count("'zorblax'") == 2 and "text similarity only" in err  # its id, then its name: one warning each
    with store.open_artifact(out / "graph.h5", "graph") as art:
        S = art.read("S_w")
        assert art.read("hierarchy_known").tolist() == [1, 1, 1, 0]
        res = art.json_attr("name_resolution")
        assert art.json_attr("table_problems")[0].startswith("class 'wolf' has unknown WordNet synset")
    assert [(e["class"], e["synset"], e["source"]) for e in res] == [
        ("dog", "dog.n.01", "table"), ("cat", "cat.n.01", "table"), ("wolf", "wolf.n.01", "name"),
        ("zorblax", "", "none")]
    assert "wolf.n.99" in res[2]["detail"]
    assert np.allclose(S[3], [0, 0, 0, 1]) and np.allclose(S[:, 3], [0, 0, 0, 1]) and 0 < S[0, 2] < 1
    # --strict on the graph now up to date still stops: it reads what the graph recorded
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--sources", "wordnet",
                            "--strict", "--out", str(out))
    assert code == 1 and "'wolf'" in err and str(tsv) in err and err.count("\n") == 1
    # the old --lenient is accepted (hidden, no effect)
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--sources", "wordnet",
                            "--lenient", "--out", str(out))
    assert code == 0 and "deprecated" in err and "up to date" in err


def test_cli_class_table_overrides_the_name_and_strict_names_class_and_file(tmp_path, monkeypatch, capsys):
    tsv = write_tsv(tmp_path / "classes.tsv", [("Bag", "bag.n.04"), ("ankle_boot", ""), ("sneakers", ""),
                                               ("Hoodie", "")], header=("name", "synset"))
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--sources", "wordnet",
                            "--strict", "--out", str(tmp_path / "o"))
    assert code == 1 and err.count("\n") == 1
    assert "'Hoodie'" in err and str(tsv) in err and "--strict" in err
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--sources", "wordnet",
                            "--out", str(tmp_path / "o"))
    assert code == 0, err
    with store.open_artifact(tmp_path / "o" / "graph.h5", "graph") as art:
        res = art.json_attr("name_resolution")
        S = art.read("S_w")
    bag, boot, sneakers, hoodie = res
    assert (bag["synset"], bag["source"]) == ("bag.n.04", "table")  # the name alone gives bag.n.01
    assert (boot["synset"], boot["source"], boot["lemma"], boot["modifier"]) == ("boot.n.01", "parent", "boot", "ankle")
    assert (sneakers["synset"], sneakers["source"], sneakers["lemma"]) == ("gym_shoe.n.01", "name", "sneaker")
    assert (hoodie["synset"], hoodie["source"], hoodie["lemma"]) == ("", "none", "")
    assert all({"class", "synset", "source", "lemma"} <= set(e) for e in res)
    # ankle_boot sits one edge below boot.n.01: d(ankle_boot, sneaker) = d(boot, sneaker) + 1
    wn = sideinfo.wordnet()
    d = wn.synset("boot.n.01").shortest_path_distance(wn.synset("sneaker.n.01"))
    assert S[1, 2] == pytest.approx(1 / (1 + d + 1))
    assert "resolved 2 of 4 class names in WordNet" in err and "ankle_boot -> below boot.n.01 (head noun" in err
    assert "1 unresolved" in err and err.count("'Hoodie'") == 1


def test_cli_descriptions_punctuation_is_an_error_empty_falls_back(tmp_path, monkeypatch, capsys, encoder):
    bad = write_tsv(tmp_path / "bad.tsv", [("dog", "dog.n.01", "a loyal pet", ""), ("cat", "cat.n.01", "-- ...", "")])
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(bad), "--device", "cpu",
                            "--out", str(tmp_path / "o"))
    assert code == 1 and "'cat'" in err and "no words" in err and str(bad) in err
    ok = write_tsv(tmp_path / "ok.tsv", [("dog", "dog.n.01", "a loyal pet", ""), ("cat", "cat.n.01", "   ", ""),
                                         ("zorblax", "", "", ""), ("bag", "", "", "")])
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(ok), "--sources", "text",
                            "--device", "cpu", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "empty description for 'cat', 'zorblax', 'bag'" in err
    assert "no description or WordNet gloss for 'zorblax': encoding the class name" in err
    with store.open_artifact(tmp_path / "o" / "graph.h5", "graph") as art:
        # text alone also looks names up in WordNet: its gloss describes the class
        assert list(art.read("description_source")) == ["user", "wordnet", "name", "wordnet"]
        assert art.read("descriptions")[3] == sideinfo.wordnet().synset("bag.n.01").definition()
        assert list(art.read("descriptions"))[:2] == ["a loyal pet", stage.synset_by_id(sideinfo.wordnet(), "cat.n.01").definition()]


def test_cli_duplicate_class_name(tmp_path, monkeypatch, capsys):
    tsv = write_tsv(tmp_path / "dup.tsv", [("dog", "dog.n.01"), ("dog", "cat.n.01")], header=("name", "synset"))
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--out", str(tmp_path / "o"))
    assert code == 1 and "duplicate class name 'dog'" in err and f"{tsv}:3" in err


def test_cli_taxonomy_catalogue_and_cycle(tmp_path, monkeypatch, capsys):
    tsv = write_tsv(tmp_path / "products.tsv", [("cola 330ml", "soda"), ("cola 1l", "soda"), ("lemonade", "soda"),
                                                ("salted crisps", "snacks")], header=("name", "parent"))
    tax = tmp_path / "tax.tsv"
    tax.write_text("child\tparent\nsoda\tdrinks\ndrinks\tgroceries\nsnacks\tgroceries\n")
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--taxonomy", str(tax),
                            "--sources", "hierarchy", "--out", str(tmp_path / "o"))
    assert code == 0, err
    with store.open_artifact(tmp_path / "o" / "graph.h5", "graph") as art:
        S = art.read("S_w")
        assert art.params["hierarchy"] == "taxonomy"
    assert S[0, 1] == pytest.approx(1 / 3) and S[0, 3] == pytest.approx(1 / 6)  # d = 2 and 5
    cyc = tmp_path / "cycle.tsv"
    cyc.write_text("soda\tdrinks\ndrinks\tgroceries\ngroceries\tsoda\n")
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--classes", str(tsv), "--taxonomy", str(cyc),
                            "--sources", "hierarchy", "--out", str(tmp_path / "o2"))
    assert code == 1 and str(cyc) in err and "cycle" in err and "soda" in err and err.count("\n") == 1


def test_cli_bad_options(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--sources", "pictures", "--out", str(tmp_path))
    assert code == 1 and "'pictures'" in err
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--hierarchy-sim", "cosine", "--out", str(tmp_path))
    assert code == 1 and "--hierarchy-sim" in err


def _imagefolder(root, names):
    from PIL import Image

    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), k * 20, dtype=np.uint8)).save(root / name / "a.png")
    return root


def test_cli_plain_imagefolder_with_ordinary_names_builds_without_flags(tmp_path, monkeypatch, capsys, encoder):
    names = ["T-shirt", "Zorblax", "ankle_boot", "bag", "Down Coat", "dresses", "sneakers", "tshirt"]
    root = _imagefolder(tmp_path / "crawl", names)
    out = tmp_path / "o"
    args = ["build-graph", "--data", f"imagefolder:{root}", "--device", "cpu", "--out", str(out)]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    with store.open_artifact(out / "graph.h5", "graph") as art:
        order = list(art.read("classes"))
        res = {e["class"]: e for e in art.json_attr("name_resolution")}
        S_w, S_l, S_t = art.read("S_w"), art.read("S_l"), art.read("S_t")
        desc = dict(zip(order, art.read("descriptions")))
        desc_src = dict(zip(order, art.read("description_source")))
        known = dict(zip(order, art.read("hierarchy_known").tolist()))
    assert sorted(order) == sorted(names) and list(res) == order
    expect = {"T-shirt": ("jersey.n.03", "name"), "tshirt": ("jersey.n.03", "name"), "bag": ("bag.n.01", "name"),
              "ankle_boot": ("boot.n.01", "parent"), "Down Coat": ("coat.n.01", "parent"),
              "dresses": ("dress.n.01", "name"), "sneakers": ("gym_shoe.n.01", "name"), "Zorblax": ("", "none")}
    assert {n: (e["synset"], e["source"]) for n, e in res.items()} == expect
    assert res["bag"]["senses"] == len(sideinfo.wordnet().synsets("bag", pos="n")) > 1
    ix = {n: i for i, n in enumerate(order)}
    z = ix["Zorblax"]
    assert known == {n: int(n != "Zorblax") for n in names}
    assert np.allclose(np.delete(S_w[z], z), 0) and np.allclose(np.delete(S_w[:, z], z), 0)
    assert np.all(np.abs(np.delete(S_l[z], z)) > 0) and np.allclose(S_t, S_l + S_w, atol=1e-6)  # text only
    assert S_w[ix["T-shirt"], ix["tshirt"]] == 1.0
    assert S_w[ix["ankle_boot"], ix["sneakers"]] > S_w[ix["ankle_boot"], ix["dresses"]] > 0
    assert desc_src["Zorblax"] == "name" and desc["ankle_boot"] == sideinfo.wordnet().synset("boot.n.01").definition()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'Zorblax'" in warnings[0] and "text similarity only" in warnings[0]
    assert "resolved 7 of 8 class names in WordNet" in err and "1 unresolved" in err
    # --strict is not a param: on the up-to-date graph it still names the unresolved class and the folder
    code, _, err = run_main(monkeypatch, capsys, *args, "--strict")
    assert code == 1 and "'Zorblax'" in err and str(root) in err and err.count("\n") == 1
    # a renamed class folder is another graph; resolvable names pass --strict, and the graph then stays
    # up to date without it
    (root / "Zorblax").rename(root / "sandals")
    code, _, err = run_main(monkeypatch, capsys, *args, "--strict")
    assert code == 0 and "warning" not in err, err
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "up to date" in err
    with store.open_artifact(out / "graph.h5", "graph") as art:
        assert art.json_attr("name_resolution")[list(art.read("classes")).index("sandals")]["synset"] == "sandal.n.01"
        assert art.inputs["wordnet"].endswith(f"/names-{stage.NAME_RULES_VERSION}") and "strict" not in art.params


def test_make_strict_variable_reaches_build_graph():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]

    def graph_line(*args: str) -> str:
        done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(repo), "-o", ".install.stamp", "graph",
                               "DATASET=imagefolder", "DATA_ROOT=/d/crawl", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return next(line for line in done.stdout.replace("\\\n", " ").splitlines() if " build-graph " in line)

    assert "--strict" not in graph_line() and "--lenient" not in graph_line()
    assert "--strict" in graph_line("STRICT=1")


# -- the config: validation and provenance params ----------------------------------------------


def test_graph_config_params_are_the_fields_that_change_graph_h5():
    # the params graph.h5 recorded before the config existed: existing artifacts stay up to date
    default = stage.GraphConfig().resolved(False, ["dog.n.01"], [""])
    assert default.params() == {"sources": ["hierarchy", "text"], "hierarchy": "wordnet", "hierarchy_sim": "path",
                                "text_head": "none"}
    exp = stage.GraphConfig(sources="wordnet", hierarchy_sim="exp", tau=1.5).resolved(False, [""], [""])
    assert exp.params() == {"sources": ["hierarchy"], "hierarchy": "wordnet", "hierarchy_sim": "exp", "tau": 1.5}
    head = stage.GraphConfig(sources="CD", text_head="bilstm", head_steps=20, strict=True).resolved(False, [""], [""])
    assert head.params() == {"sources": ["text"], "hierarchy": "wordnet", "text_head": "bilstm", "head_steps": 20,
                             "head_hidden": 192, "head_lr": 2e-3, "head_temperature": 0.1, "seed": 0}
    assert stage.GraphConfig(sources="CN+HW").resolved(False, [""], ["drinks"]).params() == {
        "sources": ["hierarchy", "name"], "hierarchy": "taxonomy", "hierarchy_sim": "path"}  # parents, no synsets
    assert stage.GraphConfig(sources="name").params() == {"sources": ["name"]}
    assert stage.GraphConfig(sources="HW").resolved(True, [""], [""]).hierarchy == "taxonomy"
    for kwargs, message in (({"sources": "colour"}, "unknown source 'colour'"), ({"sources": " "}, "empty"),
                            ({"hierarchy_sim": "exp", "tau": 0.0}, "--tau 0.0"), ({"hierarchy": "tree"}, "--hierarchy"),
                            ({"text_head": "bilstm", "sources": "HW"}, "add 'text'"),
                            ({"text_head": "bilstm", "head_lr": 0.0}, "--head-lr")):
        with pytest.raises(ValueError, match=message):
            stage.GraphConfig(**kwargs)
    with pytest.raises(ValueError, match="drop one"):
        stage.GraphConfig(hierarchy="wordnet").resolved(True, [""], [""])
    with pytest.raises(ValueError, match="resolved config"):
        stage.run_build_graph(stage.GraphConfig(), demo_classes())


def test_cli_config_error_is_one_line(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "build-graph", "--data", "demo", "--hierarchy-sim", "exp",
                            "--tau", "-1")
    assert code == 1 and err.strip() == "sinet: error: --tau -1.0: must be > 0"
