"""Your own segmentation data as a concept dataset: a documented folder of images and masks.

Layout of a segmentation folder::

    root/
      labels.csv            number,name,category   (header row; 1 <= number <= 65535;
                                                     0 in a mask means "no label")
      images/<id>.png|jpg   one image per item; items are sorted by <id> (plain string sort)
      masks/<id>.<category>.png
                            one plane per annotated pixel-level category: an 8- or 16-bit
                            single-channel (or palette) PNG of label numbers; the image is
                            annotated for <category> iff the file exists
      image_labels.csv      image,number           (optional: image-level labels such as
                                                     scenes; image: the <id> or the file name;
                                                     an image is annotated for a label's
                                                     category iff it has a row of it)

All masks share one size, the segmentation resolution; images may be of any size and are resized
to ``size``. :func:`~dissect.datasets.write_broden` turns the folder into a Broden, and
``Broden(write_broden(SegmentationFolder(root), out))`` has the same categories, concepts and
annotations.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .annotation_cache import file_stamps
from .broden_csv import MAX_LABEL
from .concepts import Concept, rgb_to_tensor
from .images import MAX_IMAGE_PIXELS, read_image, resize_rgb, shown
from .segmentation_files import FolderScan, check_mask_labels, read_mask, scan_folder

__all__ = ["SegmentationFolder"]


def _size_arg(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    ints = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in pair)
    if not ints or min(pair) < 1 or pair[0] * pair[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"size must be an int or an (h, w) pair of positive ints of at most "
                        f"{MAX_IMAGE_PIXELS} pixels in all, got {size!r}")
    return int(pair[0]), int(pair[1])


class SegmentationFolder(Dataset):
    """A folder of images, label masks and a label table, as a :class:`ConceptDataset`.

    Parameters
    ----------
    root
        The folder (layout in :mod:`dissect.datasets.segmentation_folder`).
    size
        The size every image is resized to: an int (square) or ``(h, w)``. Default: the masks'
        size x 2 (as in Broden, whose segmentations have half the image resolution); required
        when the folder has no mask at all (its segmentation size is then ``size // 2``).
        Images are shrunk with ``cv2.INTER_AREA`` (an average over the pixels each output pixel
        covers: no aliasing) and enlarged with ``cv2.INTER_LINEAR`` (when either side grows);
        an image already of ``size`` is used as it is. Masks are never resized.
    transform
        Applied to each ``(3, h, w)`` float RGB image in [0, 1]; settable later as
        ``ds.transform``.

    Attributes
    ----------
    categories : list of str
        In order of first appearance in ``labels.csv``.
    concepts : list of Concept
        One per row of ``labels.csv``, sorted by number.
    ids : list of str
        The item ids (image file names without their suffix), sorted.
    size : tuple of int
        ``(h, w)`` of the images served.
    segmentation_size : tuple of int
        ``(sh, sw)`` of the label planes.

    Notes
    -----
    Items are dicts as described by :class:`~dissect.datasets.ConceptDataset`:
    ``pixel_labels`` has one plane per mask file of the item, in ``categories`` order;
    ``image_labels`` the item's rows of ``image_labels.csv`` in ``categories`` order, then by
    number; ``annotated`` is true for a category with a mask file or an image-level label.
    A category is pixel-level (masks) or image-level (``image_labels.csv``), not both.

    Masks are read as they are stored: a gray PNG's values, or a palette PNG's (PASCAL VOC,
    ADE20K) palette indices, read with Pillow, never its colors. Every non-zero value must be a
    label number that ``labels.csv`` gives the mask's category (PASCAL VOC's 255 "void" border,
    for example, must be listed or set to 0).

    The label table, the file names and the first mask's header are checked when the folder
    is opened; each image and mask when it is read (its PNG header before it is decoded).

    Raises
    ------
    DataError
        Naming the file (and the CSV line): a missing ``labels.csv`` or ``images/``; a bad
        header; a label number that is repeated, 0, negative, above 65535 or not an integer; an
        empty name; a mask whose id has no image, or whose file name has no category or one
        that ``labels.csv`` does not list; an id with both a .png and a .jpg image; a row of
        ``image_labels.csv`` naming an unknown image or label, a label of a category that has
        masks, or repeating a row. When an item is read: an unreadable image or mask, a mask of
        another size than the first, an RGB mask, or a mask label that is not its category's.
    """

    def __init__(
        self,
        root: str | Path,
        size: int | tuple[int, int] | None = None,
        transform: Callable | None = None,
    ) -> None:
        size = _size_arg(size)
        self._setup(scan_folder(root), size, transform)

    @classmethod
    def _from_scan(cls, scan: FolderScan, size: tuple[int, int] | None) -> SegmentationFolder:
        """A dataset on an existing scan (used by :func:`dissect.datasets.check.check_dataset`)."""
        self = cls.__new__(cls)
        self._setup(scan, size, None)
        return self

    def _setup(self, scan: FolderScan, size: tuple[int, int] | None,
               transform: Callable | None) -> None:
        self.root = scan.root
        self.transform = transform
        self.categories: list[str] = list(scan.categories)
        self.concepts: list[Concept] = list(scan.concepts)
        self.ids: list[str] = list(scan.ids)
        self._scan = scan
        if scan.mask_size is not None:
            self.segmentation_size: tuple[int, int] = scan.mask_size
            self.size: tuple[int, int] = size or (2 * scan.mask_size[0], 2 * scan.mask_size[1])
        elif size is None:
            raise DataError(f"{shown(scan.root / 'masks')} holds no mask: give size= (the image "
                            "size; the segmentation size is then size // 2)")
        else:
            self.size = size
            self.segmentation_size = (max(1, size[0] // 2), max(1, size[1] // 2))
        self._category_of = np.full(MAX_LABEL + 1, -1, dtype=np.int32)
        position = {c: k for k, c in enumerate(self.categories)}
        for c in self.concepts:
            self._category_of[c.number] = position[c.category]
        self._names = {c.number: c.name for c in self.concepts}
        self._position = position

    # ---------------------------------------------------------------- metadata

    def __len__(self) -> int:
        return len(self.ids)

    def filename(self, i: int) -> Path:
        """Path of the image file of item ``i``."""
        return self.root / "images" / self._scan.image_files[i]

    def mask_files(self, i: int) -> list[Path]:
        """Paths of the mask PNGs of item ``i``, in plane order."""
        return [self.root / "masks" / name for name in self._scan.mask_files[i]]

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        """The category of each pixel-label plane and each image-level label of item ``i``."""
        return list(self._scan.masks[i]), [c for c, _ in self._scan.image_labels[i]]

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this dataset's annotations for the annotation cache
        (:mod:`dissect.datasets.annotation_cache`): the folder, the item ids, the segmentation
        size, and the size and modification time of the CSV files and of every mask."""
        masks = [name for names in self._scan.mask_files for name in names]
        ids = hashlib.sha256("\0".join(self.ids).encode()).hexdigest()
        return {"dataset": "SegmentationFolder", "root": str(self.root.resolve()),
                "categories": self.categories, "items": len(self), "ids": ids,
                "segmentation_size": list(self.segmentation_size),
                "tables": file_stamps(self.root, ["labels.csv", "image_labels.csv"]),
                "masks": file_stamps(self.root / "masks", masks)}

    # ---------------------------------------------------------------- items

    def _index(self, i: int) -> int:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} images")
        return i % len(self)

    def read_image(self, i: int) -> np.ndarray:
        """The image of item ``i`` as stored: an ``(H, W, 3)`` uint8 RGB array (not resized)."""
        return read_image(self.filename(self._index(i)))

    def resized(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` resized to :attr:`size` (``INTER_AREA`` to shrink, ``INTER_LINEAR`` when a
        side grows; unchanged when already of that size)."""
        return resize_rgb(rgb, self.size)

    def read_pixel_labels(self, i: int) -> np.ndarray:
        """The label planes of item ``i`` as a ``(P, sh, sw)`` int64 array, each mask checked
        (size, format, and every label one of its category's)."""
        i = self._index(i)
        names = self._scan.mask_files[i]
        out = np.empty((len(names), *self.segmentation_size), dtype=np.int64)
        for k, (category, name) in enumerate(zip(self._scan.masks[i], names, strict=True)):
            path = os.path.join(self.root, "masks", name)
            what = f"mask {shown(path)}"
            plane = read_mask(path, what, self.segmentation_size)
            check_mask_labels(plane, self._position[category], self._category_of,
                              self.categories, self._names, what)
            out[k] = plane
        return out

    def annotations(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its image: ``pixel_labels``, ``image_labels``, ``annotated``,
        ``index`` (what scoring needs; skips decoding the photograph)."""
        i = self._index(i)
        annotated = np.zeros(len(self.categories), dtype=bool)
        for category in self._scan.masks[i]:
            annotated[self._position[category]] = True
        labels = self._scan.image_labels[i]
        for category, _ in labels:
            annotated[self._position[category]] = True
        return {
            "pixel_labels": torch.from_numpy(self.read_pixel_labels(i)),
            "image_labels": torch.tensor([n for _, n in labels], dtype=torch.int64),
            "annotated": torch.from_numpy(annotated),
            "index": i,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.annotations(i)
        image = rgb_to_tensor(self.resized(self.read_image(item["index"])))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, **item}

    def __repr__(self) -> str:
        (h, w), (sh, sw) = self.size, self.segmentation_size
        return (f"SegmentationFolder({str(self.root)!r}: {len(self)} images at {h}x{w}, "
                f"segmentation {sh}x{sw}, {len(self.concepts)} concepts in {self.categories})")
