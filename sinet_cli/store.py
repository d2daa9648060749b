"""The artifact store: every HDF5 schema of the pipeline, atomic writes, provenance, fingerprints.

One module owns the layout of every artifact, so other tools can rely on fixed dataset names:

* ``features.h5``   ``ids`` (N, str), ``labels`` (N, int, noisy), ``features`` (N x D), ``classes`` (C)
* ``graph.h5``      ``classes`` (C), ``S_w``, ``S_l``, ``S_t`` (C x C float32)
* ``prototypes.h5`` ``prototypes`` (P x D), ``prototype_class`` (P), ``consistency`` (N)
* ``scores.h5``     ``ids``, ``weight``, ``distance``, ``nearest_class``, ``flagged``, ``suggested_class`` (N),
  ``class_noise`` (C)

Every artifact carries attributes: ``schema_version``, ``kind``, ``params`` (JSON), ``inputs``
(JSON name -> fingerprint), ``package_version``, ``created`` and its own ``fingerprint`` (a
content hash over kind, params, inputs and the bytes of every dataset). Downstream stages
record that fingerprint as their input, so staleness is decided by content, not by mtime.

Writes go to ``<name>.partial`` and are renamed into place only when complete; a crash never
leaves a half-written artifact under the final name, and the previous artifact stays intact.
Commands that write several files (prototypes.h5 + prototypes.faiss, scores.h5 + suspects.tsv, a
train run, export/, report/) commit them as one unit (:func:`commit_outputs`): a record listing each
file's fingerprint is written last, and an interrupted commit is completed by the next run
(:func:`recover_outputs`) or seen as not current (:func:`outputs_current`).

Every dataset is written with an HDF5 Fletcher-32 checksum, so a damaged byte is an error naming the
file (files written without checksums still read), and feature rows that are not finite are refused
where they are written and where they are read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
APPEND_SUFFIX = ".append.partial"  # append mode's copy: extract-features' resumable .partial stays untouched
RECORD_DIR = ".sinet"  # <folder>/.sinet/<unit>.json: the commit record of a multi-file output
# Numeric datasets whose every value must be finite: a NaN or inf feature makes NaN prototypes and
# models. Checked where rows are written (append_rows, write) and where they are read.
FINITE = {"features": ("features", "probs")}


class ArtifactError(Exception):
    """An artifact is missing, corrupt, of the wrong schema or inconsistent with another."""


def _replace(src: Path | str, dst: Path | str) -> None:
    """The one rename every commit of the store goes through (tests inject kills here)."""
    os.replace(src, dst)


def _close_h5(f: h5py.File) -> None:
    """Close an HDF5 file even when its last write failed (disk full, a file size limit).

    HDF5 flushes its metadata cache on close; when that write fails the file stays open in the
    library, and h5py's finalizers later retry the close while the interpreter tears down and
    crash it (SIGSEGV), even once a second close succeeded. So the flush is tried first, and a
    file that cannot be flushed, being abandoned, gets its descriptor pointed at /dev/null before
    any close: the close's own flush then succeeds and the library frees the file cleanly."""
    try:
        if not f.id.valid:
            return
        f.flush()
        f.close()
        return
    except (OSError, RuntimeError, ValueError):
        pass
    try:
        fd = f.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, RuntimeError, ValueError, AttributeError):
        return  # already closed, or not a POSIX file: nothing left to free
    try:
        f.close()
    except (OSError, RuntimeError, ValueError):
        pass


def _read_failed(path: Path, name: str, e: BaseException) -> ArtifactError:
    """A dataset read that HDF5 refused: a Fletcher-32 mismatch (a damaged byte) or an I/O error."""
    text = " ".join(str(e).split())
    if "checksum" in text.lower() or "filter" in text.lower():
        why = "damaged (checksum mismatch)"
    else:
        why = f"unreadable ({text[:160]})"
    return ArtifactError(f"{path}: dataset {name!r} is {why}; rebuild it with the command that wrote it "
                         "(e.g. sinet extract-features --force for features.h5)")


def _first_not_finite(value: np.ndarray) -> int | None:
    """Index of the first row holding a NaN or inf, else None (float16 through its bit pattern)."""
    a = np.asarray(value)
    if a.dtype.kind != "f" or a.size == 0:
        return None
    if a.dtype == np.float16:  # exponent all ones: inf or NaN; a bit test avoids a float conversion
        bad = (np.ascontiguousarray(a).view(np.uint16) & 0x7C00) == 0x7C00
    else:
        bad = ~np.isfinite(a)
    if not bad.any():
        return None
    rows = bad.reshape(len(a), -1).any(axis=1) if a.ndim > 1 else bad
    return int(np.flatnonzero(rows)[0])


@dataclass(frozen=True)
class Field:
    """One dataset of an artifact: its name, value kind and symbolic shape."""

    name: str
    kind: str  # "str", "int", "float"
    dims: tuple[str, ...]
    required: bool = True


# Symbolic dims: N images, D feature dim, C classes, P prototypes, S skipped images, K probe folds.
SCHEMAS: dict[str, tuple[Field, ...]] = {
    "features": (
        Field("ids", "str", ("N",)),
        Field("labels", "int", ("N",)),
        Field("features", "float", ("N", "D")),
        Field("classes", "str", ("C",)),
        Field("paths", "str", ("N",), required=False),
        Field("splits", "str", ("N",), required=False),
        Field("clean_labels", "int", ("N",), required=False),
        Field("side_text", "str", ("N",), required=False),
        Field("subset", "str", ("N",), required=False),
        Field("probs", "float", ("N", "C"), required=False),
        Field("skipped_ids", "str", ("S",), required=False),
        Field("skipped_reasons", "str", ("S",), required=False),
    ),
    "graph": (
        Field("classes", "str", ("C",)),
        Field("S_w", "float", ("C", "C")),
        Field("S_l", "float", ("C", "C")),
        Field("S_t", "float", ("C", "C")),
        Field("descriptions", "str", ("C",), required=False),
        Field("description_source", "str", ("C",), required=False),
        Field("hierarchy_known", "int", ("C",), required=False),
        Field("label_embeddings", "float", ("C", "E"), required=False),
    ),
    "prototypes": (
        Field("classes", "str", ("C",)),
        Field("prototypes", "float", ("P", "D")),
        Field("prototype_class", "int", ("P",)),
        Field("initial_prototypes", "float", ("C", "D")),
        Field("ids", "str", ("N",)),
        Field("consistency", "float", ("N",)),
        Field("selected", "int", ("N",), required=False),
    ),
    "scores": (
        Field("ids", "str", ("N",)),
        Field("labels", "int", ("N",)),
        Field("weight", "float", ("N",)),
        Field("distance", "float", ("N",)),
        Field("nearest_class", "int", ("N",)),
        Field("nearest_distance", "float", ("N",)),
        Field("classes", "str", ("C",)),
        Field("clean_labels", "int", ("N",), required=False),
        Field("paths", "str", ("N",), required=False),
        Field("splits", "str", ("N",), required=False),
        # --score fused: eq. 6's weight and the fused components (docs/method.md, "Scoring beyond eq. 6")
        Field("weight_eq6", "float", ("N",), required=False),
        Field("share", "float", ("N",), required=False),
        Field("probe", "float", ("N",), required=False),
        Field("text_share", "float", ("N",), required=False),
        Field("open_set", "float", ("N",), required=False),
        Field("open_set_threshold", "float", ("C",), required=False),
        Field("probe_W", "float", ("K", "D", "C"), required=False),  # K folds of the probe (cron appends reuse it)
        Field("probe_b", "float", ("K", "C"), required=False),
        # the noise estimate, the flag and the relabel suggestion (docs/noise-estimate.md)
        Field("flagged", "int", ("N",), required=False),  # 0/1: the is-label-issue flag
        Field("flag_score", "float", ("N",), required=False),  # E8's score: flagged = flag_score > flag_threshold
        Field("suggested_class", "int", ("N",), required=False),
        Field("suggested_confidence", "float", ("N",), required=False),
        Field("class_noise", "float", ("C",), required=False),  # estimated noise rate per class (NaN: no rows)
        Field("noise_transition", "float", ("C", "C"), required=False),  # T[t, y] of the estimate (appends use it)
        Field("outside_level", "float", ("C",), required=False),  # per-class p_max level of "outside every class"
        Field("relabel_probe_W", "float", ("K", "D", "C"), required=False),  # round-1 probe (the suggestion's)
        Field("relabel_probe_b", "float", ("K", "C"), required=False),
    ),
}

