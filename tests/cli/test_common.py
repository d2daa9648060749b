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


def test_without_data_a_dataset_is_required_and_out_names_the_artifacts(tmp_path, monkeypatch):
    from pathlib import Path

    from sinet_cli.common import artifact_dir, load_table

    with pytest.raises(SinetError, match=r"^--data is required, e\.g\. --data demo or --data imagefolder:DIR$"):
        load_table(None)
    with pytest.raises(SinetError, match="pass --out ART"):
        artifact_dir(None, None)
    assert artifact_dir(tmp_path / "a", None) == tmp_path / "a"  # --out alone is enough
    monkeypatch.setenv("SINET_ARTIFACTS", str(tmp_path))
    assert artifact_dir(None, "imagefolder:/data/crawl") == Path(tmp_path) / "crawl"
    assert artifact_dir(None, "demo") == Path(tmp_path) / "demo"


def test_missing_val_split_reads_the_splits(tmp_path):
    import numpy as np

    from sinet_cli import store
    from sinet_cli.common import missing_val_split

    def features(path, splits, n=2):
        data = {"ids": [f"i{k}" for k in range(n)], "labels": np.zeros(n, np.int64),
                "features": np.ones((n, 2), np.float32), "classes": ["a"]}
        if splits is not None:
            data["splits"] = splits
        store.write_artifact(path, "features", data, {}, {})
        return path

    assert missing_val_split("features", features(tmp_path / "a.h5", ["train", "val"])) is None
    only_train = features(tmp_path / "b.h5", ["train", "train"])
    assert missing_val_split("features", only_train) == str(only_train)
    no_splits = features(tmp_path / "c.h5", None)
    assert missing_val_split("features", no_splits) == str(no_splits)  # no splits: every row is train
    assert missing_val_split("features", tmp_path / "missing.h5") is None  # the command's own error says it
    assert missing_val_split("images", tmp_path / "x.h5", "demo") is None  # the demo has a clean val split
    root = tmp_path / "crawl"
    for name in ("a/1.png", "b/2.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    assert missing_val_split("images", tmp_path / "x.h5", f"imagefolder:{root}") == f"--data imagefolder:{root}"


def test_plain_keeps_crawl_strings_from_steering_a_terminal():
    from sinet_cli.console import plain

    assert plain("a\x1b[31mred\x1b[0m\nb\tc\x1b]0;title\x07 d") == "ared b c d"
    assert plain("[bold]x[/bold] <b>") == "[bold]x[/bold] <b>"  # markup stays literal text
    assert plain("abcdefgh", 5) == "abcd…" and plain("abc", 5) == "abc"
