"""build-graph: the command, its config and errors, and the stage on the demo's class table, which
loads through sinet_cli.datasets (S_w, eq. 2 and eq. 3 on their own: tests/unit/test_stage_build_graph.py)."""

from __future__ import annotations

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