STR_DTYPE = h5py.string_dtype("utf-8")


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("sinet")
    except Exception:  # running from a source tree that was not installed
        return "0+unknown"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace variance, so equal params hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_file(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a plain input file (manifest, class table, taxonomy)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from e
    return h.hexdigest()


def fingerprint_arrays(*arrays: Any) -> str:
    """Content hash of in-memory values (numpy arrays, strings, lists)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"<none>")
        elif isinstance(a, np.ndarray) and a.dtype != object:
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(canonical_json(a if not isinstance(a, np.ndarray) else a.tolist()).encode())
    return h.hexdigest()


def _kind_ok(kind: str, dtype: np.dtype) -> bool:
    if kind == "str":
        return h5py.check_string_dtype(dtype) is not None or dtype.kind in ("S", "U", "O")
    if kind == "int":
        return dtype.kind in ("i", "u")
    return dtype.kind == "f"


def _checksummed(shape: tuple[int, ...], dtype: Any = None) -> dict[str, Any]:
    """create_dataset options: a Fletcher-32 checksum. HDF5 filters need a chunked layout, which a
    scalar cannot have, and apply to no variable-length type (long captions): those go without."""
    if dtype is not None and _is_vlen_str(np.dtype(dtype)):
        return {}
    return {"fletcher32": True} if len(shape) else {}


def _h5_dtype(kind: str, value_dtype: np.dtype | None) -> Any:
    if kind == "str":
        return STR_DTYPE
    if value_dtype is not None:
        return value_dtype
    return np.int64 if kind == "int" else np.float32


# -- strings -------------------------------------------------------------------------------------
#
# String datasets are stored as fixed-width UTF-8 (NUL-padded) when their longest value fits in
# FIXED_STR_MAX bytes: writing and reading them is a memory copy plus a vectorized ASCII
# conversion, where HDF5 variable-length strings cost a library call per value each way (at
# millions of ids those calls dominate writing and reading them). Longer values (captions) stay
# variable-length, where padding every value to the longest would waste space. Files written
# with variable-length strings (older sinet) read and append as before. A fixed-width dataset is
# widened in place when an appended value does not fit (variable-length past FIXED_STR_MAX).

_WIDENING = ".widening"  # temporary name suffix of a string dataset being widened
FIXED_STR_MIN = 16  # width of a new fixed-width string dataset: >= this and a power of two, so
FIXED_STR_MAX = 128  # that growing ids ("img9" ... "img1000000") rarely need widening


def _encode_strings(value: Any) -> np.ndarray:
    """Values as a 1-d numpy ``S`` array of their UTF-8 bytes (vectorized when they are ASCII)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return value.reshape(-1)
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        a = np.ascontiguousarray(value.reshape(-1))
    else:
        items = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
        a = np.asarray(items, dtype=str) if items else np.zeros(0, dtype="U1")
    width = a.dtype.itemsize // 4
    if width == 0 or len(a) == 0:
        return np.zeros(len(a), dtype="S1")
    codes = a.view(np.uint32).reshape(len(a), width)
    if int(codes.max()) < 128:  # ASCII: one byte per code point, a cast
        return codes.astype(np.uint8).view(f"S{width}").reshape(-1)
    return np.asarray([x.encode("utf-8") for x in a.tolist()], dtype=bytes)


def _decode_strings(raw: np.ndarray) -> np.ndarray:
    """UTF-8 bytes (an ``S`` array, or an object array of bytes from a variable-length dataset) as a
    numpy array of ``str`` (vectorized when they are ASCII)."""
    if raw.dtype == object:
        if raw.size and not isinstance(raw.flat[0], bytes):  # already str (h5py asstr)
            return raw.astype(str)
        raw = _raw_strings(raw)
    width = raw.dtype.itemsize
    if raw.size == 0 or width == 0:
        return np.zeros(raw.shape, dtype="U1")
    codes = np.ascontiguousarray(raw).view(np.uint8)
    if int(codes.max()) < 128:
        return codes.astype(np.uint32).view(f"U{width}").reshape(raw.shape)
    return np.asarray([x.decode("utf-8") for x in raw.reshape(-1).tolist()], dtype=str).reshape(raw.shape)


def _raw_strings(raw: np.ndarray) -> np.ndarray:
    """A string dataset's raw read (``S`` array, or object array of bytes when variable-length) as
    an ``S`` array of UTF-8 bytes."""
    if raw.dtype.kind == "S":
        return raw
    if raw.size == 0:
        return np.zeros(raw.shape, dtype="S1")
    if isinstance(raw.flat[0], bytes):
        return raw.astype(bytes)
    return _encode_strings(raw)


def _str_max_len(s: np.ndarray) -> int:
    """Longest value of an ``S`` array in bytes (values are NUL-padded to the itemsize)."""
    width = s.dtype.itemsize
    if s.size == 0 or width == 0:
        return 0
    used = np.ascontiguousarray(s).view(np.uint8).reshape(-1, width).any(axis=0)
    nz = np.flatnonzero(used)
    return int(nz[-1]) + 1 if len(nz) else 0


def _fixed_str_width(max_len: int) -> int | None:
    """Width of a fixed-width dataset for values of up to ``max_len`` bytes; None: variable-length."""
    if max_len > FIXED_STR_MAX:
        return None
    return max(FIXED_STR_MIN, 1 << max(0, max_len - 1).bit_length())


def _str_dtype(width: int | None) -> Any:
    return STR_DTYPE if width is None else h5py.string_dtype("utf-8", width)


def _is_vlen_str(dtype: np.dtype) -> bool:
    info = h5py.check_string_dtype(dtype)
    return info is not None and info.length is None


def _str_values_for(ds_dtype: np.dtype, s: np.ndarray) -> np.ndarray:
    """Encoded values (``S`` array) in the memory layout that writes to a dataset of ``ds_dtype``."""
    if _is_vlen_str(ds_dtype):
        return s.astype(object)  # bytes objects: written as they are
    return s.astype(f"S{ds_dtype.itemsize}").view(ds_dtype)


# -- content fingerprints ------------------------------------------------------------------------
#
# fingerprint = blake2b(kind, params, inputs, then per dataset in name order: name, shape, dtype
# tag ("str" for every string storage), and the 16-byte digest of the dataset's data stream).
# The data stream is the C-order bytes of the values for numbers, and each value's UTF-8 bytes
# followed by one NUL for strings. Digesting each dataset on its own lets ArtifactWriter hash rows
# as they are appended (the shape is only known at the end), instead of re-reading the file.
# _content_fingerprint (a full re-read) is the reference the incremental digests must equal.


def _new_hasher() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


def _hash_strings(h: "hashlib._Hash", s: np.ndarray) -> None:
    """Feed ``S`` values to ``h`` as each value's bytes followed by one NUL (vectorized: a masked
    gather from the NUL-padded values, no per-value Python)."""
    n, width = len(s), s.dtype.itemsize
    if n == 0:
        return
    lens = np.char.str_len(s)  # bytes up to the last non-NUL one
    cols = int(lens.max()) + 1  # the longest value and its terminator
    m = np.zeros((n, cols), dtype=np.uint8)
    keep = min(cols, width)
    m[:, :keep] = np.ascontiguousarray(s).view(np.uint8).reshape(n, width)[:, :keep]
    h.update(m[np.arange(cols)[None, :] <= lens[:, None]].tobytes())


def _hash_values(h: "hashlib._Hash", value: np.ndarray, is_str: bool) -> None:
    if is_str:
        _hash_strings(h, value if value.dtype.kind == "S" else _encode_strings(value))
    else:
        h.update(np.ascontiguousarray(value).tobytes())


def _dtype_tag(dtype: np.dtype) -> str:
    return "str" if h5py.check_string_dtype(dtype) is not None else str(dtype)


def _data_hasher(ds: h5py.Dataset, rows: int = 65536) -> "hashlib._Hash":
    """The data-stream digest state of a whole dataset, by reading it."""
    h = _new_hasher()
    if ds.shape == () or ds.size == 0:
        return h
    is_str = h5py.check_string_dtype(ds.dtype) is not None
    for start in range(0, ds.shape[0], rows):
        block = ds[start : start + rows]
        _hash_values(h, _raw_strings(block) if is_str else block, is_str)
    return h


def _fingerprint_from(f: h5py.File, digests: Mapping[str, bytes]) -> str:
    h = _new_hasher()
    for key in ("kind", "params", "inputs"):
        h.update(str(f.attrs.get(key, "")).encode())
    for name in sorted(f.keys()):
        ds = f[name]
        h.update(name.encode() + b"\0" + str(ds.shape).encode() + b"\0" + _dtype_tag(ds.dtype).encode() + b"\0")
        h.update(digests[name])
    return h.hexdigest()


def _content_fingerprint(f: h5py.File) -> str:
    """The content fingerprint of an open artifact, re-reading every dataset (the reference)."""
    return _fingerprint_from(f, {name: _data_hasher(f[name]).digest() for name in f.keys()})


def validate(path: Path, kind: str, f: h5py.File) -> dict[str, int]:
    """Check an open artifact against its schema; return the resolved symbolic dims."""
    if kind not in SCHEMAS:
        raise ArtifactError(f"{path}: unknown artifact kind {kind!r}")
    found_kind = f.attrs.get("kind")
    if found_kind != kind:
        raise ArtifactError(f"{path}: is a {found_kind or 'non-sinet'!s} artifact, expected {kind}")
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {version}, this sinet reads {SCHEMA_VERSION}; rebuild it with --force"
        )
    dims: dict[str, int] = {}
    for field in SCHEMAS[kind]:
        if field.name not in f:
            if field.required:
                raise ArtifactError(f"{path}: missing dataset {field.name!r}")
            continue
        ds = f[field.name]
        if not _kind_ok(field.kind, ds.dtype):
            raise ArtifactError(f"{path}: dataset {field.name!r} has dtype {ds.dtype}, expected {field.kind}")
        if len(ds.shape) != len(field.dims):
            raise ArtifactError(
                f"{path}: dataset {field.name!r} has shape {ds.shape}, expected {len(field.dims)} dims "
                f"({' x '.join(field.dims)})"
            )
        for sym, n in zip(field.dims, ds.shape):
            if sym in dims and dims[sym] != n:
                raise ArtifactError(
                    f"{path}: dataset {field.name!r} has {sym}={n} but other datasets have {sym}={dims[sym]}"
                )
            dims[sym] = n
    return dims


