"""score-noise and rescore's scoring with --engine ray on a local Ray cluster (ray.init(num_cpus=2), once for
the module): tiny features, the state fitted on the driver, the rows scored as tasks. Skipped where Ray is
not installed."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from fixtures_layouts import score_on_flat_graph
from sinet_cli import store
from sinet_cli.engines import ray_engine, ray_score
from test_score_noise import grow, make_features, make_prototypes_artifact, read_scores

# several parts of several blocks each, the last ones short
SMALL = ["--chunk-rows", "16", "--part-rows", "40"]


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


def twin_folders(tmp_path, n=230):
    """Two artifact folders holding the same features.h5 and prototypes."""
    a, b = tmp_path / "local", tmp_path / "ray"
    a.mkdir()
    make_features(a / "features.h5", n)
    make_prototypes_artifact(a)
    shutil.copytree(a, b)
    return a, b


def same_scores(a, b) -> None:
    """The local engine's scores.h5 and suspects.tsv against Ray's: the same rows, weights equal to
    round-off, flags and suggestions equal."""
    sa, _, da = read_scores(a)
    sb, _, db = read_scores(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if sa[k].dtype.kind in "fc":
            np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            assert sa[k].tolist() == sb[k].tolist(), k
    assert da == db
    assert (a / "suspects.tsv").read_text() == (b / "suspects.tsv").read_text()


def test_plan_score_parts_are_whole_blocks_with_new_rows():
    assert ray_score.plan_score_parts(100, 16, 40) == [(0, 0, 48), (1, 48, 96), (2, 96, 100)]
    mask = np.zeros(100, bool)
    mask[[50, 99]] = True
    assert ray_score.plan_score_parts(100, 16, 40, mask) == [(1, 48, 96), (2, 96, 100)]
    assert ray_score.plan_score_parts(0, 16, 40) == []


@pytest.mark.parametrize("score", ["fused", "paper"])
def test_score_noise_on_ray_equals_the_local_engine(cluster, tmp_path, sinet, score):
    a, b = twin_folders(tmp_path)
    code, _, err = sinet("score-noise", "--out", a, "--score", score, "--device", "cpu", *SMALL)
    assert code == 0, err
    code, _, err = sinet("score-noise", "--out", b, "--score", score, "--device", "cpu", *SMALL, "--engine", "ray")
    assert code == 0, err
    same_scores(a, b)
    with store.open_artifact(b / "scores.h5", "scores") as s:
        assert s.attr("device") == "ray:cpu"
    # the options are the same: either engine finds the other's scores.h5 up to date
    code, _, err = sinet("score-noise", "--out", b, "--score", score, "--device", "cpu", *SMALL)
    assert code == 0 and "up to date" in err, err


def test_a_killed_scoring_task_is_retried_and_a_failed_one_changes_nothing(cluster, tmp_path, sinet):
    a, b = twin_folders(tmp_path)
    code, _, err = sinet("score-noise", "--out", a, "--device", "cpu", *SMALL)
    assert code == 0, err

    # no retries: part 2's worker dies, the run fails in one line and writes nothing
    (cluster / "score-exit-2").touch()
    code, _, err = sinet("score-noise", "--out", b, "--device", "cpu", *SMALL, "--engine", "ray",
                         "--ray-retries", "0")
    assert code == 1 and err.count("\n") == 1, err
    assert "scoring part 2 (rows 96..143 of" in err and "failed after 0 retries" in err, err
    assert not (cluster / "score-exit-2").exists()  # the fault fired
    assert not (b / "scores.h5").exists() and not (b / "suspects.tsv").exists()
    assert not list(b.glob("*.partial"))

    # with retries Ray runs the killed task again: the result is the local one, no row lost or twice
    (cluster / "score-exit-1").touch()
    code, _, err = sinet("score-noise", "--out", b, "--device", "cpu", *SMALL, "--engine", "ray")
    assert code == 0, err
    assert not (cluster / "score-exit-1").exists()
    same_scores(a, b)


def test_score_noise_on_ray_appends_only_new_rows(cluster, tmp_path, sinet):
    a, b = tmp_path / "local", tmp_path / "ray"
    for d in (a, b):
        d.mkdir()
        make_features(d / "features.h5", 120)
        make_prototypes_artifact(d)
        code, _, err = sinet("score-noise", "--out", d, "--device", "cpu", *SMALL)
        assert code == 0, err
        grow(d, 120, 90)  # the first 120 rows again, and 90 new ones
    code, _, err = sinet("score-noise", "--out", a, "--device", "cpu", *SMALL)
    assert code == 0 and "scoring 90 new" in err, err
    # the new rows are 120..209: the parts holding none of them are not even started
    (cluster / "score-exit-0").touch()
    code, _, err = sinet("score-noise", "--out", b, "--device", "cpu", *SMALL, "--engine", "ray", "--ray-retries",
                         "0")
    assert code == 0 and "scoring 90 new" in err, err
    assert (cluster / "score-exit-0").exists()
    (cluster / "score-exit-0").unlink()
    same_scores(a, b)
    s, _, _ = read_scores(b)
    assert len(s["ids"]) == len(set(s["ids"].tolist())) == 210


def test_rescore_on_ray_scores_the_new_rows_on_ray(cluster, tmp_path, sinet, monkeypatch):
    """rescore --engine ray: its scoring step runs as Ray tasks over only the appended rows."""
    from sinet_cli.commands import rescore

    calls = []
    real = ray_score.scored_parts

    def spy(job, n, new_mask, **kw):
        calls.append((n, None if new_mask is None else int(new_mask.sum())))
        yield from real(job, n, new_mask, **kw)

    monkeypatch.setattr(ray_score, "scored_parts", spy)
    from test_ray_engine import ARGS, CLASSES, class_table, crawl

    classes = class_table(tmp_path)
    crawl(tmp_path, shards=2, per_shard=6)
    art = tmp_path / "art"
    code, _, err = sinet("extract-features", "--data", f"webdataset:{tmp_path}/crawl/*.tar", "--classes", classes,
                         *ARGS, "--out", art)
    assert code == 0, err
    score_on_flat_graph(art, CLASSES, sinet)
    before, _, _ = read_scores(art)
    crawl(tmp_path, shards=2, per_shard=6, start=12, folder="crawl")
    code, _, err = sinet("rescore", "--data", f"webdataset:{tmp_path}/crawl/*.tar", "--classes", classes, "--out",
                         art, "--workers", "0", "--device", "cpu", "--engine", "ray")
    assert code == 0, err
    assert "appended 12 new images" in err and "scoring 12 new" in err, err
    assert calls == [(24, 12)]
    after, _, _ = read_scores(art)
    assert after["ids"][:12].tolist() == before["ids"].tolist()
    np.testing.assert_array_equal(after["weight"][:12], before["weight"])
    assert sorted(after["ids"][12:].tolist()) == [f"{k // 6:05d}/{k:09d}" for k in range(12, 24)]
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert s.attr("device") == "ray:cpu"


def test_without_ray_score_noise_engine_is_a_one_line_error(tmp_path, sinet, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    make_features(tmp_path / "features.h5", 30)
    make_prototypes_artifact(tmp_path)
    code, _, err = sinet("score-noise", "--out", tmp_path, "--engine", "ray")
    assert code == 1 and err == "sinet: error: --engine ray needs Ray, which is not installed: pip install " \
                               "'sinet[ray]'\n", err
    assert not (tmp_path / "scores.h5").exists()


def test_side_text_is_encoded_on_the_workers_as_on_the_driver(cluster, tmp_path, sinet):
    """With side text each worker loads the packaged sentence encoder and encodes its rows' captions."""
    from sinet_cli import sideinfo

    a, b = tmp_path / "local", tmp_path / "ray"
    a.mkdir()
    data = make_features(a / "features.h5", 100)
    text = [f"a photo of a {('cat', 'dog', 'car')[c]}" if i % 4 else "" for i, c in enumerate(data["clean_labels"])]
    store.write_artifact(a / "features.h5", "features", {**data, "side_text": text}, {"text": 1}, {})
    make_prototypes_artifact(a)
    encoder = sideinfo.load_text_encoder(str(sideinfo.default_text_encoder()), device="cpu")
    emb = np.asarray(encoder.encode(["cat", "dog", "car"], normalize_embeddings=True), dtype=np.float32)
    S = np.eye(3, dtype=np.float32)
    store.write_artifact(a / "graph.h5", "graph", {"classes": ["c0", "c1", "c2"], "S_w": S, "S_l": S, "S_t": S,
                                                    "label_embeddings": emb}, {}, {})
    shutil.copytree(a, b)
    opts = ("--probe-folds", "2", "--probe-epochs", "2", "--device", "cpu", *SMALL)
    code, _, err = sinet("score-noise", "--out", a, *opts)
    assert code == 0, err
    code, _, err = sinet("score-noise", "--out", b, *opts, "--engine", "ray")
    assert code == 0, err
    s, _, _ = read_scores(b)
    assert "text_share" in s and np.isnan(s["text_share"][np.arange(100) % 4 == 0]).all()
    same_scores(a, b)


def test_a_task_that_raises_fails_the_run_in_one_line_naming_it(cluster, tmp_path, sinet):
    a, b = twin_folders(tmp_path, n=60)
    code, _, err = sinet("score-noise", "--out", b, "--device", "cpu", *SMALL, "--engine", "ray", "--force")
    assert code == 0, err
    before = (b / "scores.h5").read_bytes(), (b / "suspects.tsv").read_bytes()
    # a val row is damaged: the driver's fit reads train rows only, the task of part 1 finds it
    import h5py

    with h5py.File(b / "features.h5", "r+") as f:
        x = f["features"][...]
        x[54] = np.nan
        f["features"][...] = x
    code, _, err = sinet("score-noise", "--out", b, "--device", "cpu", *SMALL, "--engine", "ray", "--force",
                         "--probe-rows", "0")
    assert code == 1 and err.count("\n") == 1, err
    assert "scoring part 1 (rows 48..59 of" in err and "failed: ArtifactError:" in err and "retries" not in err, err
    assert "'img00054' (row 54) are not finite" in err
    assert ((b / "scores.h5").read_bytes(), (b / "suspects.tsv").read_bytes()) == before
