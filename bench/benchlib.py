"""Shared helpers of the benchmark scripts: synthetic artifacts written chunk by chunk through the
store, in-process command runs, timing, peak RSS of a child process, and the figure records that
``bench/run_all.py`` collects.

Every benchmark measures its figure *and* its baseline in the same process run, interleaved, and
reports the ratio: the bench machine has 2 cores shared with other work, so absolute seconds move
from run to run while ratios measured side by side stay meaningful.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CI", "1")  # no progress bars: they would draw into the timed region
os.environ.setdefault("SINET_QUIET", "1")

from sinet_cli import store  # noqa: E402


# -- figures ---------------------------------------------------------------------------------


def figure(name: str, value: float, unit: str, baseline: str, baseline_value: float | None,
           ratio: float | None, target: str, met: bool | None, note: str = "") -> dict[str, Any]:
    """One line of the final table: the figure, its baseline (measured in the same run), the ratio."""
    return {"figure": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": ratio, "target": target, "met": met, "note": note}


def emit(figures: list[dict[str, Any]], json_path: str | None) -> None:
    """Print the figures of one script and write them where run_all.py reads them."""
    print()
    for f in figures:
        print(format_figure(f))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=1, default=float) + "\n")


def format_figure(f: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    verdict = {True: "MET", False: "MISSED", None: "-"}[f["met"]]
    base = f"{f['baseline']} {num(f['baseline_value'])}" if f["baseline"] else "-"
    ratio = "n/a" if f["ratio"] is None else f"{f['ratio']:.2f}x"
    line = (f"{f['figure']}: {num(f['value'])} {f['unit']} | baseline: {base} | ratio {ratio} | "
            f"target {f['target']}: {verdict}")
    return line + (f" ({f['note']})" if f.get("note") else "")


def common_args(ap) -> None:
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU paths; needs a CUDA machine)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not the targets)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="write the figures here (run_all.py)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions; the fastest counts")


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- timing ----------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Run every function ``repeats`` times, interleaved (a, b, b, a, ...): the fastest time of each.

    Interleaving spreads any background load on the shared cores over all contenders."""
    best = {k: float("inf") for k in fns}
    for r in range(max(1, repeats)):
        for k, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):  # a b, b a: no order bias
            _, t = timed(fn)
            print(f"  {k}: {t:.2f} s", flush=True)
            best[k] = min(best[k], t)
    return best


def sinet(*args: object) -> float:
    """Run one sinet command in-process (what a user runs, without the interpreter start-up);
    returns its wall time in seconds."""
    from sinet_cli.app import main

    t0 = time.perf_counter()
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"sinet {' '.join(map(str, args))} exited {e.code}") from None
    return time.perf_counter() - t0


@contextmanager
def scratch(work: Path | None, prefix: str) -> Iterator[Path]:
    """The scratch folder of a bench script: ``work`` when given (kept), else a temp dir removed
    at the end."""
    folder = work or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)


# -- synthetic artifacts ---------------------------------------------------------------------


