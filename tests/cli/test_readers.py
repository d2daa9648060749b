"""Clothing1M and WebVision / Mini-WebVision readers on fixture trees in their exact layouts."""

import pytest
from typer.testing import CliRunner

from fixtures_layouts import CLOTHING1M_NAMES, make_clothing1m, make_webvision
from sinet_cli import store
from sinet_cli.app import app
from sinet_cli.common import _extra_readers, dataset_name, load_table
from sinet_cli.datasets import ClassTable, jsonmeta
from sinet_cli.datasets.clothing1m import CLEAN_ID_PREFIX, clothing1m_classes, read_clothing1m
from sinet_cli.datasets.webvision import read_mini_webvision, read_synsets, read_webvision
from sinet_cli.errors import InputError, SinetError

TINY = ["--backbone", "test_resnet", "--random-init", "--image-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture
def c1m(tmp_path):
    return make_clothing1m(tmp_path / "Clothing1M")


@pytest.fixture
def wv(tmp_path):
    return make_webvision(tmp_path / "webvision")


def _rows(table):
    return {i: (int(l), int(c), s) for i, l, c, s in zip(table.ids, table.labels, table.clean_labels, table.splits)}


# --- Clothing1M --------------------------------------------------------------------------------------


def test_clothing1m_splits_labels_and_clean_join(c1m):
    t = _extra_readers()["clothing1m"](c1m["root"], None)
    rows = _rows(t)
    assert {s: int((t.splits == s).sum()) for s in ("train", "val", "test")} == {"train": 28 + 4, "val": 3, "test": 3}
    assert t.provenance["counts"] == {"noisy_train": 28, "clean_train": 4, "clean_val": 3, "clean_test": 3}
    for rel in c1m["noisy_train"]:  # noisy label, clean label where the image has one
        assert rows[rel] == (c1m["noisy"][rel], c1m["clean"].get(rel, -1), "train")
    assert rows[c1m["noisy_train"][2]] == (1, 4, "train")  # a known mislabeled image
    assert int((t.labels != t.clean_labels)[t.clean_labels >= 0].sum()) == 2
    for rel in c1m["clean_train"]:  # a clean-set row even when the image is also a noisy row
        assert rows[CLEAN_ID_PREFIX + rel] == (c1m["clean"][rel], c1m["clean"][rel], "train")
    for split in ("val", "test"):
        for rel in c1m[split]:
            assert rows[rel] == (c1m["clean"][rel], c1m["clean"][rel], split)
    assert list(t.subset[t.splits == "train"]) == ["noisy"] * 28 + ["clean"] * 4
    assert set(t.subset[t.splits != "train"]) == {"clean"}
    # paths point at the written JPEGs, ids are the relative paths
    assert all(p.endswith(i.removeprefix(CLEAN_ID_PREFIX)) for i, p in zip(t.ids, t.paths))
    assert all((c1m["root"] / i.removeprefix(CLEAN_ID_PREFIX)).is_file() for i in t.ids)
    assert t.classes.names == CLOTHING1M_NAMES and t.classes.synsets[0] == "tee_shirt.n.01"
    assert t.side_text is None


def test_clothing1m_root_layout_reads_the_same(tmp_path, c1m):
    other = make_clothing1m(tmp_path / "flat", layout="root")
    assert not (other["root"] / "annotations").exists()
    a, b = read_clothing1m(c1m["root"]), read_clothing1m(other["root"])
    assert list(a.ids) == list(b.ids) and list(a.labels) == list(b.labels)
    assert list(a.clean_labels) == list(b.clean_labels) and list(a.splits) == list(b.splits)
    assert b.provenance["annotations"] == str(other["root"])


def test_clothing1m_clean_as_skip_and_the_fingerprint_sees_it(c1m):
    t = read_clothing1m(c1m["root"], clean_as="skip")
    assert not any(i.startswith(CLEAN_ID_PREFIX) for i in t.ids) and len(t) == 28 + 3 + 3
    assert t.fingerprint() != read_clothing1m(c1m["root"]).fingerprint()
    relabelled = read_clothing1m(c1m["root"], clean_as="skip")
    relabelled.subset[0] = "clean"  # the subset column is part of what a stage reads
    assert relabelled.fingerprint() != t.fingerprint()
    assert list(t.take(t.splits == "test").subset) == ["clean"] * 3
    with pytest.raises(ValueError, match="clean_as"):
        read_clothing1m(c1m["root"], clean_as="val")


def test_clothing1m_class_table_synsets_exist_in_wordnet():
    from sinet_cli.sideinfo import wordnet

    wn = wordnet()
    t = clothing1m_classes()
    assert t.names == CLOTHING1M_NAMES
    for name, syn, desc, parent in zip(t.names, t.synsets, t.descriptions, t.parents):
        assert syn or (desc and parent), f"{name}: needs a synset, or a description and a parent"
        if syn:
            wn.synset(syn)
        if parent:
            wn.synset(parent)
    assert wn.synset(t.synsets[t.index("Vest")]).lexname() == "noun.artifact"
    assert t.synsets[t.index("Chiffon")] is None  # chiffon.n.01 is the fabric, not the garment


def test_clothing1m_user_classes_must_match_the_category_file(c1m, tmp_path):
    bad = ClassTable.from_names(["a", "b"], source="my.tsv")
    with pytest.raises(InputError, match=r"^my.tsv: 2 classes, but .*category_names_eng.txt names 14"):
        read_clothing1m(c1m["root"], bad)
    mine = ClassTable.from_names([n.lower() for n in CLOTHING1M_NAMES])
    assert read_clothing1m(c1m["root"], mine).classes.names[0] == "t-shirt"


@pytest.mark.parametrize("names", [
    ["T-shirt", "shirts", "knit_wear", "Chiffon", "Sweaters", "Hoodies", "wind breaker", "Jacket", "Down Coat",
     "Suit", "shawl", "Dresses", "VEST", "Underwear"],
    ["t_shirt", "Shirt", "Knitwear", "chiffon", "Sweater", "hoodie", "Windbreaker", "jackets", "downcoat", "Suits",
     "Shawl", "dress", "Vest", "under-wear"],
])
def test_clothing1m_category_spellings_match_the_packaged_rows(c1m, capsys, names):
    path = c1m["ann"] / "category_names_eng.txt"
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    t = read_clothing1m(c1m["root"]).classes
    packaged = clothing1m_classes()
    assert t.names == names  # the file's spelling, in its order
    assert (t.synsets, t.descriptions, t.parents) == (packaged.synsets, packaged.descriptions, packaged.parents)
    assert "warning" not in capsys.readouterr().err


def test_clothing1m_a_name_outside_the_table_is_looked_up_in_wordnet(c1m, capsys, tmp_path):
    path = c1m["ann"] / "category_names_eng.txt"
    names = CLOTHING1M_NAMES.copy()
    names[6] = "Parka"  # instead of Windbreaker
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    t = read_clothing1m(c1m["root"]).classes
    err = capsys.readouterr().err
    assert (t.synsets[6], t.descriptions[6], t.parents[6]) == (None, None, None)
    assert t.synsets[0] == "tee_shirt.n.01" and t.parents[8] == "coat.n.01" and t.source == str(path)
    assert "'Parka'" in err and str(path) in err and err.count("\n") == 1
    # exactly the packaged names: the packaged table itself
    path.write_text("".join(f"{n}\n" for n in CLOTHING1M_NAMES), encoding="utf-8")
    assert read_clothing1m(c1m["root"]).classes.source.endswith("clothing1m_classes.tsv")
    # build-graph places it by its name, the other rows from the packaged table
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    done = CliRunner().invoke(app, ["build-graph", "--data", f"clothing1m:{c1m['root']}", "--sources", "wordnet",
                                    "--out", str(tmp_path / "o")])
    assert done.exit_code == 0, done.output
    with store.open_artifact(tmp_path / "o" / "graph.h5", "graph") as art:
        res = art.json_attr("name_resolution")
    assert (res[6]["synset"], res[6]["source"]) == ("parka.n.01", "name")
    assert (res[0]["synset"], res[0]["source"]) == ("jersey.n.03", "table")
    assert (res[8]["synset"], res[8]["source"], res[8]["rule"]) == ("coat.n.01", "parent", "parent column")


def _edit(path, line_no, new):
    lines = path.read_bytes().split(b"\n")
    lines[line_no - 1] = new
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    "fname, line, new, message",
    [
        ("noisy_label_kv.txt", 3, b"images/2/02/1002.jpg x", "label 'x' is not an integer"),
        ("noisy_label_kv.txt", 4, b"images/3/03/1003.jpg", "missing the label column"),
        ("noisy_label_kv.txt", 5, b"images/4/04/1004.jpg 14", "label 14 out of range 0..13"),
        ("noisy_label_kv.txt", 6, b"images/5/05/1005.jpg 2 extra", "expected 'path label', 3 fields"),
        ("noisy_label_kv.txt", 7, b"images/0/00/1000.jpg 1", "duplicate image 'images/0/00/1000.jpg' (first on line 1)"),
        ("noisy_label_kv.txt", 2, b"/etc/passwd 1", "must be relative"),
        ("noisy_label_kv.txt", 2, b"images/../../x.jpg 1", "must not contain '..'"),
        ("clean_label_kv.txt", 2, b"images/2/02/1002.jpg \xe9t\xe9", "not UTF-8 text"),
        ("category_names_eng.txt", 5, b"\xff\xfeSweater", "not UTF-8 text"),
        ("category_names_eng.txt", 14, b"Shirt", "duplicate class name 'Shirt'"),
        ("noisy_train_key_list.txt", 9, b"images/9/99/nowhere.jpg", "'images/9/99/nowhere.jpg' has no label in"),
        ("noisy_train_key_list.txt", 9, b"images/0/00/1000.jpg", "duplicate image 'images/0/00/1000.jpg' (first on line 1)"),
        ("clean_val_key_list.txt", 2, b"images/1/01/1001.jpg", "has no label in"),
        ("clean_test_key_list.txt", 2, b"images/0/00/1000.jpg extra", "expected one image path per line"),
    ],
)
def test_clothing1m_malformed_lines_name_file_and_line(c1m, fname, line, new, message):
    path = c1m["ann"] / fname
    _edit(path, line, new)
    with pytest.raises(InputError) as e:
        read_clothing1m(c1m["root"])
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert message in str(e.value)


