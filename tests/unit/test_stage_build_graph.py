"""stages.build_graph: S_w on real WordNet against nltk, taxonomy and deep-chain distances, eq. 2 and
eq. 3 by hand. Imports no sinet_cli module (WordNet through stages.assets; the command, and the stage on
the demo's class table: tests/cli/test_build_graph.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages import assets
from stages import build_graph as stage


@pytest.fixture(scope="module")
def wn():
    return assets.wordnet()


# -- S_w on real WordNet -----------------------------------------------------------------------


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