class Artifact:
    """A validated, open, read-only artifact. Use as a context manager or call ``close()``."""

    def __init__(self, path: Path | str, kind: str):
        self.path = Path(path)
        self.kind = kind
        if not self.path.exists():
            raise ArtifactError(f"{self.path}: not found (run the stage that writes the {kind} artifact first)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise ArtifactError(f"{self.path}: not a readable HDF5 file ({e})") from e
        self._handles: dict[str, h5py.Dataset] = {}
        try:
            self.dims = validate(self.path, kind, self.file)
        except Exception:
            self.file.close()
            raise

    def __enter__(self) -> "Artifact":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def __contains__(self, name: str) -> bool:
        return name in self.file

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.file.attrs.get("params", "{}"))

    @property
    def inputs(self) -> dict[str, str]:
        return json.loads(self.file.attrs.get("inputs", "{}"))

    @property
    def fingerprint(self) -> str:
        return str(self.file.attrs["fingerprint"])

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.file.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def json_attr(self, name: str, default: Any = None) -> Any:
        raw = self.file.attrs.get(name)
        return default if raw is None else json.loads(raw)

    def dataset(self, name: str) -> h5py.Dataset:
        ds = self._handles.get(name)
        if ds is None:  # an h5py name lookup walks the file's links: once per dataset, not per block
            if name not in self.file:
                raise ArtifactError(f"{self.path}: missing dataset {name!r}")
            ds = self._handles[name] = self.file[name]
        return ds

    def _not_finite(self, name: str, row: int) -> ArtifactError:
        try:
            image = repr(str(self.read("ids", slice(row, row + 1))[0])) if "ids" in self.file else f"row {row}"
        except (ArtifactError, IndexError):
            image = f"row {row}"
        return ArtifactError(f"{self.path}: {name} of image {image} (row {row}) are not finite (NaN or inf); the "
                             "file is damaged or its backbone is broken: re-extract it (sinet extract-features --force)")

    def _check_finite(self, name: str, value: Any, rows: slice | np.ndarray | None) -> None:
        if name not in FINITE.get(self.kind, ()) or not isinstance(value, np.ndarray):
            return
        r = _first_not_finite(value)
        if r is None:
            return
        if isinstance(rows, slice):
            r += rows.start or 0
        elif rows is not None:
            r = int(np.asarray(rows)[r])
        raise self._not_finite(name, r)

    def read(self, name: str, sl: slice | np.ndarray | None = None) -> np.ndarray:
        """Read a dataset (or rows of it); strings come back as a numpy array of ``str``
        (fixed-width or variable-length storage alike). A damaged block (checksum) or a feature
        that is not finite is an :class:`ArtifactError` naming the file (and the image)."""
        ds = self.dataset(name)
        try:
            value = ds[()] if sl is None else ds[sl]
        except OSError as e:
            raise _read_failed(self.path, name, e) from None
        self._check_finite(name, value, sl)
        if h5py.check_string_dtype(ds.dtype) is not None:
            if isinstance(value, np.ndarray):
                return _decode_strings(value)
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return value

    def take(self, name: str, positions: np.ndarray, chunk_rows: int) -> np.ndarray:
        """Rows ``positions`` (sorted, unique) of a numeric row dataset, in one pass of
        ``chunk_rows``-row reads into one reused buffer (a fresh array per read page-faults every
        block again); blocks holding none of the positions are not read."""
        ds = self.dataset(name)
        positions = np.asarray(positions, dtype=np.int64)
        n = ds.shape[0]
        if len(positions) and (positions[0] < 0 or positions[-1] >= n or (np.diff(positions) <= 0).any()):
            raise ValueError(f"{self.path}: {name}: positions must be sorted, unique and in [0, {n})")
        out = np.empty((len(positions), *ds.shape[1:]), dtype=ds.dtype)
        buf = np.empty((min(chunk_rows, n), *ds.shape[1:]), dtype=ds.dtype)
        for start in range(0, n, chunk_rows):
            lo, hi = np.searchsorted(positions, [start, start + chunk_rows])
            if hi == lo:
                continue
            end = min(n, start + chunk_rows)
            try:
                ds.read_direct(buf, np.s_[start:end], np.s_[0 : end - start])
            except OSError as e:
                raise _read_failed(self.path, name, e) from None
            out[lo:hi] = buf[positions[lo:hi] - start]
        self._check_finite(name, out, positions)
        return out

    def iter_rows(self, names: list[str], chunk_rows: int,
                  prefetch: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream row blocks of several N-length datasets together: bounded memory for any N.

        With ``prefetch``, a background thread reads the next block while the caller works on the
        current one (h5py releases the GIL while HDF5 reads, and so do torch's and numpy's large
        ops): one extra block in memory, read errors raised where that block is taken.
        """
        n = self.dataset(names[0]).shape[0]

        def block(start: int) -> dict[str, np.ndarray]:
            return {name: self.read(name, slice(start, min(n, start + chunk_rows))) for name in names}

        starts = iter(range(0, n, chunk_rows))
        if not prefetch:
            for start in starts:
                yield start, block(start)
            return
        from concurrent.futures import ThreadPoolExecutor

        start = next(starts, None)
        if start is None:
            return
        # closing the generator early waits for the one pending read before the caller closes the file
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinet-read") as pool:
            pending = pool.submit(block, start)
            while pending is not None:
                current, rows = start, pending.result()
                start = next(starts, None)
                pending = pool.submit(block, start) if start is not None else None
                yield current, rows


def open_artifact(path: Path | str, kind: str) -> Artifact:
    return Artifact(path, kind)


def read_provenance(path: Path | str) -> dict[str, Any] | None:
    """Kind, params, inputs and fingerprint of an artifact, or None when absent/unreadable."""
    try:
        with h5py.File(path, "r") as f:
            if "fingerprint" not in f.attrs:
                return None
            return {
                "kind": f.attrs.get("kind"),
                "params": json.loads(f.attrs.get("params", "{}")),
                "inputs": json.loads(f.attrs.get("inputs", "{}")),
                "fingerprint": str(f.attrs["fingerprint"]),
                "schema_version": int(f.attrs.get("schema_version", -1)),
            }
    except (OSError, ValueError):
        return None


def artifact_fingerprint(path: Path | str, kind: str) -> str:
    """The stored content fingerprint of a valid artifact (cheap: an attribute read)."""
    with open_artifact(path, kind) as art:
        return art.fingerprint


JSON_RECORD = "json"  # is_up_to_date's kind for a JSON output that records its own params and inputs


def _json_provenance(path: Path | str) -> dict[str, Any] | None:
    """``params`` and ``inputs`` of a JSON output (a train run's metrics.json, a report's manifest)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {"params": record.get("params"), "inputs": record.get("inputs")}


def is_up_to_date(path: Path | str, kind: str, params: Mapping[str, Any], inputs: Mapping[str, str], *,
                  unit: Path | str | None = None, files: tuple[Path, ...] | list[Path] = ()) -> bool:
    """The one staleness rule of every output: True when ``path`` was built from these exact params
    and input fingerprints. ``kind`` names the HDF5 schema (the file must be a valid artifact of it),
    or is :data:`JSON_RECORD` for a JSON file holding ``params`` and ``inputs`` keys. ``files`` are
    the other outputs written with it: each must exist, and with ``unit`` all of them (``path``
    included) must be the outputs of one completed :func:`commit_outputs` of that unit."""
    if kind == JSON_RECORD:
        prov = _json_provenance(path)
        if prov is None:
            return False
    else:
        prov = read_provenance(path)
        if prov is None or prov["kind"] != kind or prov["schema_version"] != SCHEMA_VERSION:
            return False
    if canonical_json(prov["params"]) != canonical_json(dict(params)) or \
            canonical_json(prov["inputs"]) != canonical_json(dict(inputs)):
        return False
    if not all(Path(f).exists() for f in files):
        return False
    return unit is None or outputs_current(unit, [Path(path), *map(Path, files)])


# -- ids and classes shared by artifacts ----------------------------------------------------------


def match_ids(have: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``wanted`` is in ``have``: ``(rows, found)``, ``have[rows[i]] == wanted[i]``
    where ``found[i]`` (``rows`` is 0 elsewhere). One sort of ``have`` and one binary search per
    wanted id, no Python loop over rows; works for any sortable ids (strings, integers, 64-bit id
    hashes). Of repeated ids in ``have`` the first row is returned."""
    have, wanted = np.asarray(have), np.asarray(wanted)
    if len(have) == 0:
        return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
    order = np.argsort(have, kind="stable")
    pos = np.minimum(np.searchsorted(have[order], wanted), len(have) - 1)
    found = have[order][pos] == wanted
    return np.where(found, order[pos], 0), found


def rows_of_ids(path: Path | str, have: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """The rows of ``have`` (the ids of the artifact at ``path``) holding ``wanted``, in their order;
    an :class:`ArtifactError` naming the first missing id otherwise (``what``: the fix, e.g. "rerun
    extract-features")."""
    rows, found = match_ids(have, wanted)
    if not found.all():
        miss = np.asarray(wanted)[~found]
        raise ArtifactError(f"{path}: no row for image {str(miss[0])!r} ({len(miss)} of {len(found)} missing); {what}")
    return rows


def ids_in(art: "Artifact", wanted: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Which of ``wanted`` are ids of ``art``, reading its ids in blocks (memory grows with
    ``wanted``, not with the artifact)."""
    found = np.zeros(len(wanted), dtype=bool)
    for _, rows in art.iter_rows(["ids"], chunk):
        pos, hit = match_ids(wanted, rows["ids"])
        found[pos[hit]] = True
    return found


def check_classes(path: Path | str, classes: Any, other: Path | str, other_classes: Any, fix: str) -> None:
    """The one class-list check: ``path`` and ``other`` must name the same classes in the same order
    (a label is an index into that list). An :class:`ArtifactError` naming both files and the first
    difference otherwise; ``fix`` says what to rebuild."""
    a, b = [str(c) for c in classes], [str(c) for c in other_classes]
    if len(a) != len(b):
        only_a, only_b = [c for c in a if c not in b], [c for c in b if c not in a]
        detail = f" (only in {path}: {only_a[0]!r})" if only_a else f" (only in {other}: {only_b[0]!r})" if only_b else ""
        raise ArtifactError(f"{path} has {len(a)} classes but {other} has {len(b)}{detail}; {fix}")
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if diff:
        i = diff[0]
        raise ArtifactError(f"{path} and {other} disagree on class {i}: {a[i]!r} vs {b[i]!r} "
                            f"({len(diff)} classes differ); {fix}")


def _abandon_on_write_failure(method: Any) -> Any:
    """An ArtifactWriter method whose failed write (disk full, a file size limit, an I/O error)
    abandons the file at once: its descriptor is pointed at /dev/null before any other HDF5 object
    of it is released. HDF5 flushes a dataset's cache when the dataset is closed, and a failing
    flush there (from a garbage-collected handle) corrupts the library's state: SIGSEGV later."""
    import functools

    @functools.wraps(method)
    def guarded(self: "ArtifactWriter", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            from .errors import is_storage_error

            if is_storage_error(e):
                self._abandon()
            raise

    return guarded


class ArtifactWriter:
    """Writes one artifact to ``<path>.partial`` and renames it into place on ``commit()``.

    Modes:
      * ``"new"``: start from an empty file (an old partial is discarded).
      * ``"resume"``: reopen an existing partial written with the same kind, params and inputs,
        keeping the rows it committed (extract-features after a kill); otherwise start new.
      * ``"append"``: copy the existing final artifact to the partial and grow it (incremental
        scoring); the final file is untouched until ``commit()``.

    Row-wise datasets are appended in lockstep through :meth:`append_rows`; the number of rows
    committed is recorded in the ``rows_committed`` attribute after each flush, so a partial
    file killed mid-append is truncated back to its last complete block on resume.

    The content fingerprint is computed as the data is written: each dataset's digest is fed the
    rows :meth:`append_rows` appends and the values :meth:`write` writes, so :meth:`commit` does
    not re-read the file. Rows already in the file when the writer opened it (resume, append)
    are hashed once, when the first rows are appended to their dataset; datasets the writer did
    not write (or whose shape changed behind its back) are hashed at commit by reading them.
    Modify the file only through the writer's methods.
    """

    def __init__(
        self,
        path: Path | str,
        kind: str,
        params: Mapping[str, Any],
        inputs: Mapping[str, str],
        mode: str = "new",
    ):
        if kind not in SCHEMAS:
            raise ArtifactError(f"{path}: unknown artifact kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.partial = self.path.with_name(self.path.name + (APPEND_SUFFIX if mode == "append" else PARTIAL_SUFFIX))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.params_json = canonical_json(dict(params))
        self.inputs_json = canonical_json(dict(inputs))
        self.resumed = False
        self.abandoned = False  # a write failed: the file goes to /dev/null and is never kept
        self._fields = {f.name: f for f in SCHEMAS[kind]}
        # dataset name -> (digest state of its data stream, the shape it covers)
        self._digests: dict[str, tuple[Any, tuple[int, ...]]] = {}
        self._handles: dict[str, h5py.Dataset] = {}  # open datasets: an h5py name lookup walks the file's links
        if mode == "resume" and self.partial.exists() and self._partial_matches():
            self.file = h5py.File(self.partial, "r+")
            self.resumed = True
            self._finish_widening()
            self._truncate_to_committed()
        elif mode == "append":
            if not self.path.exists():
                raise ArtifactError(f"{self.path}: nothing to append to")
            self.partial.unlink(missing_ok=True)
            shutil.copyfile(self.path, self.partial)
            self.file = h5py.File(self.partial, "r+")
            self.file.attrs["params"] = self.params_json
            self.file.attrs["inputs"] = self.inputs_json
            self.file.attrs["rows_committed"] = self._row_count()
        else:
            self.partial.unlink(missing_ok=True)
            self.file = h5py.File(self.partial, "w")
            self.file.attrs["kind"] = kind
            self.file.attrs["schema_version"] = SCHEMA_VERSION
            self.file.attrs["params"] = self.params_json
            self.file.attrs["inputs"] = self.inputs_json
            self.file.attrs["rows_committed"] = 0

    # -- resume support -------------------------------------------------------------------
    def _partial_matches(self) -> bool:
        try:
            with h5py.File(self.partial, "r") as f:
                return (
                    f.attrs.get("kind") == self.kind
                    and int(f.attrs.get("schema_version", -1)) == SCHEMA_VERSION
                    and f.attrs.get("params") == self.params_json
                    and f.attrs.get("inputs") == self.inputs_json
                )
        except (OSError, ValueError):
            return False  # a partial corrupted by the kill: start over

    def _row_datasets(self) -> list[str]:
        return [n for n in self.file.keys() if self.file[n].maxshape and self.file[n].maxshape[0] is None]

    def _row_count(self) -> int:
        rows = self._row_datasets()
        return int(self.file[rows[0]].shape[0]) if rows else 0

    def _finish_widening(self) -> None:
        """A kill during :meth:`_widen` leaves the copy under a temporary name: keep the original
        when it still exists (the copy may be incomplete), else the copy (it was complete)."""
        for tmp in [k for k in self.file.keys() if k.endswith(_WIDENING)]:
            name = tmp[: -len(_WIDENING)]
            if name in self.file:
                del self.file[tmp]
            else:
                self.file.move(tmp, name)

    def _truncate_to_committed(self) -> None:
        n = int(self.file.attrs.get("rows_committed", 0))
        for name in self._row_datasets():
            ds = self.file[name]
            if ds.shape[0] != n:
                ds.resize(n, axis=0)

    @property
    def rows_committed(self) -> int:
        if not self.file:  # closed by commit(): the count recorded at that moment
            return self._final_rows
        return int(self.file.attrs.get("rows_committed", 0))

    # -- writing -----------------------------------------------------------------------------
    @_abandon_on_write_failure
    def set_attr(self, name: str, value: Any) -> None:
        self.file.attrs[name] = value if isinstance(value, (str, int, float, np.number)) else canonical_json(value)

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.file.attrs.get(name, default)

    @_abandon_on_write_failure
    def write(self, name: str, value: Any) -> None:
        """Write (or replace) a whole fixed-size dataset."""
        field = self._fields.get(name)
        if field is None:
            raise ArtifactError(f"{self.path}: {name!r} is not part of the {self.kind} schema")
        if name in self._handles:  # see _keep: flushed before its handle is let go
            self.file.flush()
            self._handles.pop(name)
        if name in self.file:
            del self.file[name]
        self._digests.pop(name, None)
        h = _new_hasher()
        if field.kind == "str":
            enc = _encode_strings(value)
            dtype = _str_dtype(_fixed_str_width(_str_max_len(enc)))
            ds = self._keep(name, self.file.create_dataset(name, data=_str_values_for(np.dtype(dtype), enc),
                                                           dtype=dtype, **_checksummed(enc.shape, dtype)))
            _hash_strings(h, enc)
        else:
            arr = np.asarray(value)
            self._refuse_not_finite(name, arr, 0)
            ds = self._keep(name, self.file.create_dataset(name, data=arr, dtype=_h5_dtype(field.kind, arr.dtype),
                                                           **_checksummed(arr.shape)))
            if ds.dtype != arr.dtype or arr.dtype.kind not in "iuf" or not arr.dtype.isnative:
                return  # stored as something else: hashed from the file at commit
            if arr.shape != () and arr.size:
                h.update(np.ascontiguousarray(arr).tobytes())
        self._digests[name] = (h, ds.shape)

    @_abandon_on_write_failure
    def create_rows(
        self,
        name: str,
        tail_shape: tuple[int, ...] = (),
        dtype: Any = None,
        chunk_rows: int = 4096,
        str_width: int | None = None,
    ) -> None:
        """Declare a growable row-wise dataset (first axis N). String datasets are variable-length
        unless ``str_width`` (bytes) is given: fixed-width, widened on demand by :meth:`append_rows`."""
        if name in self.file:
            return
        field = self._fields.get(name)
        if field is None:
            raise ArtifactError(f"{self.path}: {name!r} is not part of the {self.kind} schema")
        if field.kind == "str":
            h5dtype = _str_dtype(str_width)
        else:
            h5dtype = _h5_dtype(field.kind, np.dtype(dtype) if dtype is not None else None)
        self._keep(name, self.file.create_dataset(
            name,
            shape=(0, *tail_shape),
            maxshape=(None, *tail_shape),
            dtype=h5dtype,
            chunks=(max(1, chunk_rows), *tail_shape),
            **_checksummed((0, *tail_shape), h5dtype),
        ))

    @_abandon_on_write_failure
    def _widen(self, name: str, width: int | None) -> None:
        """Rewrite string dataset ``name`` with a wider fixed width (None: variable-length). The
        copy is made under a temporary name first (see :meth:`_finish_widening`)."""
        ds = self.file[name]
        tmp = name + _WIDENING
        if tmp in self.file:
            del self.file[tmp]
        new = self.file.create_dataset(tmp, shape=ds.shape, maxshape=ds.maxshape, chunks=ds.chunks,
                                       dtype=_str_dtype(width),
                                       **(_checksummed(ds.shape, _str_dtype(width)) if ds.fletcher32 else {}))
        step = 65536
        for start in range(0, ds.shape[0], step):
            new[start : start + step] = _str_values_for(new.dtype, _raw_strings(ds[start : start + step]))
        self.file.flush()  # see _keep: before the old handles are let go
        self._handles.pop(name, None)
        del ds
        del self.file[name]
        self.file.move(tmp, name)
        self._keep(name, new)

    def _keep(self, name: str, ds: h5py.Dataset) -> h5py.Dataset:
        """Hold the handle of a dataset written to until the file is closed. HDF5 writes a dataset's
        cached chunks when its last handle closes; a handle dropped mid-run (garbage collected) would
        write there, where a failed write (disk full) is swallowed and leaves the library in a state
        that crashes it later. Held, the cached chunks go out at :meth:`append_rows`' flush or at
        commit, where a failure raises."""
        self._handles[name] = ds
        return ds

    def _handle(self, name: str) -> h5py.Dataset | None:
        ds = self._handles.get(name)
        if ds is None and name in self.file:
            ds = self._handles[name] = self.file[name]
        return ds

    def _hasher_of(self, name: str, ds: h5py.Dataset, shape: tuple[int, ...]) -> Any:
        """The digest state of a row dataset, hashing the rows it already holds the first time."""
        entry = self._digests.get(name)
        if entry is None or entry[1] != shape:
            entry = (_data_hasher(ds), shape)
            self._digests[name] = entry
        return entry[0]

    @_abandon_on_write_failure
    def append_rows(self, rows: Mapping[str, Any], **attrs: Any) -> None:
        """Append the same number of rows to several row datasets, then record the new count."""
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise ArtifactError(f"{self.path}: append with unequal row counts {lengths}")
        (k,) = lengths
        n0 = self.rows_committed
        for name in FINITE.get(self.kind, ()):  # before any row is written: a refused block leaves none
            if name in rows:
                self._refuse_not_finite(name, np.asarray(rows[name]), n0, rows)
        written: list[tuple[str, Any, np.ndarray, bool]] = []
        try:
            for name, value in rows.items():
                field = self._fields.get(name)
                is_str = field is not None and field.kind == "str"
                if is_str:
                    arr = _encode_strings(value)
                    max_len = _str_max_len(arr)
                else:
                    arr = np.asarray(value)
                ds = self._handle(name)
                if ds is None:
                    if is_str:
                        self.create_rows(name, (), str_width=_fixed_str_width(max_len))
                    else:
                        self.create_rows(name, arr.shape[1:], arr.dtype if arr.dtype != object else None)
                    ds = self._handle(name)
                shape = ds.shape  # one query per block: each is a call into the HDF5 library
                if shape[0] != n0:
                    raise ArtifactError(f"{self.path}: dataset {name!r} has {shape[0]} rows, expected {n0}")
                h = self._hasher_of(name, ds, shape)
                if is_str and not _is_vlen_str(ds.dtype) and max_len > ds.dtype.itemsize:
                    self._widen(name, _fixed_str_width(max_len))
                    ds = self._handle(name)
                if is_str:
                    data = _str_values_for(ds.dtype, arr)
                elif arr.dtype != ds.dtype and arr.dtype.kind in "biuf" and ds.dtype.kind in "iuf":
                    data = arr = arr.astype(ds.dtype)  # converted here: the digest sees the stored bytes
                else:
                    data = arr
                ds.resize(n0 + k, axis=0)
                ds[n0 : n0 + k] = data
                written.append((name, ds, (n0 + k, *shape[1:]), h, arr, is_str))
        except BaseException:
            for name, *_ in written:  # rows written but not committed: hash from the file if it goes on
                self._digests.pop(name, None)
            self._digests.pop(name, None)
            raise
        for name, ds, shape, h, arr, is_str in written:
            if not is_str and (arr.dtype != ds.dtype or not ds.dtype.isnative):
                self._digests.pop(name, None)  # converted by HDF5: hashed from the file at commit
                continue
            _hash_values(h, arr, is_str)
            self._digests[name] = (h, shape)
        self.file.attrs["rows_committed"] = n0 + k
        for key, val in attrs.items():
            self.set_attr(key, val)
        self.file.flush()

    def _refuse_not_finite(self, name: str, arr: np.ndarray, n0: int, rows: Mapping[str, Any] | None = None) -> None:
        if name not in FINITE.get(self.kind, ()):
            return
        r = _first_not_finite(arr)
        if r is None:
            return
        ids = (rows or {}).get("ids")
        image = repr(str(np.asarray(ids)[r])) if ids is not None and len(ids) > r else f"row {n0 + r}"
        raise ArtifactError(f"{self.path}: refused the {name} of image {image}: not finite (NaN or inf)")

    def fingerprint(self) -> str:
        """The content fingerprint the file would get if committed now (digests kept so far, the
        other datasets read)."""
        digests = {}
        for name in self.file.keys():
            ds = self.file[name]
            entry = self._digests.get(name)
            if entry is None or entry[1] != ds.shape:
                entry = (_data_hasher(ds), ds.shape)
                self._digests[name] = entry
            digests[name] = entry[0].digest()
        return _fingerprint_from(self.file, digests)

    def _abandon(self) -> None:
        if self.abandoned or not self.file or not self.file.id.valid:
            return
        try:
            fd = self.file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
            self.abandoned = True
        except (OSError, RuntimeError, ValueError):
            pass

    @_abandon_on_write_failure
    def commit(self, rename: bool = True) -> str:
        """Validate, fingerprint, close and atomically rename into place. Returns the fingerprint.
        ``rename=False``: leave the finished file at :attr:`partial` for :func:`commit_outputs`,
        which renames it together with the other files of its command."""
        try:
            validate(self.partial, self.kind, self.file)
            self.file.attrs["package_version"] = package_version()
            self.file.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            fp = self.fingerprint()
            self.file.attrs["fingerprint"] = fp
            self._final_rows = int(self.file.attrs.get("rows_committed", 0))
            self.file.flush()  # the last writes (metadata): a failure here must not pass unnoticed, and must
            self.file.close()  # come before any close (see _close_h5)
        except BaseException:
            _close_h5(self.file)
            raise
        if rename:
            _replace(self.partial, self.path)
        return fp

    def abort(self, keep_partial: bool = False) -> None:
        """Close without committing; the partial is kept only when asked (resumable stages) and no
        write failed (after a failed write its structure on disk is not known to be whole). Safe
        after a failed write (disk full): the file is closed without the crash HDF5 would give."""
        try:
            _close_h5(self.file)
        finally:
            if not keep_partial or self.abandoned:
                self.partial.unlink(missing_ok=True)


class BackgroundAppender:
    """Appends row blocks to an :class:`ArtifactWriter` on a background thread, so the caller
    computes the next block while the last one is hashed and written (h5py and blake2 release the
    GIL while they work). At most one block is pending: :meth:`append` first waits for the one
    before, and raises its error there; leaving the ``with`` block waits for the last one.

    The caller must not change a block's arrays after handing them over, and must not use the
    writer itself until the ``with`` block is left.
    """

    def __init__(self, writer: ArtifactWriter) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinet-write")
        self._pending: Future | None = None

    def append(self, rows: Mapping[str, Any]) -> None:
        self.wait()
        self._pending = self._pool.submit(self.writer.append_rows, dict(rows))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "BackgroundAppender":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:  # the caller's error wins; the block's own is dropped
                self._pending.exception()
                self._pending = None
        finally:
            self._pool.shutdown(wait=True)


# -- typed readers of the artifacts -------------------------------------------------------------


@dataclass
class GraphArrays:
    """What graph.h5 gives the stages after it: the classes and S_t (eq. 3)."""

    path: Path
    classes: np.ndarray
    S_t: np.ndarray  # (C, C) float32
    fingerprint: str


def read_graph(path: Path | str) -> GraphArrays:
    with open_artifact(path, "graph") as art:
        return GraphArrays(Path(path), art.read("classes"), art.read("S_t").astype(np.float32), art.fingerprint)


@dataclass
class PrototypeArrays:
    """prototypes.h5's prototypes (float32, P x D) and their classes."""

    path: Path
    classes: np.ndarray
    prototypes: np.ndarray
    prototype_class: np.ndarray
    fingerprint: str


def read_prototypes(path: Path | str) -> PrototypeArrays:
    with open_artifact(path, "prototypes") as art:
        return PrototypeArrays(Path(path), art.read("classes"), art.read("prototypes").astype(np.float32),
                               art.read("prototype_class"), art.fingerprint)


def _rows_equal(art: "Artifact", name: str, value: str, chunk: int) -> np.ndarray:
    ds = art.dataset(name)  # raw bytes: no per-row decoding
    n = art.dims["N"]
    mask = np.zeros(n, dtype=bool)
    step = max(chunk, 65536)
    for start in range(0, n, step):
        block = np.asarray(ds[start : start + step])
        mask[start : start + len(block)] = (block == value.encode()) | (block == value)
    return mask


def train_mask(art: "Artifact", chunk: int, subset: str = "all") -> np.ndarray:
    """Rows of features.h5's train split (every row when the file records no splits), restricted
    to rows of ``subset`` (its ``subset`` column, e.g. Clothing1M's ``clean``) unless it is ``all``."""
    n = art.dims["N"]
    mask = _rows_equal(art, "splits", "train", chunk) if "splits" in art else np.ones(n, dtype=bool)
    if subset != "all":
        if "subset" not in art:
            raise ArtifactError(f"{art.path}: --prototypes-from {subset}: the file records no subsets "
                                "(only Clothing1M and WebVision readers write them)")
        mask &= _rows_equal(art, "subset", subset, chunk)
    return mask


def feature_blocks(art: "Artifact", chunk: int, cache_mb: float = 0) -> Any:
    """A callable a stage calls once per pass: streams ``features`` in blocks of ``chunk`` rows.

    The raw blocks of the first pass are kept in memory while they fit in ``cache_mb`` megabytes,
    so later passes replay them instead of re-reading the file; past the cap nothing is cached
    and every pass streams from disk (memory stays bounded either way).
    """
    cap = cache_mb * 2**20
    cache: list[tuple[int, np.ndarray]] = []
    state = {"complete": False, "bytes": 0, "overflow": cap <= 0}

    def source() -> Iterator[tuple[int, np.ndarray]]:
        if state["complete"]:
            yield from cache
            return
        # the next block is read while the stage computes on this one (passes past the cache's cap)
        for start, rows in art.iter_rows(["features"], chunk, prefetch=True):
            block = rows["features"]
            if not state["overflow"]:
                if state["bytes"] + block.nbytes <= cap:
                    cache.append((start, block))
                    state["bytes"] += block.nbytes
                else:
                    state["overflow"] = True
                    cache.clear()
            yield start, block
        state["complete"] = not state["overflow"]

    return source


def labeled_confidence(art: "Artifact", labels: np.ndarray, chunk: int) -> np.ndarray:
    """p(y_i | x_i) from features.h5's stored ``probs`` (one streamed pass)."""
    conf = np.empty(len(labels), dtype=np.float32)
    lab = np.clip(labels, 0, None)
    for start, rows in art.iter_rows(["probs"], chunk):
        p = rows["probs"]
        conf[start : start + len(p)] = np.take_along_axis(p, lab[start : start + len(p), None], 1)[:, 0]
    return conf


def prototype_index(prototypes: np.ndarray, device: str = "cpu") -> Any:
    """Exact inner-product FAISS index over the (unit) prototypes: nearest by IP = nearest by L2.
    Built on the GPU when faiss-gpu and CUDA are present (:func:`write_faiss_index` writes it back
    as CPU)."""
    import faiss

    index = faiss.IndexFlatIP(prototypes.shape[1])
    if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(np.ascontiguousarray(prototypes, dtype=np.float32))
    return index


def write_prototypes(target: Path, index_path: Path, feats: "Artifact", result: Any, train: np.ndarray,
                     params: Mapping[str, Any], inputs: Mapping[str, str], attrs: Mapping[str, Any],
                     device: str = "cpu", chunk: int = 65536) -> str:
    """prototypes.h5 (from a ``stages.make_prototypes.PrototypeResult``; per-row values of the
    ``train`` rows of ``feats``, with their ids) and prototypes.faiss, committed as one unit.
    Returns prototypes.h5's fingerprint."""
    writer = ArtifactWriter(target, "prototypes", params, inputs, mode="new")
    try:
        writer.write("classes", feats.read("classes"))
        writer.write("prototypes", result.prototypes)
        writer.write("prototype_class", result.prototype_class)
        writer.write("initial_prototypes", result.initial_prototypes)
        for start, rows in feats.iter_rows(["ids"], max(chunk, 65536)):
            sl = slice(start, start + len(rows["ids"]))
            t = train[sl]
            if t.any():
                writer.append_rows({
                    "ids": rows["ids"][t],
                    "consistency": result.consistency[sl][t].astype(np.float32),
                    "selected": result.selected[sl][t].astype(np.int8),
                })
        for key, value in attrs.items():
            writer.set_attr(key, value)
        index_tmp = write_faiss_index(index_path, prototype_index(result.prototypes, device), stage=True)
        fp = writer.commit(rename=False)
    except BaseException:
        writer.abort()
        raise
    # prototypes.h5 and prototypes.faiss together: a kill between the renames is completed by the next run
    commit_outputs(target, {target: writer.partial, index_path: index_tmp}, params, inputs)
    return fp


# -- features.h5 rows from extracted batches ---------------------------------------------------

FEATURE_ROW_FILL = {"paths": "", "clean_labels": -1, "side_text": "", "subset": ""}  # a column the table lacks


def feature_row_names(table: Any, with_probs: bool) -> list[str]:
    """The per-image datasets features.h5 gets from a dataset table (SCHEMAS order): the required
    ones, each optional column the table has, and ``probs`` when extracted."""
    names = []
    for f in SCHEMAS["features"]:
        if f.dims[0] != "N":
            continue
        if f.name == "probs":
            if with_probs:
                names.append(f.name)
        elif f.required or getattr(table, f.name, None) is not None:
            names.append(f.name)
    return names


def append_feature_batches(writer: "ArtifactWriter", table: Any, batches: Any, *, names: list[str],
                           feature_dtype: Any, chunk_rows: int, on_skip: Any = None, end: int | None = None,
                           marks: Any = None) -> int:
    """The one feature-append loop (extract-features, rescore): append the readable images of
    ``batches`` (``stages.extract_features.extract``'s) to features.h5 every ``chunk_rows`` images.

    Args:
        writer: features.h5's writer (mode resume or append).
        table: the dataset table the batches' ``positions`` index (ids, labels, splits, ... columns).
        batches: iterable of feature batches (``positions``, ``ok``, ``features``, ``probs``, ``reasons``).
        names: the row datasets to write (:func:`feature_row_names`, or those the file already has);
            a column the table lacks is filled with :data:`FEATURE_ROW_FILL`.
        feature_dtype: on-disk dtype of ``features``.
        chunk_rows: images per flushed chunk.
        on_skip: called ``on_skip(position, reason)`` for each image that could not be read.
        end: the position after the last one (the last flush's mark); default the last batch's.
        marks: ``marks(upto) -> dict`` of attributes committed with each chunk (a resume point).

    Returns:
        The number of rows appended.
    """
    buf: list = []
    appended = 0

    def flush(upto: int) -> None:
        nonlocal appended
        attrs = marks(upto) if marks is not None else {}
        pos = np.concatenate([b.positions[b.ok] for b in buf]) if buf else np.zeros(0, dtype=np.int64)
        if len(pos) == 0:
            for key, value in attrs.items():
                writer.set_attr(key, value)
            buf.clear()
            return
        rows: dict[str, Any] = {}
        for name in names:
            if name == "features":
                rows[name] = np.concatenate([b.features[b.ok] for b in buf]).astype(feature_dtype)
            elif name == "probs":
                rows[name] = np.concatenate([b.probs[b.ok] for b in buf]).astype(np.float32)
            else:
                column = getattr(table, name, None)
                rows[name] = column[pos] if column is not None else np.full(len(pos), FEATURE_ROW_FILL[name])
        buf.clear()
        writer.append_rows(rows, **attrs)
        appended += len(pos)

    pending, last = 0, None
    for batch in batches:
        if on_skip is not None:
            for p in np.flatnonzero(~batch.ok):
                on_skip(int(batch.positions[p]), batch.reasons[p])
        buf.append(batch)
        pending += len(batch.positions)
        if len(batch.positions):
            last = int(batch.positions[-1]) + 1
        if pending >= chunk_rows:
            flush(last)
            pending = 0
    flush(end if end is not None else (last or 0))
    return appended


def finish_features(writer: "ArtifactWriter", table: Any, skipped: list[list[str]], attrs: Mapping[str, Any]) -> str:
    """Write what features.h5 holds besides its rows (classes, the skipped images, the table's
    provenance and class table, ``attrs``) and commit it; returns its fingerprint."""
    writer.write("classes", table.classes.names)
    if skipped:
        writer.write("skipped_ids", [s[0] for s in skipped])
        writer.write("skipped_reasons", [s[1] for s in skipped])
    for key, value in attrs.items():
        writer.set_attr(key, value)
    writer.set_attr("dataset_provenance", table.provenance)
    writer.set_attr("class_table", {"names": table.classes.names, "synsets": table.classes.synsets,
                                    "descriptions": table.classes.descriptions, "parents": table.classes.parents})
    return writer.commit()


FEATURE_FILE_ATTRS = ("backbone", "preprocess", "decode", "dataset_provenance", "class_table")


def append_parts(writer: ArtifactWriter, parts: list["Artifact"], names: list[str]) -> tuple[list[str], list[str]]:
    """Append the rows ``names`` of the features files ``parts`` to ``writer``, in order; returns
    their skipped images (ids, reasons), in the same order."""
    skipped_ids: list[str] = []
    skipped_reasons: list[str] = []
    for part in parts:
        for _, rows in part.iter_rows(names, 65536):
            writer.append_rows(rows)
        if "skipped_ids" in part:
            skipped_ids += list(part.read("skipped_ids"))
            skipped_reasons += list(part.read("skipped_reasons"))
    return skipped_ids, skipped_reasons


def merge_features(target: Path, parts: list["Artifact"], params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """features.h5 from the shard files ``parts`` (their rows in order, their skipped images, the
    first one's classes and attributes); returns its fingerprint."""
    first = parts[0]
    writer = ArtifactWriter(target, "features", params, inputs, mode="new")
    try:
        names = [f.name for f in SCHEMAS["features"] if f.dims[0] == "N" and f.name in first]
        skipped_ids, skipped_reasons = append_parts(writer, parts, names)
        writer.write("classes", first.read("classes"))
        if skipped_ids:
            writer.write("skipped_ids", skipped_ids)
            writer.write("skipped_reasons", skipped_reasons)
        for key in FEATURE_FILE_ATTRS:
            if first.attr(key) is not None:
                writer.set_attr(key, first.attr(key))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_artifact(
    path: Path | str,
    kind: str,
    data: Mapping[str, Any],
    params: Mapping[str, Any],
    inputs: Mapping[str, str],
    attrs: Mapping[str, Any] | None = None,
) -> str:
    """Write a whole artifact atomically. Returns its content fingerprint."""
    writer = ArtifactWriter(path, kind, params, inputs, mode="new")
    try:
        for name, value in data.items():
            if value is not None:
                writer.write(name, value)
        for key, val in (attrs or {}).items():
            writer.set_attr(key, val)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


# -- FAISS -------------------------------------------------------------------------------------


def write_faiss_index(path: Path | str, index: Any, stage: bool = False) -> Path:
    """Write a FAISS index atomically (temp file + rename). GPU indexes are moved to CPU first.
    The index is serialized in memory and written by Python, so a failed write is an OSError
    naming the file (FAISS's own writer reports only "write error"). ``stage``: leave it at the
    temporary name (returned) for :func:`commit_outputs`."""
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    return write_bytes(path, faiss.serialize_index(index).tobytes(), stage=stage)


def read_faiss_index(path: Path | str, expected_dim: int | None = None, expected_rows: int | None = None) -> Any:
    import faiss

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: not found")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise ArtifactError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0]})") from e
    if expected_dim is not None and index.d != expected_dim:
        raise ArtifactError(f"{path}: index dimension {index.d}, expected {expected_dim}")
    if expected_rows is not None and index.ntotal != expected_rows:
        raise ArtifactError(f"{path}: index holds {index.ntotal} vectors, expected {expected_rows}")
    return index


# -- plain files (metrics, TSV, PNG, model weights) ------------------------------------------------


def staged_path(path: Path | str) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def write_bytes(path: Path | str, data: bytes, stage: bool = False) -> Path:
    """Write ``data`` to ``<path>.partial`` and rename it into place (``stage``: leave it there for
    :func:`commit_outputs`); returns the file written. A failed write leaves no partial behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staged_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if stage:
        return tmp
    _replace(tmp, path)
    return path


def write_json(path: Path | str, obj: Any, stage: bool = False) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), stage=stage)


def write_text(path: Path | str, text: str, stage: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), stage=stage)


# -- multi-file outputs: committed as one unit --------------------------------------------------
#
# A command whose output is several files (a "unit": prototypes.h5 with prototypes.faiss, scores.h5
# with suspects.tsv, a train-X/ run, export/, report/) writes each of them to a temporary name, then
# calls commit_outputs: it writes <folder>/.sinet/<unit>.pending.json (each file, its temporary name
# and its fingerprint), renames the files into place, writes <folder>/.sinet/<unit>.json (each
# file's fingerprint) and removes the pending record. A kill anywhere leaves either the old files
# with their old record, or a pending record that the next run of the command completes
# (recover_outputs: every file whose temporary copy is still there is renamed into place), so the
# result is the one the interrupted run would have committed. The up-to-date check of such a command
# trusts the record (outputs_current); readers refuse a unit caught half committed (unit_problem).


def record_path(unit: Path | str) -> Path:
    unit = Path(unit)
    return unit.parent / RECORD_DIR / f"{unit.name}.json"


def _pending_path(unit: Path | str) -> Path:
    unit = Path(unit)
    return unit.parent / RECORD_DIR / f"{unit.name}.pending.json"


def output_fingerprint(path: Path | str) -> str | None:
    """Content fingerprint of one output: an HDF5 artifact's stored fingerprint, a symlink's target,
    a folder's files (names and contents), any other file's bytes. None when it does not exist."""
    path = Path(path)
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_dir():
        h = _new_hasher()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + fingerprint_file(f).encode())
        return "dir:" + h.hexdigest()
    if not path.exists():
        return None
    if path.name.endswith((".h5", ".h5" + PARTIAL_SUFFIX, ".h5" + APPEND_SUFFIX)):
        prov = read_provenance(path)
        return None if prov is None else "h5:" + prov["fingerprint"]
    return fingerprint_file(path)


def _rel(unit: Path, path: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(unit.parent))


def _install(staged: Path, final: Path) -> None:
    """Rename ``staged`` over ``final``; a folder or link replaces what is there (removed first)."""
    if (staged.is_dir() or staged.is_symlink()) and (final.is_dir() and not final.is_symlink()):
        shutil.rmtree(final)
    elif staged.is_dir() and not staged.is_symlink() and final.is_symlink():
        final.unlink()
    _replace(staged, final)


def _write_record(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)


@contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives during the block until it ends: a commit is a few
    renames, and finishing it makes "interrupted" mean either before the commit or after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def commit_outputs(unit: Path | str, staged: Mapping[Path, Path], params: Any = None, inputs: Any = None) -> None:
    """Rename the files of one multi-file output into place as a unit: ``staged`` maps each final
    path (under ``unit``'s folder) to the finished temporary file holding its new content.
    ``params`` and ``inputs``, when given, are kept in the record (for people reading it). A Ctrl-C
    during the renames takes effect after them."""
    with _interrupt_after():
        _commit_outputs(Path(unit), staged, params, inputs)


def _commit_outputs(unit: Path, staged: Mapping[Path, Path], params: Any, inputs: Any) -> None:
    files = {}
    for final, tmp in staged.items():
        fp = output_fingerprint(tmp)
        if fp is None:
            raise ArtifactError(f"{tmp}: missing; cannot commit {final}")
        files[_rel(unit, Path(final))] = {"fingerprint": fp, "staged": _rel(unit, Path(tmp))}
    record = {"unit": unit.name, "files": files, "params": params, "inputs": inputs}
    pending = _pending_path(unit)
    _write_record(pending, record)
    for final, tmp in staged.items():
        _install(Path(tmp), Path(final))
    _finish(unit, record)


def _finish(unit: Path, record: dict) -> None:
    done = dict(record, files={k: v["fingerprint"] for k, v in record["files"].items()},
                committed=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _write_record(record_path(unit), done)
    _pending_path(unit).unlink(missing_ok=True)


def recover_outputs(unit: Path | str) -> str | None:
    """Complete a commit an interrupted run left (call it holding the unit's exclusive lock): each
    file still at its temporary name is renamed into place. Returns what was done (None: nothing
    pending). When a file's new content is gone the unit is marked not current, so the command
    rebuilds it."""
    unit = Path(unit)
    pending = _pending_path(unit)
    for stale in (staged_path(pending), staged_path(record_path(unit))):  # a record a kill left half written
        stale.unlink(missing_ok=True)
    if not pending.exists():
        return None
    try:
        record = json.loads(pending.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    missing = []
    if files is not None:
        for rel, entry in files.items():
            final, tmp = unit.parent / rel, unit.parent / entry["staged"]
            if output_fingerprint(final) == entry["fingerprint"]:
                continue
            if (tmp.exists() or tmp.is_symlink()) and output_fingerprint(tmp) == entry["fingerprint"]:
                _install(tmp, final)
            else:
                missing.append(rel)
    if files is None or missing:
        # not every new file survived: nothing is current until the command commits again
        _write_record(record_path(unit), {"unit": unit.name, "files": {}, "incomplete": True})
        pending.unlink(missing_ok=True)
        return (f"{unit}: an interrupted run left its outputs half committed ({', '.join(missing) or 'record unreadable'} "
                "lost); rebuilding them")
    _finish(unit, record)
    return f"{unit}: completed the commit of {', '.join(files)} that an interrupted run left"


def commit_pending(unit: Path | str) -> bool:
    """Whether a commit of ``unit`` was interrupted and not yet completed."""
    return _pending_path(unit).exists()


def outputs_current(unit: Path | str, files: list[Path]) -> bool:
    """Whether ``files`` are the outputs of one completed commit of ``unit``: its record lists each
    of them with the fingerprint it has now, and no commit is pending. Outputs written before
    commit records existed (no record, nothing pending) count as current when they all exist."""
    unit = Path(unit)
    if _pending_path(unit).exists():
        return False
    try:
        record = json.loads(record_path(unit).read_text())
    except FileNotFoundError:
        return all(Path(f).exists() for f in files)
    except (OSError, ValueError):
        return False
    recorded = record.get("files") if isinstance(record, dict) else None
    if not isinstance(recorded, dict):
        return False
    for f in files:
        fp = recorded.get(_rel(unit, Path(f)))
        if fp is None or output_fingerprint(f) != fp:
            return False
    return True


def unit_problem(unit: Path | str, files: list[Path], command: str) -> str | None:
    """For a reader: why ``files`` cannot be read together (a commit of ``command`` was interrupted
    half way), or None."""
    if outputs_current(unit, files):
        return None
    names = " and ".join(str(f) for f in files)
    return (f"{names} are not the outputs of one {command} run (it was interrupted while committing them); run "
            f"sinet {command} again: a plain run completes or redoes the commit")
