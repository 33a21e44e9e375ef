"""A concept dataset's annotations decoded once, kept on disk, reused by every later dissection.

Network Dissection reads every image's label planes once per run; decoding Broden's label PNGs
is most of a run's time outside the counting. :func:`annotation_batches` serves the
annotations of a run in batches: from the cache when it holds every item the run needs, else
decoded from the dataset (in DataLoader workers when ``num_workers`` > 0) while a new cache file
is written next to the old one and swapped in atomically (``os.replace``) once the pass is
complete. An interrupted pass leaves the old cache as it was.

Where: the folder ``annotation_cache=`` names, else the environment variable
``DISSECT_CACHE_DIR``, else ``~/.cache/torch-dissect``; files live in its ``annotations/``
subfolder, one per dataset: ``<class>-<key>.h5``, ``key`` a hash of the dataset's
:meth:`cache_identity` (Broden: its folder, split, categories and the size and modification
time of every CSV file and label PNG the rows name; :class:`SyntheticConcepts`: its
parameters and the drawing code's version). A file that changes size or modification time
gives another key, so a stale cache is never read; a label PNG rewritten in place with the same
size and the same modification time would not be noticed. Delete the folder to reclaim the
space. Datasets without ``cache_identity()`` are not cached.

The file (HDF5) holds, per stored item, its label planes as runs of one label in row-major
order (``values`` uint16, ``lengths`` uint32: label planes are piecewise constant, so a plane of
112 x 112 pixels takes a few hundred runs; label numbers above 65535 are not cached and the
dataset is read as is), its image-level labels and ``annotated`` flags, and ``item_row``: for
every dataset item its stored position (-1: not stored). A batch is rebuilt with one
``numpy.repeat`` of its runs (zero runs pad the items with fewer planes): about 10x faster
than decoding Broden's label PNGs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DissectError
from .concepts import collate

log = logging.getLogger(__name__)

CACHE_ENV = "DISSECT_CACHE_DIR"
FORMAT = "torch-dissect annotation cache"
VERSION = 2
MAX_CACHED_LABEL = 65535
_KEYS = ("pixel_labels", "image_labels", "annotated", "index")


def cache_folder(folder: str | Path | None = None) -> Path:
    """The folder annotation caches live in: ``folder``, else ``$DISSECT_CACHE_DIR``, else
    ``~/.cache/torch-dissect``; the files are in its ``annotations/`` subfolder."""
    base = folder or os.environ.get(CACHE_ENV) or Path("~/.cache/torch-dissect")
    return Path(base).expanduser() / "annotations"


def file_stamps(root: str | Path, names: list[str]) -> str:
    """A hash of each file's name (relative to ``root``), size and modification time (ns), in
    order: what a cache key needs to notice a changed file. A missing file hashes as missing
    (reading it will fail later with the dataset's own error)."""
    digest = hashlib.sha256()
    root = str(root)
    for name in names:
        try:
            st = os.stat(os.path.join(root, name))
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{name}\0{stamp}\n".encode())
    return digest.hexdigest()


def cache_file(dataset: Any, folder: str | Path | None = None) -> Path | None:
    """The cache file of ``dataset`` (``None`` when it has no ``cache_identity()``)."""
    identify = getattr(dataset, "cache_identity", None)
    if not callable(identify):
        return None
    identity = json.dumps(identify(), sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    return cache_folder(folder) / f"{type(dataset).__name__}-{key}.h5"


class _Annotations(Dataset):
    """A concept dataset's annotations for the given items (skipping images when possible)."""

    def __init__(self, dataset: Any, items: np.ndarray) -> None:
        self.dataset, self.items = dataset, items
        self._light = callable(getattr(dataset, "annotations", None))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> dict[str, Any]:
        i = int(self.items[row])
        item = self.dataset.annotations(i) if self._light else self.dataset[i]
        return {**{k: item[k] for k in _KEYS[:3]}, "index": i}


class _Reader:
    """Batches of annotations from a cache file that holds every item asked for."""

    def __init__(self, file: h5py.File, path: Path) -> None:
        self.file, self.path = file, path
        self.item_row = file["item_row"][:]
        self.plane_start = file["plane_start"][:]
        self.run_start = file["run_start"][:]
        self.label_start = file["label_start"][:]
        self.annotated = file["annotated"][:]
        self.size = tuple(int(v) for v in file.attrs["size"])

    def covers(self, items: np.ndarray) -> bool:
        return bool(len(items) == 0 or (self.item_row[items] >= 0).all())

    def _runs(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """The runs of the stored items ``pos`` (each a ``(values, lengths)`` pair of one
        read when the items are stored consecutively), the first run's number, and each
        item's first plane."""
        planes = self.plane_start[pos]
        if len(pos) and (np.diff(pos) == 1).all():
            r0, r1 = self.run_start[planes[0]], self.run_start[self.plane_start[pos[-1] + 1]]
            return self.file["values"][r0:r1], self.file["lengths"][r0:r1], int(r0), planes
        parts = [(self.file["values"][a:b], self.file["lengths"][a:b]) for a, b in
                 ((self.run_start[self.plane_start[p]], self.run_start[self.plane_start[p + 1]])
                  for p in pos)]
        values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0, np.uint16)
        lengths = np.concatenate([n for _, n in parts]) if parts else np.zeros(0, np.uint32)
        return values, lengths, -1, planes

    def batch(self, items: np.ndarray) -> dict[str, Any]:
        pos = self.item_row[items]
        B = len(pos)
        counts = self.plane_start[pos + 1] - self.plane_start[pos]
        n_labels = self.label_start[pos + 1] - self.label_start[pos]
        sh, sw = self.size
        P = int(counts.max(initial=0))
        labels = np.zeros((B, int(n_labels.max(initial=0))), dtype=np.int64)
        try:
            values, lengths, r0, firsts = self._runs(pos)
            if r0 >= 0:  # consecutive items: one read
                l0 = self.label_start[pos[0]]
                block = self.file["labels"][l0 : self.label_start[pos[-1] + 1]]
                for b, p in enumerate(pos):
                    start = self.label_start[p] - l0
                    labels[b, : n_labels[b]] = block[start : start + n_labels[b]]
            else:
                for b, p in enumerate(pos):
                    labels[b, : n_labels[b]] = self.file["labels"][
                        self.label_start[p] : self.label_start[p + 1]]
        except (OSError, RuntimeError) as exc:
            raise DissectError(f"reading the annotation cache {self.path} failed ({exc}): "
                               "delete the file and rerun (it is rebuilt)") from exc
        # each item's runs, then one zero run per missing plane, then one numpy.repeat
        seg_v, seg_n, at = [], [], 0
        pad_v, pad_n = np.zeros(P, np.uint16), np.full(P, sh * sw, np.uint32)
        for b in range(B):
            if r0 >= 0:
                a = self.run_start[firsts[b]] - r0
                z = self.run_start[firsts[b] + counts[b]] - r0
            else:
                a = at
                z = at = at + (self.run_start[firsts[b] + counts[b]]
                               - self.run_start[firsts[b]])
            seg_v += [values[a:z], pad_v[: P - counts[b]]]
            seg_n += [lengths[a:z], pad_n[: P - counts[b]]]
        flat_v = np.concatenate(seg_v).astype(np.int64) if seg_v else np.zeros(0, np.int64)
        flat_n = np.concatenate(seg_n) if seg_n else np.zeros(0, np.uint32)
        if int(flat_n.sum()) != B * P * sh * sw:
            raise DissectError(f"the annotation cache {self.path} is inconsistent: delete it "
                               "and rerun (it is rebuilt)")
        planes = np.repeat(flat_v, flat_n).reshape(B, P, sh, sw)
        return {"pixel_labels": torch.from_numpy(planes),
                "image_labels": torch.from_numpy(labels),
                "annotated": torch.from_numpy(self.annotated[pos]),
                "index": torch.from_numpy(np.asarray(items, dtype=np.int64))}

    def raw(self, i: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Dataset item ``i`` as stored: ``(i, planes, labels, annotated)``."""
        p = self.item_row[i]
        P = int(self.plane_start[p + 1] - self.plane_start[p])
        a, z = self.run_start[self.plane_start[p]], self.run_start[self.plane_start[p + 1]]
        planes = np.repeat(self.file["values"][a:z], self.file["lengths"][a:z])
        return (int(i), planes.reshape(P, *self.size),
                self.file["labels"][self.label_start[p] : self.label_start[p + 1]],
                self.annotated[p])


def _open_reader(path: Path, n_items: int) -> tuple[h5py.File, _Reader] | None:
    """The cache file at ``path`` if it is one for a dataset of ``n_items`` items, else
    ``None`` (a damaged or foreign file is logged and left to be replaced)."""
    if not path.is_file():
        return None
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        log.warning("ignoring the annotation cache %s: it cannot be opened (%s); it is rebuilt",
                    path, exc)
        return None
    try:
        if (file.attrs.get("format") != FORMAT or int(file.attrs.get("version", -1)) != VERSION
                or len(file["item_row"]) != n_items):
            raise ValueError("not an annotation cache of this dataset and release")
        return file, _Reader(file, path)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        file.close()
        log.warning("ignoring the annotation cache %s (%s); it is rebuilt", path, exc)
        return None


class _Writer:
    """A new cache file written next to ``path`` and moved onto it by :meth:`commit`."""

    def __init__(self, path: Path, n_items: int, size: tuple[int, int], n_categories: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.file = h5py.File(self.tmp, "w")
        f = self.file
        f.attrs["format"], f.attrs["version"] = FORMAT, VERSION
        f.attrs["size"] = np.asarray(size, dtype=np.int64)
        sh, sw = size
        f.create_dataset("item_row", data=np.full(n_items, -1, dtype=np.int64))
        for name, dtype in (("values", np.uint16), ("lengths", np.uint32)):
            f.create_dataset(name, (0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,))
        f.create_dataset("labels", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        f.create_dataset("annotated", (0, n_categories), maxshape=(None, n_categories),
                         dtype=bool, chunks=(4096, max(1, n_categories)))
        self.plane_start, self.label_start, self.items = [0], [0], []
        self.run_start = [0]
        self.item_row = np.full(n_items, -1, dtype=np.int64)

    def fits(self, batch: dict[str, Any]) -> bool:
        planes = batch["pixel_labels"]
        return (tuple(planes.shape[2:]) == tuple(self.file.attrs["size"])
                and (planes.numel() == 0 or (int(planes.min()) >= 0
                                             and int(planes.max()) <= MAX_CACHED_LABEL)))

    def add(self, items: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Append items ``(dataset position, planes (P, sh, sw), labels (L,), annotated)``."""
        f = self.file
        values, lengths, labels = [], [], []
        for i, planes, lab, _ in items:
            self.item_row[i] = len(self.items)
            self.items.append(i)
            self.plane_start.append(self.plane_start[-1] + len(planes))
            self.label_start.append(self.label_start[-1] + len(lab))
            labels.append(np.asarray(lab, dtype=np.int64))
            flat = np.asarray(planes).reshape(len(planes), -1)
            if flat.size == 0:
                continue
            change = np.ones(flat.shape, dtype=bool)  # a run starts at each plane's start
            change[:, 1:] = flat[:, 1:] != flat[:, :-1]
            starts = np.flatnonzero(change)
            values.append(flat.ravel()[starts].astype(np.uint16))
            lengths.append(np.diff(np.append(starts, flat.size)).astype(np.uint32))
            per_plane = change.sum(axis=1)
            self.run_start.extend((self.run_start[-1] + np.cumsum(per_plane)).tolist())
        for name, parts in (("values", values), ("lengths", lengths), ("labels", labels)):
            block = np.concatenate(parts) if parts else np.zeros(0)
            if len(block):
                ds = f[name]
                at = len(ds)
                ds.resize(at + len(block), axis=0)
                ds[at:] = block
        ann = np.stack([it[3] for it in items]).astype(bool)
        at = len(f["annotated"])
        f["annotated"].resize(at + len(ann), axis=0)
        f["annotated"][at:] = ann

    def commit(self, old: _Reader | None) -> None:
        """Copy the items only ``old`` holds, finish the file and move it onto ``path``."""
        if old is not None:
            extra = np.flatnonzero((old.item_row >= 0) & (self.item_row < 0))
            for start in range(0, len(extra), 256):
                self.add([old.raw(i) for i in extra[start : start + 256]])
        f = self.file
        f["item_row"][:] = self.item_row
        f.create_dataset("plane_start", data=np.asarray(self.plane_start, dtype=np.int64))
        f.create_dataset("label_start", data=np.asarray(self.label_start, dtype=np.int64))
        f.create_dataset("run_start", data=np.asarray(self.run_start, dtype=np.int64))
        f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self.file.id.valid:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def annotation_batches(
    dataset: Any,
    items: np.ndarray,
    batch_size: int,
    *,
    num_workers: int = 0,
    cache: bool | str | Path | None = True,
) -> Iterator[Iterator[dict[str, Any]]]:
    """The annotations of dataset ``items`` (in that order) in collated batches.

    Parameters
    ----------
    dataset
        A concept dataset (``annotations(i)`` is used when it has one: no image decoding).
    items
        Dataset positions, one per row of the run.
    batch_size
        Items per batch.
    num_workers
        DataLoader workers decoding the annotations when the cache cannot serve them.
    cache
        ``True``: the default cache folder (:func:`cache_folder`); a path: that folder;
        ``False`` or ``None``: no cache.

    Yields
    ------
    iterator of dict
        Batches as :func:`~dissect.datasets.concepts.collate` makes them (``pixel_labels``,
        ``image_labels``, ``annotated``, ``index``). The context manager commits a newly
        written cache when the iterator was read to the end, and discards it otherwise.
        On exit the C heap's free pages go back to the system (:func:`release_free_heap`).
    """
    items = np.asarray(items, dtype=np.int64)
    path = cache_file(dataset, None if cache is True else cache) if cache else None
    opened = _open_reader(path, len(dataset)) if path is not None else None
    file, reader = opened if opened is not None else (None, None)
    try:
        if reader is not None and reader.covers(items):
            log.info("reading annotations from the cache %s", path)
            yield (reader.batch(items[s : s + batch_size])
                   for s in range(0, len(items), batch_size))
            return
        loader = DataLoader(_Annotations(dataset, items), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_collate_keep_items)
        if path is None:
            yield (batch for batch, _ in loader)
            return
        state: dict[str, Any] = {"writer": None, "done": False, "ok": True}
        try:
            yield _decode_and_write(loader, path, len(dataset), len(dataset.categories), state)
            if state["done"] and state["ok"] and state["writer"] is not None:
                state["writer"].commit(reader)
                log.info("wrote the annotation cache %s", path)
        finally:
            if state["writer"] is not None:
                state["writer"].discard()
    finally:
        if file is not None:
            file.close()
        release_free_heap()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # musl and others have none: AttributeError
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc's ``malloc_trim(0)``, a
    few milliseconds; nothing elsewhere).

    A pass over the annotations allocates and frees tens of MB per batch (label planes,
    decoded or rebuilt, collated, written to the cache); glibc keeps much of that freed
    memory in its heap, where it would count in the process's RSS for the rest of the run
    (and a second run would start from it). Only memory already freed is returned.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _collate_keep_items(items: list[dict[str, Any]]) -> tuple[dict[str, Any], list]:
    """:func:`collate`, keeping the items themselves (each unpadded) for the cache."""
    return collate(items), items


def _decode_and_write(loader: DataLoader, path: Path, n_items: int, n_categories: int,
                      state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for batch, items in loader:
        if state["ok"]:
            writer = state["writer"]
            try:
                if writer is None:
                    writer = state["writer"] = _Writer(
                        path, n_items, tuple(batch["pixel_labels"].shape[2:]), n_categories)
                if writer.fits(batch):
                    writer.add([(int(it["index"]), it["pixel_labels"].numpy(),
                                 it["image_labels"].numpy(), it["annotated"].numpy())
                                for it in items])
                else:
                    state["ok"] = False
                    log.info("not caching annotations: label numbers beyond %d or planes of "
                             "several sizes", MAX_CACHED_LABEL)
            except OSError as exc:
                state["ok"] = False
                log.warning("not caching annotations in %s: %s", path.parent, exc)
        yield batch
    state["done"] = True
