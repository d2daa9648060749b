"""``--engine ray`` for scoring (score-noise, and rescore's scoring step): the blocks of rows as Ray tasks.

The driver (the process running the command) fits the run's state on its sample as the local engine
does (``stages.score_noise.fit_score_state``), puts it with the prototypes and options in Ray's object
store once (``ray.put``), and splits features.h5 into parts of whole ``--chunk-rows`` blocks (at least
``part_rows`` rows each). Each task opens features.h5 by its path, reads its part block by block and
scores each block with the same code as the local loop (``commands.score.score_block_rows``), the
blocks starting at the same rows; it returns scores.h5's columns of its rows. The driver writes the
parts in row order with the local engine's writer, so scores.h5 and suspects.tsv are what the local
engine writes, and only once every part is scored (a failure leaves scores.h5 as it was).

FAISS: a task rebuilds the exact flat index from the prototypes (make-prototypes writes one); any other
index travels as FAISS's own serialized bytes (``faiss.serialize_index``), never as a pickled object.

Workers read features.h5 themselves: on a cluster the artifact folder must be on a file system every
node sees at the same path. Side text: each worker loads the sentence encoder (the same folder path on
every node) to encode its rows' captions.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import SinetError
from .ray_engine import DEFAULT_PART_ROWS, DEFAULT_RETRIES, _failure, _inject_fault, ray_session, task_device

__all__ = ["DEFAULT_PART_ROWS", "DEFAULT_RETRIES", "ScoreJob", "plan_score_parts", "score_job", "score_part",
           "scored_parts"]

#: Fault injection for tests (ray_engine.FAULTS_ENV): a file ``score-exit-K`` ends part K's task's worker once.
FAULT_KIND = "score-exit"


@dataclass(frozen=True)
class ScoreJob:
    """What every scoring task needs, put in the object store once.

    ``index_metric`` ("ip" or "l2"): the prototypes' exact flat index, rebuilt in the task; else
    ``index_bytes`` holds the index as ``faiss.serialize_index`` wrote it. ``text``: the caption
    encoder's folder (None: the default), the label embeddings and the fit sample's shares, or None.
    """

    features_path: str
    read: tuple[str, ...]
    optional: tuple[str, ...]
    state: Any
    config: Any
    prototypes: np.ndarray
    slots: np.ndarray
    prototype_class: np.ndarray
    index_metric: str | None
    index_bytes: np.ndarray | None
    text: dict[str, Any] | None
    chunk_rows: int
    device: str = "cpu"


def score_job(features_path: Any, read: list[str], optional: list[str], state: Any, config: Any, model: tuple,
              text: Any, chunk_rows: int) -> ScoreJob:
    """The job of a run: ``model`` is (prototypes, slots, prototype_class, FAISS index), ``text`` a
    ``commands.score.SideText`` or None."""
    from stages.score_noise import _flat_metric

    prototypes, slots, prototype_class, index = model
    metric = _flat_metric(index)
    index_bytes = None
    if metric is None:
        import faiss

        index_bytes = faiss.serialize_index(index)
    side = None if text is None else {"encoder": text.encoder_path, "label_embeddings": text.label_embeddings,
                                      "sample_rows": text.sample_rows, "sample_shares": text.sample_shares}
    return ScoreJob(os.path.abspath(str(features_path)), tuple(read), tuple(optional), state, config,
                    np.ascontiguousarray(prototypes), slots, prototype_class, metric, index_bytes, side, chunk_rows)


def plan_score_parts(n: int, chunk_rows: int, part_rows: int,
                     new_mask: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """(part, start, stop) of each part: the rows of features.h5 in runs of whole ``chunk_rows`` blocks
    (the blocks the local engine scores) of at least ``part_rows`` rows, numbered in row order; the
    parts holding no row of ``new_mask`` are left out."""
    if part_rows < 1:
        raise SinetError(f"--part-rows {part_rows}: must be >= 1")
    step = -(-part_rows // chunk_rows) * chunk_rows
    parts = [(k, s, min(n, s + step)) for k, s in enumerate(range(0, n, step))]
    return [p for p in parts if new_mask is None or new_mask[p[1] : p[2]].any()]


# -- the task (runs on a Ray worker) ------------------------------------------------------------------

_ENCODERS: dict[str | None, Any] = {}  # one sentence encoder per worker process, reused across tasks


def _index(job: ScoreJob) -> Any:
    import faiss

    if job.index_metric is None:
        return faiss.deserialize_index(job.index_bytes)
    index = (faiss.IndexFlatIP if job.index_metric == "ip" else faiss.IndexFlatL2)(job.prototypes.shape[1])
    index.add(job.prototypes)
    return index


def _side_text(job: ScoreJob) -> Any:
    if job.text is None:
        return None
    from ..commands.score import SideText

    path = job.text["encoder"]
    if path not in _ENCODERS:
        from ..sideinfo import load_text_encoder

        _ENCODERS.clear()
        _ENCODERS[path] = load_text_encoder(path)
    return SideText(_ENCODERS[path], job.text["label_embeddings"], path, job.text["sample_rows"],
                    job.text["sample_shares"])


def score_part(job: ScoreJob, index: int, start: int, stop: int, keep: np.ndarray | None) -> dict[str, np.ndarray]:
    """scores.h5's columns of features.h5 rows [start, stop) (the Ray task), only those of ``keep``
    (a mask of the part's rows) when given: each ``chunk_rows`` block scored as the local loop scores it."""
    _inject_fault(index, FAULT_KIND)
    from stages import score_noise as stage

    from .. import store
    from ..commands.score import score_block_rows

    # the object store's arrays are read-only: torch warns on wrapping them though scoring never writes
    # into them (the state's probe weights are wrapped as they are; the small prototype arrays copied)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    model = (np.array(job.prototypes), np.array(job.slots), np.array(job.prototype_class), _index(job))
    text = _side_text(job)
    outs = []
    with store.open_artifact(job.features_path, "features") as feats:
        for s in range(start, stop, job.chunk_rows):
            e = min(stop, s + job.chunk_rows)
            rows = {k: feats.read(k, slice(s, e)) for k in job.read}
            block_rows = np.arange(s, e)
            if keep is not None:
                k_ = keep[s - start : e - start]
                if not k_.any():
                    continue
                rows = {k: v[k_] for k, v in rows.items()}
                block_rows = block_rows[k_]
            outs.append(score_block_rows(stage, rows, block_rows, list(job.optional), model, job.config, job.state,
                                         text, job.device))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}