def test_clothing1m_image_in_two_splits_is_an_error_naming_both_lines(c1m):
    path = c1m["ann"] / "clean_test_key_list.txt"
    val_image = c1m["val"][1]
    _edit(path, 3, val_image.encode())
    with pytest.raises(InputError) as e:
        read_clothing1m(c1m["root"])
    assert str(e.value).startswith(f"{path}:3: image {val_image!r} is listed twice")
    assert "clean_val_key_list.txt:2" in str(e.value)


def test_clothing1m_missing_required_file(c1m):
    (c1m["ann"] / "noisy_label_kv.txt").unlink()
    with pytest.raises(InputError, match="no noisy_label_kv.txt"):
        read_clothing1m(c1m["root"])


# --- WebVision ---------------------------------------------------------------------------------------


def test_webvision_lists_classes_and_side_text(wv):
    t = _extra_readers()["webvision"](wv["root"], None)
    rows = _rows(t)
    assert {s: int((t.splits == s).sum()) for s in ("train", "val")} == {"train": 4 * 3, "val": 4}
    assert t.provenance["counts"] == {"train_google": 8, "train_flickr": 4, "val": 4}
    for rel, c in wv["train"].items():
        assert rows[rel] == (c, -1, "train")
    for rel, c in wv["val"].items():
        assert rows[rel] == (c, c, "val")
        assert (wv["root"] / rel).is_file()
    assert t.classes.names == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert t.classes.synsets == ["n01440764", "n01443537", "n01484850", "n01491361"]
    assert t.classes.descriptions == [None] * 4
    text = dict(zip(t.ids, t.side_text))
    for rel, expected in wv["text"].items():  # google by id (records reversed), flickr by position
        assert text[rel] == expected
    assert text["google/q0002/000002.jpg"] == "photo of 1-2. a fish."
    assert all(text[rel] == "" for rel in wv["val"])
    sub = dict(zip(t.ids, t.subset))
    assert sub["google/q0003/000001.jpg"] == "google/q0003" and sub["flickr/q0001/000001.jpg"] == "flickr/q0001"