def synthetic_centers(c: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((c, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_features(path: Path, n: int, d: int, c: int, *, dtype=np.float16, chunk: int = 65536, seed: int = 0,
                   noise_rate: float = 0.3, with_clean: bool = False, with_splits: bool = False,
                   centers: np.ndarray | None = None) -> None:
    """A features.h5 of N unit rows around C class centers, written chunk by chunk through
    ``store.ArtifactWriter`` (memory bounded by the chunk). ``noise_rate`` of the labels are
    flipped to a uniformly drawn class; ``clean_labels`` and ``splits`` (90% train) optional."""
    rng = np.random.default_rng(seed + 1)
    centers = synthetic_centers(c, d, seed) if centers is None else centers
    sigma = 1.0 / np.sqrt(d)  # noise of norm ~1 around a unit center: cosine to its center ~0.7
    # one pool of Gaussian noise rows, read at a random offset per chunk: drawing N x D normals
    # would dominate the setup time at N = 5M
    pool = rng.standard_normal((chunk + 4099, d), dtype=np.float32)
    pool *= sigma
    writer = store.ArtifactWriter(path, "features", {"bench": "synthetic", "n": n, "d": d, "c": c, "seed": seed},
                                  {}, mode="new")
    try:
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            y = rng.integers(0, c, b)
            off = int(rng.integers(0, 4099))
            x = centers[y]
            x += pool[off : off + b]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            flip = rng.random(b) < noise_rate
            labels = np.where(flip, (y + rng.integers(1, c, b)) % c, y)
            rows = {"ids": np.char.add("img", np.arange(start, start + b).astype(str)),
                    "labels": labels.astype(np.int64), "features": x.astype(dtype)}
            if with_clean:
                rows["clean_labels"] = y.astype(np.int64)
            if with_splits:
                rows["splits"] = np.where(rng.random(b) < 0.9, "train", "val")
            writer.append_rows(rows)
        writer.write("classes", [f"class{i:05d}" for i in range(c)])
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_graph(path: Path, c: int, centers: np.ndarray) -> None:
    """A graph.h5 whose S_t is the cosine similarity of the class centers (diagonal 1)."""
    S = np.clip(centers @ centers.T, -1, 1).astype(np.float32)
    store.write_artifact(path, "graph", {"classes": [f"class{i:05d}" for i in range(c)], "S_w": S, "S_l": S,
                                         "S_t": S}, {"bench": "synthetic"}, {})


def prototype_size_args(ap) -> None:
    """--n/--d/--c of the make-prototypes benchmarks (the issue's N=200k, D=1,280, C=1,000)."""
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--c", type=int, default=1000)


def prototype_inputs(work: Path, n: int, d: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """features.h5 (float16, written chunk by chunk) and graph.h5 in ``work`` for make-prototypes,
    and what the stage reads of them: the float16 rows, the labels, S_t."""
    centers = synthetic_centers(c, d)
    _, t = timed(lambda: write_features(work / "features.h5", n, d, c, centers=centers))
    write_graph(work / "graph.h5", c, centers)
    print(f"  setup: features.h5 written chunk by chunk in {t:.1f} s "
          f"({(work / 'features.h5').stat().st_size / 2**20:,.0f} MB)", flush=True)
    with store.open_artifact(work / "features.h5", "features") as a:
        x16, labels = a.read("features"), a.read("labels").astype(np.int64)
    with store.open_artifact(work / "graph.h5", "graph") as g:
        S_t = g.read("S_t")
    return x16, labels, S_t


def write_prototypes(folder: Path, centers: np.ndarray) -> Path:
    """prototypes.h5 + prototypes.faiss with one prototype per class (the class centers), as
    make-prototypes would write them (its per-row consistency columns left empty)."""
    c = centers.shape[0]
    path = folder / "prototypes.h5"
    store.write_artifact(path, "prototypes", {
        "classes": [f"class{i:05d}" for i in range(c)], "prototypes": centers.astype(np.float32),
        "prototype_class": np.arange(c, dtype=np.int64), "initial_prototypes": centers.astype(np.float32),
        "ids": np.zeros(0, dtype=str), "consistency": np.zeros(0, dtype=np.float32)}, {"bench": "synthetic"}, {})
    store.write_faiss_index(folder / "prototypes.faiss", store.prototype_index(centers))
    return path


# -- artifacts as the Python API takes them ----------------------------------------------------


def class_graph(path: Path) -> Any:
    """graph.h5 as ``stages.ClassGraph``: its S_t and, when it has them, its label embeddings."""
    import stages

    with store.open_artifact(path, "graph") as g:
        emb = g.read("label_embeddings").astype(np.float32) if "label_embeddings" in g else None
        return stages.ClassGraph(classes=[str(c) for c in g.read("classes")], similarity=g.read("S_t"),
                                 label_embeddings=emb)


def train_split(path: Path, columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The train split of features.h5 (every row when it records no splits): float32 ``features``,
    int64 ``labels`` and ``columns`` (those it has), the rows make-prototypes and score-noise fit on."""
    with store.open_artifact(path, "features") as a:
        train = a.read("splits") == "train" if "splits" in a else np.ones(a.dims["N"], dtype=bool)
        out = {"features": a.read("features")[train].astype(np.float32),
               "labels": a.read("labels")[train].astype(np.int64)}
        out.update({c: a.read(c)[train] for c in columns if c in a})
    return out


# -- peak memory of a child ------------------------------------------------------------------


# A child's ru_maxrss starts at the RSS of the process that exec'd it (Linux carries the old
# address space's high-water mark over an exec), so a child spawned straight from this process -
# which holds torch, FAISS and benchmark arrays, ~1 GB - would report at least that. The command
# is therefore spawned by a tiny launcher interpreter (~10 MB), which reports its child's wait4.
_LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {time.perf_counter() - t} {os.waitstatus_to_exitcode(status)}")
"""


def child_peak_rss(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Run ``cmd`` (``cmd[0]`` a full path) as a child process; its own peak RSS in MB
    (``wait4``'s ru_maxrss of that child only, spawned by a small launcher: see above), its wall
    time, and its exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rss"
        launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *map(str, cmd)], cwd=ROOT,
                                  env={**os.environ, **(env or {})})
        if launcher.returncode != 0 or not result.exists():
            raise RuntimeError(f"the peak-RSS launcher failed (exit {launcher.returncode}) for {cmd}")
        maxrss_kb, wall, code = result.read_text().split()
    return int(maxrss_kb) / 1024.0, float(wall), int(code)
