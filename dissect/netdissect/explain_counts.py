"""The exact counts behind :func:`~dissect.netdissect.explain.explain`: pixels grouped by the
concepts they carry, and each unit's active pixels counted per group.

Every pixel of a concept dataset carries a set of concepts: one label per pixel-label plane, and
its image's image-level labels. Within an image few distinct sets occur (a background colour, a
shape's colour, kind and part, ...), so the pixels are grouped into *entries*: the pixels of one
image carrying one set of concepts (:class:`Entries`). Every formula of concepts (AND, OR,
AND NOT) is true on all pixels of an entry or on none, so the size of any formula's mask, of its
intersection with a concept and of its intersection with a unit's active pixels are sums over
entries. One pass over the annotations (with the activations, as :func:`~dissect.netdissect.dissect`
counts) builds the entries and counts, for every unit, its active pixels in each entry
(:class:`UnitCounts`, sparse: a unit is active in few entries); the beam search
(:mod:`.explain_search`) then never touches a pixel again.

The active pixels are :func:`~dissect.netdissect.dissect`'s, counted by the same engines: the
label plane handed to them is the entry number of each pixel, so the engine's "concept
intersections" are the active pixels per entry (numba's compiled kernel
:func:`.numba_engine.count_batch` on the CPU; :func:`.active_pixels.active_intervals` with
:func:`.label_runs.interval_label_counts` elsewhere).

A concept's pixels count only on images where its category is annotated (a label found on an
image whose category is not annotated is left out and counted in :attr:`Entries.dropped`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._plumbing.progress import progress_bar
from ..datasets.annotation_cache import annotation_batches
from ..store import ActivationStore
from .active_pixels import active_intervals
from .label_runs import interval_label_counts, label_runs

log = logging.getLogger(__name__)

_FOLD_LIMIT = 1 << 62  # codes are combined plane by plane while they stay below this


@dataclass(frozen=True)
class Entries:
    """The pixels of a run grouped by image and the set of concepts they carry.

    Attributes
    ----------
    image
        ``(E,)`` int64: the image (position in the run, i.e. the store row) of each entry.
    size
        ``(E,)`` int64: its pixels (the entries of one image cover all ``sh * sw`` pixels).
    label_ptr, label_col
        The concepts of each entry (CSR): entry ``e`` carries the concept columns
        ``label_col[label_ptr[e]:label_ptr[e + 1]]`` (sorted, unique). Image-level labels are
        carried by every entry of their image.
    concept_ptr, concept_entry
        The same incidence by concept (CSC): concept ``c`` is carried by the entries
        ``concept_entry[concept_ptr[c]:concept_ptr[c + 1]]`` (sorted).
    annotated
        ``(N, n_categories)`` bool: which categories each image has annotated.
    dropped
        ``(C,)`` int64: pixels carrying each concept on images where the concept's category is
        not annotated (left out of every count).
    """

    image: np.ndarray
    size: np.ndarray
    label_ptr: np.ndarray
    label_col: np.ndarray
    concept_ptr: np.ndarray
    concept_entry: np.ndarray
    annotated: np.ndarray
    dropped: np.ndarray

    @property
    def n_entries(self) -> int:
        """``E``."""
        return len(self.size)

    def labels_of(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``(owner, column)`` pairs of ``entries``: ``owner`` indexes ``entries``."""
        return expand_csr(self.label_ptr, self.label_col, entries)

    def concept_mask(self, column: int) -> np.ndarray:
        """``(E,)`` bool: the entries carrying concept ``column``."""
        mask = np.zeros(self.n_entries, dtype=bool)
        mask[self.concept_entry[self.concept_ptr[column] : self.concept_ptr[column + 1]]] = True
        return mask


