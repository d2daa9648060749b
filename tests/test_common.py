"""sinet_cli.common: the options the commands share."""

import pytest
import torch

from sinet_cli.common import resolve_device
from sinet_cli.errors import SinetError


def test_resolve_device_names_what_is_wrong(monkeypatch):
    assert resolve_device("cpu") == "cpu" and resolve_device("cpu:0") == "cpu"
    for bad, says in (("foo", "not a device"), ("cuda:x", "not a device"), ("mps", "runs on cpu or cuda")):
        with pytest.raises(SinetError, match=says):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(SinetError, match="CUDA is not available"):
        resolve_device("cuda")
    # a machine with one GPU: cuda:1 is refused before any work
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(SinetError, match="has 1 CUDA device"):
        resolve_device("cuda:1")