def test_webvision_json_dirs_and_bare_val_names(tmp_path):
    wv = make_webvision(tmp_path / "wv", json_dirs="suffixed", val_bare_names=True)
    assert (wv["root"] / "google_json" / "q0001.json").is_file()
    t = read_webvision(wv["root"])
    text = dict(zip(t.ids, t.side_text))
    assert all(text[rel] == s for rel, s in wv["text"].items())
    assert sorted(t.ids[t.splits == "val"]) == sorted(wv["val"])


def test_webvision_without_any_metadata_has_no_side_text(tmp_path, capsys):
    wv = make_webvision(tmp_path / "wv", json_dirs="none")
    t = read_webvision(wv["root"])
    assert t.side_text is None and len(t) == 16
    assert "no per-query JSON metadata" in capsys.readouterr().err


def test_webvision_bad_json_is_a_logged_skip(wv, capsys):
    bad = wv["json"][("google", "q0002")]
    bad.write_text('[{"id": "000001",\n  "title": "x" "description": 3}]')
    t = read_webvision(wv["root"])
    err = " ".join(capsys.readouterr().err.split())
    assert f"{bad}:2:16: invalid JSON" in err and "skipped side text of query google/q0002" in err
    text = dict(zip(t.ids, t.side_text))
    assert text["google/q0002/000001.jpg"] == "" and text["google/q0001/000001.jpg"] == wv["text"]["google/q0001/000001.jpg"]
    assert text["flickr/q0002/000001.jpg"] == wv["text"]["flickr/q0002/000001.jpg"]


