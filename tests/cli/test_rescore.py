"""sinet rescore (cron): a growing crawl is extracted and scored incrementally, locked, idempotent."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sinet_cli import store
from fixtures_layouts import write_jpeg, score_on_flat_graph

CLASSES = ["boot", "coat", "shirt"]
TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--workers", "0", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[2]


def write_manifest(root: Path, n_per_class: int, start: int = 0, extra_lines: list[str] | None = None) -> Path:
    """A manifest of ``n_per_class`` train images per class (JPEG files of real demo images), one
    val image per class; image k is the same file whatever the manifest's length (a growing crawl)."""
    lines = ["id\tpath\tlabel\tsplit"]
    k = 0
    for c, name in enumerate(CLASSES):
        for j in range(n_per_class + 1):
            split = "val" if j == 0 else "train"
            rel = f"img/{name}/{j:03d}.jpg"
            if not (root / rel).exists():
                write_jpeg(root / rel, 100 * c + j)
            lines.append(f"{name}-{j}\t{rel}\t{name}\t{split}")
            k += 1
    path = root / "crawl.tsv"
    path.write_text("\n".join(lines + (extra_lines or [])) + "\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Artifacts of a first crawl (4 train + 1 val per class), built with the CLI; returns (root, art)."""
    from conftest import run_sinet

    root = tmp_path_factory.mktemp("crawl")
    art = root / "art"
    manifest = write_manifest(root, 4)
    code, _, err = run_sinet("extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art)
    assert code == 0, err
    score_on_flat_graph(art, CLASSES, run_sinet)
    return root, art


def snapshot(art: Path) -> dict:
    with store.open_artifact(art / "features.h5", "features") as f:
        feats = {"ids": list(f.read("ids")), "features": f.read("features"), "fp": f.fingerprint,
                 "labels": f.read("labels"), "splits": list(f.read("splits"))}
    with store.open_artifact(art / "scores.h5", "scores") as s:
        scores = {"ids": list(s.read("ids")), "weight": s.read("weight"), "fp": s.fingerprint,
                  "flagged": s.read("flagged"), "noise_transition": s.read("noise_transition"),
                  "noise_estimate": s.json_attr("noise_estimate")}
    return {"features": feats, "scores": scores,
            "mtimes": {n: (art / n).stat().st_mtime_ns for n in ("features.h5", "scores.h5", "prototypes.h5")}}


def test_growing_crawl_extracts_and_scores_only_new_images_then_nothing(built, sinet, tmp_path):
    root, art = built
    before = snapshot(art)
    assert len(before["features"]["ids"]) == 15

    # the crawl gains 2 train images per class: 6 new ids
    manifest = write_manifest(root, 6)
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0", "--device", "cpu")
    assert code == 0, err
    assert "appended 6 new images" in err and "scoring 6 new" in err, err
    after = snapshot(art)
    f0, f1 = before["features"], after["features"]
    assert f1["ids"][:15] == f0["ids"]  # old rows untouched, new ones after them
    new_ids = {f"{c}-{j}" for c in CLASSES for j in (5, 6)}
    assert set(f1["ids"][15:]) == new_ids and len(f1["ids"]) == 21
    np.testing.assert_array_equal(f1["features"][:15], f0["features"])
    assert f1["splits"][15:] == ["train"] * 6
    assert [CLASSES[k] for k in f1["labels"][15:]] == [i.split("-")[0] for i in f1["ids"][15:]]
    s0, s1 = before["scores"], after["scores"]
    assert s1["ids"][:15] == s0["ids"] and set(s1["ids"][15:]) == new_ids
    np.testing.assert_array_equal(s1["weight"][:15], s0["weight"])
    # the new rows are flagged by the estimate's stored noise process and threshold, which the append keeps
    with store.open_artifact(art / "scores.h5", "scores") as s:
        flagged, score = s.read("flagged"), s.read("flag_score")
        info = s.json_attr("noise_estimate")
    assert info["method"] != "none" and info == before["scores"]["noise_estimate"]
    np.testing.assert_array_equal(s1["noise_transition"], s0["noise_transition"])
    np.testing.assert_array_equal(flagged[:15], s0["flagged"])
    np.testing.assert_array_equal(flagged[15:], score[15:] > info["flag_threshold"])
    assert after["mtimes"]["prototypes.h5"] == before["mtimes"]["prototypes.h5"]  # scored against the same ones
    with store.open_artifact(art / "features.h5", "features") as f:
        assert f.json_attr("appended")["rows"] == 6

    # the appended rows are what extract-features computes for those images from scratch:
    # same backbone, (random-init seed), image size and preprocessing as recorded in features.h5
    fresh = tmp_path / "fresh"
    code, _, err = sinet("extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", fresh)
    assert code == 0, err
    with store.open_artifact(fresh / "features.h5", "features") as f:
        ref = dict(zip(f.read("ids"), f.read("features")))
    for i, row in zip(f1["ids"], f1["features"]):
        np.testing.assert_allclose(row.astype(np.float32), ref[i].astype(np.float32), atol=2e-3)

    # nothing new: says so, changes nothing
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 0, err
    assert "nothing new" in err and "up to date" in err, err
    assert snapshot(art)["mtimes"] == after["mtimes"]


def test_busy_lock_broken_manifest_and_other_classes_are_one_line_errors(built, sinet):
    root, art = built
    manifest = write_manifest(root, 4)  # nothing new, whether the growing-crawl test ran first or not
    before = snapshot(art)["mtimes"]

    # a run in progress holds the lock: a cron run gives up at once, non-zero, one line
    fd = os.open(art / "features.h5.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art)
        assert code == 75  # EX_TEMPFAIL: cron retries
        assert err.count("\n") == 1 and err.startswith("sinet: error: ") and "another process holds" in err, err
        assert f"{art / 'features.h5.lock'} (writing it)" in err, err
        # --wait: goes on once the other run ends
        threading.Timer(0.5, fcntl.flock, (fd, fcntl.LOCK_UN)).start()
        code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--wait", "60")
        assert code == 0 and "nothing new" in err, err
    finally:
        os.close(fd)

    # a broken manifest line: the file and line named, nothing changed
    broken = write_manifest(root, 4, extra_lines=["coat-99\timg/coat/001.jpg"])
    line = len(broken.read_text().splitlines())
    code, _, err = sinet("rescore", "--data", f"manifest:{broken}", "--out", art)
    assert code == 1
    assert err == f"sinet: error: {broken}:{line}: 2 fields, header has 4\n", err

    # a crawl with another class table is refused (labels would mean other classes)
    other = write_manifest(root, 4, extra_lines=["hat-1\timg/coat/001.jpg\that\ttrain"])
    code, _, err = sinet("rescore", "--data", f"manifest:{other}", "--out", art)
    assert code == 1 and err.count("\n") == 1 and "4 classes but" in err and "'hat'" in err, err
    assert snapshot(art)["mtimes"] == before


def test_cron_run_is_quiet_and_one_line_on_failure(built, tmp_path):
    """As cron runs it: a real process without a terminal; nothing on stdout, no progress bars."""
    root, art = built
    manifest = write_manifest(root, 4)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SINET_QUIET")}  # the default, no TTY
    run = lambda *a: subprocess.run([sys.executable, "-m", "sinet_cli", "rescore", *map(str, a)],  # noqa: E731
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    done = run("--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "nothing new" in lines[0] and "up to date" in lines[1], done.stderr
    missing = run("--data", f"manifest:{manifest}", "--out", tmp_path / "nowhere")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("sinet: error: ") and missing.stderr.count("\n") == 1
    assert "features.h5: not found" in missing.stderr


def test_unreadable_new_image_is_recorded_not_retried_unless_asked(built, sinet, tmp_path):
    import shutil

    root, built_art = built
    art = tmp_path / "art"
    shutil.copytree(built_art, art)
    with store.open_artifact(art / "features.h5", "features") as f:
        n0 = f.dims["N"]
    manifest = write_manifest(root, 4, extra_lines=["boot-90\timg/boot/later.jpg\tboot\ttrain"])
    args = ["rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0"]
    code, _, err = sinet(*args)
    assert code == 0 and "skipped image boot-90" in err and "appended 0 new images" in err, err
    with store.open_artifact(art / "features.h5", "features") as f:
        assert f.dims["N"] == n0 and list(f.read("skipped_ids")) == ["boot-90"]
        assert "file not found" in f.read("skipped_reasons")[0]
    code, _, err = sinet(*args)
    assert code == 0 and "nothing new" in err and "1 unreadable ones not retried" in err, err

    write_jpeg(root / "img" / "boot" / "later.jpg", 7)  # the download completed
    code, _, err = sinet(*args, "--retry-skipped")
    assert code == 0 and "appended 1 new images" in err and "scoring 1 new" in err, err
    with store.open_artifact(art / "features.h5", "features") as f:
        assert f.dims["N"] == n0 + 1 and f.read("ids")[-1] == "boot-90"
        assert len(f.read("skipped_ids")) == 0 and len(f.read("skipped_reasons")) == 0


def test_cron_scoring_keeps_the_score_mode_scores_h5_was_made_with(tmp_path, sinet):
    """An eq. 6 scores.h5 (--score paper records alpha and beta only) gets its new rows scored by
    eq. 6 and appended, not rescored whole with the default score."""
    from test_score_noise import grow, make_features, make_prototypes_artifact, read_scores

    from sinet_cli.commands.rescore import score_new
    from stages import score_noise as sn

    make_features(tmp_path / "features.h5", 100)
    make_prototypes_artifact(tmp_path)
    assert sinet("score-noise", "--out", tmp_path, "--score", "paper")[0] == 0
    first, _, _ = read_scores(tmp_path)
    grow(tmp_path, 100, 20)
    score_new(tmp_path, None, None, 0.0)
    second, _, _ = read_scores(tmp_path)
    assert len(second["ids"]) == 120 and "probe" not in second
    np.testing.assert_array_equal(second["weight"][:100], first["weight"])
    np.testing.assert_array_equal(second["weight"], sn.noise_weight(second["distance"], 1.2, 1.5))


def test_cron_scoring_runs_on_rescores_device(tmp_path, monkeypatch):
    """rescore's --device reaches score-noise (its own default would pick a GPU on a GPU machine)."""
    import sinet_cli.commands.score as score_cmd
    from sinet_cli.commands.rescore import score_new

    seen = {}
    monkeypatch.setattr(score_cmd, "run_score_noise", lambda folder, config, **kw: seen.update(kw, folder=folder))
    score_new(tmp_path, None, None, 0.0, "cpu")
    assert seen["device"] == "cpu" and seen["folder"] == tmp_path
