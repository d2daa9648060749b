"""The fault cases of issue 19, run against one or two checkouts of sinet: held / not held.

    python bench/fault_cases.py --before /tmp/before --after .    # the table, before and after
    python bench/fault_cases.py --after .                          # one checkout
    python bench/fault_cases.py --after . --only disk,ctrl-c       # cases whose name holds a word

Every case runs sinet as a separate process (``tests/fault_run.py``, which can pause or SIGKILL a
command at a rename, or pause it at the n-th call of a function) with ``PYTHONPATH`` pointing at the
checkout under test, on a copy of one small crawl (JPEG files of demo images, a random-init tiny
backbone) and its artifacts, built by that checkout. A case holds when what the issue asks for
happened: nothing lost or silently wrong, one line saying what to do, no traceback, no crash.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
RUNNER = TESTS / "fault_run.py"
sys.path[:0] = [str(ROOT), str(TESTS)]
TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--workers", "0",
        "--device", "cpu"]
UNITS = ["features.h5", "graph.h5", "prototypes.h5", "prototypes.faiss", "scores.h5", "suspects.tsv"]


class Env:
    """One checkout under test: runs its sinet in processes, builds its base crawl once."""

    def __init__(self, src: Path, work: Path):
        self.src, self.work = src.resolve(), work
        self.base: Path | None = None

    def env(self, **extra: str) -> dict:
        return dict(os.environ, PYTHONPATH=str(self.src), CI="1", **extra)

    def start(self, *args, fault: dict | None = None, preexec: Callable | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(RUNNER), *map(str, args)], cwd=self.work,
                                env=self.env(**(fault or {})), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=preexec)

    def run(self, *args, fault: dict | None = None, preexec: Callable | None = None,
            timeout: float = 600) -> tuple[int, str]:
        p = self.start(*args, fault=fault, preexec=preexec)
        _, err = p.communicate(timeout=timeout)
        return p.returncode, err

    def py(self, code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True,
                             timeout=300)
        if out.returncode:
            raise RuntimeError(out.stderr[-1500:])
        return out.stdout

    def build_base(self) -> Path:
        if self.base is not None:
            return self.base
        from fault_fixtures import write_crawl

        root = self.work / "base"
        manifest = write_crawl(root)
        art = root / "art"
        for step in (["extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art],):
            code, err = self.run(*step)
            assert code == 0, err
        self.py(f"import sys; sys.path.insert(0, {str(TESTS)!r}); from fault_fixtures import write_graph; "
                f"from pathlib import Path; write_graph(Path({str(art / 'graph.h5')!r}))")
        for step in (["make-prototypes", "--out", art, "--device", "cpu"],
                     ["score-noise", "--out", art, "--device", "cpu"]):
            code, err = self.run(*step)
            assert code == 0, err
        self.base = root
        return root

    def copy(self, name: str) -> tuple[Path, Path]:
        root = self.work / name
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(self.build_base(), root, symlinks=True)
        return root, root / "art"

    def h5(self, path: Path, code: str) -> object:
        """Evaluate ``code`` with ``f`` an open h5py File of ``path`` (in a process of this checkout)."""
        out = self.py(f"import h5py, json, numpy as np\nwith h5py.File({str(path)!r}, 'r') as f:\n"
                      f"    print(json.dumps({code}, default=str))")
        return json.loads(out)


# -- helpers --------------------------------------------------------------------------------------


def one_line(err: str) -> bool:
    lines = [x for x in err.splitlines() if x.strip()]
    return len(lines) >= 1 and lines[-1].startswith("sinet: error: ") and "Traceback" not in err


def last(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    return (lines[-1] if lines else "(nothing)")[:230]


def wait_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def content_consistent(e: Env, path: Path) -> tuple[bool, int]:
    """Whether an artifact's stored fingerprint is the one of what it holds, and its row count."""
    out = e.py(f"import sys, h5py\nfrom sinet_cli import store\nwith h5py.File({str(path)!r}, 'r') as f:\n"
               "    print(store._content_fingerprint(f) == f.attrs['fingerprint'], len(f['ids']))")
    ok, n = out.split()
    return ok == "True", int(n)


