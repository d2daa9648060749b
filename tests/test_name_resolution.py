"""Class names resolved in WordNet by themselves (stages.build_graph.resolve_class_name), on real WordNet."""

from __future__ import annotations

import pytest

from sinet_cli.commands import graph as cmd
from stages import build_graph as stage
from stages.build_graph import name_key, name_words, resolve_class_name, same_name


@pytest.fixture(scope="module")
def wn():
    return cmd._wordnet()


def syn(wn, ident: str) -> str:
    """The canonical name of a synset (``tee_shirt.n.01`` is WordNet's ``jersey.n.03``)."""
    return wn.synset(ident).name()


# -- normalization -------------------------------------------------------------------------------


def test_name_words_and_keys():
    assert name_words("T-Shirt") == name_words("t_shirt") == name_words("T shirt") == ["t", "shirt"]
    assert name_words("Men's  Ankle-Boots") == ["men", "ankle", "boots"]
    assert name_words("___") == [] and name_words("Größe 42") == ["größe", "42"]
    assert name_key("Down Coat") == name_key("down_coat") == name_key("Downcoat") == "downcoat"
    for a, b in [("T-shirt", "T-Shirt"), ("t_shirt", "T-Shirt"), ("tshirt", "T-Shirt"), ("T-shirts", "T-Shirt"),
                 ("Down Coat", "Downcoat"), ("downcoat", "Downcoat"), ("Dresses", "Dress"), ("dress", "Dresses")]:
        assert same_name(a, b) and same_name(b, a), (a, b)
    for a, b in [("Shirt", "T-Shirt"), ("Coat", "Downcoat"), ("Suit", "Sweater"), ("", ""), ("---", "---")]:
        assert not same_name(a, b), (a, b)


# -- each spelling resolves to the right synset ----------------------------------------------------


@pytest.mark.parametrize("name", ["T-shirt", "T-Shirt", "t_shirt", "tshirt", "TSHIRT", "tee shirt", "Tee_Shirt"])
def test_t_shirt_spellings(wn, name):
    r = resolve_class_name(name, wn)
    assert r.synset == syn(wn, "tee_shirt.n.01") and not r.placed, r
    assert r.lemma in ("T-shirt", "tee_shirt") and r.rule in ("lemma", "compound")


@pytest.mark.parametrize("name, synset, lemma", [
    ("sneakers", "sneaker.n.01", "sneaker"),
    ("Sneaker", "sneaker.n.01", "sneaker"),
    ("dresses", "dress.n.01", "dress"),
    ("Pullover", "pullover.n.01", "pullover"),
    ("Trouser", "trouser.n.01", "trouser"),
    ("trousers", "trouser.n.01", "trouser"),
    ("sandal", "sandal.n.01", "sandal"),
    ("Knitwear", "knitwear.n.01", "knitwear"),
    ("Windbreaker", "windbreaker.n.01", "windbreaker"),
    ("running shoes", "running_shoe.n.01", "running_shoe"),
    ("0", "zero.n.02", "0"),
    ("7", "seven.n.01", "7"),
    ("seven", "seven.n.01", "seven"),
])
def test_plain_names_plurals_and_digits(wn, name, synset, lemma):
    r = resolve_class_name(name, wn)
    assert (r.synset, r.placed, r.lemma) == (syn(wn, synset), False, lemma), r
    assert r.name == name


@pytest.mark.parametrize("name, head, modifier, rule", [
    ("ankle_boot", "boot.n.01", "ankle", "head noun"),
    ("Ankle boot", "boot.n.01", "ankle", "head noun"),
    ("ankle-boots", "boot.n.01", "ankle", "head noun"),
    ("Down Coat", "coat.n.01", "down", "head noun"),
    ("Downcoat", "coat.n.01", "down", "closed compound"),
    ("black t-shirt", "tee_shirt.n.01", "black", "head noun"),
    ("mens_tshirts", "tee_shirt.n.01", "mens", "head noun"),
])
def test_multiword_names_sit_below_their_head_noun(wn, name, head, modifier, rule):
    r = resolve_class_name(name, wn)
    assert (r.synset, r.placed, r.modifier, r.rule) == (syn(wn, head), True, modifier, rule), r
    assert "placed below" in r.describe() and r.synset in r.describe()


def test_a_compound_lemma_wins_over_its_head(wn):
    # running_shoe is a WordNet lemma: the class is that synset, not a kind of shoe
    r = resolve_class_name("Running-Shoe", wn)
    assert r.synset == "running_shoe.n.01" and not r.placed and r.rule == "compound"


def test_alternatives_take_the_first_that_resolves(wn):
    r = resolve_class_name("T-shirt/top", wn)  # Fashion-MNIST's class 0
    assert r.synset == syn(wn, "tee_shirt.n.01") and r.part == "T-shirt" and not r.placed
    r = resolve_class_name("Zorblax / sandals", wn)
    assert r.synset == "sandal.n.01" and r.part == "sandals"


def test_synset_ids_as_names(wn):
    assert resolve_class_name("n02084071", wn).synset == "dog.n.01"  # ImageNet-style folder name
    r = resolve_class_name("dog.n.01", wn)
    assert (r.synset, r.rule) == ("dog.n.01", "synset id")
    assert resolve_class_name("n99999999", wn).synset is None


def test_ambiguous_name_takes_the_first_noun_sense_and_counts_them(wn):
    nouns = wn.synsets("bag", pos="n")
    assert len(nouns) > 1
    r = resolve_class_name("bag", wn)
    assert r.synset == nouns[0].name() == "bag.n.01"
    assert r.senses == len(nouns) and f"1st of {len(nouns)} noun senses" in r.describe()
    # a noun sense wins over a more frequent verb sense
    r = resolve_class_name("dress", wn)
    assert r.synset == "dress.n.01" and r.senses == len(wn.synsets("dress", pos="n"))
    assert resolve_class_name("Pullover", wn).senses == 1 and "senses" not in resolve_class_name("Pullover", wn).describe()


@pytest.mark.parametrize("name, note", [
    ("Zorblax", "not in WordNet"),        # a made-up brand
    ("Kleid", "not in WordNet"),          # German
    ("连衣裙", "not in WordNet"),          # Chinese
    ("hoodie", "not in WordNet"),         # newer than WordNet 3.0
    ("___", "no letters or digits"),
    ("casual", "no noun sense; adjective"),
    ("knitted", "no noun sense; verb"),   # not split into knit + ted
    ("class_01", "ends in a number"),
    ("iphone 12", "ends in a number"),
])
def test_unknown_names_resolve_to_nothing_and_say_why(wn, name, note):
    r = resolve_class_name(name, wn)
    assert r.synset is None and not r.placed and r.lemma == "", r
    assert note in r.note and r.describe().startswith("unresolved")

