"""Writing rows into a store made by :func:`~dissect.store.create_store`, never losing any.

A write that fails (a full disk, a file-size limit, an I/O error) is a :class:`StoreError`
raised by the call that wrote, naming the file and the OS error; ``/progress`` only ever
counts rows that reached the file, so the store never reads as more complete than it is and a
rerun after freeing space resumes at the first row that was not written.

How: the file is opened without HDF5's raw-data chunk cache, so every write goes to the
operating system at once and its errors come back to that write (with a cache, dirty chunks
were written when the dataset handles were garbage-collected, where HDF5 errors are printed
and dropped, and the process could crash at exit). The rows of a batch are written first, the
file flushed, and only then ``/progress`` is advanced and flushed again.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from .layout import check_layout, io_error


class StoreWriter:
    """Append batches of rows to a store made by :func:`create_store`, crash-safely.

    Rows must be written in order; after each batch the data is flushed and only then is
    ``/progress`` advanced. After a failed write the writer refuses further writes (the
    store keeps every row before the failed batch). Use as a context manager or call
    :meth:`close`.

    Raises
    ------
    StoreError
        When the file cannot be opened for writing, is not a whole store, or a write fails.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # no raw-data chunk cache: write errors surface at the write (module docstring)
            self._file = h5py.File(self.path, "r+", rdcc_nbytes=0)
        except (OSError, RuntimeError) as exc:
            raise io_error(self.path, "opening for writing", exc) from exc
        try:
            layout = check_layout(self._file, self.path)
        except BaseException:
            self.close()
            raise
        self.n_samples = layout["n_samples"]
        self.layers: list[str] = layout["layers"]
        self.progress = layout["progress"]
        f = self._file
        self._acts = {n: f["activations"][n] for n in self.layers}
        self._maxima = {n: f["maxima"][n] for n in self.layers}
        self._grads = {n: f["gradients"][n] for n in self.layers} if layout["gradients"] else {}
        self._prefix = dict(f["prefix"].items()) if "prefix" in f else {}
        self._index, self._progress = f["index"], f["progress"]
        self.row_shapes = {n: ds.shape[1:] for n, ds in self._acts.items()}
        self.failed: StoreError | None = None

    def write(
        self,
        start: int,
        index: np.ndarray,
        activations: dict[str, np.ndarray],
        maxima: dict[str, np.ndarray],
        gradients: dict[str, np.ndarray] | None = None,
        prefix: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write rows ``start : start + len(index)`` and advance the progress marker.

        ``prefix``: the prefix tokens ``(b, P, C)`` of the layers that have them (every one
        of them, each batch).

        Raises
        ------
        StoreError
            For rows out of order or beyond the store, or when a write fails (then
            ``/progress`` still counts only the rows before ``start``).
        """
        if self.failed is not None:
            raise StoreError(f"{self.path}: an earlier write failed ({self.failed}); no more "
                             "rows are written")
        if start != self.progress:
            raise StoreError(f"rows must be written in order: {self.progress} next, not {start}")
        stop = start + len(index)
        if stop > self.n_samples:
            raise StoreError(f"writing rows up to {stop} but the store has {self.n_samples}")
        if set(prefix or {}) != set(self._prefix):
            raise StoreError(f"{self.path} holds prefix tokens of {sorted(self._prefix)}, this "
                             f"batch of {sorted(prefix or {})}")
        try:
            for name, arr in activations.items():
                self._acts[name][start:stop] = arr
                self._maxima[name][start:stop] = maxima[name]
            for name, arr in (gradients or {}).items():
                self._grads[name][start:stop] = arr
            for name, arr in (prefix or {}).items():
                self._prefix[name][start:stop] = arr
            self._index[start:stop] = index
            self._file.flush()
            self._progress[()] = stop
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            self.failed = io_error(self.path, f"writing rows {start}-{stop} to", exc)
            raise self.failed from exc
        self.progress = stop

    def finish(self) -> None:
        """Mark the store complete (only when every row is written)."""
        if self.progress != self.n_samples or self.failed is not None:
            raise StoreError(f"{self.path}: {self.progress} of {self.n_samples} rows written")
        try:
            self._file.attrs["complete"] = True
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            self.failed = io_error(self.path, "marking complete", exc)
            raise self.failed from exc

    def close(self) -> None:
        """Close the file (idempotent). A failure to close after a failed write is not
        raised again (the write's error already was)."""
        if not self._file.id.valid:
            return
        try:
            self._file.close()
        except (OSError, RuntimeError) as exc:
            if getattr(self, "failed", None) is None:
                raise io_error(self.path, "closing", exc) from exc

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

