"""``--engine ray``: feature extraction as one Ray task per part, on one machine or a Ray cluster.

A part is one WebDataset shard (``--data webdataset:...``) or a run of ``part_rows`` consecutive
images of any other reader. Each task rebuilds the backbone from the same recipe as the local path
(``stages.extract_features.build_backbone``, ``Preprocess``, ``Decode``) and runs the same
``stages.extract_features.extract`` over its images; the driver writes each finished part as its own
features file under ``<artifacts>/<parts folder>/part-NNNNNN.h5`` with the store's writer (a
``.partial`` file renamed into place: a part file exists only once complete). The caller then merges
the parts into one ``features.h5`` (extract-features) or appends them to it (rescore), and removes
the part folder.

Failures: a task whose worker dies (killed, out of memory, a lost node) is retried by Ray
``max_retries`` times; a part still failing after that is named in a one-line error, and the parts
finished by then stay on disk, so the next run of the same command computes only the missing ones
(a part file is reused when it was written with the same parameters, inputs and image positions).

Workers read the images themselves: local paths are made absolute, so on a cluster every node needs
them at the same path (a shared file system) or the shards must be fsspec URLs; the backbone's
weight file must be at the same path on every node too (it is, where sinet is installed alike).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .. import console, store
from ..errors import Interrupted, SinetError
from ..progress import progress_bar

RAY_MISSING = "--engine ray needs Ray, which is not installed: pip install 'sinet[ray]'"
#: Images per task for readers without shards (image files, in-memory pixels).
DEFAULT_PART_ROWS = 65536
#: Ray's retries of a task whose worker died.
DEFAULT_RETRIES = 3
#: Fault injection for tests: a folder; a file ``exit-K`` in it makes the next attempt of part K's
#: task remove that file and end its worker process at once (as a killed or crashed worker ends);
#: ``score-exit-K`` does the same to scoring part K's task (engines.ray_score).
FAULTS_ENV = "SINET_RAY_FAULTS"


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SinetError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class PartJob:
    """What every task runs: the backbone (rebuilt on the worker from these), its preprocessing size,
    the decoding recipe (``Decode.as_dict()``) and the compute options."""

    backbone: str
    weights: str | None  # a weight file readable at this path on every node; None: random init
    random_init: bool
    num_classes: int  # > 0: a classifier head of that size, and class probabilities are returned
    image_size: int | None
    decode: Mapping[str, Any]
    batch_size: int = 64
    workers: int = 0
    channels_last: bool | None = None
    device: str = "cpu"  # "cpu" or "cuda" (a task asking for a GPU sees its own as cuda:0)


@dataclass
class Part:
    """One task's images: dataset rows ``positions`` (ascending), and a name for messages."""

    index: int
    positions: np.ndarray
    name: str


def plan_parts(table: Any, positions: np.ndarray, part_rows: int = DEFAULT_PART_ROWS) -> list[Part]:
    """The parts of the rows ``positions`` of ``table``: one per WebDataset shard holding any of them
    (in shard order), else runs of ``part_rows`` consecutive positions."""
    positions = np.sort(np.asarray(positions, dtype=np.int64))
    if len(positions) == 0:
        return []
    shards = _shards_of(table)
    if shards is not None:
        names, of = shards
        shard = of[positions]
        order = np.argsort(shard, kind="stable")  # by shard, each shard's positions still ascending
        groups = np.split(positions[order], np.flatnonzero(np.diff(shard[order])) + 1)
        return [Part(k, g, names[int(of[g[0]])]) for k, g in enumerate(groups)]
    if part_rows < 1:
        raise SinetError(f"--part-rows {part_rows}: must be >= 1")
    return [Part(k, positions[s : s + part_rows], f"rows {positions[s]}..{positions[min(s + part_rows, len(positions)) - 1]}")
            for k, s in enumerate(range(0, len(positions), part_rows))]


def _shards_of(table: Any) -> tuple[list[str], np.ndarray] | None:
    if table.provenance.get("reader") != "webdataset" or table.paths is None:
        return None
    from ..datasets.webdataset import archive_members

    shards, of, _ = archive_members(table.paths)
    return shards, of


def _local(path: str) -> str:
    """A local path made absolute (a worker's working folder is not the driver's); a URL as it is."""
    from ..datasets.webdataset import is_url

    return path if is_url(path) else os.path.abspath(path)


def _part_source(table: Any, part: Part) -> dict[str, Any]:
    """What a task needs to read its images: pixels, image file paths, or one shard and its members."""
    if table.pixels is not None:
        return {"pixels": np.ascontiguousarray(table.pixels[part.positions])}
    from ..datasets.webdataset import split_member_path

    paths = [str(p) for p in table.paths[part.positions]]
    if table.provenance.get("reader") == "webdataset":
        members = [split_member_path(p) for p in paths]
        return {"shard": _local(members[0][0]), "members": [m[1] for m in members]}
    return {"paths": [_local(p) for p in paths]}


