"""Faults: concurrent runs, kills between the renames of a commit, bad images and values, full disks,
read-only folders, Ctrl-C, and inputs that must be refused (issue 19; docs/reliability.md).

Most cases run in process on a small crawl (JPEG files of demo images, a random-init tiny backbone);
those that need a real process (a second run at the same time, a SIGKILL, a file size limit, a
read-only folder, SIGINT) go through tests/fault_run.py, which can pause or kill a command at its
n-th rename.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_sinet
from fault_fixtures import CLASSES, bilevel_png, write_crawl, write_graph
from sinet_cli import store

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parents[1] / "fault_run.py"
ALL = ["features.h5", "graph.h5", "prototypes.h5", "prototypes.faiss", "scores.h5", "suspects.tsv"]
TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A crawl (6 train + 2 val images per class) and its artifacts through score-noise: (root, art)."""
    root = tmp_path_factory.mktemp("faults")
    art = root / "art"
    manifest = write_crawl(root)
    code, _, err = run_sinet("extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art)
    assert code == 0, err
    write_graph(art / "graph.h5")
    for step in (["make-prototypes", "--out", art, "--device", "cpu"],
                 ["score-noise", "--out", art, "--device", "cpu"]):
        code, _, err = run_sinet(*step)
        assert code == 0, err
    return root, art


@pytest.fixture
def crawl(base, tmp_path):
    """A private copy of the base crawl and artifacts: (root, art)."""
    root = tmp_path / "crawl"
    shutil.copytree(base[0], root)
    return root, root / "art"


def fingerprints(art: Path, names: list[str]) -> dict[str, str | None]:
    """Each file's bytes (a folder: its files'), None when missing: what must stay as it was."""
    import hashlib

    def digest(p: Path) -> str | None:
        if p.is_symlink():
            return "link:" + os.readlink(p)
        if p.is_dir():
            return "dir:" + "".join(f"{f.relative_to(p)}={digest(f)}" for f in sorted(p.rglob("*")) if f.is_file())
        return hashlib.md5(p.read_bytes()).hexdigest() if p.exists() else None

    return {n: digest(art / n) for n in names}


def runner(*args, env: dict | None = None, preexec=None, **popen) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(REPO), CI="1", **(env or {}))
    return subprocess.Popen([sys.executable, str(RUNNER), *map(str, args)], cwd=REPO, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec, **popen)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {path}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("sinet: error: ") and "Traceback" not in err


# -- two runs at once ---------------------------------------------------------------------------


def test_extract_force_and_rescore_at_once_never_interleave(crawl, sinet):
    """extract-features --force holds features.h5 until its commit; a rescore meanwhile is told so
    (exit 75) and, run after, appends to the new file: every row and the fingerprint consistent."""
    root, art = crawl
    manifest = write_crawl(root, n_train=7)  # one new image per class for rescore
    flag = root / "go"
    extract = runner("extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art, "--force",
                     env={"FAULT_DIR": str(art), "FAULT_PAUSE_AT": "1", "FAULT_SIGNAL": str(flag)})
    try:
        wait_for(Path(str(flag) + ".paused"), extract)  # finished, holding features.h5, about to commit
        code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
        assert code == 75 and one_line(err), err
        assert f"{art / 'features.h5'}: busy: another extract-features run" in err and "(writing it)" in err, err
    finally:
        flag.touch()
        out, err = extract.communicate(timeout=300)
    assert extract.returncode == 0, err
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 0 and "scoring 0 new" not in err, err
    with h5py.File(art / "features.h5", "r") as f:
        assert store._content_fingerprint(f) == f.attrs["fingerprint"]  # what the file holds is what it says
        assert len(f["ids"]) == 3 * (7 + 2)
    assert not list(art.glob("*.partial"))


