"""Reading a store: :class:`ActivationStore`, lazy and picklable."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._plumbing.token_grid import TokenGrid
from ..errors import StoreError
from .layout import check_layout, io_error

log = logging.getLogger("dissect.store")


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
        if path.is_dir():
            raise StoreError(f"{path} is a folder, not an activation store file")
        try:
            hdf5 = h5py.is_hdf5(path)
        except OSError as exc:
            raise io_error(path, "reading", exc) from exc
        if not hdf5:
            raise StoreError(f"{path} is not an HDF5 file, so not an activation store")
        try:
            f = h5py.File(path, "r")
        except (OSError, RuntimeError) as exc:
            raise StoreError(
                f"{path} cannot be opened ({exc}): it is damaged, or another process is "
                "writing it (a capture in progress)"
            ) from exc
        try:
            check_layout(f, path)
            # a store published by a multi-process capture maps its rows to shard files
            # (HDF5 virtual datasets) that would silently read as zeros if missing
            shards = json.loads(f.attrs.get("shards", "[]"))
            if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
                raise StoreError(f"{path}: root attribute 'shards' is malformed ({shards!r:.60})")
        except (TypeError, ValueError, OSError, RuntimeError) as exc:
            f.close()
            raise StoreError(f"{path}: root attribute 'shards' cannot be read or is not valid "
                             f"JSON ({exc}); the file is damaged") from exc
        except BaseException:
            f.close()
            raise
        missing = [s for s in shards if not (path.parent / s).is_file()]
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
        with self._reading("the root attributes"):
            items = list(self._file.attrs.items())
        for key, value in items:
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
        with self._reading("/progress"):
            return int(self._file["progress"][()])

    def __len__(self) -> int:
        return self.n_written

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """A read of ``what`` that fails (a damaged block, an I/O error) is a StoreError."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"reading {what} of {self.path} failed ({type(exc).__name__}: "
                             f"{exc}): the file is damaged; recapture it") from exc

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

    def maxima(self, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Per-sample spatial maxima of every channel, ``(N, C)`` float32, read into memory.

        ``start``/``stop`` read only rows ``[start, stop)`` of the written ones (a chunk, for
        streaming over a large store)."""
        ds = self._layer("maxima", layer)
        stop = self.n_written if stop is None else min(stop, self.n_written)
        with self._reading(f"/maxima/{layer}"):
            return ds[start:stop]

    def layout(self, layer: str) -> TokenGrid | None:
        """How ``layer`` was read from token outputs (:class:`dissect.hooks.TokenGrid`), or
        ``None`` for a layer stored as the module returned it."""
        ds = self._layer("activations", layer)
        return TokenGrid.from_json(ds.attrs["tokens"]) if "tokens" in ds.attrs else None

    def prefix(self, layer: str) -> h5py.Dataset:
        """Lazy dataset of ``layer``'s prefix tokens ``(N, P, C)`` (class token first, then
        register tokens), stored when a token layer with prefix tokens was captured."""
        if "prefix" not in self._file or layer not in self._file["prefix"]:
            self._layer("activations", layer)  # an unknown layer: the usual error
            raise StoreError(f"layer {layer!r} of {self.path} has no prefix tokens (class "
                             "token): it was not captured from a token output that has them")
        return self._file["prefix"][layer]

    @property
    def index(self) -> np.ndarray:
        """Dataset index of each written row, ``(N,)`` int64."""
        with self._reading("/index"):
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
            with self._reading(ds.name):
                block = ds[start : min(start + batch_size, len(self))]
            yield torch.from_numpy(block).to(dtype)