def fingerprints(art: Path) -> dict:
    import hashlib

    return {n: hashlib.md5((art / n).read_bytes()).hexdigest() if (art / n).exists() else None for n in UNITS}


def flip_features_byte(e: Env, path: Path) -> None:
    e.py("import h5py\n"
         f"with h5py.File({str(path)!r}, 'r') as f:\n"
         "    ds = f['features']\n"
         "    if ds.chunks:\n"
         "        info = ds.id.get_chunk_info(0); off = info.byte_offset + info.size // 2\n"
         "    else:\n"
         "        off = ds.id.get_offset() + ds.id.get_storage_size() // 2\n"
         f"with open({str(path)!r}, 'r+b') as fh:\n"
         "    fh.seek(off); b = fh.read(1); fh.seek(off); fh.write(bytes([b[0] ^ 0x10]))\n")


def put_nan(e: Env, path: Path, row: int = 5) -> str:
    return e.py("import h5py, numpy as np\n"
                f"with h5py.File({str(path)!r}, 'r+') as f:\n"
                f"    r = f['features'][{row}].copy(); r[0] = np.nan; f['features'][{row}] = r\n"
                f"    i = f['ids'][{row}]; print(i.decode() if isinstance(i, bytes) else i)").strip()


def limit_fsize(nbytes: int) -> Callable:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def without_root_override() -> None:
    """Root's override of file permissions dropped for the child, so a 555 folder is read-only."""
    import ctypes

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 3):  # CAP_DAC_OVERRIDE, CAP_FOWNER
            libc.prctl(24, cap, 0, 0, 0)


# -- the cases ------------------------------------------------------------------------------------