def test_rescore_during_make_prototypes_commit_waits_or_says_busy(crawl, sinet):
    root, art = crawl
    manifest = write_crawl(root, n_train=7)
    flag = root / "go"
    # paused between the renames of prototypes.h5 and prototypes.faiss (its 3rd: pending record, h5, faiss)
    proto = runner("make-prototypes", "--out", art, "--device", "cpu", "--temperature", "0.2",
                   env={"FAULT_DIR": str(art), "FAULT_PAUSE_AT": "3", "FAULT_SIGNAL": str(flag)})
    try:
        wait_for(Path(str(flag) + ".paused"), proto)
        code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
        assert code == 75 and one_line(err), err
        # the first of its locks in the global order that make-prototypes holds: features.h5, which it reads
        assert f"{art / 'features.h5'}: busy: another make-prototypes run" in err and "(reading it)" in err, err
        threading.Timer(1.0, flag.touch).start()  # a waiting rescore goes on once the commit is done
        code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0",
                             "--wait", "120")
        assert code == 0 and "appended 3 new images" in err, err
        assert "prototypes changed; rescoring every row" in err, err  # against the prototypes it waited for
    finally:
        flag.touch()
        proto.communicate(timeout=300)
    assert proto.returncode == 0
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert s.inputs["prototypes"] == store.artifact_fingerprint(art / "prototypes.h5", "prototypes")


def test_killed_make_prototypes_between_its_renames_is_refused_by_readers_then_repaired(crawl, sinet):
    root, art = crawl
    manifest = write_crawl(root, n_train=7)
    proto = runner("make-prototypes", "--out", art, "--device", "cpu", "--temperature", "0.2",
                   env={"FAULT_DIR": str(art), "FAULT_KILL_AT": "3"})  # prototypes.h5 renamed, .faiss not
    proto.communicate(timeout=300)
    assert proto.returncode == -signal.SIGKILL
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 1 and one_line(err), err
    assert "are not the outputs of one make-prototypes run" in err and "run sinet make-prototypes again" in err
    code, _, err = sinet("make-prototypes", "--out", art, "--device", "cpu", "--temperature", "0.2")
    assert code == 0 and "completed the commit" in err and "up to date" in err, err
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 0 and "appended 3 new images" in err, err


def test_rescore_wait_reads_the_scoring_options_after_it_gets_the_lock(crawl, sinet):
    """A rescore waiting behind score-noise --force --probe-epochs 7 scores its new rows with 7 (the
    options the scores.h5 it then finds records), appending, not rescoring everything with the old."""
    root, art = crawl
    manifest = write_crawl(root, n_train=7)
    flag = root / "go"
    score = runner("score-noise", "--out", art, "--device", "cpu", "--force", "--probe-epochs", "7",
                   env={"FAULT_DIR": str(art), "FAULT_PAUSE_AT": "1", "FAULT_SIGNAL": str(flag)})
    try:
        wait_for(Path(str(flag) + ".paused"), score)
        # long enough for rescore to reach the point where it reads the scoring options
        threading.Timer(8.0, flag.touch).start()
        code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0",
                             "--wait", "120")
    finally:
        flag.touch()
        score.communicate(timeout=300)
    assert score.returncode == 0
    assert code == 0 and "scoring 3 new" in err and "options changed" not in err, err
    with store.open_artifact(art / "scores.h5", "scores") as s:
        assert s.params["probe_epochs"] == 7 and s.dims["N"] == 27


