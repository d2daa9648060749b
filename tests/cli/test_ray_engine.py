"""--engine ray on a local Ray cluster (ray.init(num_cpus=2), once for the module): tiny WebDataset shards
and image files of 32 px, a random-init tiny backbone. Skipped where Ray is not installed."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from fixtures_layouts import score_on_flat_graph
from sinet_cli import store
from sinet_cli.datasets import webdataset as wdr
from sinet_cli.engines import ray_engine
from test_webdataset import CLASSES, TINY, class_table, crawl, features, files_and_shards, jpeg_bytes, raw_tar

ARGS = [*TINY, "--workers", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs; its workers see FAULTS_ENV (set before they start)."""
    ray = pytest.importorskip("ray")
    faults = tmp_path_factory.mktemp("faults")
    os.environ[ray_engine.FAULTS_ENV] = str(faults)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield faults
    ray.shutdown()
    del os.environ[ray_engine.FAULTS_ENV]


def same_features(a: dict, b: dict) -> None:
    for k in ("ids", "labels", "splits", "paths"):
        assert a[k].tolist() == b[k].tolist(), k
    np.testing.assert_allclose(a["features"].astype(np.float32), b["features"].astype(np.float32), atol=2e-3)
    assert a["skipped_ids"] == b["skipped_ids"]


def test_ray_extraction_equals_the_single_process_run_for_shards_and_files(cluster, tmp_path, sinet):
    manifest, shards = files_and_shards(tmp_path)  # 12 JPEGs, as 2 shards and as files
    for data, extra in ((shards, []), (f"manifest:{manifest}", ["--part-rows", "5"])):
        code, _, err = sinet("extract-features", "--data", data, *ARGS, "--out", tmp_path / "local")
        assert code == 0, err
        code, _, err = sinet("extract-features", "--data", data, *ARGS, *extra, "--engine", "ray",
                             "--out", tmp_path / "ray")
        assert code == 0, err
        parts = 2 if data == shards else 3  # one per shard; 12 files by 5
        assert f"12 images in {parts} Ray parts" in err, err
        assert not (tmp_path / "ray" / "features.parts").exists()  # merged, then removed
        same_features(features(tmp_path / "local" / "features.h5"), features(tmp_path / "ray" / "features.h5"))
        # the merged file records what the local run records: either engine finds it up to date
        code, _, err = sinet("extract-features", "--data", data, *ARGS, "--out", tmp_path / "ray")
        assert code == 0 and "up to date" in err, err
        for d in ("local", "ray"):
            (tmp_path / d / "features.h5").unlink()


def test_a_killed_task_is_retried_and_a_failed_part_redone_by_the_next_run_alone(cluster, tmp_path, sinet):
    crawl(tmp_path, shards=3, per_shard=4)
    data = f"webdataset:{tmp_path}/crawl/*.tar"
    code, _, err = sinet("extract-features", "--data", data, *ARGS, "--out", tmp_path / "local")
    assert code == 0, err
    local = features(tmp_path / "local" / "features.h5")

    # the worker running shard 1's task dies on its first attempt: Ray runs it again
    (cluster / "exit-1").touch()
    code, _, err = sinet("extract-features", "--data", data, *ARGS, "--engine", "ray", "--out", tmp_path / "retried")
    assert code == 0, err
    assert not (cluster / "exit-1").exists()  # the fault fired
    same_features(local, features(tmp_path / "retried" / "features.h5"))

    # no retries: the run fails naming the part, keeps the two finished ones
    (cluster / "exit-1").touch()
    out = tmp_path / "killed"
    code, _, err = sinet("extract-features", "--data", data, *ARGS, "--engine", "ray", "--ray-retries", "0",
                         "--out", out)
    assert code == 1 and err.count("\n") == 1, err
    assert "1 of 3 parts failed after 0 retries, the first: part 1 (" in err and "00001.tar" in err, err
    assert sorted(p.name for p in (out / "features.parts").glob("*.h5")) == ["part-000000.h5", "part-000002.h5"]
    assert not (out / "features.h5").exists()
    # the next run computes part 1 only: a task for part 0 or 2 would have used up its fault file
    (cluster / "exit-0").touch()
    (cluster / "exit-2").touch()
    code, _, err = sinet("extract-features", "--data", data, *ARGS, "--engine", "ray", "--out", out)
    assert code == 0 and "2 of 3 parts already done, not redone" in err, err
    assert (cluster / "exit-0").exists() and (cluster / "exit-2").exists()
    (cluster / "exit-0").unlink()
    (cluster / "exit-2").unlink()
    merged = features(out / "features.h5")
    same_features(local, merged)  # nothing lost, nothing twice
    assert len(set(merged["ids"].tolist())) == len(merged["ids"]) == 12


