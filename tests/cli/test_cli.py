"""The conventions of the `sinet` command line: --version, -q/-v, exit 75 on a busy lock, --data
required where a dataset is read, no third-party progress bars off a terminal."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from test_report import write_synthetic

REPO = Path(__file__).resolve().parents[2]
# what tqdm draws: "Loading weights:  40%|####      | 41/103 [00:00<00:00, 11558.58it/s]"
TQDM_BAR = re.compile(r"\d+%\|.*\||\d+/\d+ \[\d\d:\d\d|it/s\]|s/it\]|Loading weights|Batches:")


def test_version_is_the_package_version(sinet):
    with open(REPO / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    code, out, err = sinet("--version")
    assert code == 0 and out == f"sinet {version}\n" and err == ""


def test_quiet_keeps_warnings_verbose_adds_detail_lines(tmp_path, sinet):
    art = tmp_path / "art"
    write_synthetic(art, 3, 4, scores_attrs={"noise_estimate": "not an object"})
    code, _, normal = sinet("report", "--out", art)
    assert code == 0, normal
    lines = normal.splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: ") and "noise_estimate" in lines[0]
    assert lines[1].startswith(f"{art / 'report' / 'index.html'}: 3 classes")
    (art / "report" / "index.html").unlink()

    code, out, quiet = sinet("-q", "report", "--out", art)
    assert code == 0 and out == "" and (art / "report" / "index.html").is_file()
    assert quiet.splitlines() == lines[:1]  # the warning only
    assert "SINET_QUIET" not in os.environ  # an in-process caller gets its environment back

    code, _, verbose = sinet("-v", "report", "--out", art, "--force")
    assert code == 0
    extra = [x for x in verbose.splitlines() if x not in lines]
    assert any("low weight w <= " in x for x in extra), verbose
    code, _, again = sinet("report", "--out", art, "--force")  # verbosity does not leak into the next run
    assert code == 0 and again == normal

    code, _, err = sinet("-q", "-v", "summary", "--out", art)
    assert code == 1 and "--quiet and --verbose exclude each other" in err


def test_busy_lock_exits_75_for_cron_to_retry(tmp_path, sinet):
    from sinet_cli.errors import SinetError
    from sinet_cli.locks import BusyError, file_lock

    target = tmp_path / "scores.h5"
    fd = os.open(tmp_path / "scores.h5.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"score-noise run (pid 4242)\n")  # what a sinet holder writes into its lock file
        with pytest.raises(BusyError, match=r"another score-noise run \(pid 4242\) holds") as e:
            with file_lock(target, 0, "score-noise"):
                pass
        assert isinstance(e.value, SinetError)
        # through the command line: a real command on real artifacts
        art = tmp_path / "art"
        write_synthetic(art, 3, 6)
        assert sinet("make-prototypes", "--out", art, "--device", "cpu")[0] == 0
        lock = os.open(art / "scores.h5.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a process that names nobody in the lock file
            code, out, err = sinet("score-noise", "--out", art, "--device", "cpu", "--force")
            assert code == 75, err
            assert err.count("\n") == 1 and err.startswith("sinet: error: ")
            assert f"{art / 'scores.h5.lock'}" in err and "another process holds" in err and "(writing it)" in err
        finally:
            os.close(lock)
        code, _, err = sinet("score-noise", "--out", art, "--device", "cpu", "--force")
        assert code == 0, err
    finally:
        os.close(fd)


@pytest.mark.parametrize("command", [["extract-features"], ["build-graph"], ["train", "--on", "images"]])
def test_commands_that_read_a_dataset_require_data(command, tmp_path, sinet):
    code, out, err = sinet(*command, "--out", tmp_path / "art")
    assert code == 1 and out == ""
    assert err == "sinet: error: --data is required, e.g. --data demo or --data imagefolder:DIR\n"


def test_commands_that_read_artifacts_need_only_out(tmp_path, sinet):
    code, _, err = sinet("summary")
    assert code == 1 and err.count("\n") == 1 and "pass --out ART" in err
    art = tmp_path / "art"
    write_synthetic(art, 3, 4)
    for command in (["summary"], ["report"], ["make-prototypes", "--device", "cpu"]):
        code, _, err = sinet(*command, "--out", art)
        assert code == 0, (command, err)


def run_cli(*args: str, env_drop=("CI", "SINET_QUIET", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"),
            stderr_file: Path) -> subprocess.CompletedProcess:
    """As cron or make runs it: a real process, stderr redirected to a file (not a terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(stderr_file, "w") as err:
        done = subprocess.run([sys.executable, "-m", "sinet_cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=600)
    return done


def test_no_third_party_progress_bars_off_a_terminal(tmp_path):
    """build-graph loads the sentence encoder (transformers draws "Loading weights" with tqdm)."""
    classes = tmp_path / "classes.tsv"
    classes.write_text("name\tsynset\tdescription\ncat\t\ta small domesticated feline\ndog\t\ta loyal pet\n")
    log = tmp_path / "stderr.txt"
    done = run_cli("build-graph", "--classes", str(classes), "--sources", "text", "--device", "cpu",
                   "--out", str(tmp_path / "art"), stderr_file=log)
    err = log.read_text()
    assert done.returncode == 0, err
    assert "graph.h5: 2 classes" in err  # it did load the encoder and encode
    assert not TQDM_BAR.search(err), err
    assert "\r" not in err and "\x1b[" not in err  # no redrawn lines, no colour codes


def test_train_without_a_val_split_skips_in_one_line_and_records_why(tmp_path, sinet):
    import json

    import numpy as np

    from sinet_cli import store

    art = tmp_path / "art"
    n = 12
    store.write_artifact(art / "features.h5", "features", {
        "ids": [f"i{k}" for k in range(n)], "labels": np.arange(n) % 2, "classes": ["ant", "bee"],
        "features": np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), "splits": ["train"] * n}, {}, {})
    for mode in ("A", "C"):  # C would read scores.h5, which does not exist: skipped before that
        code, out, err = sinet("train", "--out", art, "--mode", mode, "--epochs", 1, "--device", "cpu")
        assert code == 0 and out == "", err
        assert err.count("\n") == 1 and err.startswith(f"{art / ('train-' + mode)}: not trained: "
                                                       f"{art / 'features.h5'} has no val split to evaluate on; "
                                                       "add a val split")
    runs = json.loads((art / "metrics.json").read_text())["train"]
    assert runs["A"]["skipped"] == runs["C"]["skipped"] == "no val split" and runs["A"]["top1"] is None
    assert not (art / "train-A").exists()
    code, out, _ = sinet("summary", "--out", art)
    assert code == 0 and "not known: not trained (A, C): no val split" in out
