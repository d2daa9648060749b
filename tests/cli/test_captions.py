"""SYNTHETIC demo captions (load_demo(captions=...), --captions); how --image-text reads them:
tests/unit/test_stage_score_fused.py."""

import numpy as np
import pytest

from sinet_cli.common import load_table
from sinet_cli.datasets import demo
from sinet_cli.datasets.table import OUTSIDE
from sinet_cli.errors import SinetError

NAMES = {"a": [["cat", "kitty"], ["dog"], ["bird", "fowl"]], "b": [["seven"], ["eight"]]}
TEMPLATES = {"a": ("a photo of a {name}", "{name} for sale", "{name}"), "b": ("handwritten digit {name}",)}


def _captions(seed, wrong=0.2, empty=0.1, n=500):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, n)
    src = np.where(np.arange(n) < n - 50, "a", "b")
    y[src == "b"] %= 2
    return y, src, demo.synthetic_captions(y, src, NAMES, "a", wrong, empty, seed, TEMPLATES)


def test_captions_reproducible_by_seed_and_wrong_share_is_the_rate():
    y, src, (cap, status) = _captions(seed=3)
    _, _, (again, status2) = _captions(seed=3)
    _, _, (other, _) = _captions(seed=4)
    assert (cap == again).all() and (status == status2).all()
    assert (cap != other).mean() > 0.5
    assert (status == 1).sum() == 100 and (status == 2).sum() == 50  # exact shares of n = 500
    assert (cap[status == 2] == "").all() and (cap[status != 2] != "").all()

    def names_in(text, src_, k):
        return any(f" {n} " in f" {text.replace(',', ' ')} " for n in NAMES[src_][k])

    for text, yy, s, st in zip(cap, y, src, status):
        if st == 0:  # the TRUE class (junk from source b: its own digit names)
            assert names_in(text, s, yy), text
        elif st == 1:  # another class of the label set
            assert any(names_in(text, "a", k) for k in range(3) if not (s == "a" and k == yy)), text
            if s == "a":
                assert not names_in(text, "a", yy), text


def test_parse_captions():
    assert demo.parse_captions(None) is None and demo.parse_captions("none") is None
    assert demo.parse_captions("synthetic:0.3") == (0.3, 0.0)
    assert demo.parse_captions("synthetic:0.3:0.1") == (0.3, 0.1)
    for bad in ("real:0.2", "synthetic:x", "synthetic:0.8:0.5", "synthetic:1:2:3"):
        with pytest.raises(ValueError):
            demo.parse_captions(bad)


def test_load_demo_captions_leave_labels_and_default_unchanged():
    plain = load_table("demo-mnist", noise="symmetric:0.3+openset:0.1", noise_seed=2)
    cap = load_table("demo-mnist", noise="symmetric:0.3+openset:0.1", noise_seed=2, captions="synthetic:0.2")
    assert plain.side_text is None
    assert (plain.labels == cap.labels).all() and (plain.clean_labels == cap.clean_labels).all()
    assert plain.fingerprint() != cap.fingerprint()
    tr = cap.splits == "train"
    text = cap.side_text
    assert len(text) == len(cap.ids) and (text[~tr] == "").all()
    junk = tr & (cap.clean_labels == OUTSIDE)
    clothing = {n.lower() for k in demo.caption_names(demo.demo_classes("demo")) for n in k}
    # 80% of junk captions describe the junk's own source (Fashion-MNIST garments)
    own = np.mean([any(n in t.lower() for n in clothing) for t in text[junk]])
    assert 0.7 < own <= 1.0
    with pytest.raises(SinetError):
        load_table("manifest:x.tsv", captions="synthetic:0.2")