def case_extract_force_and_rescore(e: Env) -> tuple[bool, str]:
    from fault_fixtures import write_crawl

    root, art = e.copy("c1")
    manifest = write_crawl(root, n_train=7)
    flag = root / "go"
    ex = e.start("extract-features", "--data", f"manifest:{manifest}", *TINY, "--out", art, "--force",
                 "--batch-size", "4", "--chunk-rows", "4",
                 fault={"FAULT_PAUSE_CALL": "sinet_cli.store:ArtifactWriter.append_rows:2", "FAULT_SIGNAL": str(flag)})
    if not wait_file(Path(str(flag) + ".paused"), ex):
        return False, "extract did not reach its second chunk: " + last(ex.communicate()[1])
    code, err = e.run("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    flag.touch()
    _, ex_err = ex.communicate(timeout=600)
    code2, err2 = e.run("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    ok, n = content_consistent(e, art / "features.h5")
    held = ok and n == 27 and (code == 75 or code == 0) and "Traceback" not in err + ex_err + err2
    return held, (f"rescore during extract: rc {code} ({last(err)}); extract rc {ex.returncode}; features.h5 "
                  f"{n} rows (27 expected), fingerprint {'matches' if ok else 'DOES NOT match'} its content")


def case_rescore_during_prototypes_commit(e: Env) -> tuple[bool, str]:
    from fault_fixtures import write_crawl

    root, art = e.copy("c2")
    manifest = write_crawl(root, n_train=7)
    flag = root / "go"
    mp = e.start("make-prototypes", "--out", art, "--device", "cpu", "--temperature", "0.2",
                 fault={"FAULT_DIR": str(art), "FAULT_PAUSE_DST": "prototypes.faiss", "FAULT_SIGNAL": str(flag)})
    if not wait_file(Path(str(flag) + ".paused"), mp):
        return False, "make-prototypes did not reach its commit"
    code, err = e.run("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    flag.touch()
    mp.communicate(timeout=600)
    busy = code == 75 and one_line(err) and "make-prototypes" in err and "busy" in err
    return busy, f"rescore rc {code}: {last(err)}"


def case_bomb_png(e: Env) -> tuple[bool, str]:
    from fault_fixtures import bilevel_png, write_crawl

    root, art = e.copy("c3")
    bilevel_png(root / "img" / "boot" / "bomb.png", 20000, 20000)
    manifest = write_crawl(root, n_train=7, extra_lines=["boot-bomb\timg/boot/bomb.png\tboot\ttrain"])
    code, err = e.run("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    skipped = e.h5(art / "features.h5", "[[x.decode() if isinstance(x, bytes) else str(x) for x in f['skipped_ids'][:]] "
                                        "if 'skipped_ids' in f else [], len(f['ids'])]")
    held = code == 0 and any("boot-bomb" in s for s in skipped[0]) and skipped[1] == 27
    return held, f"rc {code}, {len(err.splitlines())} stderr lines, skipped {skipped[0]}, {skipped[1]} rows (27 expected)"


def case_large_png_memory(e: Env) -> tuple[bool, str]:
    from fault_fixtures import bilevel_png, write_crawl

    root, art = e.copy("c4")
    bilevel_png(root / "img" / "coat" / "huge.png", 12000, 12000)
    manifest = write_crawl(root, n_train=6, extra_lines=["coat-huge\timg/coat/huge.png\tcoat\ttrain"])
    with tempfile.TemporaryFile("w+") as err_file:
        p = subprocess.Popen([sys.executable, str(RUNNER), "rescore", "--data", f"manifest:{manifest}", "--out", art,
                              "--workers", "0"], cwd=e.work, env=e.env(), text=True, stdout=subprocess.DEVNULL,
                             stderr=err_file)
        _, status, usage = os.wait4(p.pid, 0)  # this run's own peak resident memory
        p.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read()
    skipped = e.h5(art / "features.h5", "[x.decode() if isinstance(x, bytes) else str(x) for x in f['skipped_ids'][:]] "
                                        "if 'skipped_ids' in f else []")
    held = p.returncode == 0 and "coat-huge" in skipped
    return held, f"rc {p.returncode}, skipped {skipped}; peak RSS of the run {usage.ru_maxrss / 1024:.0f} MB"


def nan_case(command: list[str]) -> Callable[[Env], tuple[bool, str]]:
    def case(e: Env) -> tuple[bool, str]:
        _, art = e.copy("c5")
        image = put_nan(e, art / "features.h5")
        before = fingerprints(art)
        code, err = e.run(*command, "--out", art)
        held = code != 0 and one_line(err) and image in last(err) and fingerprints(art) == before
        return held, f"rc {code}: {last(err)}"
    return case


def case_flipped_byte(e: Env) -> tuple[bool, str]:
    _, art = e.copy("c8")
    flip_features_byte(e, art / "features.h5")
    code, err = e.run("make-prototypes", "--out", art, "--device", "cpu", "--force")
    held = code != 0 and one_line(err) and "features.h5" in last(err)
    return held, f"rc {code}: {last(err)}"


def case_killed_prototypes(e: Env) -> tuple[bool, str]:
    _, art = e.copy("c9")
    cmd = ["make-prototypes", "--out", art, "--device", "cpu", "--temperature", "0.2"]
    code, _ = e.run(*cmd, fault={"FAULT_DIR": str(art), "FAULT_KILL_DST": "prototypes.faiss"})
    code2, err2 = e.run(*cmd)  # the plain rerun
    code3, err3 = e.run("score-noise", "--out", art, "--device", "cpu")
    same = e.py("import numpy as np, faiss\nfrom sinet_cli import store\n"
                f"p = store.open_artifact({str(art / 'prototypes.h5')!r}, 'prototypes').read('prototypes')\n"
                f"i = faiss.read_index({str(art / 'prototypes.faiss')!r})\n"
                "print(bool(np.allclose(i.reconstruct_n(0, i.ntotal), p, atol=1e-5)))").strip() == "True"
    held = code == -signal.SIGKILL and code2 == 0 and same and code3 == 0
    return held, (f"killed before the .faiss rename; plain rerun: {last(err2)}; .faiss matches .h5: {same}; "
                  f"score-noise rc {code3}: {last(err3)[:120]}")


def case_killed_scores(e: Env) -> tuple[bool, str]:
    _, art = e.copy("c10")
    _, ref = e.copy("c10ref")
    cmd = ["score-noise", "--device", "cpu", "--alpha", "1.1"]
    e.run(*cmd, "--out", ref)
    code, _ = e.run(*cmd, "--out", art, fault={"FAULT_DIR": str(art), "FAULT_KILL_DST": "suspects.tsv"})
    code2, err2 = e.run(*cmd, "--out", art)
    same = (art / "suspects.tsv").read_bytes() == (ref / "suspects.tsv").read_bytes()
    held = code == -signal.SIGKILL and code2 == 0 and same
    return held, f"killed before the suspects.tsv rename; plain rerun: {last(err2)[:100]}; suspects.tsv as uninterrupted: {same}"


def case_killed_train(e: Env) -> tuple[bool, str]:
    _, art = e.copy("c11")
    cmd = ["train", "--mode", "C", "--epochs", "2", "--device", "cpu", "--out", art]
    code, _ = e.run(*cmd, fault={"FAULT_DIR": str(art), "FAULT_KILL_DST": "metrics.json"})
    code2, err2 = e.run(*cmd)
    code3, err3 = e.run("summary", "--out", art)
    shared = json.loads((art / "metrics.json").read_text()).get("train", {}) if (art / "metrics.json").exists() else {}
    held = code == -signal.SIGKILL and code2 == 0 and "C" in shared and code3 == 0
    return held, f"killed before the shared metrics.json rename; plain rerun: {last(err2)[:90]}; runs in metrics.json: {sorted(shared)}"


def case_rescore_wait_options(e: Env) -> tuple[bool, str]:
    from fault_fixtures import write_crawl

    root, art = e.copy("c12")
    manifest = write_crawl(root, n_train=7)
    flag = root / "go"
    sc = e.start("score-noise", "--out", art, "--device", "cpu", "--force", "--probe-epochs", "7",
                 fault={"FAULT_DIR": str(art), "FAULT_PAUSE_AT": "1", "FAULT_SIGNAL": str(flag)})
    if not wait_file(Path(str(flag) + ".paused"), sc):
        return False, "score-noise did not reach its commit"
    rs = e.start("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0", "--wait", "300")
    time.sleep(8)  # rescore starts, and waits for a lock
    flag.touch()
    sc.communicate(timeout=600)
    _, err = rs.communicate(timeout=600)
    epochs = e.h5(art / "scores.h5", "json.loads(f.attrs['params']).get('probe_epochs')")
    held = rs.returncode == 0 and epochs == 7 and "options changed" not in err
    return held, f"rescore rc {rs.returncode}; scores.h5 probe_epochs {epochs} (7 expected); " + \
        ("rescored every row with the old options" if "options changed" in err else "appended")


def case_truncated_scores(e: Env) -> tuple[bool, str]:
    from fault_fixtures import write_crawl

    root, art = e.copy("c13")
    manifest = write_crawl(root, n_train=7)
    data = (art / "scores.h5").read_bytes()
    (art / "scores.h5").write_bytes(data[: len(data) // 2])
    code, err = e.run("rescore", "--data", f"manifest:{manifest}", "--out", art, "--workers", "0")
    held = code != 0 and one_line(err) and "scores.h5" in last(err)
    return held, f"rc {code}: {last(err)}"


def disk_full(command: list[str]) -> Callable[[Env], tuple[bool, str]]:
    def case(e: Env) -> tuple[bool, str]:
        root, art = e.copy("c14")
        before = fingerprints(art)
        cmd = [a.replace("{manifest}", str(root / "crawl.tsv")) for a in command]
        code, err = e.run(*cmd, "--out", art, "--force", preexec=limit_fsize(48 * 1024))
        held = code == 1 and one_line(err) and fingerprints(art) == before
        return held, f"rc {code}{' (SIGSEGV)' if code == -11 else ''}: {last(err)[:150]}"
    return case


def read_only(command: list[str]) -> Callable[[Env], tuple[bool, str]]:
    def case(e: Env) -> tuple[bool, str]:
        root, art = e.copy("c15")
        for lock in art.glob("*.lock"):  # as a folder that was never written by this sinet
            lock.unlink()
        cmd = [a.replace("{manifest}", str(root / "crawl.tsv")).replace("{art}", str(art)) for a in command]
        os.chmod(art, 0o555)
        try:
            code, err = e.run(*cmd, preexec=without_root_override)
        finally:
            os.chmod(art, 0o755)
        n = len([x for x in err.splitlines() if x.strip()])
        return code == 1 and one_line(err) and n <= 2, f"rc {code}, {n} lines: {last(err)[:150]}"
    return case


def ctrl_c(command: list[str], at_work: str) -> Callable[[Env], tuple[bool, str]]:
    def case(e: Env) -> tuple[bool, str]:
        from fault_fixtures import write_crawl

        root, art = e.copy("c16")
        manifest = write_crawl(root, n_train=120) if "{manifest}" in " ".join(command) else root / "crawl.tsv"
        ready = root / "ready"
        before = fingerprints(art)
        p = e.start(*[a.replace("{manifest}", str(manifest)) for a in command], "--out", art,
                    fault={"FAULT_READY": at_work, "FAULT_READY_FILE": str(ready), "FAULT_READY_HOLD": "60"})
        if not wait_file(ready, p):
            return False, "never reached its work: " + last(p.communicate()[1])
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        says = one_line(err) and "again" in last(err)
        intact = fingerprints(art) == before or command[0] == "rescore"
        return p.returncode == 130 and says and intact, f"rc {p.returncode}: {last(err) if err.strip() else '(no message)'}"
    return case


def manifest_path(bad: str) -> Callable[[Env], tuple[bool, str]]:
    def case(e: Env) -> tuple[bool, str]:
        from fault_fixtures import write_crawl

        root, art = e.copy("c17")
        m = write_crawl(root, n_train=6, extra_lines=[f"x-1\t{bad}\tboot\ttrain"])
        code, err = e.run("extract-features", "--data", f"manifest:{m}", *TINY, "--out", root / "new")
        held = code == 1 and one_line(err) and "crawl.tsv:" in last(err)
        return held, f"rc {code}: {last(err)[:160]}"
    return case


def case_one_class(e: Env) -> tuple[bool, str]:
    from PIL import Image

    from fault_fixtures import demo_pixels

    root = e.work / "c18"
    shutil.rmtree(root, ignore_errors=True)
    (root / "crawl" / "boot").mkdir(parents=True)
    for k in range(6):
        Image.fromarray(demo_pixels()[k]).save(root / "crawl" / "boot" / f"{k}.png")
    code, err = e.run("extract-features", "--data", f"imagefolder:{root / 'crawl'}", *TINY, "--out", root / "art")
    return code == 1 and one_line(err), f"rc {code}: {last(err)[:160]}"


def case_foreign_summary(e: Env) -> tuple[bool, str]:
    from fault_fixtures import write_crawl

    root, art = e.copy("c19")
    other = e.work / "c19-other"
    shutil.rmtree(other, ignore_errors=True)
    m = write_crawl(other, n_train=5)
    e.run("extract-features", "--data", f"manifest:{m}", *TINY, "--out", other / "art")
    shutil.copy(other / "art" / "features.h5", art / "features.h5")
    code, err = e.run("summary", "--out", art)
    return code == 1 and one_line(err), f"rc {code}: {last(err)[:160]}"


def case_report_paths(e: Env) -> tuple[bool, str]:
    root, art = e.copy("c20")
    code, err = e.run("report", "--out", art.resolve())
    page = (art / "report" / "index.html").read_text() if (art / "report" / "index.html").exists() else ""
    found = sorted(set(re.findall(re.escape(str(e.work.resolve())) + r"[^\s\"'<&]*", page)))
    return code == 0 and not found, f"rc {code}; absolute local paths in the page: {found[:3] or 'none'}"


CASES: list[tuple[str, Callable[[Env], tuple[bool, str]]]] = [
    ("1 extract-features --force + rescore at once", case_extract_force_and_rescore),
    ("1 rescore during make-prototypes' commit", case_rescore_during_prototypes_commit),
    ("2 bomb PNG 20000x20000 in a cron run", case_bomb_png),
    ("2 12000x12000 PNG (decoded whole?)", case_large_png_memory),
    ("3 NaN feature -> make-prototypes", nan_case(["make-prototypes", "--device", "cpu", "--force"])),
    ("3 NaN feature -> train", nan_case(["train", "--mode", "C", "--epochs", "2", "--device", "cpu"])),
    ("3 NaN feature -> score-noise", nan_case(["score-noise", "--device", "cpu", "--force"])),
    ("3 flipped byte in features.h5", case_flipped_byte),
    ("4 kill between prototypes.h5 / .faiss renames", case_killed_prototypes),
    ("4 kill between scores.h5 / suspects.tsv renames", case_killed_scores),
    ("4 kill before the shared metrics.json merge", case_killed_train),
    ("5 rescore --wait behind score-noise --force", case_rescore_wait_options),
    ("5 truncated scores.h5 under rescore", case_truncated_scores),
    ("6 disk full: extract-features", disk_full(["extract-features", "--data", "manifest:{manifest}", *TINY])),
    ("6 disk full: make-prototypes", disk_full(["make-prototypes", "--device", "cpu"])),
    ("6 disk full: score-noise", disk_full(["score-noise", "--device", "cpu"])),
    ("6 read-only --out: extract-features", read_only(["extract-features", "--data", "manifest:{manifest}", *TINY,
                                                       "--out", "{art}/new"])),
    ("6 read-only --out: make-prototypes", read_only(["make-prototypes", "--device", "cpu", "--force", "--out",
                                                      "{art}"])),
    ("6 read-only --out: score-noise", read_only(["score-noise", "--device", "cpu", "--force", "--out", "{art}"])),
    ("6 read-only --out: report", read_only(["report", "--out", "{art}"])),
    ("6 read-only --out: export", read_only(["export", "--out", "{art}"])),
    ("6 Ctrl-C in extract-features", ctrl_c(["extract-features", "--data", "manifest:{manifest}", *TINY, "--force",
                                             "--batch-size", "1"], "stages.extract_features:extract")),
    ("6 Ctrl-C in make-prototypes", ctrl_c(["make-prototypes", "--device", "cpu", "--force", "--rounds", "400"],
                                           "stages.make_prototypes:make_prototypes")),
    ("6 Ctrl-C in score-noise", ctrl_c(["score-noise", "--device", "cpu", "--force", "--probe-epochs", "20000"],
                                       "stages.score_noise:fit_two_round_probe")),
    ("6 Ctrl-C in train", ctrl_c(["train", "--mode", "C", "--epochs", "20000", "--device", "cpu"],
                                 "stages.train:train_features")),
    ("6 Ctrl-C in rescore", ctrl_c(["rescore", "--data", "manifest:{manifest}", "--workers", "0", "--batch-size", "1"],
                                   "stages.extract_features:extract")),
    ("7 manifest row /etc/passwd", manifest_path("/etc/passwd")),
    ("7 manifest row ../ outside its folder", manifest_path("../../outside.jpg")),
    ("7 one-class crawl", case_one_class),
    ("7 summary on another dataset's features.h5", case_foreign_summary),
    ("7 report embeds absolute local paths", case_report_paths),
]


def run_all(src: Path, only: list[str]) -> dict[str, tuple[bool, str]]:
    out = {}
    with tempfile.TemporaryDirectory(prefix="sinet-faults-") as tmp:
        e = Env(src, Path(tmp))
        for name, case in CASES:
            if only and not any(w in name for w in only):
                continue
            t0 = time.monotonic()
            try:
                held, detail = case(e)
            except Exception as ex:  # noqa: BLE001 - a case that could not run is not held
                held, detail = False, f"case failed to run: {type(ex).__name__}: {str(ex)[:200]}"
            out[name] = (held, detail)
            print(f"[{src}] {name}: {'held' if held else 'NOT HELD'} ({time.monotonic() - t0:.0f}s) - {detail}",
                  file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="a checkout of sinet before the change (e.g. git worktree of main)")
    ap.add_argument("--after", type=Path, default=ROOT, help="the checkout to test (default: this one)")
    ap.add_argument("--only", default="", help="comma-separated words: run only the cases whose name holds one")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    results = {"after": run_all(args.after, only)}
    if args.before:
        results["before"] = run_all(args.before, only)
    names = [n for n, _ in CASES if n in results["after"]]
    print(f"\n| case | {'before | ' if args.before else ''}after |")
    print(f"|---|{'---|' if args.before else ''}---|")
    for n in names:
        cells = ([("held" if results["before"][n][0] else "NOT held")] if args.before else []) + \
            [("held" if results["after"][n][0] else "NOT held")]
        print(f"| {n} | {' | '.join(cells)} |")
    for side in ("before", "after"):
        if side in results:
            held = sum(v[0] for v in results[side].values())
            print(f"{side}: {held} of {len(results[side])} held")
    if args.json:
        args.json.write_text(json.dumps({k: {n: list(v) for n, v in r.items()} for k, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
