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

The file (HDF5, ``lzf``-compressed) holds, per stored item, its label planes as uint16 (label
numbers above 65535 are not cached: the dataset is read as is), its image-level labels and
its ``annotated`` flags, and ``item_row``: for every dataset item its stored position (-1:
not stored).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
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
VERSION = 1
MAX_CACHED_LABEL = 65535
_KEYS = ("pixel_labels", "image_labels", "annotated", "index")


def cache_folder(folder: str | Path | None = None) -> Path:
    """The folder annotation caches live in: ``folder``, else ``$DISSECT_CACHE_DIR``, else
    ``~/.cache/torch-dissect``; the files are in its ``annotations/`` subfolder."""
    base = folder or os.environ.get(CACHE_ENV) or Path("~/.cache/torch-dissect")
    return Path(base).expanduser() / "annotations"


def file_stamps(paths: list[Path] | list[str], root: Path) -> str:
    """A hash of each file's path (relative to ``root``), size and modification time (ns), in
    order: what a cache key needs to notice a changed file. A missing file hashes as missing
    (reading it will fail later with the dataset's own error)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{os.path.relpath(path, root)}\0{stamp}\n".encode())
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
        self.label_start = file["label_start"][:]
        self.annotated = file["annotated"][:]
        self.size = tuple(int(v) for v in file.attrs["size"])

    def covers(self, items: np.ndarray) -> bool:
        return bool(len(items) == 0 or (self.item_row[items] >= 0).all())

    def batch(self, items: np.ndarray) -> dict[str, Any]:
        pos = self.item_row[items]
        B = len(pos)
        counts = self.plane_start[pos + 1] - self.plane_start[pos]
        n_labels = self.label_start[pos + 1] - self.label_start[pos]
        sh, sw = self.size
        planes = np.zeros((B, int(counts.max(initial=0)), sh, sw), dtype=np.int64)
        labels = np.zeros((B, int(n_labels.max(initial=0))), dtype=np.int64)
        try:
            if B and (np.diff(pos) == 1).all():  # consecutive items: one read of each array
                first, last = self.plane_start[pos[0]], self.plane_start[pos[-1] + 1]
                block = self.file["planes"][first:last]
                lab = self.file["labels"][self.label_start[pos[0]]:self.label_start[pos[-1] + 1]]
                for b in range(B):
                    p0 = self.plane_start[pos[b]] - first
                    planes[b, : counts[b]] = block[p0 : p0 + counts[b]]
                    l0 = self.label_start[pos[b]] - self.label_start[pos[0]]
                    labels[b, : n_labels[b]] = lab[l0 : l0 + n_labels[b]]
            else:
                for b, p in enumerate(pos):
                    planes[b, : counts[b]] = self.file["planes"][
                        self.plane_start[p] : self.plane_start[p + 1]]
                    labels[b, : n_labels[b]] = self.file["labels"][
                        self.label_start[p] : self.label_start[p + 1]]
        except (OSError, RuntimeError) as exc:
            raise DissectError(f"reading the annotation cache {self.path} failed ({exc}): "
                               "delete the file and rerun (it is rebuilt)") from exc
        return {"pixel_labels": torch.from_numpy(planes),
                "image_labels": torch.from_numpy(labels),
                "annotated": torch.from_numpy(self.annotated[pos]),
                "index": torch.from_numpy(np.asarray(items, dtype=np.int64))}


    def raw(self, i: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Dataset item ``i`` as stored: ``(i, planes, labels, annotated)``."""
        p = self.item_row[i]
        return (int(i), self.file["planes"][self.plane_start[p] : self.plane_start[p + 1]],
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
        f.create_dataset("planes", (0, sh, sw), maxshape=(None, sh, sw), dtype=np.uint16,
                         chunks=(max(1, min(64, (1 << 20) // max(1, 2 * sh * sw))), sh, sw),
                         compression="lzf")
        f.create_dataset("labels", (0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        f.create_dataset("annotated", (0, n_categories), maxshape=(None, n_categories),
                         dtype=bool, chunks=(4096, max(1, n_categories)))
        self.plane_start, self.label_start, self.items = [0], [0], []
        self.item_row = np.full(n_items, -1, dtype=np.int64)

    def fits(self, batch: dict[str, Any]) -> bool:
        planes = batch["pixel_labels"]
        return (tuple(planes.shape[2:]) == tuple(self.file.attrs["size"])
                and (planes.numel() == 0 or (int(planes.min()) >= 0
                                             and int(planes.max()) <= MAX_CACHED_LABEL)))

    def add(self, items: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Append items ``(dataset position, planes (P, sh, sw), labels (L,), annotated)``."""
        f = self.file
        for i, planes, labels, _ in items:
            self.item_row[i] = len(self.items)
            self.items.append(i)
            self.plane_start.append(self.plane_start[-1] + len(planes))
            self.label_start.append(self.label_start[-1] + len(labels))
        for name, col, dtype in (("planes", 1, np.uint16), ("labels", 2, np.int64)):
            parts = [it[col] for it in items if len(it[col])]
            if parts:
                block = np.concatenate(parts).astype(dtype, copy=False)
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
