"""Validate a concept-data folder by reading all of it, and summarise what it holds.

:func:`check_dataset` opens a :class:`~dissect.datasets.SegmentationFolder` (a folder with
``labels.csv``) or a :class:`~dissect.datasets.Broden` (a folder with ``index.csv``), decodes
every image and every label plane (so an unreadable file is found now, not hours into a
dissection), and counts, exactly, the images annotated per category and the pixels and images
of every concept. The first bad file stops the check with a :class:`~dissect.DataError` that
names it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.progress import progress_bar
from .._plumbing.result_files import write_json
from ..errors import DataError
from .broden import Broden
from .broden_csv import MAX_LABEL
from .images import shown
from .segmentation_files import FORMAT_HINT, scan_folder
from .segmentation_folder import SegmentationFolder

log = logging.getLogger(__name__)

FORMAT = "torch-dissect dataset check"
VERSION = 1
_NO_MASK_SIZE = (2, 2)  # a folder without masks: images are not resized by the check anyway

Size = tuple[int, int]


@dataclass(frozen=True)
class CategoryCheck:
    """One category of a checked dataset.

    Attributes
    ----------
    name
        The category.
    images_annotated
        Images annotated for it (a mask / label plane, or an image-level label).
    unannotated_fraction
        Share of the dataset's images not annotated for it.
    planes
        Pixel-label planes of this category, over all images.
    image_labels
        Image-level labels of this category, over all images.
    """

    name: str
    images_annotated: int
    unannotated_fraction: float
    planes: int
    image_labels: int


@dataclass(frozen=True)
class ConceptCheck:
    """One concept of a checked dataset.

    Attributes
    ----------
    number, name, category
        As in the dataset's concept table.
    pixels
        Segmentation pixels labelled with it, summed over images (a pixel that several planes
        of one image label with it counts once).
    images
        Images where it appears: in at least one pixel, or as an image-level label.
    """

    number: int
    name: str
    category: str
    pixels: int
    images: int


@dataclass(frozen=True)
class DatasetCheck:
    """What :func:`check_dataset` found: a folder that reads without error, summarised.

    Attributes
    ----------
    kind
        ``"segmentation-folder"`` or ``"broden"``.
    path
        The folder.
    images
        Number of images.
    image_size_min, image_size_max
        Smallest and largest ``(height, width)`` of the images as stored (each side on its own).
    segmentation_size_min, segmentation_size_max
        Same for the label planes (``None`` without any plane).
    categories
        One :class:`CategoryCheck` per category, in the dataset's order.
    concepts
        One :class:`ConceptCheck` per concept, by number.
    """

    kind: str
    path: str
    images: int
    image_size_min: Size
    image_size_max: Size
    segmentation_size_min: Size | None
    segmentation_size_max: Size | None
    categories: tuple[CategoryCheck, ...]
    concepts: tuple[ConceptCheck, ...]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-able data (with ``format`` and ``version``)."""
        doc = asdict(self)
        for key in ("image_size_min", "image_size_max", "segmentation_size_min",
                    "segmentation_size_max"):
            doc[key] = None if doc[key] is None else list(doc[key])
        return {"format": FORMAT, "version": VERSION, **doc}

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; also written (atomically) to ``path`` when given."""
        doc = self.to_dict()
        if path is not None:
            write_json(path, doc, indent=1)
        return json.dumps(doc, indent=1)

    def summary(self) -> str:
        """A plain-text table: sizes, then categories, then concepts."""
        def span(lo: Size | None, hi: Size | None) -> str:
            if lo is None or hi is None:
                return "none"
            return f"{lo[0]}x{lo[1]}" if lo == hi else f"{lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}"

        lines = [f"{self.kind} {self.path}",
                 f"images: {self.images} ({span(self.image_size_min, self.image_size_max)})",
                 "segmentation: "
                 f"{span(self.segmentation_size_min, self.segmentation_size_max)}", ""]
        width = max([len("category")] + [len(c.name) for c in self.categories])
        lines.append(f"{'category':<{width}}  {'annotated':>9}  {'unannotated':>11}  "
                     f"{'planes':>7}  {'img labels':>10}")
        for c in self.categories:
            lines.append(f"{c.name:<{width}}  {c.images_annotated:>9}  "
                         f"{c.unannotated_fraction:>11.1%}  {c.planes:>7}  {c.image_labels:>10}")
        lines.append("")
        nw = max([len("concept")] + [len(c.name) for c in self.concepts])
        cw = max([len("category")] + [len(c.category) for c in self.concepts])
        lines.append(f"{'number':>6}  {'concept':<{nw}}  {'category':<{cw}}  {'pixels':>12}  "
                     f"{'images':>7}")
        for c in self.concepts:
            lines.append(f"{c.number:>6}  {c.name:<{nw}}  {c.category:<{cw}}  {c.pixels:>12}  "
                         f"{c.images:>7}")
        absent = sum(1 for c in self.concepts if c.images == 0)
        if absent:
            lines.append(f"{absent} of {len(self.concepts)} concepts appear in no image")
        return "\n".join(lines)


def _open(path: Path) -> tuple[str, Any]:
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"{shown(path)} {state}: give a segmentation folder or a Broden folder")
    if (path / "index.csv").exists():
        return "broden", Broden(path)
    if any((path / name).exists() for name in ("labels.csv", "images", "masks")):
        scan = scan_folder(path)
        size = None if scan.mask_size is not None else _NO_MASK_SIZE
        return "segmentation-folder", SegmentationFolder._from_scan(scan, size)
    raise DataError(f"{shown(path)} is neither a Broden folder (index.csv) nor a segmentation "
                    f"folder: {FORMAT_HINT}")


def _union_counts(planes: np.ndarray) -> np.ndarray:
    """Per label number, the pixels where any plane holds it (each pixel counted once)."""
    if len(planes) == 1:
        return np.bincount(planes[0].ravel())
    ordered = np.sort(planes.reshape(len(planes), -1), axis=0)
    parts = [ordered[0], *(ordered[k][ordered[k] != ordered[k - 1]]
                           for k in range(1, len(ordered)))]
    return np.bincount(np.concatenate(parts))


def check_dataset(path: str | Path, *, progress: bool = True) -> DatasetCheck:
    """Read every image and label plane of a concept-data folder and summarise it.

    Parameters
    ----------
    path
        A segmentation folder (``labels.csv``, ``images/``, ``masks/``; see
        :class:`~dissect.datasets.SegmentationFolder`) or a Broden folder (``index.csv``;
        a folder that has one is read as a Broden).
    progress
        Show a progress bar.

    Returns
    -------
    DatasetCheck
        Image and segmentation sizes, per-category annotation counts, and per-concept pixel
        and image counts, all exact.

    Raises
    ------
    DataError
        For the first file that is missing, unreadable or wrong, naming it (and the CSV line).
    """
    path = Path(path).expanduser()
    kind, ds = _open(path)
    n = len(ds)
    size_lo, size_hi = [np.iinfo(np.int64).max] * 2, [0, 0]
    seg_lo, seg_hi = [np.iinfo(np.int64).max] * 2, [0, 0]
    annotated = np.zeros(len(ds.categories), dtype=np.int64)
    planes_per = dict.fromkeys(ds.categories, 0)
    labels_per = dict.fromkeys(ds.categories, 0)
    pixels = np.zeros(MAX_LABEL + 1, dtype=np.int64)
    images = np.zeros(MAX_LABEL + 1, dtype=np.int64)
    for i in progress_bar(desc="check", enabled=progress, unit="img", iterable=range(n),
                          outer=True):
        h, w = ds.read_image(i).shape[:2]
        size_lo = [min(size_lo[0], h), min(size_lo[1], w)]
        size_hi = [max(size_hi[0], h), max(size_hi[1], w)]
        item = ds.annotations(i)
        planes = item["pixel_labels"].numpy()
        labels = item["image_labels"].numpy()
        annotated += item["annotated"].numpy()
        plane_cats, label_cats = ds.item_categories(i)
        for cat in plane_cats:
            planes_per[cat] += 1
        for cat in label_cats:
            labels_per[cat] += 1
        seen = np.zeros(0, dtype=np.int64)
        if len(planes):
            sh, sw = planes.shape[1:]
            seg_lo = [min(seg_lo[0], sh), min(seg_lo[1], sw)]
            seg_hi = [max(seg_hi[0], sh), max(seg_hi[1], sw)]
            counts = _union_counts(planes)
            counts[0] = 0
            pixels[: len(counts)] += counts
            seen = np.flatnonzero(counts)
        present = np.union1d(seen, labels[labels > 0])
        images[present] += 1
    categories = tuple(
        CategoryCheck(cat, int(annotated[k]), float(1 - annotated[k] / n) if n else 0.0,
                      planes_per[cat], labels_per[cat])
        for k, cat in enumerate(ds.categories))
    concepts = tuple(ConceptCheck(c.number, c.name, c.category, int(pixels[c.number]),
                                  int(images[c.number])) for c in ds.concepts)
    has_planes = seg_hi[0] > 0
    result = DatasetCheck(
        kind=kind, path=str(path), images=n,
        image_size_min=(int(size_lo[0]), int(size_lo[1])) if n else (0, 0),
        image_size_max=(int(size_hi[0]), int(size_hi[1])),
        segmentation_size_min=(int(seg_lo[0]), int(seg_lo[1])) if has_planes else None,
        segmentation_size_max=(int(seg_hi[0]), int(seg_hi[1])) if has_planes else None,
        categories=categories, concepts=concepts)
    log.info("checked %s: %d images, %d concepts, no errors", shown(path), n, len(concepts))
    return result
