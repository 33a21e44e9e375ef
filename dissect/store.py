"""The HDF5 activation store: its schema (version 1), a crash-safe writer and a lazy reader.

Layout (design.md)::

    /                      attrs: format="torch-dissect", version=1, model, fingerprint,
                           n_samples, complete (+ layers, dtype, pool, gradients)
    /activations/<layer>   (N, C[, H, W]) float16|float32, chunked by rows; attrs: pool, dtype
    /gradients/<layer>     same, when gradients were captured
    /maxima/<layer>        (N, C) float32 per-sample max over space
    /index                 (N,) int64 dataset index of each row
    /progress              () int64 number of leading rows known to be written

Crash safety: the file is created whole (every dataset, every chunk allocated, no compression)
under a temporary name and renamed into place, so the path never holds a half-built file.
After that, writing a batch only writes raw data at fixed offsets: the HDF5 metadata never
changes until the final ``complete`` attribute. ``/progress`` is advanced only after the
batch's rows were flushed, so a process killed at any moment leaves a file whose first
``progress`` rows are valid and which never reads as complete.

A multi-process capture (:mod:`dissect.distributed`) writes one such store per rank under
``<path>.shards/`` and publishes ``<path>`` with the same layout made of HDF5 virtual datasets
over the shards (root attribute ``shards``: their paths relative to ``<path>``'s folder); it
reads exactly like a single file, rows in dataset order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .errors import StoreError

log = logging.getLogger(__name__)

FORMAT = "torch-dissect"
VERSION = 1
DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20


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


def create_store(
    path: str | Path,
    *,
    n: int,
    layers: dict[str, tuple[int, ...]],
    dtype: str,
    pool: Any,
    attrs: dict[str, Any],
    gradients: bool = False,
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
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".creating")
    pool_json = json.dumps(pool)
    with h5py.File(tmp, "w") as f:
        f.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "n_samples": n,
                "complete": False,
                "layers": json.dumps(list(layers)),
                "dtype": dtype,
                "pool": pool_json,
                "gradients": gradients,
            }
        )
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
            _create_fixed(f["maxima"], name, (n, row_shape[0]), "float32", _chunk_rows(
                row_shape[:1], 4, n))
        _create_fixed(f, "index", (n,), "int64", _chunk_rows((), 8, n))
        progress = _create_fixed(f, "progress", (), "int64", None)
        progress[()] = 0
    os.replace(tmp, path)


class StoreWriter:
    """Append batches of rows to a store made by :func:`create_store`, crash-safely.

    Rows must be written in order; after each batch the data is flushed and only then is
    ``/progress`` advanced. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r+")
        except OSError as exc:
            raise StoreError(f"cannot open {self.path} for writing: {exc}") from exc
        self.n_samples = int(self._file.attrs["n_samples"])
        self.layers: list[str] = json.loads(self._file.attrs["layers"])
        self.progress = int(self._file["progress"][()])
        self.row_shapes = {n: self._file["activations"][n].shape[1:] for n in self.layers}

    def write(
        self,
        start: int,
        index: np.ndarray,
        activations: dict[str, np.ndarray],
        maxima: dict[str, np.ndarray],
        gradients: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write rows ``start : start + len(index)`` and advance the progress marker."""
        if start != self.progress:
            raise StoreError(f"rows must be written in order: {self.progress} next, not {start}")
        stop = start + len(index)
        if stop > self.n_samples:
            raise StoreError(f"writing rows up to {stop} but the store has {self.n_samples}")
        f = self._file
        for name, arr in activations.items():
            f["activations"][name][start:stop] = arr
            f["maxima"][name][start:stop] = maxima[name]
        for name, arr in (gradients or {}).items():
            f["gradients"][name][start:stop] = arr
        f["index"][start:stop] = index
        f.flush()
        f["progress"][()] = stop
        f.flush()
        self.progress = stop

    def finish(self) -> None:
        """Mark the store complete (only when every row is written)."""
        if self.progress != self.n_samples:
            raise StoreError(f"{self.path}: {self.progress} of {self.n_samples} rows written")
        self._file.attrs["complete"] = True
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActivationStore:
    """Read activations captured by :func:`dissect.hooks.capture` from one HDF5 file.

    Data stays on disk: ``store[layer]`` is a lazy ``h5py.Dataset`` sliced numpy-style.
    The store is picklable (it reopens the file by path), so it can travel to DataLoader workers.

    Parameters
    ----------
    path
        The HDF5 file.

    Raises
    ------
    StoreError
        If the file is missing, is not HDF5, or is not a torch-dissect store of a supported
        version.

    Examples
    --------
    >>> store = ActivationStore("acts.h5")                       # doctest: +SKIP
    >>> store.layers, store["layer4"].shape, store.maxima("layer4").shape   # doctest: +SKIP
    >>> for batch in store.iter("layer4", batch_size=256): ...  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self._open(self.path)

    @staticmethod
    def _open(path: Path) -> h5py.File:
        if not path.exists():
            raise StoreError(f"no activation store at {path}: capture one with dissect.capture")
        if not h5py.is_hdf5(path):
            raise StoreError(f"{path} is not an HDF5 file, so not an activation store")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(
                f"{path} cannot be opened ({exc}): it is damaged, or another process is "
                "writing it (a capture in progress)"
            ) from exc
        fmt, version = f.attrs.get("format"), f.attrs.get("version")
        if fmt != FORMAT:
            f.close()
            raise StoreError(f"{path} is HDF5 but not a torch-dissect store (format={fmt!r})")
        if version != VERSION:
            f.close()
            raise StoreError(
                f"{path} is a torch-dissect store of version {version}; this release reads "
                f"version {VERSION}: recapture it or use the matching torch-dissect"
            )
        # a store published by a multi-process capture maps its rows to shard files (HDF5
        # virtual datasets) that would silently read as zeros if missing
        missing = [s for s in json.loads(f.attrs.get("shards", "[]"))
                   if not (path.parent / s).is_file()]
        if missing:
            f.close()
            raise StoreError(
                f"{path} reads its rows from shard files that are missing: "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (relative to "
                f"{path.parent}); keep the shard folder next to the file, or recapture"
            )
        return f

    # pickling: reopen by path
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._file = self._open(self.path)

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying file (idempotent)."""
        if self._file.id.valid:
            self._file.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"INCOMPLETE {self.n_written}/{self.n_samples}"
        return f"ActivationStore({str(self.path)!r}, layers={self.layers}, {state})"

    @property
    def meta(self) -> dict[str, Any]:
        """Root attributes (model, fingerprint, n_samples, complete, dtype, pool, ...)."""
        out: dict[str, Any] = {}
        for key, value in self._file.attrs.items():
            if isinstance(value, np.generic):
                value = value.item()
            if key in ("layers", "pool"):
                value = json.loads(value)
            out[key] = value
        return out

    @property
    def layers(self) -> list[str]:
        """Captured layer names, in the order they were requested."""
        return json.loads(self._file.attrs["layers"])

    @property
    def complete(self) -> bool:
        """True only when every row was written and the capture finished."""
        return bool(self._file.attrs["complete"])

    @property
    def n_samples(self) -> int:
        """Number of rows the store was created for."""
        return int(self._file.attrs["n_samples"])

    @property
    def n_written(self) -> int:
        """Number of leading rows known to be written (``n_samples`` when complete)."""
        return int(self._file["progress"][()])

    def __len__(self) -> int:
        return self.n_written

    def _layer(self, group: str, layer: str) -> h5py.Dataset:
        if group not in self._file or layer not in self._file[group]:
            if group == "gradients" and "gradients" not in self._file:
                raise StoreError(f"{self.path} holds no gradients: capture with grads_for=...")
            raise StoreError(
                f"layer {layer!r} is not in {self.path}; it holds: {', '.join(self.layers)}"
            )
        return self._file[group][layer]

    def __getitem__(self, layer: str) -> h5py.Dataset:
        return self._layer("activations", layer)

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def gradients(self, layer: str) -> h5py.Dataset:
        """Lazy dataset of the captured gradients of ``layer`` (same shape as activations)."""
        return self._layer("gradients", layer)

    def maxima(self, layer: str) -> np.ndarray:
        """Per-sample spatial maxima of every channel, ``(N, C)`` float32, read into memory."""
        return self._layer("maxima", layer)[: self.n_written]

    @property
    def index(self) -> np.ndarray:
        """Dataset index of each written row, ``(N,)`` int64."""
        return self._file["index"][: self.n_written]

    def iter(
        self,
        layer: str,
        batch_size: int = 256,
        *,
        dtype: torch.dtype = torch.float32,
        gradients: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield the written rows of ``layer`` in order, ``batch_size`` rows at a time.

        Parameters
        ----------
        layer
            A captured layer.
        batch_size
            Rows per yielded tensor; memory use is bounded by it, not by the store's size.
        dtype
            Dtype of the yielded tensors (default float32, whatever the stored dtype).
        gradients
            Iterate over the stored gradients instead of the activations.

        Yields
        ------
        torch.Tensor
            ``(b, C[, H, W])`` CPU tensors.
        """
        if batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {batch_size}")
        ds = self.gradients(layer) if gradients else self[layer]
        if not self.complete:
            log.warning("%s is incomplete: iterating its %d written rows", self.path, len(self))
        for start in range(0, len(self), batch_size):
            block = ds[start : min(start + batch_size, len(self))]
            yield torch.from_numpy(block).to(dtype)
