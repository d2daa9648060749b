import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from sinet_cli import store
from sinet_cli.store import ArtifactError


def _features(n=8, d=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "ids": [f"img{i}" for i in range(n)],
        "labels": rng.integers(0, c, n),
        "features": rng.normal(size=(n, d)).astype(np.float32),
        "classes": [f"c{i}" for i in range(c)],
    }


def test_write_and_read_roundtrip(tmp_path):
    path = tmp_path / "features.h5"
    data = _features()
    fp = store.write_artifact(path, "features", data, {"a": 1}, {"dataset": "x"})
    with store.open_artifact(path, "features") as art:
        assert art.fingerprint == fp
        assert art.params == {"a": 1}
        assert art.inputs == {"dataset": "x"}
        assert list(art.read("ids")) == data["ids"]
        np.testing.assert_array_equal(art.read("labels"), data["labels"])
        assert art.dims == {"N": 8, "D": 4, "C": 3}
        assert art.attr("package_version")
        assert art.attr("created")
    assert not (tmp_path / "features.h5.partial").exists()


def test_fingerprint_follows_content(tmp_path):
    a = store.write_artifact(tmp_path / "a.h5", "features", _features(seed=0), {}, {})
    b = store.write_artifact(tmp_path / "b.h5", "features", _features(seed=0), {}, {})
    c = store.write_artifact(tmp_path / "c.h5", "features", _features(seed=1), {}, {})
    d = store.write_artifact(tmp_path / "d.h5", "features", _features(seed=0), {"k": 2}, {})
    assert a == b
    assert a != c and a != d


def test_up_to_date_checks_params_and_inputs(tmp_path):
    path = tmp_path / "f.h5"
    assert not store.is_up_to_date(path, "features", {"a": 1}, {"x": "1"})
    store.write_artifact(path, "features", _features(), {"a": 1}, {"x": "1"})
    assert store.is_up_to_date(path, "features", {"a": 1}, {"x": "1"})
    assert not store.is_up_to_date(path, "features", {"a": 2}, {"x": "1"})
    assert not store.is_up_to_date(path, "features", {"a": 1}, {"x": "2"})
    assert not store.is_up_to_date(path, "graph", {"a": 1}, {"x": "1"})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.__delitem__("labels"), "missing dataset 'labels'"),
        (lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.zeros(5, int))), "N=5"),
        (lambda f: f.attrs.__setitem__("schema_version", 99), "schema version 99"),
        (lambda f: f.attrs.__setitem__("kind", "graph"), "is a graph artifact"),
        (lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.zeros(8))), "expected 2 dims"),
    ],
)
def test_load_validates_and_names_file(tmp_path, mutate, message):
    path = tmp_path / "features.h5"
    store.write_artifact(path, "features", _features(), {}, {})
    with h5py.File(path, "r+") as f:
        mutate(f)
    with pytest.raises(ArtifactError) as e:
        store.open_artifact(path, "features")
    assert str(path) in str(e.value) and message in str(e.value)


def test_not_hdf5_and_missing(tmp_path):
    bad = tmp_path / "features.h5"
    bad.write_text("hello")
    with pytest.raises(ArtifactError, match="not a readable HDF5"):
        store.open_artifact(bad, "features")
    with pytest.raises(ArtifactError, match="not found"):
        store.open_artifact(tmp_path / "nope.h5", "features")


def test_killed_writer_leaves_earlier_artifact_intact(tmp_path):
    path = tmp_path / "features.h5"
    fp = store.write_artifact(path, "features", _features(), {"v": 1}, {})
    before = path.read_bytes()
    # a second writer streams rows forever; we SIGKILL it midway
    script = textwrap.dedent(
        f"""
        import numpy as np, sys, time
        from sinet_cli import store
        w = store.ArtifactWriter({str(path)!r}, "features", {{"v": 2}}, {{}})
        for i in range(10_000):
            w.append_rows({{"ids": [f"x{{i}}"], "labels": [0], "features": np.ones((1, 4), np.float32)}})
            if i == 20:
                print("midway", flush=True)
            time.sleep(0.01)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "midway"
    assert (tmp_path / "features.h5.partial").exists()
    proc.kill()
    proc.wait()
    assert path.read_bytes() == before
    with store.open_artifact(path, "features") as art:
        assert art.fingerprint == fp and art.params == {"v": 1}


def test_writer_resume_truncates_to_committed_rows(tmp_path):
    path = tmp_path / "f.h5"
    w = store.ArtifactWriter(path, "features", {"p": 1}, {"i": "x"})
    w.append_rows({"ids": ["a", "b"], "labels": [0, 1], "features": np.ones((2, 3))})
    # a kill between dataset writes: one dataset got rows the count does not cover
    w.file["ids"].resize(3, axis=0)
    w.abort(keep_partial=True)
    w2 = store.ArtifactWriter(path, "features", {"p": 1}, {"i": "x"}, mode="resume")
    assert w2.resumed and w2.rows_committed == 2
    assert w2.file["ids"].shape[0] == 2
    w2.abort(keep_partial=True)
    # other params: the partial is not reused
    w3 = store.ArtifactWriter(path, "features", {"p": 2}, {"i": "x"}, mode="resume")
    assert not w3.resumed and w3.rows_committed == 0
    w3.abort()


def test_append_mode_keeps_final_until_commit(tmp_path):
    path = tmp_path / "s.h5"
    w = store.ArtifactWriter(path, "features", {}, {})
    w.append_rows({"ids": ["a"], "labels": [0], "features": np.ones((1, 2))})
    w.write("classes", ["c0"])
    w.commit()
    before = path.read_bytes()
    w = store.ArtifactWriter(path, "features", {}, {"new": "1"}, mode="append")
    w.append_rows({"ids": ["b"], "labels": [0], "features": np.zeros((1, 2))})
    assert path.read_bytes() == before
    w.commit()
    with store.open_artifact(path, "features") as art:
        assert list(art.read("ids")) == ["a", "b"]
        assert art.inputs == {"new": "1"}


def test_unknown_dataset_name_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not part of the features schema"):
        store.write_artifact(tmp_path / "f.h5", "features", {**_features(), "bogus": [1]}, {}, {})
    assert not (tmp_path / "f.h5").exists()


def test_json_written_atomically(tmp_path):
    store.write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
