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


# -- incremental fingerprints and string storage ----------------------------------------------


def _reference_fingerprint(path):
    """What a full re-read of the committed file computes (store._content_fingerprint)."""
    with h5py.File(path, "r") as f:
        return store._content_fingerprint(f), str(f.attrs["fingerprint"])


def _rows(start, n, d=3, long=False):
    ids = np.array([f"img{i}" + ("x" * 300 if long and i % 2 else "") for i in range(start, start + n)])
    return {"ids": ids, "labels": np.arange(start, start + n) % 3, "features": np.full((n, d), start, np.float16),
            "splits": np.where(np.arange(n) % 4 == 0, "val", "train"), "paths": [f"dir/é{i}.jpg" for i in range(n)]}


def test_incremental_fingerprint_equals_full_reread(tmp_path):
    path = tmp_path / "f.h5"
    w = store.ArtifactWriter(path, "features", {"p": 1}, {"i": "x"})
    w.append_rows(_rows(0, 5))
    w.append_rows(_rows(5, 7))  # wider ids than the first block's: same dataset
    w.write("classes", ["c0", "c1", "ç2"])
    fp = w.commit()
    ref, stored = _reference_fingerprint(path)
    assert fp == ref == stored
    # the same content in one block gives the same fingerprint (no dependence on block sizes)
    one = {k: np.concatenate([np.asarray(a), np.asarray(b)]) for (k, a), b in
           zip(_rows(0, 5).items(), _rows(5, 7).values())}
    w = store.ArtifactWriter(tmp_path / "g.h5", "features", {"p": 1}, {"i": "x"})
    w.append_rows(one)
    w.write("classes", ["c0", "c1", "ç2"])
    assert w.commit() == fp
    # and write_artifact (whole datasets) too
    assert store.write_artifact(tmp_path / "h.h5", "features", {**one, "classes": ["c0", "c1", "ç2"]},
                                {"p": 1}, {"i": "x"}) == fp
    # any changed value changes it
    one["paths"][3] = "dir/other.jpg"
    assert store.write_artifact(tmp_path / "k.h5", "features", {**one, "classes": ["c0", "c1", "ç2"]},
                                {"p": 1}, {"i": "x"}) != fp


def test_strings_fixed_width_widened_or_variable_length_read_back(tmp_path):
    path = tmp_path / "f.h5"
    w = store.ArtifactWriter(path, "features", {}, {})
    w.append_rows(_rows(0, 4))
    assert h5py.check_string_dtype(w.file["ids"].dtype).length == store.FIXED_STR_MIN
    w.append_rows({**_rows(4, 3), "ids": np.array(["a" * 40, "b", "ü" * 30])})  # widened to 64 bytes
    assert h5py.check_string_dtype(w.file["ids"].dtype).length == 64
    w.append_rows(_rows(7, 4, long=True))  # 300+ bytes: variable-length from here on
    assert h5py.check_string_dtype(w.file["ids"].dtype).length is None
    w.write("classes", ["c0", "c1", "c2"])
    fp = w.commit()
    assert fp == _reference_fingerprint(path)[0]
    want = list(_rows(0, 4)["ids"]) + ["a" * 40, "b", "ü" * 30] + list(_rows(7, 4, long=True)["ids"])
    with store.open_artifact(path, "features") as art:
        assert list(art.read("ids")) == want
        assert art.read("ids", slice(5, 7)).tolist() == ["b", "ü" * 30]
        assert art.read("ids", 6) == "ü" * 30
        assert art.read("paths")[2] == "dir/é2.jpg"
        assert [r["splits"].tolist() for _, r in art.iter_rows(["splits"], 8)][0][:2] == ["val", "train"]
    assert not any(k.endswith(".widening") for k in h5py.File(path, "r").keys())


def test_fingerprint_after_resume_and_append(tmp_path):
    path = tmp_path / "f.h5"
    w = store.ArtifactWriter(path, "features", {"p": 1}, {"i": "x"}, mode="resume")
    w.append_rows(_rows(0, 5))
    w.append_rows(_rows(5, 5))
    w.abort(keep_partial=True)  # killed after two blocks
    w = store.ArtifactWriter(path, "features", {"p": 1}, {"i": "x"}, mode="resume")
    assert w.resumed and w.rows_committed == 10
    w.append_rows(_rows(10, 5))
    w.write("classes", ["c0", "c1", "c2"])
    fp = w.commit()
    assert fp == _reference_fingerprint(path)[0]
    one = {k: np.concatenate([np.asarray(r[k]) for r in (_rows(0, 5), _rows(5, 5), _rows(10, 5))]) for k in _rows(0, 1)}
    assert store.write_artifact(tmp_path / "one.h5", "features", {**one, "classes": ["c0", "c1", "c2"]},
                                {"p": 1}, {"i": "x"}) == fp
    # append mode: the final file is copied and grown
    w = store.ArtifactWriter(path, "features", {"p": 1}, {"i": "x"}, mode="append")
    w.append_rows(_rows(15, 3))
    fp2 = w.commit()
    assert fp2 == _reference_fingerprint(path)[0] != fp
    with store.open_artifact(path, "features") as art:
        assert list(art.read("ids")) == [f"img{i}" for i in range(18)]