# -- the task (runs on a Ray worker) ------------------------------------------------------------------

_MODELS: dict[tuple, tuple[Any, Any]] = {}  # one backbone per worker process and recipe, reused across tasks


def _model(job: PartJob) -> tuple[Any, Any]:
    from stages import extract_features as stage

    key = (job.backbone, job.weights, job.random_init, job.num_classes, job.image_size)
    if key not in _MODELS:
        model, _ = stage.build_backbone(job.backbone, job.weights, random_init=job.random_init,
                                        num_classes=job.num_classes)
        _MODELS.clear()
        _MODELS[key] = (model, stage.Preprocess.for_model(model, job.image_size))
    return _MODELS[key]


def _inject_fault(index: int, kind: str = "exit") -> None:
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    try:
        os.unlink(os.path.join(folder, f"{kind}-{index}"))
    except FileNotFoundError:
        return
    os._exit(1)


def extract_part(job: PartJob, index: int, source: Mapping[str, Any]) -> dict[str, Any]:
    """Features of one part's images (the Ray task): ``stages.extract_features.extract`` over them,
    the rows in the order given. Returns ``features`` (n, D) float32, ``probs`` (n, C) or None,
    ``ok`` (n,) and ``reasons`` (n,)."""
    _inject_fault(index)
    from stages import extract_features as stage

    model, preprocess = _model(job)
    if "pixels" in source:
        n, kwargs = len(source["pixels"]), {"pixels": source["pixels"]}
    elif "paths" in source:
        n, kwargs = len(source["paths"]), {"paths": source["paths"]}
    else:
        from ..datasets.webdataset import read_members

        n = len(source["members"])
        kwargs = {"archives": stage.ArchiveImages([source["shard"]], np.zeros(n, dtype=np.int64), source["members"],
                                                  read_members)}
    batches = list(stage.extract(model, preprocess, positions=range(n), batch_size=job.batch_size,
                                 workers=job.workers, device=job.device, with_probs=job.num_classes > 0,
                                 channels_last=job.channels_last, decode=stage.Decode.from_dict(dict(job.decode)),
                                 **kwargs))
    if not batches:
        return {"features": np.zeros((0, model.num_features), np.float32), "probs": None,
                "ok": np.zeros(0, bool), "reasons": []}
    order = np.concatenate([b.positions for b in batches])
    if not np.array_equal(order, np.arange(n)):
        raise RuntimeError(f"part {index}: extract gave its rows out of order")
    return {"features": np.concatenate([b.features for b in batches]),
            "probs": np.concatenate([b.probs for b in batches]) if job.num_classes > 0 else None,
            "ok": np.concatenate([b.ok for b in batches]), "reasons": sum((list(b.reasons) for b in batches), [])}


# -- the driver -------------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: to ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), else a local
    cluster of this machine's CPUs and GPUs. A session the caller opened already is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise SinetError(f"--engine ray: cannot start or reach {where} ({str(e).splitlines()[0][:200]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def task_device(ray: Any, device: str) -> str:
    """``--device`` for the tasks: cpu or cuda; auto = cuda when the cluster has GPUs."""
    if device == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise SinetError(f"--device {device!r}: not a device (cpu, cuda or auto)")
    if kind == "cuda" and ray.cluster_resources().get("GPU", 0) == 0:
        raise SinetError("--device cuda: the Ray cluster has no GPU")
    return kind  # a task gets its GPU from Ray (num_gpus=1), seen as cuda:0 there


def part_paths(folder: Path, parts: list[Part]) -> list[Path]:
    return [folder / f"part-{p.index:06d}.h5" for p in parts]


def _failure(ray: Any, e: BaseException) -> str:
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
    return text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__


