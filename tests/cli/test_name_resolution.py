"""Class names of a sinet_cli ClassTable placed in WordNet in view of each other (the name resolution
itself: tests/unit/test_stage_name_resolution.py)."""

from __future__ import annotations

import pytest

from sinet_cli import sideinfo
from stages import build_graph as stage


@pytest.fixture(scope="module")
def wn():
    return sideinfo.wordnet()


def test_build_graph_places_every_class_in_view_of_the_others(wn):
    from sinet_cli.datasets import ClassTable

    table = ClassTable(["mouse", "Notebook PC", "keyboard", "monitors"], ["", "laptop.n.01", "", ""], [None] * 4,
                       [None] * 4, "<test>")
    placement = stage.place_classes(wn, table.names, table.synsets, table.parents, use_parents=True, strict=False)
    e = {x["class"]: x for x in placement.entries}
    assert e["mouse"]["synset"] == "mouse.n.04" and e["mouse"]["choice"] == "context"
    assert e["mouse"]["runner_up"] == "mouse.n.01" and e["mouse"]["evidence"].startswith("context ")
    assert e["Notebook PC"]["source"] == "table" and e["monitors"]["synset"] == "monitor.n.04"
    assert "context of 4 senses" in stage.resolution_summary(placement)