def test_corrupt_members_are_skipped_and_named(cluster, tmp_path, sinet):
    members = []
    for k in range(6):
        members += [(f"{k:09d}.jpg", b"\xff\xd8\xff\xe0 not a jpeg" if k == 4 else jpeg_bytes(k)),
                    (f"{k:09d}.json", json.dumps({"label": CLASSES[k % 3]}).encode())]
    bad_image = raw_tar(tmp_path / "s" / "00000.tar", members)
    broken = raw_tar(tmp_path / "s" / "00001.tar", [(f"{k:09d}.{e}", jpeg_bytes(k) if e == "jpg" else
                                                      json.dumps({"label": CLASSES[k % 3]}).encode())
                                                     for k in range(6, 10) for e in ("jpg", "json")])
    raw = bytearray(broken.read_bytes())
    at = raw.find(b"000000007.jpg")
    raw[at + 100 : at + 108] = b"garbage!"  # sample 7's image header: its checksum fails
    broken.write_bytes(bytes(raw))
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/s/*.tar", *ARGS, "--engine", "ray",
                         "--out", tmp_path / "out")
    assert code == 0, err
    assert f"{broken}: corrupt tar header at byte {at} (name field '000000007.jpg')" in err
    assert "skipped image 00000/000000004" in err
    f = features(tmp_path / "out" / "features.h5")
    assert f["ids"].tolist() == [f"{k // 6:05d}/{k:09d}" for k in (0, 1, 2, 3, 5, 6, 8, 9)]
    assert f["skipped_ids"] == ["00000/000000004"]
    assert f["skipped_reasons"][0].startswith(f"{bad_image}#000000004.jpg: cannot decode image")


def test_rescore_on_ray_adds_the_new_shards_only_and_leaves_the_recorded_ones_unopened(cluster, tmp_path, sinet,
                                                                                      monkeypatch):
    classes = class_table(tmp_path)
    crawl(tmp_path, shards=2, per_shard=6)
    art = tmp_path / "art"
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/crawl/*.tar", "--classes", classes,
                         *ARGS, "--engine", "ray", "--out", art)
    assert code == 0, err
    score_on_flat_graph(art, CLASSES, sinet)
    before = features(art / "features.h5")

    opened: list[str] = []
    real_open = wdr.open_shard
    monkeypatch.setattr(wdr, "open_shard", lambda shard: opened.append(shard) or real_open(shard))
    crawl(tmp_path, shards=2, per_shard=6, start=12, folder="crawl")  # crawl/00002.tar, 00003.tar: samples 12-23
    everything = f"webdataset:{tmp_path}/crawl/*.tar"
    code, _, err = sinet("rescore", "--data", everything, "--classes", classes, "--out", art, "--workers", "0",
                         "--device", "cpu", "--engine", "ray")
    assert code == 0, err
    assert "appended 12 new images" in err and "scoring 12 new" in err, err
    assert sorted(set(opened)) == [f"{tmp_path}/crawl/00002.tar", f"{tmp_path}/crawl/00003.tar"]  # in this process
    after = features(art / "features.h5")
    assert after["ids"][:12].tolist() == before["ids"].tolist()
    assert after["ids"][12:].tolist() == [f"{k // 6:05d}/{k:09d}" for k in range(12, 24)]
    np.testing.assert_array_equal(after["features"][:12], before["features"])
    assert not (art / "rescore.parts").exists()
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert sorted(s.read("ids")) == sorted(after["ids"])

    # the new rows are what a single-process extraction of those shards gives
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/crawl/{{00002,00003}}.tar",
                         "--classes", classes, *ARGS, "--out", tmp_path / "fresh")
    assert code == 0, err
    np.testing.assert_allclose(features(tmp_path / "fresh" / "features.h5")["features"].astype(np.float32),
                               after["features"][12:].astype(np.float32), atol=2e-3)

    # again: every shard is recorded, none is opened, nothing changes
    opened.clear()
    for engine in ("ray", "local"):
        code, _, err = sinet("rescore", "--data", everything, "--classes", classes, "--out", art, "--workers", "0",
                             "--device", "cpu", "--engine", engine)
        assert code == 0 and "nothing new" in err and "all 4 shards already in it" in err, err
    assert opened == []


def test_without_ray_the_engine_is_a_one_line_error(tmp_path, sinet, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    crawl(tmp_path, shards=1, per_shard=3)
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/crawl/*.tar", *ARGS,
                         "--engine", "ray", "--out", tmp_path / "out")
    assert code == 1 and err == "sinet: error: --engine ray needs Ray, which is not installed: pip install " \
                               "'sinet[ray]'\n", err
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/crawl/*.tar", *ARGS,
                         "--engine", "spark", "--out", tmp_path / "out")
    assert code == 1 and "--engine 'spark': choose local or ray" in err, err


def test_parts_are_shards_in_order_or_runs_of_rows(tmp_path):
    from sinet_cli.common import load_table

    crawl(tmp_path, shards=3, per_shard=4)
    table = load_table(f"webdataset:{tmp_path}/crawl/*.tar")
    parts = ray_engine.plan_parts(table, np.array([11, 1, 2, 9, 8]))
    assert [p.positions.tolist() for p in parts] == [[1, 2], [8, 9, 11]]
    assert [p.name for p in parts] == [f"{tmp_path}/crawl/00000.tar", f"{tmp_path}/crawl/00002.tar"]
    table.provenance = {"reader": "manifest"}
    assert [p.positions.tolist() for p in ray_engine.plan_parts(table, np.arange(7), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