def extract_parts(
    job: PartJob,
    table: Any,
    parts: list[Part],
    folder: Path,
    *,
    params: Mapping[str, Any],
    inputs: Mapping[str, str],
    names: list[str],
    feature_dtype: Any,
    chunk_rows: int,
    attrs: Mapping[str, Any],
    feature_dim: int,
    address: str | None = None,
    device: str = "auto",
    retries: int = DEFAULT_RETRIES,
    on_skip: Callable[[int, str], None] | None = None,
) -> list[Path]:
    """Make sure every part has its features file under ``folder`` (running the missing ones as Ray
    tasks) and return their paths in part order.

    A part file records ``params`` plus the part's index, and ``inputs`` plus a fingerprint of its
    positions: one written for exactly these is kept, anything else is redone. Each file holds the
    rows ``names`` (columns the table lacks filled as the store fills them), the part's skipped
    images, the table's classes and provenance, and ``attrs``.

    Raises:
        SinetError: a part failed after ``retries`` retries (the finished parts stay on disk).
    """
    if retries < 0:
        raise SinetError(f"--ray-retries {retries}: must be >= 0")
    paths = part_paths(folder, parts)
    part_params = [dict(params, part=[p.index, len(parts)]) for p in parts]
    part_inputs = [dict(inputs, positions=store.fingerprint_arrays(p.positions)) for p in parts]
    todo = [k for k in range(len(parts))
            if not store.is_up_to_date(paths[k], "features", part_params[k], part_inputs[k])]
    if len(todo) < len(parts):
        console.info(f"{folder}: {len(parts) - len(todo)} of {len(parts)} parts already done, not redone")
    if not todo:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with ray_session(address) as ray:
        dev = task_device(ray, device)
        task = ray.remote(extract_part).options(
            num_cpus=max(1, job.workers), num_gpus=1 if dev == "cuda" else 0, max_retries=retries,
            retry_exceptions=False)
        run = PartJob(**{**job.__dict__, "device": dev})
        refs = {task.remote(run, parts[k].index, _part_source(table, parts[k])): k for k in todo}
        failed: list[tuple[int, str]] = []
        pending = list(refs)
        try:
            collect(ray, refs, pending, failed, lambda k, result: write_part(
                paths[k], part_params[k], part_inputs[k], table, parts[k], result, names=names,
                feature_dtype=feature_dtype, chunk_rows=chunk_rows, attrs=attrs, feature_dim=feature_dim,
                on_skip=on_skip), sum(len(parts[k].positions) for k in todo), lambda k: len(parts[k].positions))
        except KeyboardInterrupt:
            done = sum(p.exists() for p in paths)
            raise Interrupted(f"interrupted with {done} of {len(parts)} parts finished, kept in {folder}; run the "
                              "same command again to compute only the others") from None
    if failed:
        k, why = min(failed)
        raise SinetError(f"{len(failed)} of {len(parts)} parts failed after {retries} retries, the first: part {k} "
                         f"({parts[k].name}): {why}; the {len(parts) - len(failed)} finished parts are kept in "
                         f"{folder}: run the same command again to redo only the failed ones")
    return paths


def collect(ray: Any, refs: dict, pending: list, failed: list, write: Callable[[int, Any], Any], total: int,
            size: Callable[[int], int]) -> None:
    """Write each part as its task finishes (``refs``: task -> part, emptied as they end); a task that
    failed after its retries goes to ``failed`` as (part, why)."""
    with progress_bar("extract-features (ray)", total) as advance:
        while pending:
            ready, pending[:] = ray.wait(pending, num_returns=1)
            k = refs.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # the worker died after its retries, or the task raised
                failed.append((k, _failure(ray, e)))
                continue
            write(k, result)
            advance(size(k))


def write_part(path: Path, params: Mapping[str, Any], inputs: Mapping[str, str], table: Any, part: Part,
               result: Mapping[str, Any], *, names: list[str], feature_dtype: Any, chunk_rows: int,
               attrs: Mapping[str, Any], feature_dim: int, on_skip: Callable[[int, str], None] | None) -> str:
    """One part's features file from its task's result, committed atomically; returns its fingerprint."""
    from stages.extract_features import FeatureBatch

    batch = FeatureBatch(part.positions, result["features"], result["probs"], np.asarray(result["ok"], bool),
                         list(result["reasons"]))
    skipped: list[list[str]] = []

    def skip(position: int, reason: str) -> None:
        skipped.append([str(table.ids[position]), reason])
        if on_skip is not None:
            on_skip(position, reason)

    writer = store.ArtifactWriter(path, "features", params, inputs, mode="new")
    try:
        store.append_feature_batches(writer, table, [batch], names=names, feature_dtype=feature_dtype,
                                     chunk_rows=chunk_rows, on_skip=skip)
        if writer.rows_committed == 0:  # every image of the part unreadable: a part of no rows, still done
            none = np.zeros(0, dtype=np.int64)
            writer.append_rows({n: _empty_column(table, n, none, feature_dim, feature_dtype) for n in names})
        return store.finish_features(writer, table, skipped, attrs)
    except BaseException:
        writer.abort()
        raise


def _empty_column(table: Any, name: str, none: np.ndarray, dim: int, feature_dtype: Any) -> np.ndarray:
    if name == "features":
        return np.zeros((0, dim), dtype=feature_dtype)
    if name == "probs":
        return np.zeros((0, len(table.classes)), dtype=np.float32)
    column = getattr(table, name, None)
    return column[none] if column is not None else np.full(0, store.FEATURE_ROW_FILL[name])
