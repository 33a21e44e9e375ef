"""Write any concept dataset in Broden's on-disk format (read back by :class:`Broden`)."""

from __future__ import annotations

import copy
import csv
import logging
import os
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.progress import progress_bar
from ..errors import DataError
from .broden import INDEX_COLUMNS, encode_label_png
from .concepts import ConceptDataset, concept_lookup, item_categories

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg"}


def _to_uint8_rgb(image: torch.Tensor, i: int) -> np.ndarray:
    image = torch.as_tensor(image).detach().cpu()
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise DataError(
            f"item {i}: 'image' must be a float (3, H, W) tensor, got {tuple(image.shape)} "
            f"{image.dtype}"
        )
    lo, hi = float(image.min()), float(image.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataError(
            f"item {i}: image values span [{lo:.3g}, {hi:.3g}], not RGB in [0, 1]; give a dataset "
            "whose transform is None (write_broden removes a `transform` attribute by itself)"
        )
    arr = (image.float().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def _imwrite(path: Path, array: np.ndarray, params: list[int] | None = None) -> None:
    if not cv2.imwrite(str(path), array, params or []):
        raise DataError(f"could not write {path}: check the folder is writable and has space")


def _decimal(value: float) -> str:
    """``value`` as a fixed-point decimal with a point and every digit its shortest round-trip
    repr needs (``7.97e-05`` -> ``0.0000797``, ``3.0`` -> ``3.0``): NetDissect-Lite's loader
    reads a number only when it matches ``\\d+\\.\\d*`` and keeps any other text, exponents
    included, as a string."""
    return np.format_float_positional(float(value), unique=True, trim="0")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


class _Tally:
    """Per (label number, category): images with the label, and pixel coverage summed."""

    def __init__(self) -> None:
        self.frequency: dict[tuple[int, str], int] = defaultdict(int)
        self.coverage: dict[tuple[int, str], float] = defaultdict(float)

    def add(self, number: int, category: str, share: float) -> None:
        self.frequency[number, category] += 1
        self.coverage[number, category] += float(share)


def _write_item(
    ds: ConceptDataset,
    i: int,
    root: Path,
    stem: str,
    fmt: str,
    params: list[int],
    lookup: dict,
    tally: _Tally,
) -> list:
    """Write item ``i``'s image and label PNGs; tally its labels; return its index.csv row."""
    categories = list(ds.categories)
    item = ds[i]
    rgb = _to_uint8_rgb(item["image"], i)
    planes = torch.as_tensor(item["pixel_labels"]).cpu().numpy().astype(np.int64)
    labels = [int(v) for v in torch.as_tensor(item["image_labels"]).reshape(-1)]
    if planes.ndim != 3:
        raise DataError(f"item {i}: pixel_labels must be (P, sh, sw), got shape {planes.shape}")
    unknown = sorted((set(np.unique(planes).tolist()) | set(labels)) - set(lookup) - {0})
    if unknown:
        raise DataError(f"item {i}: label numbers {unknown[:10]} are not in the concept table")
    plane_cats, label_cats = item_categories(ds, i, item)
    if len(plane_cats) != len(planes) or len(label_cats) != len(labels):
        raise DataError(
            f"item {i}: item_categories gives {len(plane_cats)} plane and {len(label_cats)} "
            f"label categories for {len(planes)} planes and {len(labels)} labels"
        )
    image_name = f"{stem}{fmt}"
    _imwrite(root / "images" / image_name, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    cells: dict[str, list[str]] = {c: [] for c in categories}
    size = planes.shape[1] * planes.shape[2]
    for cat in categories:
        ks = [k for k, c in enumerate(plane_cats) if c == cat]
        for j, k in enumerate(ks, start=1):
            mask_name = f"{stem}_{cat}_{j}.png" if len(ks) > 1 else f"{stem}_{cat}.png"
            _imwrite(root / "images" / mask_name, encode_label_png(planes[k]))
            cells[cat].append(mask_name)
        if ks:
            stack = planes[ks]
            for number in np.unique(stack).tolist():
                if number:
                    tally.add(number, cat, np.count_nonzero((stack == number).any(axis=0)) / size)
        own = [n for n, c in zip(labels, label_cats, strict=True) if c == cat and n]
        for number in dict.fromkeys(own):
            cells[cat].append(str(number))
            tally.add(number, cat, 1.0)
    flags = torch.as_tensor(item["annotated"]).tolist()
    for cat, flag in zip(categories, flags, strict=True):
        if bool(flag) != bool(cells[cat]):
            log.debug("item %d: %s annotated=%s with %d entries", i, cat, flag, len(cells[cat]))
    return [image_name, "", rgb.shape[0], rgb.shape[1], planes.shape[1], planes.shape[2],
            *(";".join(cells[c]) for c in categories)]


@renamed_kwargs(root="out_dir")
def write_broden(
    ds: ConceptDataset,
    out_dir: str | Path,
    *,
    image_format: str = "png",
    split: str = "train",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a concept dataset in exactly Broden's on-disk format.

    Writes ``index.csv``, ``label.csv``, ``category.csv``, one ``c_<category>.csv`` per category
    and, under ``images/<name>/``, one image per item plus one RG-encoded label PNG per
    pixel-label plane (``<k>_<category>.png``, or ``<k>_<category>_<j>.png`` when a category has
    several planes). Statistics (frequency: number of images; coverage: pixel share summed over
    images, 1 per image for image-level labels) are computed from the data, as NetDissect's
    joiner does. ``index.csv`` is written last, so an interrupted run never looks complete.

    ``Broden(write_broden(ds, out_dir))`` has the same categories, concepts, pixel labels, image
    labels and annotated flags as ``ds`` (images too, unless JPEG is asked for). A concept's
    primary category survives when its coverage in that category is the largest of its
    categories (always so for a concept labelled in one category only); a warning names any
    concept for which the data decide otherwise.

    Parameters
    ----------
    ds
        Any concept dataset. Its ``transform`` is ignored (a shallow copy with
        ``transform = None`` is read), so images are written as RGB.
    out_dir
        Output folder (created if needed): the dataset's root. (``root=`` is a deprecated
        alias, for one release.)
    image_format
        ``"png"`` (lossless, default) or ``"jpg"``.
    split
        Split name written for every row, unless ``ds`` has a per-item ``splits`` list (as
        :class:`Broden` has).
    jpeg_quality
        JPEG quality when ``image_format="jpg"``.
    overwrite
        Allow writing into a folder that already holds an ``index.csv``.
    progress
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        ``out_dir``, the root to pass to :class:`Broden`.

    Raises
    ------
    DataError
        For an unsupported format, an existing dataset at ``out_dir`` (without ``overwrite``), or an
        item whose data do not fit the ConceptDataset contract (unknown label numbers, numbers
        above 65535, images outside [0, 1]).
    """
    fmt = IMAGE_FORMATS.get(image_format.lower().lstrip("."))
    if fmt is None:
        raise DataError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    root = Path(out_dir).expanduser()
    if (root / "index.csv").exists() and not overwrite:
        raise DataError(
            f"{root} already holds a Broden index.csv; pass overwrite=True to replace it"
        )
    categories = list(ds.categories)
    if len(set(categories)) != len(categories) or not categories:
        raise DataError(f"dataset categories must be distinct and non-empty, got {categories}")
    lookup = concept_lookup(ds)
    if len(lookup) != len(ds.concepts):
        raise DataError("dataset concepts must have distinct numbers")
    for c in ds.concepts:
        if not 1 <= c.number <= 65535 or c.category not in categories:
            raise DataError(
                f"concept {c} cannot be written: numbers must lie in [1, 65535] and categories "
                f"be among {categories}"
            )
    source = ds
    if hasattr(ds, "transform"):
        source = copy.copy(ds)
        source.transform = None
    splits = getattr(ds, "splits", None)
    if splits is None or len(splits) != len(ds):
        splits = None
    name = type(ds).__name__.lower()
    image_dir = root / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt == ".jpg" else []

    tally = _Tally()
    position = {c: k for k, c in enumerate(categories)}
    index_tmp = root / "index.csv.partial"
    try:
        with open(index_tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([*INDEX_COLUMNS, *categories])
            for i in progress_bar(desc="write_broden", enabled=progress, unit="img",
                                  iterable=range(len(ds)), outer=True):
                row = _write_item(source, i, root, f"{name}/{i:06d}", fmt, params, lookup, tally)
                row[1] = splits[i] if splits is not None else split
                writer.writerow(row)
    except BaseException:
        index_tmp.unlink(missing_ok=True)
        raise
    frequency, coverage = tally.frequency, tally.coverage

    # per-category statistics, every concept listed at least in its primary category
    for c in ds.concepts:
        frequency.setdefault((c.number, c.category), 0)
        coverage.setdefault((c.number, c.category), 0.0)
    by_label: dict[int, list[str]] = defaultdict(list)
    for number, cat in frequency:
        by_label[number].append(cat)
    known = getattr(ds, "labels", None)  # Broden keeps label.csv rows: carry synonyms over
    label_rows, moved = [], []
    for c in sorted(ds.concepts):
        cats = sorted(by_label[c.number], key=lambda k: (-frequency[c.number, k], position[k]))
        primary = max(cats, key=lambda k: (coverage[c.number, k], position[k]))
        if primary != c.category:
            moved.append(f"{c.name} ({c.category} -> {primary})")
        label_rows.append([
            c.number, c.name, ";".join(f"{k}({frequency[c.number, k]})" for k in cats),
            sum(frequency[c.number, k] for k in cats),
            _decimal(sum(coverage[c.number, k] for k in cats)),
            ";".join(getattr(known.get(c.number), "syns", ()) if isinstance(known, dict) else ()),
        ])
    if moved:
        log.warning("write_broden: the data give these concepts another primary category "
                    "(largest coverage): %s", ", ".join(moved))
    category_rows = []
    for cat in categories:
        numbers = sorted(n for n, k in frequency if k == cat)
        dense = sorted(numbers, key=lambda n: (-frequency[n, cat], -coverage[n, cat], n))
        _write_csv(
            root / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
            [[code, n, lookup[n].name, frequency[n, cat], _decimal(coverage[n, cat])]
             for code, n in enumerate(dense, start=1)],
        )
        category_rows.append([cat, numbers[0] if numbers else 0, numbers[-1] if numbers else 0,
                              len(numbers), sum(frequency[n, cat] for n in numbers)])
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
               category_rows)
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               label_rows)
    os.replace(index_tmp, root / "index.csv")
    log.info("wrote %d images and %d concepts in Broden format to %s", len(ds),
             len(ds.concepts), root)
    return root
