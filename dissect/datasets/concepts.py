"""The ConceptDataset contract: images plus concept annotations in Broden's model.

A concept dataset has a concept table (:class:`Concept` rows: label number, name, primary
category) and, per image, pixel-label planes, image-level labels and per-category "annotated"
flags. :class:`~dissect.datasets.Broden` reads the real Broden layout,
:class:`~dissect.datasets.SyntheticConcepts` generates images with known concepts, and
:func:`~dissect.datasets.write_broden` writes any of them in Broden's on-disk format.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)

ITEM_KEYS = ("image", "pixel_labels", "image_labels", "annotated", "index")


class Concept(NamedTuple):
    """One row of a concept table.

    Attributes
    ----------
    number
        The dataset's label number (as in Broden's ``label.csv``; 0 means "no label").
    name
        The concept's name, e.g. ``"red"`` or ``"striped"``.
    category
        The concept's primary category, e.g. ``"color"``.
    """

    number: int
    name: str
    category: str


@runtime_checkable
class ConceptDataset(Protocol):
    """What every concept dataset provides (a structural type: no base class needed).

    Attributes
    ----------
    categories
        Category names, e.g. ``["color", "object", "part", "material", "scene", "texture"]``.
    concepts
        The concept table: one :class:`Concept` per label number, sorted by number.
    transform
        Settable; applied to each ``(3, H, W)`` float RGB image in [0, 1] (``None``: none).

    Notes
    -----
    ``ds[i]`` is a dict with

    - ``"image"``: float tensor ``(3, H, W)`` after ``transform`` (default RGB in [0, 1]);
    - ``"pixel_labels"``: int64 tensor ``(P, sh, sw)`` of label numbers (0 = none), one plane per
      annotation layer of every annotated pixel-level category, in ``categories`` order;
    - ``"image_labels"``: int64 tensor ``(L,)`` of image-level label numbers (each covers the
      whole image), in ``categories`` order;
    - ``"annotated"``: bool tensor ``(len(categories),)``: is this category annotated on this
      image at all;
    - ``"index"``: the item's position ``i``.

    Batch items with :func:`collate`. Datasets may also implement
    ``item_categories(i) -> (plane_categories, label_categories)``, the category of each
    pixel-label plane and of each image-level label of item ``i``; :func:`write_broden` uses it
    (and otherwise infers them from the labels' primary categories). ``annotations(i)``: item
    ``i`` without ``"image"`` (scoring skips decoding the photograph). ``cache_identity()``: a
    JSON-able description of everything the annotations depend on; datasets that have it get
    their decoded label planes cached on disk (:mod:`dissect.datasets.annotation_cache`).
    """

    categories: list[str]
    concepts: list[Concept]
    transform: Callable | None

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """Convert an ``(H, W, 3)`` uint8 RGB array to a ``(3, H, W)`` float32 tensor in [0, 1].

    Computed in numpy (``value / 255``, correctly rounded), so it stays fast in data-loading
    workers and never competes for torch's intra-op threads.
    """
    chw = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(np.divide(chw, np.float32(255.0), dtype=np.float32))


def concept_lookup(ds: ConceptDataset) -> dict[int, Concept]:
    """Map label number -> :class:`Concept` for a dataset's concept table."""
    return {c.number: c for c in ds.concepts}


def item_categories(ds: ConceptDataset, i: int, item: dict | None = None) -> tuple[list, list]:
    """The category of each pixel-label plane and each image-level label of item ``i``.

    Uses ``ds.item_categories(i)`` when the dataset has it; otherwise infers each plane's category
    as the most common primary category of its labels (an all-zero plane takes the category of the
    plane before it, or the first category) and each image-level label's from its primary
    category.

    Parameters
    ----------
    ds
        A concept dataset.
    i
        Item position.
    item
        ``ds[i]`` when already loaded (avoids loading it again for inference).

    Returns
    -------
    tuple of (list of str, list of str)
        Plane categories (length P) and image-level label categories (length L).
    """
    method = getattr(ds, "item_categories", None)
    if callable(method):
        planes, labels = method(i)
        return list(planes), list(labels)
    if item is None:
        item = ds[i]
    lookup = concept_lookup(ds)

    def category_of(number: int) -> str:
        if number not in lookup:
            raise DataError(
                f"item {i} has label {number}, which is not in the dataset's concept table"
            )
        return lookup[number].category

    plane_cats: list[str] = []
    for plane in item["pixel_labels"]:
        numbers = [int(v) for v in torch.unique(plane) if int(v) != 0]
        if numbers:
            plane_cats.append(Counter(category_of(v) for v in numbers).most_common(1)[0][0])
        else:
            plane_cats.append(plane_cats[-1] if plane_cats else ds.categories[0])
    label_cats = [category_of(int(v)) for v in item["image_labels"]]
    return plane_cats, label_cats


def _pad_stack(tensors: Sequence[torch.Tensor], key: str) -> torch.Tensor:
    """Stack tensors that differ only in their first dimension, padding it with zeros."""
    rest = {tuple(t.shape[1:]) for t in tensors}
    if len(rest) > 1:
        raise DataError(
            f"cannot batch {key!r}: items have shapes {sorted(rest)} after the first dimension; "
            "use batch_size=1 or a dataset whose segmentations share one size"
        )
    depth = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == depth for t in tensors):
        return torch.stack(list(tensors))  # one pass: no zero fill to overwrite
    out = torch.empty((len(tensors), depth, *next(iter(rest))), dtype=tensors[0].dtype)
    for row, t in enumerate(tensors):
        out[row, : t.shape[0]] = t
        out[row, t.shape[0] :] = 0
    return out


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch concept-dataset items (the ``collate_fn`` for a ``DataLoader``).

    ``"pixel_labels"`` ``(P, sh, sw)`` and ``"image_labels"`` ``(L,)`` are padded with 0 (= no
    label) to the largest P and L of the batch; images, ``"annotated"`` and other equally shaped
    tensors are stacked; ints become an int64 tensor; anything else becomes a list.

    Parameters
    ----------
    items
        Dicts as returned by a concept dataset's ``__getitem__``.

    Returns
    -------
    dict
        ``"image"`` ``(B, 3, H, W)``, ``"pixel_labels"`` ``(B, P, sh, sw)`` int64,
        ``"image_labels"`` ``(B, L)`` int64, ``"annotated"`` ``(B, C)`` bool, ``"index"`` ``(B,)``
        int64, plus any other keys the items have.

    Raises
    ------
    DataError
        If items have different keys, or images (or segmentations) of different sizes.
    """
    if not items:
        raise DataError("cannot collate an empty batch")
    keys = list(items[0])
    for item in items[1:]:
        if list(item) != keys:
            raise DataError(f"batch items have different keys: {keys} and {list(item)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items]
        if key in ("pixel_labels", "image_labels"):
            out[key] = _pad_stack([torch.as_tensor(v, dtype=torch.int64) for v in values], key)
        elif all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DataError(
                    f"cannot batch {key!r}: items have shapes {sorted(shapes)}; set the dataset's "
                    "transform to resize images to one size, or use batch_size=1"
                )
            out[key] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out