# -- the driver -------------------------------------------------------------------------------------


def scored_parts(job: ScoreJob, n: int, new_mask: np.ndarray | None, *, address: str | None = None,
                 retries: int = DEFAULT_RETRIES, part_rows: int = DEFAULT_PART_ROWS, device: str = "auto",
                 window: int | None = None, resolved: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Each part's scored columns, in row order, scored as Ray tasks (at most ``window`` parts in flight
    or waiting to be written: default twice the cluster's CPUs). ``resolved`` gets the tasks' device.

    Raises:
        SinetError: a part failed after ``retries`` retries (the parts not yet taken are abandoned).
    """
    if retries < 0:
        raise SinetError(f"--ray-retries {retries}: must be >= 0")
    parts = plan_score_parts(n, job.chunk_rows, part_rows, new_mask)
    if not parts:
        return
    with ray_session(address) as ray:
        dev = task_device(ray, device)
        if resolved is not None:
            resolved["device"] = dev
        job_ref = ray.put(ScoreJob(**{**job.__dict__, "device": dev}))
        task = ray.remote(score_part).options(num_cpus=1, num_gpus=1 if dev == "cuda" else 0, max_retries=retries,
                                              retry_exceptions=False)
        window = window or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        running: dict[Any, int] = {}
        done: dict[int, Any] = {}
        submitted = taken = 0
        try:
            while taken < len(parts):
                while submitted < len(parts) and submitted - taken < window:
                    part, s, e = parts[submitted]
                    keep = None if new_mask is None else np.ascontiguousarray(new_mask[s:e])
                    running[task.remote(job_ref, part, s, e, keep)] = submitted
                    submitted += 1
                if taken in done:
                    out = done.pop(taken)
                    taken += 1
                    if out:
                        yield out
                    continue
                ready, _ = ray.wait(list(running), num_returns=1)
                k = running.pop(ready[0])
                try:
                    done[k] = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # the worker died after its retries, or the task raised
                    part, s, e_ = parts[k]
                    # an exception the task raised is not retried (it would raise again); a dead worker is
                    after = "" if isinstance(e, ray.exceptions.RayTaskError) else f" after {retries} retries"
                    raise SinetError(f"scoring part {part} (rows {s}..{e_ - 1} of {job.features_path}) "
                                     f"failed{after}: {_failure(ray, e)}; scores.h5 is unchanged, "
                                     "run the same command again") from None
        finally:
            for ref in running:
                ray.cancel(ref)
