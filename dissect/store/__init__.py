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

Modules: :mod:`.layout` (the schema, :func:`create_store`, :func:`check_layout`, the one check
every reader runs), :mod:`.writer` (:class:`StoreWriter`), :mod:`.reader`
(:class:`ActivationStore`).
"""

from .layout import CHUNK_BYTES, DTYPES, FORMAT, VERSION, check_layout, create_store
from .reader import ActivationStore
from .writer import StoreWriter

__all__ = [
    "CHUNK_BYTES",
    "DTYPES",
    "FORMAT",
    "VERSION",
    "ActivationStore",
    "StoreWriter",
    "check_layout",
    "create_store",
]