def test_webvision_oversized_json_is_refused_unread(wv, capsys):
    big = wv["json"][("flickr", "q0003")]
    big.write_text(big.read_text() + " " * 1000)  # valid JSON, but over the limit below
    size = big.stat().st_size
    t = read_webvision(wv["root"], max_json_bytes=1000)
    err = " ".join(capsys.readouterr().err.split())
    assert f"{big}: {size} bytes, over the 1000-byte limit" in err and err.count("over the") == 1
    text = dict(zip(t.ids, t.side_text))
    assert text["flickr/q0003/000001.jpg"] == "" and text["flickr/q0004/000001.jpg"] != ""
    with pytest.raises(jsonmeta.MetadataError, match="over the 10-byte limit"):
        jsonmeta.load_json(big, max_bytes=10)
    assert jsonmeta.MAX_JSON_BYTES == 64 * 1024 * 1024


def test_webvision_all_metadata_unreadable_is_fatal(wv):
    for p in wv["json"].values():
        p.write_bytes(b"\xff\xfe{not json")
    with pytest.raises(SinetError, match="no metadata file could be read"):
        read_webvision(wv["root"])


def test_untrusted_metadata_values_are_cleaned():
    entries = jsonmeta.entries_of({"items": [{"id": 7, "title": "bad\x00\ud800 title\n\tend", "description": {"x": 1},
                                               "tags": "a b c"}, {"id": "8", "title": "t" * 5000}]})
    assert jsonmeta.side_texts(["7", "0008", "9"], entries) == ["bad \ufffd title end. a b c", "t" * jsonmeta.MAX_SIDE_TEXT_CHARS, ""]
    assert jsonmeta.entries_of({"123": {"title": "by key"}}) == [{"id": "123", "title": "by key"}]
    assert jsonmeta.entries_of("just a string") == []
    assert jsonmeta.entry_text({"title": "Done!", "description": "next", "tags": [1, None, "x"]}) == "Done! next. 1, x"


def test_deeply_nested_json_is_a_metadata_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(jsonmeta.MetadataError, match="nested too deeply"):
        jsonmeta.load_json(p)


