"""sinet_cli.locks: one reader-writer discipline, one global order, busy locks as one line (exit 75)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from sinet_cli import locks
from sinet_cli.locks import BusyError, artifact_locks, lock_path


def in_thread(fn):
    """Run ``fn`` in another thread (its own lock registry, like another process) and return what it
    returned or raised."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    return box


def test_readers_share_writers_exclude(tmp_path):
    a = tmp_path / "features.h5"
    with artifact_locks(reads=[a], command="summary"):
        # another reader gets in at once
        assert "error" not in in_thread(lambda: artifact_locks(reads=[a], command="report").__enter__())
        # a writer does not, and is told who reads it
        box = in_thread(lambda: artifact_locks(writes=[a], wait=0, command="rescore").__enter__())
        assert isinstance(box.get("error"), BusyError)
        msg = str(box["error"])
        assert msg.startswith(f"{a}: busy: another ") and f"holds {lock_path(a)} (reading it)" in msg
    with artifact_locks(writes=[a], command="extract-features"):
        for mode in ("reads", "writes"):
            box = in_thread(lambda: artifact_locks(**{mode: [a]}, wait=0.2, command="x").__enter__())
            err = box.get("error")
            assert isinstance(err, BusyError) and "another extract-features run (pid" in str(err), box
            assert "(writing it)" in str(err) and "gave up after 0.2s" in str(err)


def test_a_waiting_run_gets_the_lock_when_it_is_released(tmp_path):
    a = tmp_path / "scores.h5"
    order = []
    with artifact_locks(writes=[a], command="score-noise"):
        def waiter():
            with artifact_locks(writes=[a], wait=30, command="rescore"):
                order.append("waiter")

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        order.append("holder done")
    t.join(30)
    assert order == ["holder done", "waiter"]


def test_locks_are_taken_in_one_global_order(tmp_path, monkeypatch):
    taken = []
    real = locks._acquire
    monkeypatch.setattr(locks, "_acquire", lambda fd, mode, art, *a: (taken.append((art.name, mode)), real(fd, mode, art, *a)))
    f, g, p, s, m = (tmp_path / n for n in ("features.h5", "graph.h5", "prototypes.h5", "scores.h5", "metrics.json"))
    with artifact_locks(writes=[s, f], reads=[m, p, g], command="x"):
        pass
    # by path, whatever order the command lists them in, the shared metrics.json last
    assert taken == [("features.h5", "exclusive"), ("graph.h5", "shared"), ("prototypes.h5", "shared"),
                     ("scores.h5", "exclusive"), ("metrics.json", "shared")]


def test_no_deadlock_between_two_runs_listing_locks_in_opposite_orders(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    done = []

    def run(first, second):
        for _ in range(30):
            with artifact_locks(writes=[first, second], wait=30, command="x"):
                time.sleep(0.001)
        done.append(1)

    threads = [threading.Thread(target=run, args=(a, b)), threading.Thread(target=run, args=(b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert done == [1, 1]


def test_reentrant_within_a_run_and_released_at_the_end(tmp_path):
    a = tmp_path / "scores.h5"
    with artifact_locks(writes=[a], command="rescore"):
        with artifact_locks(writes=[a], reads=[a], command="score-noise"):  # rescore runs score-noise in process
            assert locks.held_mode(a) == "exclusive"
        assert locks.held_mode(a) == "exclusive"
        with pytest.raises(RuntimeError, match="cannot be upgraded"):
            with artifact_locks(reads=[tmp_path / "b.h5"], command="x"):
                with artifact_locks(writes=[tmp_path / "b.h5"], command="x"):
                    pass
    assert locks.held_mode(a) is None
    fd = os.open(lock_path(a), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: released by the outer block
        assert os.read(fd, 100) == b""  # and the holder's name cleared with it
    finally:
        os.close(fd)


def test_read_only_folder_is_read_without_a_lock_and_refused_for_writing(tmp_path, monkeypatch):
    import errno

    a = tmp_path / "ro" / "features.h5"
    real_open = os.open

    def ro_open(path, flags, *args):  # a read-only file system under tmp_path/ro
        if str(path).startswith(str(tmp_path / "ro")) and flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", ro_open)
    with artifact_locks(reads=[a], command="summary"):
        assert locks.held_mode(a) is None  # nothing to lock: nobody can write there
    from sinet_cli.errors import StorageError

    with pytest.raises(StorageError, match=r"features\.h5\.lock: cannot write \(Read-only file system\); not "
                                           r"writable: pass --out"):
        with artifact_locks(writes=[a], command="extract-features"):
            pass


def test_busy_artifact_through_the_cli_is_one_line_exit_75(tmp_path, sinet):
    from fault_fixtures import write_graph

    art = tmp_path / "art"
    write_graph(art / "graph.h5")
    with artifact_locks(writes=[art / "graph.h5"], command="build-graph"):
        box = in_thread(lambda: sinet("make-prototypes", "--out", art, "--device", "cpu"))
    assert "value" in box, box
    code, out, err = box["value"]
    assert code == 75 and out == "" and err.count("\n") == 1, err
    assert f"{art / 'graph.h5'}: busy: another build-graph run (pid {os.getpid()}) holds" in err, err
    assert not (art / "prototypes.h5").exists()


def test_extract_shards_lock_their_own_files_and_run_side_by_side(tmp_path, sinet):
    from fault_fixtures import write_crawl

    manifest = write_crawl(tmp_path / "c", n_train=2, n_val=0)
    art = tmp_path / "art"
    tiny = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--workers", "0",
            "--device", "cpu"]
    # shard 0 of 2 is being written by another run: shard 1 goes ahead, a second shard-0 run is told
    with artifact_locks(writes=[art / "features.shard-0-of-2.h5"], command="extract-features"):
        box = in_thread(lambda: sinet("extract-features", "--data", f"manifest:{manifest}", *tiny, "--out", art,
                                      "--shard", "1/2"))
        assert box["value"][0] == 0, box
        box = in_thread(lambda: sinet("extract-features", "--data", f"manifest:{manifest}", *tiny, "--out", art,
                                      "--shard", "0/2"))
        assert box["value"][0] == 75 and "features.shard-0-of-2.h5: busy" in box["value"][2], box
    assert (art / "features.shard-1-of-2.h5").exists() and not (art / "features.shard-0-of-2.h5").exists()