def test_resume_finishes_an_interrupted_widening(tmp_path):
    path = tmp_path / "f.h5"
    w = store.ArtifactWriter(path, "features", {}, {}, mode="resume")
    w.append_rows(_rows(0, 4))
    # killed inside _widen after the old dataset was deleted, before the copy got its name
    w.file.move("ids", "ids" + store._WIDENING)
    w.abort(keep_partial=True)
    w = store.ArtifactWriter(path, "features", {}, {}, mode="resume")
    assert "ids" in w.file and "ids.widening" not in w.file
    w.append_rows(_rows(4, 2))
    w.write("classes", ["c0", "c1", "c2"])
    fp = w.commit()
    assert fp == _reference_fingerprint(path)[0]
    with store.open_artifact(path, "features") as art:
        assert list(art.read("ids")) == [f"img{i}" for i in range(6)]


def test_variable_length_files_of_older_sinet_read_and_append(tmp_path):
    """Files whose strings are HDF5 variable-length (sinet before fixed-width strings) read as
    before, grow with appended rows, and fingerprint as the same content stored fixed-width."""
    path = tmp_path / "old.h5"
    rows = _rows(0, 6)
    with h5py.File(path, "w") as f:
        f.attrs.update({"kind": "features", "schema_version": store.SCHEMA_VERSION, "params": "{}",
                        "inputs": "{}", "rows_committed": 6, "fingerprint": "old"})
        for k in ("ids", "splits", "paths"):
            f.create_dataset(k, data=np.asarray(rows[k], dtype=object), dtype=store.STR_DTYPE, maxshape=(None,))
        f.create_dataset("labels", data=rows["labels"], maxshape=(None,))
        f.create_dataset("features", data=rows["features"], maxshape=(None, 3))
        f.create_dataset("classes", data=np.array(["c0", "c1", "c2"], dtype=object), dtype=store.STR_DTYPE)
    with store.open_artifact(path, "features") as art:
        assert list(art.read("ids")) == list(rows["ids"])
        assert art.read("paths", 1) == "dir/é1.jpg"
    w = store.ArtifactWriter(path, "features", {}, {}, mode="append")
    w.append_rows(_rows(6, 2))
    fp = w.commit()
    assert fp == _reference_fingerprint(path)[0]
    with h5py.File(path, "r") as f:
        assert h5py.check_string_dtype(f["ids"].dtype).length is None  # still variable-length
    both = {k: np.concatenate([np.asarray(rows[k]), np.asarray(_rows(6, 2)[k])]) for k in rows}
    assert store.write_artifact(tmp_path / "new.h5", "features", {**both, "classes": ["c0", "c1", "c2"]}, {}, {}) == fp
    with store.open_artifact(path, "features") as art:
        assert list(art.read("ids")) == [f"img{i}" for i in range(6)] + ["img6", "img7"]


def test_string_fingerprint_keeps_value_boundaries(tmp_path):
    def fp(ids, name):
        data = {**_features(n=2), "ids": ids}
        return store.write_artifact(tmp_path / name, "features", data, {}, {})

    assert fp(["ab", "c"], "a.h5") != fp(["a", "bc"], "b.h5")
    assert fp(["", "abc"], "c.h5") != fp(["abc", ""], "d.h5")
    assert fp(["ab", "c"], "e.h5") == fp(np.array([b"ab", b"c"]), "f.h5")


def test_prefetched_rows_equal_plain_reads_and_close_early(tmp_path):
    path = tmp_path / "f.h5"
    store.write_artifact(path, "features", _features(n=23), {}, {})
    with store.open_artifact(path, "features") as a:
        plain = list(a.iter_rows(["ids", "labels", "features"], 5))
        ahead = list(a.iter_rows(["ids", "labels", "features"], 5, prefetch=True))
        assert [s for s, _ in ahead] == [0, 5, 10, 15, 20]
        for (_, p), (_, q) in zip(plain, ahead):
            assert p.keys() == q.keys() and all(np.array_equal(p[k], q[k]) for k in p)
        rows = a.iter_rows(["ids"], 5, prefetch=True)
        assert next(rows)[0] == 0
        rows.close()  # waits for the block read ahead; the file is still usable after
        assert a.read("ids")[22] == "img22"
        with pytest.raises(ArtifactError, match="missing dataset 'nope'"):
            list(a.iter_rows(["ids", "nope"], 5, prefetch=True))


