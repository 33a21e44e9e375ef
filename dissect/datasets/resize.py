"""A concept dataset at another resolution: images ``S x S``, label planes ``S // 2``.

For networks trained on small images (CIFAR-size) or large ones: :func:`resize_dataset`
writes a Broden (or converts a :class:`~dissect.datasets.segmentation_folder.SegmentationFolder`)
at a chosen size; :class:`ResizedConcepts` is the same resizing as a dataset, read lazily.
"""

from __future__ import annotations

import copy
import logging
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .concepts import ConceptDataset, item_categories, rgb_to_tensor
from .images import MAX_IMAGE_PIXELS, nearest_centers, resize_rgb, shown
from .writer import _to_uint8_rgb, write_broden

log = logging.getLogger(__name__)

MAX_SIZE = int(MAX_IMAGE_PIXELS**0.5)
"""Largest image side :func:`resize_dataset` writes (16384)."""


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
            or not 2 <= int(size) <= MAX_SIZE:
        raise DataError(f"size must be an integer from 2 to {MAX_SIZE} (label planes are "
                        f"size // 2 pixels), got {size!r}")
    return int(size)


class ResizedConcepts(Dataset):
    """A concept dataset with its images resized to ``size x size`` and its label planes to
    ``size // 2 x size // 2`` (a :class:`~dissect.datasets.ConceptDataset`).

    Images shrink with ``cv2.INTER_AREA`` (each output pixel averages the input pixels it
    covers) and grow with ``cv2.INTER_LINEAR``, computed on the uint8 RGB image. Label planes
    are resized by nearest neighbour with aligned pixel centers: output pixel ``(y, x)`` takes
    the label of the input pixel under its center,
    ``plane[floor((y + 0.5) * sh / s), floor((x + 0.5) * sw / s)]`` for ``s = size // 2``
    (:func:`~dissect.datasets.images.nearest_centers`), so the planes stay aligned with the
    images. This is what ``cv2.INTER_NEAREST_EXACT`` (and PIL's nearest) compute, but in exact
    integer arithmetic:
    OpenCV's 16.16 fixed point breaks a tie (a center exactly on a boundary, e.g. 24 -> 22
    pixels) the other way or, for planes of thousands of pixels, can pick a neighbour of the
    pixel under the center; ``cv2.INTER_NEAREST`` would shift every plane up and left by up to
    half a pixel. Labels are never mixed: every output label is one of the input's. The plane
    side is ``size // 2`` as in Broden, whose 227-pixel release has 113-pixel planes.
    Image-level labels, ``annotated`` flags, the categories of every plane and label, and
    per-item ``splits`` are kept as they are.

    A non-square image becomes square (stretched); a warning says so once.

    Parameters
    ----------
    ds
        Any concept dataset; read without its ``transform``.
    size
        Side of the output images in pixels, 2 to :data:`MAX_SIZE`.

    Attributes
    ----------
    categories, concepts
        Those of ``ds``.
    transform
        Applied to each resized ``(3, size, size)`` float RGB image in [0, 1] (default ``None``).
    splits
        ``ds.splits`` when ``ds`` has one per item (as :class:`~dissect.datasets.Broden` has).
    """

    def __init__(self, ds: ConceptDataset, size: int) -> None:
        self.size = _check_size(size)
        self.plane_size = self.size // 2
        source = ds
        if getattr(ds, "transform", None) is not None:
            source = copy.copy(ds)
            source.transform = None
        self.ds = source
        self.categories = list(ds.categories)
        self.concepts = list(ds.concepts)
        self.transform = None
        splits = getattr(ds, "splits", None)
        if splits is not None and len(splits) == len(ds):
            self.splits = list(splits)
        labels = getattr(ds, "labels", None)
        if isinstance(labels, dict):  # Broden's label.csv rows: write_broden keeps synonyms
            self.labels = labels
        self._stretched = False

    def __len__(self) -> int:
        return len(self.ds)

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        """The category of each plane and image-level label of item ``i`` (those of ``ds``:
        resizing can remove every label of a plane, never change its category)."""
        return item_categories(self.ds, i)

    def resize_image(self, rgb: np.ndarray) -> np.ndarray:
        """An ``(H, W, 3)`` uint8 RGB image at ``size x size`` (area shrinking, linear
        enlarging)."""
        h, w = rgb.shape[:2]
        if h != w and not self._stretched:
            self._stretched = True
            log.warning("resizing %dx%d images to %dx%d stretches them (they are not square)",
                        h, w, self.size, self.size)
        return resize_rgb(rgb, (self.size, self.size))

    def resize_planes(self, planes: np.ndarray, i: int = 0) -> np.ndarray:
        """``(P, sh, sw)`` label planes at ``(P, size // 2, size // 2)``: each output pixel
        takes the label of the input pixel under its center (exact integer arithmetic)."""
        planes = np.asarray(planes)
        if planes.ndim != 3:
            raise DataError(f"item {i}: pixel_labels must be (P, sh, sw), got shape "
                            f"{planes.shape}")
        rows, cols = (nearest_centers(n, self.plane_size) for n in planes.shape[1:])
        return planes[:, rows[:, None], cols[None, :]].astype(np.int64, copy=False)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        item = self.ds[i]
        rgb = self.resize_image(_to_uint8_rgb(item["image"], i))
        image = rgb_to_tensor(rgb)
        if self.transform is not None:
            image = self.transform(image)
        planes = torch.as_tensor(item["pixel_labels"]).cpu().numpy()
        return {
            "image": image,
            "pixel_labels": torch.from_numpy(self.resize_planes(planes, i)),
            "image_labels": torch.as_tensor(item["image_labels"], dtype=torch.int64),
            "annotated": torch.as_tensor(item["annotated"], dtype=torch.bool),
            "index": item.get("index", i),
        }

    def __repr__(self) -> str:
        return f"ResizedConcepts({self.ds!r}, size={self.size})"