@dataclass(frozen=True)
class UnitCounts:
    """Each unit's active pixels per entry (CSR over the explained units, in their order).

    Attributes
    ----------
    ptr
        ``(K + 1,)`` int64: unit ``i``'s entries are ``entry[ptr[i]:ptr[i + 1]]``.
    entry
        ``(nnz,)`` int64 entry numbers, sorted within each unit.
    count
        ``(nnz,)`` int64 active pixels of the unit in that entry (all positive).
    """

    ptr: np.ndarray
    entry: np.ndarray
    count: np.ndarray

    def unit(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The entries and counts of the ``i``-th explained unit."""
        s, e = self.ptr[i], self.ptr[i + 1]
        return self.entry[s:e], self.count[s:e]


def expand_csr(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, value)`` for every value of the CSR ``rows``: ``owner`` indexes ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = ptr[rows]
    lengths = ptr[rows + 1] - starts
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    if not len(owner):
        return owner, values[:0]
    first = np.cumsum(lengths) - lengths  # position of each row's first value in the output
    pos = np.arange(len(owner), dtype=np.int64) - np.repeat(first - starts, lengths)
    return owner, values[pos]


def _fold(codes: np.ndarray, plane: np.ndarray, radix: int) -> np.ndarray:
    """``codes * radix + plane`` as dense codes, compacted first when it could overflow."""
    top = int(codes.max(initial=0)) + 1
    if top * radix >= _FOLD_LIMIT:
        _, codes = np.unique(codes, return_inverse=True)
        codes = codes.reshape(-1)
    return codes * radix + plane


class _Labels:
    """The concept columns of a batch's labels (0: none; else column + 1), kept only on images
    where the concept's category is annotated."""

    def __init__(self, concepts_numbers: np.ndarray, concept_category: np.ndarray) -> None:
        self.numbers = concepts_numbers
        self.category = concept_category
        self.C = len(concepts_numbers)
        top = int(concepts_numbers.max(initial=0)) + 1
        self.lut = np.zeros(top, dtype=np.int64)
        self.lut[concepts_numbers] = np.arange(1, self.C + 1)
        self.dropped = np.zeros(self.C, dtype=np.int64)

    def columns(self, labels: np.ndarray, annotated: np.ndarray, count_drops: bool
                ) -> np.ndarray:
        """``labels`` ``(B, ...)`` label numbers -> concept columns + 1 (0: none)."""
        labels = np.where((labels > 0) & (labels < len(self.lut)), labels, 0)
        cols = self.lut[labels]
        # keep[b, col]: the column's category is annotated on image b (column 0 always "kept")
        keep = np.ones((len(annotated), self.C + 1), dtype=bool)
        if self.C:
            keep[:, 1:] = annotated[:, self.category]
        idx = np.arange(len(annotated)).reshape((-1,) + (1,) * (cols.ndim - 1))
        ok = keep[idx, cols]
        if count_drops and not ok.all():
            bad = cols[~ok]
            self.dropped += np.bincount(bad - 1, minlength=self.C)
        return np.where(ok, cols, 0)


def _batch_entries(pixel: np.ndarray, image: np.ndarray, sh: int, sw: int, C: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group one batch's pixels into entries.

    Parameters
    ----------
    pixel
        ``(B, P, sh, sw)`` concept columns + 1 of the pixel-label planes (0: none).
    image
        ``(B, L)`` concept columns + 1 of the image-level labels (0: none).

    Returns
    -------
    plane, owner_image, size, pair_entry, pair_col
        ``(B, sh, sw)`` int64 entry number (from 1) of every pixel; per entry its image in the
        batch and its size; the entries' concepts as ``(entry, column)`` pairs (sorted by entry,
        unique).
    """
    B, P = pixel.shape[:2]
    hw = sh * sw
    flat = pixel.reshape(B, P, hw)
    codes = np.repeat(np.arange(B, dtype=np.int64), hw)
    for p in range(P):
        codes = _fold(codes, flat[:, p].reshape(-1), C + 1)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(first)
    size = np.bincount(inverse, minlength=n).astype(np.int64)
    owner = first // hw
    sets = np.concatenate([flat[owner, :, first % hw], image[owner]], axis=1)  # (n, P + L)
    sets.sort(axis=1)
    if sets.shape[1] > 1:
        repeat = sets[:, 1:] == sets[:, :-1]
        sets[:, 1:][repeat] = 0  # a concept in two planes (or also image-level) counts once
    entry, slot = np.nonzero(sets)
    plane = (inverse + 1).reshape(B, sh, sw)
    return plane, owner, size, entry.astype(np.int64), sets[entry, slot] - 1


def _active_per_entry(maps: torch.Tensor, thresholds: torch.Tensor, plane: np.ndarray,
                      n_entries: int, engine: str, cache: dict) -> np.ndarray:
    """``(K, n_entries)`` int64: active pixels of each unit in each entry of the batch (entry
    ``e`` is the value ``e + 1`` of ``plane``), counted by the dissection engine ``engine``."""
    B, sh, sw = plane.shape
    labels = torch.from_numpy(plane).view(B, 1, sh, sw)
    if engine == "numba":
        from .numba_engine import count_batch

        lut = torch.arange(n_entries + 1, dtype=torch.int64)
        inter, _, _ = count_batch(maps, thresholds, labels, lut, n_entries, cache)
        return inter.numpy()
    dev = maps.device
    labels = labels.to(dev)
    b, k, y, x0, x1 = active_intervals(maps, thresholds.to(dev), (sh, sw), cache)
    counts = interval_label_counts(label_runs(labels), b, k, y, x0, x1, maps.shape[1],
                                   n_entries + 1)
    return counts[:, 1:].cpu().numpy()


def count_entries(
    store: ActivationStore,
    layer: str,
    units: list[int],
    thresholds: np.ndarray,
    dataset: Any,
    concept_numbers: np.ndarray,
    concept_category: np.ndarray,
    n_categories: int,
    *,
    batch_size: int,
    device: torch.device,
    engine: str,
    num_workers: int,
    annotation_cache: Any,
    progress: bool,
) -> tuple[Entries, UnitCounts]:
    """One pass over the annotations and the activations: the run's :class:`Entries` and
    every explained unit's :class:`UnitCounts`.

    Parameters
    ----------
    store, layer
        The activations (rows aligned with the dataset by ``store.index``).
    units
        The explained units (channels of ``layer``), in order.
    thresholds
        ``(len(units),)`` their thresholds.
    dataset
        The concept dataset.
    concept_numbers, concept_category
        ``(C,)`` the scored concepts' label numbers and category indices.
    n_categories
        The dataset's number of categories.
    batch_size, device, engine, num_workers, annotation_cache, progress
        As for :func:`~dissect.netdissect.dissect` (``engine`` resolved: ``"numba"`` or
        ``"torch"``).
    """
    C = len(concept_numbers)
    labels = _Labels(np.asarray(concept_numbers, dtype=np.int64),
                     np.asarray(concept_category, dtype=np.int64))
    thr = torch.from_numpy(np.asarray(thresholds, dtype=np.float32)).to(device)
    chan = np.asarray(units, dtype=np.int64)
    everything = len(chan) == store[layer].shape[1] and bool((chan == np.arange(len(chan))).all())
    ds = store[layer]
    index = store.index
    cache: dict = {}
    images, sizes, pair_entries, pair_cols, ann_rows = [], [], [], [], []
    unit_k, unit_e, unit_c = [], [], []
    offset = 0
    row = 0
    with (progress_bar(len(index), f"explain {layer}: counting", progress, unit="img",
                       outer=True) as bar,
          annotation_batches(dataset, index, batch_size, num_workers=num_workers,
                             cache=annotation_cache) as batches):
        for item in batches:
            annotated = item["annotated"].numpy().astype(bool)
            b = len(annotated)
            pixel = item["pixel_labels"].numpy()
            sh, sw = pixel.shape[-2:]
            cols = labels.columns(pixel, annotated, True)
            img_cols = labels.columns(item["image_labels"].numpy(), annotated, True)
            plane, owner, size, pair_entry, pair_col = _batch_entries(cols, img_cols, sh, sw, C)
            block = np.asarray(ds[row : row + b], dtype=np.float32)
            if not everything:
                block = np.ascontiguousarray(block[:, chan])
            maps = torch.from_numpy(block).to(device)
            counts = _active_per_entry(maps, thr, plane, len(size), engine, cache)
            k, e = np.nonzero(counts)
            unit_k.append(k.astype(np.int64))
            unit_e.append(e.astype(np.int64) + offset)
            unit_c.append(counts[k, e].astype(np.int64))
            images.append(owner + row)
            sizes.append(size)
            pair_entries.append(pair_entry + offset)
            pair_cols.append(pair_col)
            ann_rows.append(annotated)
            offset += len(size)
            row += b
            bar.update(b)
    image = np.concatenate(images) if images else np.zeros(0, np.int64)
    size = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    pe = np.concatenate(pair_entries) if pair_entries else np.zeros(0, np.int64)
    pc = np.concatenate(pair_cols) if pair_cols else np.zeros(0, np.int64)
    label_ptr = np.zeros(len(size) + 1, dtype=np.int64)
    np.cumsum(np.bincount(pe, minlength=len(size)), out=label_ptr[1:])
    by_concept = np.argsort(pc, kind="stable")  # entries stay sorted within each concept
    concept_ptr = np.zeros(C + 1, dtype=np.int64)
    np.cumsum(np.bincount(pc, minlength=C), out=concept_ptr[1:])
    annotated = (np.concatenate(ann_rows) if ann_rows
                 else np.zeros((0, n_categories), dtype=bool))
    small = np.int32 if len(size) < 2**31 else np.int64  # halves the incidence's memory
    entries = Entries(image, size, label_ptr, pc.astype(np.int32),
                      concept_ptr, pe[by_concept].astype(small), annotated, labels.dropped)
    k = np.concatenate(unit_k) if unit_k else np.zeros(0, np.int64)
    order = np.argsort(k, kind="stable")  # batches add entries in increasing order
    ptr = np.zeros(len(units) + 1, dtype=np.int64)
    np.cumsum(np.bincount(k, minlength=len(units)), out=ptr[1:])
    e = np.concatenate(unit_e)[order] if unit_e else np.zeros(0, np.int64)
    c = np.concatenate(unit_c)[order] if unit_c else np.zeros(0, np.int64)
    return entries, UnitCounts(ptr, e, c)