def test_background_appender_writes_what_append_rows_writes(tmp_path):
    fps = []
    for i, background in enumerate((False, True)):
        w = store.ArtifactWriter(tmp_path / f"f{i}.h5", "features", {"p": 1}, {"i": "x"})
        if background:
            with store.BackgroundAppender(w) as appender:
                appender.append(_rows(0, 5))
                appender.append(_rows(5, 7))
        else:
            w.append_rows(_rows(0, 5))
            w.append_rows(_rows(5, 7))
        w.write("classes", ["c0", "c1", "c2"])
        fps.append(w.commit())
    assert fps[0] == fps[1] == _reference_fingerprint(tmp_path / "f1.h5")[0]
    # a block's error is raised by the next append (or on leaving), not lost
    w = store.ArtifactWriter(tmp_path / "bad.h5", "features", {}, {})
    bad = {**_rows(0, 5), "labels": np.zeros(4, dtype=np.int64)}
    with pytest.raises(ArtifactError, match="unequal row counts"):
        with store.BackgroundAppender(w) as appender:
            appender.append(bad)
    with pytest.raises(ArtifactError, match="unequal row counts"):
        with store.BackgroundAppender(w) as appender:
            appender.append(bad)
            appender.append(_rows(0, 5))
    w.abort()
    assert not (tmp_path / "bad.h5").exists()


def test_take_reads_the_rows_asked_for(tmp_path):
    path = tmp_path / "f.h5"
    data = _features(n=23, d=3)
    store.write_artifact(path, "features", data, {}, {})
    with store.open_artifact(path, "features") as a:
        for positions in ([0, 4, 5, 19, 22], [7], [], list(range(23))):
            got = a.take("features", np.array(positions, dtype=np.int64), 5)
            np.testing.assert_array_equal(got, data["features"][positions])
            assert got.shape == (len(positions), 3)
        for bad in ([3, 2], [1, 1], [23], [-1]):
            with pytest.raises(ValueError, match="sorted, unique and in"):
                a.take("features", np.array(bad), 5)


def test_match_ids_finds_rows_and_misses_of_any_sortable_ids():
    have = np.array(["c", "a", "d", "a", "b"])
    rows, found = store.match_ids(have, np.array(["a", "x", "d", "b", "z"]))
    assert found.tolist() == [True, False, True, True, False]
    assert rows[found].tolist() == [1, 2, 4]  # of the repeated "a", the first row
    rows, found = store.match_ids(np.array([2**63 - 1, 5, -7], dtype=np.int64), np.array([-7, 2**63 - 1, 6]))
    assert found.tolist() == [True, True, False] and rows[found].tolist() == [2, 0]
    rows, found = store.match_ids(np.array([], dtype=str), np.array(["a"]))
    assert found.tolist() == [False]


def test_rows_of_ids_names_the_first_missing_id(tmp_path):
    assert store.rows_of_ids(tmp_path / "f.h5", np.array(["a", "b"]), np.array(["b", "a"]), "fix").tolist() == [1, 0]
    with pytest.raises(store.ArtifactError, match=r"f.h5: no row for image 'q' \(2 of 3 missing\); rerun it"):
        store.rows_of_ids(tmp_path / "f.h5", np.array(["a", "b"]), np.array(["q", "a", "r"]), "rerun it")


def test_check_classes_names_the_first_difference():
    store.check_classes("a.h5", ["x", "y"], "b.h5", np.array(["x", "y"]), "fix")
    with pytest.raises(store.ArtifactError, match=r"a.h5 has 2 classes but b.h5 has 3 \(only in b.h5: 'z'\); rebuild"):
        store.check_classes("a.h5", ["x", "y"], "b.h5", ["x", "y", "z"], "rebuild")
    with pytest.raises(store.ArtifactError, match=r"disagree on class 1: 'y' vs 'w' \(2 classes differ\)"):
        store.check_classes("a.h5", ["x", "y", "z"], "b.h5", ["x", "w", "v"], "rebuild")


def test_one_staleness_rule_for_json_outputs(tmp_path):
    import json

    out, page = tmp_path / "metrics.json", tmp_path / "page.html"
    out.write_text(json.dumps({"params": {"epochs": 3}, "inputs": {"features": "abc"}}))
    assert not store.is_up_to_date(out, store.JSON_RECORD, {"epochs": 3}, {"features": "abc"}, files=[page])
    page.write_text("x")
    assert store.is_up_to_date(out, store.JSON_RECORD, {"epochs": 3}, {"features": "abc"}, files=[page])
    assert not store.is_up_to_date(out, store.JSON_RECORD, {"epochs": 4}, {"features": "abc"})
    assert not store.is_up_to_date(out, store.JSON_RECORD, {"epochs": 3}, {"features": "abd"})
    out.write_text("{not json")
    assert not store.is_up_to_date(out, store.JSON_RECORD, {"epochs": 3}, {"features": "abc"})