def open_concepts(src: str | Path | ConceptDataset) -> ConceptDataset:
    """A concept dataset from a Broden folder (``index.csv``), a SegmentationFolder
    (``labels.csv``) or a dataset object (returned as it is)."""
    if not isinstance(src, (str, Path)):
        missing = [a for a in ("categories", "concepts", "__len__", "__getitem__")
                   if not hasattr(src, a)]
        if missing:
            raise DataError(f"{type(src).__name__} is not a concept dataset: it has no "
                            f"{', '.join(missing)}")
        return src
    root = Path(src).expanduser()
    if (root / "index.csv").is_file():
        from .broden import Broden

        return Broden(root)
    if (root / "labels.csv").is_file():
        from .segmentation_folder import SegmentationFolder

        return SegmentationFolder(root)
    state = "holds neither" if root.is_dir() else "is not a folder with"
    raise DataError(f"{shown(root)} {state} a Broden's index.csv nor a SegmentationFolder's "
                    "labels.csv: give the folder of a concept dataset")


def resize_dataset(
    src: str | Path | ConceptDataset,
    dst: str | Path,
    size: int,
    *,
    image_format: str = "png",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a concept dataset as a Broden at another resolution.

    Images become ``size x size`` and label planes ``size // 2 x size // 2`` (see
    :class:`ResizedConcepts` for how: area/linear for images; for labels the nearest pixel
    with aligned centers, as ``cv2.INTER_NEAREST_EXACT`` but exact); image-level labels and
    ``annotated`` flags are kept. Written by :func:`~dissect.datasets.write_broden`, so
    ``index.csv`` appears last and an interrupted run never looks complete.

    Parameters
    ----------
    src
        A Broden folder (with ``index.csv``), a
        :class:`~dissect.datasets.segmentation_folder.SegmentationFolder` (with
        ``labels.csv``), or any concept dataset object.
    dst
        The folder of the new Broden (created if needed); not ``src`` itself.
    size
        Side of the output images in pixels (2 to :data:`MAX_SIZE`); planes are ``size // 2``.
    image_format
        ``"png"`` (lossless, default) or ``"jpg"``.
    overwrite
        Allow writing into a folder that already holds an ``index.csv``.
    progress
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        ``dst``, the root to pass to :class:`~dissect.datasets.Broden`.

    Raises
    ------
    DataError
        For a ``src`` that is no concept dataset, a size out of range, ``dst`` equal to
        ``src``, an existing Broden at ``dst`` (without ``overwrite``), or an item that breaks
        the ConceptDataset contract (the error names the item, or the file and line).
    """
    size = _check_size(size)
    if isinstance(src, (str, Path)) and \
            Path(src).expanduser().resolve() == Path(dst).expanduser().resolve():
        raise DataError(f"the output folder {shown(dst)} is the source itself: write the "
                        "resized dataset into another folder")
    if (Path(dst).expanduser() / "index.csv").exists() and not overwrite:
        raise DataError(f"{shown(dst)} already holds a Broden index.csv; pass overwrite=True "
                        "(--overwrite) to replace it")
    ds = open_concepts(src)
    if len(ds) == 0:
        raise DataError(f"{src if isinstance(src, (str, Path)) else type(src).__name__} has no "
                        "items to resize")
    log.info("resizing %d images to %dx%d (label planes %dx%d) into %s", len(ds), size, size,
             size // 2, size // 2, dst)
    return write_broden(ResizedConcepts(ds, size), dst, image_format=image_format,
                        overwrite=overwrite, progress=progress)
