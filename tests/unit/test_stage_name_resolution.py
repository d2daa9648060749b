"""Class names resolved in WordNet by themselves (stages.build_graph.resolve_class_names), on real WordNet
through stages.assets. Imports no sinet_cli module (placement of a sinet_cli ClassTable:
tests/cli/test_name_resolution.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stages import assets
from stages import build_graph as stage
from stages.build_graph import name_key, name_words, resolve_class_name, resolve_class_names, same_name


@pytest.fixture(scope="module")
def wn():
    return assets.wordnet()


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


def test_ambiguous_name_alone_takes_the_most_frequent_noun_sense_and_counts_them(wn):
    nouns = wn.synsets("bag", pos="n")
    assert len(nouns) > 1
    r = resolve_class_name("bag", wn)
    assert r.synset == "bag.n.01" and r.choice == "most frequent" and r.runner_up
    assert r.senses == len(nouns) and f"most frequent of {len(nouns)} noun senses: SemCor" in r.describe()
    # a noun sense wins over a more frequent verb sense
    r = resolve_class_name("dress", wn)
    assert r.synset == "dress.n.01" and r.senses == len(wn.synsets("dress", pos="n"))
    r = resolve_class_name("Pullover", wn)
    assert r.senses == 1 and r.choice == r.runner_up == "" and "senses" not in r.describe()


def test_senses_of_every_form_are_pooled_by_frequency(wn):
    # nltk lists the senses of the literal lemma "shoes" (place.n.06, "in someone's shoes") before
    # those of its base form "shoe"; SemCor counts shoe.n.01 27 times, place.n.06 once
    assert wn.synsets("shoes", pos="n")[0].name() == "place.n.06"
    r = resolve_class_name("shoes", wn)
    assert (r.synset, r.lemma, r.choice, r.runner_up) == ("shoe.n.01", "shoe", "most frequent", "place.n.06"), r
    assert "SemCor 27 vs 1" in r.describe()
    assert resolve_class_name("shoes", wn, rule="first").synset == "place.n.06"  # version 1's rule
    assert resolve_class_name("shoe", wn).synset == "shoe.n.01"


def test_semcor_counts_are_nltks(wn):
    lemmas = [lm for w in ("shoe", "shoes", "bag", "glass", "glasses", "mouse", "tiger", "zero", "T-shirt")
              for s in wn.synsets(w, pos="n") for lm in s.lemmas()]
    assert [stage._lemma_count(wn, lm) for lm in lemmas] == [lm.count() for lm in lemmas]
    assert stage._lemma_count(wn, wn.synset("shoe.n.01").lemmas()[0]) == 27


def test_equal_counts_keep_wordnets_order(wn):
    # bikini: the atoll (bikini.n.01) and the swimsuit (bikini.n.02), neither tagged in SemCor
    r = resolve_class_name("bikini", wn)
    assert (r.synset, r.choice, r.runner_up) == ("bikini.n.01", "first listed", "bikini.n.02")


@pytest.mark.parametrize("names, name, synset", [
    (["gloves", "scarf", "socks", "hat"], "gloves", "glove.n.02"),  # alone: baseball_glove.n.01
    (["bikini", "swimsuit", "sarong"], "bikini", "bikini.n.02"),  # alone: the atoll
    (["mouse", "laptop", "keyboard", "monitor"], "mouse", "mouse.n.04"),  # the device
    (["tiger", "lion", "leopard", "cheetah"], "tiger", "tiger.n.02"),  # alone: tiger.n.01, a person
    (["glasses", "sunglasses", "watch", "necklace"], "glasses", "spectacles.n.01"),  # alone: glass.n.01
])
def test_context_chooses_the_sense_closest_to_the_other_classes(wn, names, name, synset):
    alone = resolve_class_name(name, wn)
    assert alone.synset != synset  # the case is one the context decides
    r = resolve_class_names(names, wn)[names.index(name)]
    assert (r.synset, r.choice, r.runner_up) == (synset, "context", alone.synset), r
    assert r.describe().startswith(f"{synset} (") and "context of" in r.describe() and "runner-up" in r.describe()


def test_context_keeps_the_frequent_sense_where_it_fits(wn):
    r = resolve_class_names(["mouse", "hamster", "rat", "squirrel"], wn)[0]
    assert (r.synset, r.choice) == ("mouse.n.01", "most frequent")  # the rodent


def test_context_does_not_take_a_broad_sense(wn):
    # attire.n.01 ("dress" as clothing in general) and coating.n.01 are near every garment
    res = {r.name: r for r in resolve_class_names(["Dress", "Coat", "Shirt", "Skirt", "Sweater"], wn)}
    assert res["Dress"].synset == "dress.n.01" and res["Coat"].synset == "coat.n.01"
    assert res["Dress"].choice == res["Coat"].choice == "most frequent"


def test_weak_context_does_not_override_frequency(wn):
    # among dog and cat, bag.n.07 ("an ugly or ill-tempered woman") is the closest sense, but only by
    # sharing organism.n.01 (Wu-Palmer 0.54, under the floor): bag.n.01 stays
    names, known = ["dog", "cat", "bag"], ["dog.n.01", "cat.n.01", None]
    r = resolve_class_names(names, wn, known)[2]
    assert (r.synset, r.choice, r.runner_up) == ("bag.n.01", "most frequent", "bag.n.07"), r
    assert resolve_class_names(names, wn, known, floor=0.0)[2].synset == "bag.n.07"


def test_classes_placed_by_the_table_are_context_and_not_looked_up(wn):
    res = resolve_class_names(["mouse", "Notebook PC", "Tastatur"], wn, ["", "laptop.n.01", "n03614007"])
    assert res[0].synset == "mouse.n.04" and res[0].choice == "context"
    assert [(r.synset, r.rule) for r in res[1:]] == [("laptop.n.01", "given"), ("keyboard.n.01", "given")]
    assert resolve_class_names(["mouse", "hamster"], wn, [None, None])[0].synset == "mouse.n.01"
    with pytest.raises(ValueError, match="known has 1 entries for 2 names"):
        resolve_class_names(["mouse", "hamster"], wn, [None])
    with pytest.raises(ValueError, match="unknown sense rule"):
        resolve_class_names(["mouse"], wn, rule="gloss")


def test_classes_with_the_same_word_are_not_each_others_context(wn):
    # each "mouse" sees only the laptop; as each other's context both would keep the rodent
    res = resolve_class_names(["mouse", "Mouse", "laptop"], wn)
    assert res[0].synset == res[1].synset == "mouse.n.04"


def test_rules_first_and_frequency_ignore_the_other_classes(wn):
    names = ["mouse", "laptop", "keyboard"]
    assert resolve_class_names(names, wn, rule="frequency")[0].synset == "mouse.n.01"
    assert resolve_class_names(names, wn, rule="first")[0].synset == "mouse.n.01"


def test_wu_palmer_is_nltks(wn):
    syns = [wn.synset(n) for n in ("dog.n.01", "cat.n.01", "shoe.n.01", "attire.n.01", "mouse.n.04", "mouse.n.01",
                                    "tiger.n.01", "coating.n.01", "bikini.n.01", "entity.n.01", "jersey.n.03")]
    W = stage.WuPalmer()(syns, syns + [None])
    expected = np.array([[a.wup_similarity(b) for b in syns] for a in syns])
    np.testing.assert_allclose(W[:, :-1], expected, atol=1e-6)
    assert np.isnan(W[:, -1]).all()
    # by hand: dog.n.01 and cat.n.01 meet at carnivore.n.01 (max_depth 11, so h = 12), 2 edges from
    # dog (dog > canine > carnivore) and 2 from cat (cat > feline > carnivore): 2 h / (2 + 2 + 2 h)
    assert W[0, 1] == pytest.approx(24 / 28)


def test_names_written_with_mixed_separators_or_apostrophes(wn):
    for name, synset in [("sulphur-crested cockatoo", "sulphur-crested_cockatoo.n.01"),
                         ("carpenter's kit", "carpenter's_kit.n.01"),
                         ("German short-haired pointer", "german_short-haired_pointer.n.01")]:
        r = resolve_class_name(name, wn)
        assert (r.synset, r.placed, r.rule) == (synset, False, "compound"), r


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
