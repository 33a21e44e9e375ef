"""The HDF5 schema of an activation store: creating one, and checking one before it is read.

:func:`create_store` makes the file whole, under a temporary name renamed into place.
:func:`check_layout` is the one validation every reader runs on open (``ActivationStore``,
``StoreWriter`` and so capture's resume): a damaged or foreign file is a :class:`StoreError`
saying what is wrong, never a ``KeyError`` from deep inside an analysis, and no value (a
progress beyond the rows, maxima of the wrong shape) is silently trusted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._plumbing.token_grid import TokenGrid
from ..errors import DissectError, StoreError

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no file-size limits
    resource = None  # type: ignore[assignment]

FORMAT = "torch-dissect"
VERSION = 1
DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20
# HDF5's 1.8 file format: its superblock, object headers and groups carry checksums, so a
# damaged file is refused instead of being misread (the default, oldest format let some byte
# flips send HDF5 into an endless loop). Not the 1.10 format: it marks files open for writing
# in the superblock, and a capture killed mid-way could then not be reopened to resume.
LIBVER = ("v108", "v108")
RECAPTURE = "recapture it (overwrite=True / --overwrite)"


def _chunk_rows(row_shape: Sequence[int], itemsize: int, n: int) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return int(max(1, min(n, CHUNK_BYTES // row_bytes)))


def _create_fixed(
    group: h5py.Group, name: str, shape: tuple[int, ...], dtype: str, chunk_rows: int | None
) -> h5py.Dataset:
    """Create a dataset whose storage is allocated now, so later writes touch no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunk_rows is not None:
        dcpl.set_chunk((chunk_rows,) + tuple(max(1, s) for s in shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def io_error(path: Path, what: str, exc: BaseException) -> StoreError:
    """A :class:`StoreError` for an OS or HDF5 failure at ``path``, naming both."""
    text = str(exc).split("\n")[0].strip() or type(exc).__name__
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and os.strerror(code) not in text:
        text = f"{os.strerror(code)}: {text}"
    no_space = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(
        s in str(exc) for s in ("No space left", "File too large", "errno = 28", "errno = 27"))
    hint = ": the disk is full (or the file is over its size limit)" if no_space else ""
    return StoreError(f"{what} {path} failed{hint} ({type(exc).__name__}: {text})")


def check_destination(path: Path) -> None:
    """Refuse a store path that cannot be a file: a folder, a path under a file, or one in a
    folder this process cannot write."""
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give the store a file path (e.g. {path}/acts.h5)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StoreError(f"cannot write {path}: the folder {parent} is not writable "
                                 "(read-only, or no permission)")
            break


def store_bytes(n: int, layers: dict[str, tuple[int, ...]], dtype: str,
                gradients: bool = False) -> int:
    """The bytes a store of these layers takes on disk once written (whole chunks), without
    the HDF5 metadata (kilobytes)."""
    item = np.dtype(dtype).itemsize

    def data(row_shape: Sequence[int], itemsize: int) -> int:
        rows = _chunk_rows(row_shape, itemsize, n)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * itemsize
        return -(-n // rows) * rows * row_bytes if n else 0

    total = data((), 8) + 8
    for row_shape in layers.values():
        total += data(row_shape, item) * (2 if gradients else 1) + data(row_shape[:1], 4)
    return total


def check_space(path: Path, needed: int) -> None:
    """Refuse to start a store the disk (or the process's file-size limit) cannot hold."""
    margin = 1 << 20
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # nothing to measure: the writes will tell
    if path.is_file():
        free += path.stat().st_size  # replaced when the new store is in place
    if free < needed + margin:
        raise StoreError(f"{path} needs {needed / 2**20:.1f} MiB but the disk has "
                         f"{free / 2**20:.1f} MiB free: free space, capture fewer layers or "
                         "rows, pool the maps (pool='mean'), or store float16")
    if resource is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY and soft < needed + margin:
            raise StoreError(f"{path} needs {needed / 2**20:.1f} MiB but this process may only "
                             f"write files of {soft / 2**20:.1f} MiB (its file-size limit, "
                             "ulimit -f): raise the limit, or capture less")


def create_store(
    path: str | Path,
    *,
    n: int,
    layers: dict[str, tuple[int, ...]],
    dtype: str,
    pool: Any,
    attrs: dict[str, Any],
    gradients: bool = False,
    tokens: dict[str, str] | None = None,
    prefix: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Create an empty, not-yet-complete store at ``path`` atomically.

    Parameters
    ----------
    path
        Destination file; replaced atomically if it exists.
    n
        Number of rows (samples).
    layers
        ``layer -> per-row shape`` of the stored (pooled) activations; the channel count is the
        first entry.
    dtype
        ``"float16"`` or ``"float32"``.
    pool
        The pooling recorded in the attributes (``None``, ``"mean"``, ``"max"`` or a size).
    attrs
        Extra root attributes (``model``, ``fingerprint``, ...).
    gradients
        Also create ``/gradients/<layer>``.
    tokens
        ``layer -> TokenGrid JSON`` for layers captured from token outputs
        (:class:`dissect.hooks.TokenGrid`): recorded as the ``tokens`` attribute of
        ``/activations/<layer>``.
    prefix
        ``layer -> (P, C)``: also create ``/prefix/<layer>`` ``(N, P, C)`` for those layers'
        prefix tokens (class and register tokens).

    Raises
    ------
    StoreError
        When the file cannot be made (a folder at ``path``, a parent that is a file, a
        read-only folder, a disk or file-size limit smaller than the whole store:
        :func:`store_bytes`); nothing is left behind then.
    """
    path = Path(path)
    check_destination(path)
    tmp = path.with_name(path.name + ".creating")
    if path.parent.is_dir():
        check_space(path, store_bytes(n, {**layers, **{f"prefix:{k}": v for k, v in
                                                      (prefix or {}).items()}},
                                      dtype, gradients))
    f = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(tmp, "w", libver=LIBVER)
        made = _lay_out(f, n, layers, dtype, pool, attrs, gradients)
        made += _lay_out_tokens(f, n, dtype, tokens or {}, prefix or {})
        f.close()  # with every dataset still referenced: closed by the file, not by GC
        del made
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as exc:
        if f is not None:
            _close_hard(f)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise io_error(path, "creating the store", exc) from exc


def _lay_out(f: h5py.File, n: int, layers: dict[str, tuple[int, ...]], dtype: str, pool: Any,
             attrs: dict[str, Any], gradients: bool) -> list[h5py.Dataset]:
    """Write the schema into the new file ``f`` (every dataset allocated now); return the
    datasets (kept referenced until the file is closed: a dataset handle dropped earlier
    would be flushed by the garbage collector, where HDF5's errors are lost)."""
    made = []
    pool_json = json.dumps(pool)
    f.attrs.update({
        "format": FORMAT, "version": VERSION, "n_samples": n, "complete": False,
        "layers": json.dumps(list(layers)), "dtype": dtype, "pool": pool_json,
        "gradients": gradients,
    })
    f.attrs.update(attrs)
    groups = ["activations", "maxima"] + (["gradients"] if gradients else [])
    for g in groups:
        f.create_group(g)
    for name, row_shape in layers.items():
        shape = (n, *row_shape)
        rows = _chunk_rows(row_shape, np.dtype(dtype).itemsize, n)
        for g in ["activations"] + (["gradients"] if gradients else []):
            ds = _create_fixed(f[g], name, shape, dtype, rows)
            ds.attrs["pool"] = pool_json
            ds.attrs["dtype"] = dtype
            made.append(ds)
        made.append(_create_fixed(f["maxima"], name, (n, row_shape[0]), "float32",
                                  _chunk_rows(row_shape[:1], 4, n)))
    made.append(_create_fixed(f, "index", (n,), "int64", _chunk_rows((), 8, n)))
    progress = _create_fixed(f, "progress", (), "int64", None)
    progress[()] = 0
    made.append(progress)
    return made


def _close_hard(f: h5py.File) -> None:
    """Close ``f`` after a failure: when HDF5 cannot flush it (a full disk), close its handle
    anyway, so that nothing is left for HDF5 to flush (and fail on) when the process exits."""
    try:
        f.close()
    except (OSError, RuntimeError):
        try:
            if f.id.valid:
                f.id.close()
        except (OSError, RuntimeError):
            pass


# --------------------------------------------------------------------------- checking


def _attr(f: h5py.File, key: str, path: Path) -> Any:
    if key not in f.attrs:
        raise StoreError(f"{path} has no root attribute {key!r}: the file is damaged or was "
                         f"not written by torch-dissect; {RECAPTURE}")
    value = f.attrs[key]
    return value.item() if isinstance(value, np.generic) else value


def _json_attr(f: h5py.File, key: str, path: Path) -> Any:
    value = _attr(f, key, path)
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: root attribute {key!r} is not valid JSON ({value!r:.60}); "
                         f"the file is damaged; {RECAPTURE}") from exc


def _int_attr(f: h5py.File, key: str, path: Path) -> int:
    value = _attr(f, key, path)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise StoreError(f"{path}: root attribute {key!r} is {value!r:.60} "
                         f"({type(value).__name__}), not an integer; {RECAPTURE}")
    return int(value)


def check_version(f: h5py.File, path: Path) -> None:
    """Refuse a file that is not a torch-dissect store, or one of another version."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt != FORMAT:
        raise StoreError(f"{path} is HDF5 but not a torch-dissect store (format={fmt!r})")
    version = f.attrs.get("version")
    if isinstance(version, np.generic):
        version = version.item()
    if version != VERSION or isinstance(version, bool):
        raise StoreError(
            f"{path} is a torch-dissect store of version {version!r} "
            f"({type(version).__name__}); this release reads version {VERSION} (an integer): "
            "recapture it or use the matching torch-dissect")


def _lay_out_tokens(f: h5py.File, n: int, dtype: str, tokens: dict[str, str],
                    prefix: dict[str, tuple[int, ...]]) -> list[h5py.Dataset]:
    """The token layouts (attributes) and the prefix-token datasets of a new store."""
    for name, layout in tokens.items():
        f["activations"][name].attrs["tokens"] = layout
    made = []
    if prefix:
        group = f.create_group("prefix")
        for name, row_shape in prefix.items():
            made.append(_create_fixed(group, name, (n, *row_shape), dtype,
                                      _chunk_rows(row_shape, np.dtype(dtype).itemsize, n)))
    return made


def check_layout(f: h5py.File, path: Path) -> dict[str, Any]:
    """Check that ``f`` is a whole torch-dissect store of this version; return its layout.

    Checked: the root attributes (format, version, row count, layers, dtype, pool, flags),
    every dataset each layer needs with consistent shapes and dtypes (activations
    ``(N, C, ...)``, maxima ``(N, C)`` float32, gradients like the activations), ``/index``
    ``(N,)`` int64 and ``/progress`` an integer between 0 and ``N`` (equal to ``N`` once the
    store is complete).

    Parameters
    ----------
    f
        The open file.
    path
        Its path, for messages.

    Returns
    -------
    dict
        ``n_samples``, ``layers``, ``dtype``, ``gradients``, ``complete``, ``progress``.

    Raises
    ------
    StoreError
        Saying what is missing or malformed.
    """
    try:
        check_version(f, path)
        return _check_layout(f, path)
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:  # h5py surprises
        raise StoreError(f"{path} is damaged ({type(exc).__name__}: {exc}); "
                         f"{RECAPTURE}") from exc


def _dataset(f: h5py.File, name: str, path: Path) -> h5py.Dataset:
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        what = "missing" if obj is None else f"a {type(obj).__name__}, not a dataset"
        raise StoreError(f"{path}: /{name} is {what}; the file is damaged; {RECAPTURE}")
    return obj


def _check_tokens(f: h5py.File, name: str, acts: h5py.Dataset, path: Path) -> None:
    """A layer captured from tokens has a readable layout and, with prefix tokens, their
    dataset ``(N, P, C)``."""
    if "tokens" not in acts.attrs:
        return
    try:
        grid = TokenGrid.from_json(acts.attrs["tokens"])
    except DissectError as exc:
        raise StoreError(f"{path}: /activations/{name} has a malformed 'tokens' attribute "
                         f"({exc}); {RECAPTURE}") from exc
    pooled = json.loads(acts.attrs.get("pool", "null")) is not None
    if acts.ndim != 4 and not (pooled and acts.ndim == 2):
        raise StoreError(f"{path}: /activations/{name} is {acts.shape} but its layout says "
                         f"maps (N, C, h, w); {RECAPTURE}")
    if grid.prefix:
        want = (acts.shape[0], grid.prefix, acts.shape[1])
        pre = _dataset(f, f"prefix/{name}", path)
        if pre.shape != want or pre.dtype != acts.dtype:
            raise StoreError(f"{path}: /prefix/{name} is {pre.shape} {pre.dtype}, not {want} "
                             f"{acts.dtype}; {RECAPTURE}")


def _check_layout(f: h5py.File, path: Path) -> dict[str, Any]:
    dict(f.attrs.items())  # every root attribute can be read (a damaged heap cannot)
    n = _int_attr(f, "n_samples", path)
    if n < 0:
        raise StoreError(f"{path}: n_samples is {n}; {RECAPTURE}")
    layers = _json_attr(f, "layers", path)
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(x, str) for x in layers) or len(set(layers)) != len(layers)):
        raise StoreError(f"{path}: root attribute 'layers' must list distinct layer names, "
                         f"got {layers!r:.80}; {RECAPTURE}")
    dtype = _attr(f, "dtype", path)
    if isinstance(dtype, bytes):
        dtype = dtype.decode("utf-8", "replace")
    if dtype not in DTYPES:
        raise StoreError(f"{path}: stored dtype {dtype!r} is not one of {DTYPES}; {RECAPTURE}")
    pool = _json_attr(f, "pool", path)
    if not (pool is None or pool in ("mean", "max") or (
            isinstance(pool, list) and len(pool) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pool))):
        raise StoreError(f"{path}: root attribute 'pool' is {pool!r:.60}; {RECAPTURE}")
    flags = {}
    for key in ("complete", "gradients"):
        value = _attr(f, key, path)
        if not isinstance(value, (bool, np.bool_, int, np.integer)) or value not in (0, 1):
            raise StoreError(f"{path}: root attribute {key!r} is {value!r:.60}, not a flag; "
                             f"{RECAPTURE}")
        flags[key] = bool(value)
    for name in layers:
        acts = _dataset(f, f"activations/{name}", path)
        if acts.ndim < 2 or acts.shape[0] != n or acts.dtype != np.dtype(dtype):
            raise StoreError(f"{path}: /activations/{name} is {acts.shape} {acts.dtype}, not "
                             f"({n}, C, ...) {dtype}; {RECAPTURE}")
        maxima = _dataset(f, f"maxima/{name}", path)
        if maxima.shape != (n, acts.shape[1]) or maxima.dtype != np.float32:
            raise StoreError(f"{path}: /maxima/{name} is {maxima.shape} {maxima.dtype}, not "
                             f"({n}, {acts.shape[1]}) float32; {RECAPTURE}")
        _check_tokens(f, name, acts, path)
        if flags["gradients"]:
            grads = _dataset(f, f"gradients/{name}", path)
            if grads.shape != acts.shape or grads.dtype != acts.dtype:
                raise StoreError(f"{path}: /gradients/{name} is {grads.shape} {grads.dtype}, "
                                 f"not like its activations; {RECAPTURE}")
    index = _dataset(f, "index", path)
    if index.shape != (n,) or index.dtype != np.int64:
        raise StoreError(f"{path}: /index is {index.shape} {index.dtype}, not ({n},) int64; "
                         f"{RECAPTURE}")
    marker = _dataset(f, "progress", path)
    if marker.shape != () or marker.dtype.kind not in "iu":
        raise StoreError(f"{path}: /progress is {marker.shape} {marker.dtype}, not one integer; "
                         f"{RECAPTURE}")
    progress = int(marker[()])
    if not 0 <= progress <= n or (flags["complete"] and progress != n):
        state = "complete" if flags["complete"] else "unfinished"
        raise StoreError(f"{path}: /progress says {progress} rows of {n} are written in a "
                         f"{state} store; the file is damaged; {RECAPTURE}")
    return {"n_samples": n, "layers": layers, "dtype": dtype, "gradients": flags["gradients"],
            "complete": flags["complete"], "progress": progress}