def test_truncated_scores_is_an_error_not_a_rebuild_with_defaults(crawl, sinet):
    root, art = crawl
    manifest = write_crawl(root, n_train=7)
    before = fingerprints(art, ["features.h5"])
    data = (art / "scores.h5").read_bytes()
    (art / "scores.h5").write_bytes(data[: len(data) // 2])
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 1 and one_line(err), err
    assert "scores.h5: unreadable" in err and "sinet score-noise" in err and "--force" in err, err
    assert fingerprints(art, ["features.h5"]) == before  # nothing appended that could not be scored


# -- a kill at each rename of each multi-file command ---------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL in process: no ``except Exception`` handler catches it."""


def kill_at_rename(monkeypatch, n: int) -> list[int]:
    count = [0]
    real = store._replace

    def replace(src, dst):
        count[0] += 1
        if count[0] == n:
            raise Killed(f"rename {n}: {dst}")
        real(src, dst)

    monkeypatch.setattr(store, "_replace", replace)
    return count


def model_bytes(path: Path) -> bytes:
    import torch

    sd = torch.load(path, weights_only=True)
    return b"".join(sd[k].numpy().tobytes() for k in sorted(sd))


UNITS = {
    # command line (the changed option makes it commit), the files compared after a plain rerun
    "make-prototypes": (["make-prototypes", "--device", "cpu", "--temperature", "0.2"],
                        ["prototypes.h5", "prototypes.faiss"]),
    "score-noise": (["score-noise", "--device", "cpu", "--alpha", "1.1"], ["scores.h5", "suspects.tsv"]),
    "export": (["export", "--relabel-at", "0.7"],
               ["export/images.csv", "export/images.parquet", "export/cleaned.tsv", "export/images"]),
    "train": (["train", "--mode", "C", "--epochs", "2", "--device", "cpu"], ["train-C/model.pt"]),
    "report": (["report", "--thumb-size", "24"], ["report/index.html", "report/classes.tsv", "report/S_t.png"]),
}


def outputs(art: Path, command: str) -> dict:
    names = UNITS[command][1]
    # HDF5 files by their content fingerprint (their bytes hold the time they were written)
    out = {n: store.output_fingerprint(art / n) if n.endswith(".h5") else fingerprints(art, [n])[n]
           for n in names if not n.endswith(".pt")}
    if command == "train":
        out["model"] = model_bytes(art / "train-C" / "model.pt")
        m = json.loads((art / "metrics.json").read_text())["train"]["C"]
        out["shared"] = (m["top1"], m["top5"], m["n_train"], m["params"])
    return out


def renames_of(command: str, base_art: Path, tmp_path: Path, monkeypatch) -> tuple[int, dict]:
    """How many renames an uninterrupted run makes, and what it leaves."""
    art = tmp_path / "reference" / "art"  # the same folder name: the report shows it
    shutil.copytree(base_art, art)
    count = kill_at_rename(monkeypatch, 0)
    code, _, err = run_sinet(*UNITS[command][0], "--out", art)
    assert code == 0, err
    monkeypatch.undo()
    return count[0], outputs(art, command)


@pytest.mark.parametrize("command", list(UNITS))
def test_kill_at_each_rename_then_a_plain_rerun_gives_the_uninterrupted_result(command, base, tmp_path,
                                                                               monkeypatch):
    _, base_art = base
    total, want = renames_of(command, base_art, tmp_path, monkeypatch)
    assert total >= 3
    # report commits 11 files: its first renames, one in the middle, and the last two (page, record)
    points = range(1, total + 1) if total <= 8 else sorted({1, 2, total // 2, total - 1, total})
    for n in points:
        art = tmp_path / f"kill{n}" / "art"
        shutil.copytree(base_art, art)
        kill_at_rename(monkeypatch, n)
        with pytest.raises(Killed):
            run_sinet(*UNITS[command][0], "--out", art)
        monkeypatch.undo()
        code, _, err = run_sinet(*UNITS[command][0], "--out", art)  # the plain rerun
        assert code == 0, (n, err)
        assert outputs(art, command) == want, f"{command} killed at rename {n} of {total}"
        assert not store.commit_pending(art / UNITS[command][1][0].split("/")[0])


def test_train_committed_but_shared_metrics_not_merged_is_completed_by_the_rerun(crawl, sinet, monkeypatch):
    _, art = crawl
    from sinet_cli.commands import train as train_cmd

    def killed(*a, **k):
        raise Killed("before the merge into metrics.json")

    monkeypatch.setattr(train_cmd, "merge_shared_metrics", killed)
    with pytest.raises(Killed):
        run_sinet("train", "--mode", "C", "--epochs", "2", "--device", "cpu", "--out", art)
    monkeypatch.undo()
    assert "C" not in json.loads((art / "metrics.json").read_text()).get("train", {}) if (art / "metrics.json").exists() \
        else True
    code, _, err = sinet("train", "--mode", "C", "--epochs", "2", "--device", "cpu", "--out", art)
    assert code == 0 and "up to date" in err and "recorded run C" in err, err
    assert json.loads((art / "metrics.json").read_text())["train"]["C"]["top1"] is not None
    code, out, err = sinet("summary", "--out", art)
    assert code == 0 and any(line.startswith("│ C") or " C " in line for line in out.splitlines()), out


# -- bad images, bad values -----------------------------------------------------------------------


def test_bomb_and_oversized_pngs_are_skipped_and_recorded_and_the_rest_added(crawl, sinet):
    root, art = crawl
    bilevel_png(root / "img" / "boot" / "bomb.png", 20000, 20000)  # PIL: DecompressionBombError
    bilevel_png(root / "img" / "coat" / "huge.png", 12000, 12000)  # PIL: only a warning, decoded whole
    manifest = write_crawl(root, n_train=7, extra_lines=["boot-bomb\timg/boot/bomb.png\tboot\ttrain",
                                                          "coat-huge\timg/coat/huge.png\tcoat\ttrain"])
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 0, err
    assert "appended 3 new images" in err and "2 unreadable skipped" in err and "Traceback" not in err, err
    with store.open_artifact(art / "features.h5", "features") as f:
        skipped = dict(zip(f.read("skipped_ids"), f.read("skipped_reasons")))
        assert f.dims["N"] == 27
    assert set(skipped) == {"boot-bomb", "coat-huge"}
    assert "image too large: 20000x20000 = 400.0 MP" in skipped["boot-bomb"]
    assert "image too large: 12000x12000 = 144.0 MP" in skipped["coat-huge"]
    code, _, err = sinet("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    assert code == 0 and "nothing new" in err and "2 unreadable ones not retried" in err, err


def test_pixel_limit_applies_to_webdataset_members_and_is_an_option(tmp_path, sinet):
    import io
    import tarfile

    from PIL import Image

    from fault_fixtures import demo_pixels

    members = []
    px = demo_pixels()
    for k in range(9):
        buf = io.BytesIO()
        Image.fromarray(px[k]).convert("RGB").resize((40, 40)).save(buf, "JPEG")
        members += [(f"{k:09d}.jpg", buf.getvalue()), (f"{k:09d}.json", json.dumps({"label": CLASSES[k % 3]}).encode())]
    bomb = bilevel_png(tmp_path / "bomb.png", 20000, 20000).read_bytes()
    members += [("000000009.png", bomb), ("000000009.json", json.dumps({"label": "boot"}).encode())]
    shard = tmp_path / "s" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    code, _, err = sinet("extract-features", "--data", f"webdataset:{shard}", *TINY, "--out", tmp_path / "out")
    assert code == 0, err
    with store.open_artifact(tmp_path / "out" / "features.h5", "features") as f:
        assert f.dims["N"] == 9 and list(f.read("skipped_ids")) == ["00000/000000009"]
        assert "#000000009.png: image too large" in f.read("skipped_reasons")[0]
    # a lower limit skips the 40 x 40 images too, and is recorded for rescore
    code, _, err = sinet("extract-features", "--data", f"webdataset:{shard}", *TINY, "--out", tmp_path / "small",
                         "--max-pixels", "1000")
    assert code == 1 and "no image could be read" in err and "image too large" in err, err


def test_jpeg_draft_applies_above_its_threshold_only(tmp_path):
    from PIL import Image

    from stages import extract_features as fx

    rng = np.random.default_rng(0)
    small = tmp_path / "small.jpg"
    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(small, quality=90)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.kron(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), np.ones((128, 128, 1), np.uint8))
                    ).save(big, quality=90)  # 4096 x 3072 = 12.6 MP
    exact, draft = fx.Decode(draft_above=None), fx.Decode(draft_above=10_000_000)
    # below the threshold: the very same pixels as without draft
    assert np.array_equal(fx.decode_image(str(small), 73, 64, draft), fx.decode_image(str(small), 73, 64, exact))
    from PIL.JpegImagePlugin import JpegImageFile

    opened = []
    real = JpegImageFile.draft
    try:
        JpegImageFile.draft = lambda self, mode, size: (opened.append(size), real(self, mode, size))[1]
        assert fx.decode_image(str(small), 73, 64, draft) is not None and opened == []  # small: no draft
        a = fx.decode_image(str(big), 73, 64, draft)
    finally:
        JpegImageFile.draft = real
    b = fx.decode_image(str(big), 73, 64, exact)
    assert opened and min(opened[0]) >= 4 * 73  # decoded at a DCT scale keeping >= 4x the decode size
    assert a.shape == b.shape and (a.int() - b.int()).abs().float().mean() < 3  # the same picture


def test_rows_whose_features_are_not_finite_are_skipped_with_their_id():
    import torch

    from stages import extract_features as fx

    model, _ = fx.build_backbone("test_efficientnet", None, random_init=True)
    pp = fx.Preprocess.for_model(model, 32)
    real = model.forward_head

    def head(x, pre_logits=False):
        out = real(x, pre_logits=pre_logits).clone()
        out[1, 0] = float("nan")  # row 1 of each batch
        return out

    model.forward_head = head
    pixels = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    (batch,) = list(fx.extract(model, pp, pixels=pixels, positions=range(4), batch_size=4, fold_bn=False,
                               static_padding=False))
    assert batch.ok.tolist() == [True, False, True, True]
    assert batch.reasons[1] == "features not finite (NaN or inf)" and np.isfinite(batch.features).all()
    assert torch.is_tensor(torch.as_tensor(batch.features))


def test_not_finite_rows_are_refused_at_append(tmp_path):
    w = store.ArtifactWriter(tmp_path / "x.h5", "features", {}, {})
    with pytest.raises(store.ArtifactError, match=r"refused the features of image 'b': not finite"):
        w.append_rows({"ids": ["a", "b"], "labels": [0, 1], "features": np.array([[1.0, 0], [np.inf, 0]], np.float16)})
    assert w.rows_committed == 0 and all(w.file[k].shape[0] == 0 for k in w.file.keys())  # no row of the block
    w.abort()


def test_not_finite_rows_are_refused_where_features_are_loaded(crawl, sinet):
    """make-prototypes, score-noise and train on a features.h5 holding an inf (written by another
    tool, or damaged without a checksum): one line naming the file and the image, nothing written."""
    _, art = crawl
    with h5py.File(art / "features.h5", "r+") as f:  # bypassing the writer's check
        image = f["ids"][5]
        image = image.decode() if isinstance(image, bytes) else str(image)
        row = f["features"][5].copy()
        row[0] = np.inf
        f["features"][5] = row
    before = fingerprints(art, ALL)
    for command in (["make-prototypes", "--force"], ["score-noise", "--force"], ["train", "--mode", "A", "--epochs", "1"]):
        code, _, err = sinet(*command, "--out", art, "--device", "cpu")
        assert code == 1 and one_line(err), err
        assert f"{art / 'features.h5'}: features of image {image!r} (row 5) are not finite" in err, err
    assert fingerprints(art, ALL) == before and not (art / "train-A").exists()


def flip_byte_in_features(path: Path) -> None:
    with h5py.File(path, "r") as f:
        ds = f["features"]
        info = ds.id.get_chunk_info(0)
        offset = info.byte_offset + info.size // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x10]))


def test_a_flipped_byte_in_features_is_detected_and_named(crawl, sinet):
    _, art = crawl
    flip_byte_in_features(art / "features.h5")
    with pytest.raises(store.ArtifactError, match=r"features\.h5: dataset 'features' is damaged \(checksum mismatch\)"):
        with store.open_artifact(art / "features.h5", "features") as f:
            f.read("features")
    code, _, err = sinet("make-prototypes", "--out", art, "--device", "cpu", "--force")
    assert code == 1 and one_line(err) and "damaged (checksum mismatch)" in err, err


def test_files_without_checksums_still_read(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as f:  # as sinet wrote before checksums
        f.attrs.update({"kind": "features", "schema_version": store.SCHEMA_VERSION, "params": "{}", "inputs": "{}",
                        "fingerprint": "x"})
        f["ids"] = np.array([b"a", b"b"])
        f["labels"] = np.array([0, 1])
        f["features"] = np.eye(2, dtype=np.float16)
        f["classes"] = np.array([b"x", b"y"])
    with store.open_artifact(tmp_path / "old.h5", "features") as a:
        assert a.read("features").tolist() == [[1, 0], [0, 1]]
        assert not a.dataset("features").fletcher32
    w = store.ArtifactWriter(tmp_path / "new.h5", "features", {}, {})
    w.append_rows({"ids": ["a"], "labels": [0], "features": np.ones((1, 2), np.float16)})
    w.write("classes", ["x", "y"])
    w.commit()
    with h5py.File(tmp_path / "new.h5", "r") as f:
        assert f["features"].fletcher32 and f["labels"].fletcher32 and f["classes"].fletcher32


# -- full disk, read-only folder, Ctrl-C ------------------------------------------------------------


def _limit_file_size(nbytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def _without_root_override():
    """As a user: root's override of file permissions dropped for the child (CAP_DAC_OVERRIDE,
    CAP_FOWNER), so a folder without write permission is read-only to it."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 3):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def batch(commands: list[list], tmp_path: Path, preexec=None) -> list[dict]:
    spec = tmp_path / f"batch-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps([[str(a) for a in c] for c in commands]))
    p = runner("--batch", spec, preexec=preexec)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"rc {p.returncode}: {err[-2000:]}"  # no SIGSEGV, no SIGXFSZ
    return json.loads(out.strip().splitlines()[-1])


def test_full_disk_is_one_line_and_the_artifacts_stay_intact(crawl, tmp_path):
    root, art = crawl
    before = fingerprints(art, ALL)
    manifest = root / "crawl.tsv"
    commands = [["extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art, "--force"],
                ["make-prototypes", "--out", art, "--device", "cpu", "--force"],
                ["score-noise", "--out", art, "--device", "cpu", "--force"]]
    results = batch(commands, tmp_path, preexec=_limit_file_size(48 * 1024))  # ulimit -f 48
    for cmd, r in zip(commands, results):
        assert r["code"] == 1 and one_line(r["stderr"]), (cmd[0], r)
        assert "cannot write (File too large)" in r["stderr"] and "file size limit" in r["stderr"], r
    assert fingerprints(art, ALL) == before
    assert not [p for p in art.iterdir() if p.name.endswith(".partial") and not p.name.startswith("features")]


def test_read_only_out_is_one_line_per_command(crawl, tmp_path):
    root, art = crawl
    manifest = root / "crawl.tsv"
    before = fingerprints(art, ALL)
    commands = [["extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art / "new"],
                ["make-prototypes", "--out", art, "--device", "cpu", "--force"],
                ["score-noise", "--out", art, "--device", "cpu", "--force"],
                ["report", "--out", art],
                ["export", "--out", art],
                ["summary", "--out", art]]
    os.chmod(art, 0o555)
    try:
        results = batch(commands, tmp_path, preexec=_without_root_override)
    finally:
        os.chmod(art, 0o755)
    for cmd, r in zip(commands[:-1], results[:-1]):
        assert r["code"] == 1 and one_line(r["stderr"]), (cmd[0], r)
        assert "Permission denied" in r["stderr"] and "not writable: pass --out" in r["stderr"], (cmd[0], r)
    assert results[-1]["code"] == 0, results[-1]  # reading a read-only folder is fine
    assert fingerprints(art, ALL) == before


LONG = {
    # the options that make it long, the function whose start means it is at work, what the line says
    "extract-features": (["--data", "manifest:{manifest}", *TINY, "--force", "--batch-size", "1"],
                         "stages.extract_features:extract", "run the same command again to resume"),
    "make-prototypes": (["--device", "cpu", "--force", "--rounds", "400"], "stages.make_prototypes:make_prototypes",
                        "unchanged; run the same command again"),
    "score-noise": (["--device", "cpu", "--force", "--probe-epochs", "20000"], "stages.score_noise:fit_two_round_probe",
                    "unchanged; run the same command again"),
    "train": (["--mode", "C", "--epochs", "20000", "--device", "cpu"], "stages.train:train_features",
              "run the same command again to resume"),
    "rescore": (["--data", "manifest:{manifest}", "--workers", "0", "--batch-size", "1"],
                "stages.extract_features:extract", "run the same command again"),
}


@pytest.mark.parametrize("command", list(LONG))
def test_ctrl_c_says_what_was_kept_and_how_to_go_on(command, crawl, tmp_path):
    root, art = crawl
    manifest = write_crawl(root, n_train=120) if command in ("rescore", "extract-features") else root / "crawl.tsv"
    args, at_work, words = LONG[command]
    before = fingerprints(art, ALL)
    ready = tmp_path / "ready"
    p = runner(command, *[a.format(manifest=manifest) for a in args], "--out", art,
               env={"FAULT_READY": at_work, "FAULT_READY_FILE": str(ready), "FAULT_READY_HOLD": "60"})
    wait_for(ready, p)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=180)
    last = err.splitlines()[-1] if err else ""
    assert p.returncode == 130 and one_line(last + "\n") and "Traceback" not in err, err
    assert "interrupted" in last and words in last, err
    if command != "rescore":  # rescore keeps the rows it committed before the interrupt
        assert fingerprints(art, ALL) == before


# -- inputs -------------------------------------------------------------------------------------------


def test_manifest_paths_outside_its_folder_are_refused_unless_allowed(tmp_path, sinet):
    from sinet_cli.datasets import read_manifest
    from sinet_cli.errors import InputError

    write_crawl(tmp_path / "c", n_train=2, n_val=0)
    base = (tmp_path / "c" / "crawl.tsv").read_text()
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(tmp_path / "c" / "img" / "boot" / "000.jpg", outside)
    for bad, why in ((str(outside), "is absolute, outside the manifest's folder"),
                     ("../elsewhere.jpg", "leaves the manifest's folder"),
                     ("img/../../elsewhere.jpg", "leaves the manifest's folder"),
                     (str(tmp_path / "c" / ".." / "elsewhere.jpg"), "is absolute, outside the manifest's folder"),
                     ("/etc/passwd", "is absolute, outside the manifest's folder")):
        m = tmp_path / "c" / "bad.tsv"
        m.write_text(base + f"x-1\t{bad}\tboot\ttrain\n")
        line = len(m.read_text().splitlines())
        with pytest.raises(InputError, match=f"bad.tsv:{line}: image path .* of 'x-1' {why}; .*--allow-outside-root"):
            read_manifest(m)
        assert read_manifest(m, allow_outside_root=True).paths[-1].endswith(bad.split("/")[-1])
    m.write_text(base + "x-1\timg/sub/../boot/000.jpg\tboot\ttrain\n"  # inside after all: fine
                 + f"x-2\t{tmp_path / 'c' / 'img' / 'boot' / '001.jpg'}\tboot\ttrain\n")  # absolute, inside
    assert len(read_manifest(m)) == 8
    m.write_text(base + "x-1\t/etc/passwd\tboot\ttrain\n")
    code, _, err = sinet("extract-features", "--data", f"manifest:{m}", *TINY, "--out", tmp_path / "a")
    assert code == 1 and one_line(err) and "is absolute" in err, err
    code, _, err = sinet("--allow-outside-root", "extract-features", "--data", f"manifest:{m}", *TINY,
                         "--out", tmp_path / "a")
    assert code == 0 and "skipped image x-1" in err, err  # read, and not an image


def test_exported_manifest_through_its_symlink_reads_without_the_flag(crawl, sinet):
    from sinet_cli.datasets import read_manifest

    _, art = crawl
    code, _, err = sinet("export", "--out", art)
    assert code == 0, err
    table = read_manifest(art / "export" / "cleaned.tsv")
    assert len(table) > 0 and all(Path(p).is_file() for p in table.paths)


def test_one_class_is_an_error(tmp_path, sinet):
    (tmp_path / "crawl" / "boot").mkdir(parents=True)
    from fault_fixtures import demo_pixels
    from PIL import Image

    for k in range(4):
        Image.fromarray(demo_pixels()[k]).save(tmp_path / "crawl" / "boot" / f"{k}.png")
    code, _, err = sinet("extract-features", "--data", f"imagefolder:{tmp_path / 'crawl'}", *TINY,
                         "--out", tmp_path / "art")
    assert code == 1 and one_line(err) and "1 class ('boot')" in err and "at least two" in err, err
    assert not (tmp_path / "art" / "features.h5").exists()


def test_summary_and_report_refuse_artifacts_from_another_run(crawl, base, tmp_path, sinet):
    root, art = crawl
    other = tmp_path / "other"
    manifest = write_crawl(other, n_train=5)
    code, _, err = sinet("extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", other / "art")
    assert code == 0, err
    shutil.copy(other / "art" / "features.h5", art / "features.h5")  # features of another crawl
    for command in ("summary", "report"):
        code, out, err = sinet(command, "--out", art)
        assert code == 1 and out == "" and one_line(err), err
        assert f"{art / 'scores.h5'} was not scored from this folder's {art / 'features.h5'}" in err, err
        assert "rerun sinet score-noise" in err


def test_report_shows_paths_relative_to_the_artifact_folder(crawl, sinet):
    root, art = crawl
    code, _, err = sinet("report", "--out", art.resolve())
    assert code == 0, err
    page = (art / "report" / "index.html").read_text()
    assert str(root.resolve()) not in page and str(Path.home()) not in page
    assert "scores.h5" in page