def test_mini_webvision_keeps_first_50_classes_google_only(tmp_path):
    wv = make_webvision(tmp_path / "wv", n_classes=52, google_per_class=1, flickr_per_class=1, val_per_class=1)
    t = _extra_readers()["mini-webvision"](wv["root"], None)
    assert len(t.classes) == 50 and t.classes.names[:2] == ["tench", "goldfish"] and t.classes.names[49] == "class 49"
    assert t.labels.max() == 49 and set(t.subset[t.splits == "train"]) == {f"google/q{c + 1:04d}" for c in range(50)}
    assert int((t.splits == "train").sum()) == 50 and int((t.splits == "val").sum()) == 50
    assert t.provenance["reader"] == "mini-webvision" and t.name == "mini-wv"
    assert dataset_name(f"mini-webvision:{wv['root']}") == "mini-wv" and dataset_name(f"webvision:{wv['root']}") == "wv"
    both = read_mini_webvision(wv["root"], include_flickr=True)
    assert int((both.splits == "train").sum()) == 100 and both.labels.max() == 49
    full = read_webvision(wv["root"])
    assert len(full.classes) == 52 and int((full.splits == "train").sum()) == 104
    # a user class table for all 52 classes is cut to 50
    user = ClassTable.from_names([f"c{i}" for i in range(52)])
    assert read_mini_webvision(wv["root"], user).classes.names == [f"c{i}" for i in range(50)]


def test_webvision_duplicate_first_names_get_their_wnid(tmp_path):
    p = tmp_path / "synsets.txt"
    p.write_text("n02012849 crane\nn03126707 crane\nn01440764 tench, Tinca tinca\nn09999999\n")
    t = read_synsets(p)
    assert t.names == ["crane (n02012849)", "crane (n03126707)", "tench", "n09999999"]


@pytest.mark.parametrize(
    "fname, line, new, message",
    [
        ("train_filelist_google.txt", 2, b"google/q0001/000002.jpg one", "label 'one' is not an integer"),
        ("train_filelist_google.txt", 3, b"google/q0002/000001.jpg", "missing the label column"),
        ("train_filelist_flickr.txt", 2, b"flickr/q0002/000001.jpg 4", "label 4 out of range 0..3"),
        ("train_filelist_flickr.txt", 1, b"google/q0001/000001.jpg 0", "listed twice (first at"),
        ("train_filelist_google.txt", 4, b"google/q0002/000002.jpg 3", "disagrees with"),
        ("train_filelist_google.txt", 4, b"google/q0099/000002.jpg 1", "query folder q0099 is not in"),
        ("val_filelist.txt", 2, b"val_images_256/x.JPEG \xc3\x28", "not UTF-8 text"),
        ("synsets.txt", 3, b"great white shark", "is not a WordNet id like n01440764"),
        ("synsets.txt", 4, b"n01440764 tench again", "duplicate synset n01440764 (first on line 1)"),
        ("queries_synsets_map.txt", 2, b"2", "expected 'query_index class_index'"),
        ("queries_synsets_map.txt", 2, b"2 9", "class 9 out of range 1..4"),
    ],
)
def test_webvision_malformed_lines_name_file_and_line(wv, fname, line, new, message):
    path = wv["root"] / "info" / fname
    _edit(path, line, new)
    with pytest.raises(InputError) as e:
        read_webvision(wv["root"])
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert message in str(e.value)


# --- through the CLI ---------------------------------------------------------------------------------


def _extract(data, out):
    from sinet_cli.app import app

    result = CliRunner().invoke(app, ["extract-features", "--data", data, *TINY, "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return store.open_artifact(out / "features.h5", "features")


def test_extract_features_cli_on_clothing1m_and_webvision(tmp_path):
    c1m = make_clothing1m(tmp_path / "Clothing1M")
    with _extract(f"clothing1m:{c1m['root']}", tmp_path / "c1m") as art:
        ids = list(art.read("ids"))
        assert len(ids) == 38 and sum(i.startswith(CLEAN_ID_PREFIX) for i in ids) == 4
        assert list(art.read("clean_labels")) == list(load_table(f"clothing1m:{c1m['root']}").clean_labels)
        assert list(art.read("classes")) == CLOTHING1M_NAMES
    wv = make_webvision(tmp_path / "wv")
    with _extract(f"webvision:{wv['root']}", tmp_path / "wv-out") as art:
        text = dict(zip(art.read("ids"), art.read("side_text")))
        assert len(text) == 16 and art.read("features").shape[0] == 16
        assert all(text[rel] == s for rel, s in wv["text"].items())
