"""Read the Broden concept dataset (Bau et al., CVPR 2017) exactly as it is published.

Layout of a Broden folder (``broden1_224``, ``broden1_227``, ``broden1_384`` or one written by
:func:`~dissect.datasets.write_broden`)::

    index.csv       image,split,ih,iw,sh,sw,<one column per category>
    category.csv    name,first,last,count,frequency
    label.csv       number,name,category,frequency,coverage,syns
    c_<cat>.csv     code,number,name,frequency,coverage   (one per category)
    images/...      the images and the label PNGs, paths relative to images/

Each category cell of ``index.csv`` is a ``;``-separated list (empty: the category is not
annotated on that image); a decimal number is an image-level label (it covers the whole image), a
file name is a pixel-label PNG of ``sh x sw`` pixels whose label at each pixel is
``R + 256 * G``. A category may have several PNG planes (``..._part_1.png;..._part_2.png``).

Every file is checked before it is trusted: CSV files must be UTF-8 (a byte-order mark is
allowed), label numbers must fit the PNG encoding (at most 65535), sizes are bounded and checked
against each PNG's header before anything is decoded or allocated, and paths in ``index.csv``
must stay inside the folder. Whatever is wrong is a :class:`~dissect.DataError` that names the
file and, for a CSV file, the line.
"""

from __future__ import annotations

import logging
import operator
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .annotation_cache import file_stamps
from .broden_csv import MAX_LABEL, check_path, parse_float, parse_int, read_csv, short
from .concepts import Concept, rgb_to_tensor
from .images import (
    MAX_IMAGE_PIXELS,
    PNG_SIGNATURE,
    check_pixels,
    decode_image,
    header_size,
    read_file_bytes,
    shown,
)

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
"""Largest label number: a label PNG holds ``R + 256 * G`` in two 8-bit channels."""
MAX_PLANE_PIXELS = 1 << 26
"""Largest pixel-label plane (``sh x sw``): 8192 x 8192, 512 MiB as int64."""
MAX_ITEM_LABEL_PIXELS = 1 << 28
"""Largest ``planes x sh x sw`` of one item: 2 GiB as int64."""
_NUMBERLIKE = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_CATEGORY_ENTRY = re.compile(r"([^()]+)\(([0-9]{1,18})\)")


class BrodenLabel(NamedTuple):
    """One row of ``label.csv``.

    Attributes
    ----------
    number, name
        The global label number and its name.
    categories
        Category name -> count, from the ``category`` column (e.g. ``material(36);object(3)``).
    frequency, coverage
        Number of images with the label; pixel coverage in units of whole images.
    syns
        Synonyms.
    """

    number: int
    name: str
    categories: dict[str, int]
    frequency: float
    coverage: float
    syns: tuple[str, ...]


class _Row(NamedTuple):
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    line: int
    planes: tuple[tuple[str, str], ...]  # (category, png path relative to images/)
    labels: tuple[tuple[str, int], ...]  # (category, image-level label number)
    annotated: tuple[bool, ...]


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a Broden pixel-label PNG as an ``(H, W)`` int64 array of ``R + 256 * G``.

    OpenCV returns channels as BGR(A), so R is channel 2 and G channel 1. A single-channel PNG
    (never in the published data) holds the label itself.

    Raises
    ------
    DataError
        If the file is missing, not a regular file, not a PNG, corrupt or truncated, larger than
        :data:`MAX_PLANE_PIXELS` pixels, or not an 8-bit RGB(A)/8- or 16-bit gray PNG.
    """
    return _read_label_plane(path, f"label PNG {shown(path)}").astype(np.int64)


def _read_label_plane(
    path: str | Path, what: str, expect: tuple[int, int] | None = None
) -> np.ndarray:
    """:func:`read_label_png` before the int64 cast: a uint8/uint16 array or a big-endian
    uint16 view of the decoded bytes (cast once, when copied where it goes).

    The PNG header is checked first: its size must be ``expect`` (``sh x sw`` of the row), or
    at most :data:`MAX_PLANE_PIXELS` pixels; only then is the file decoded."""
    data = read_file_bytes(path, what)
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(
            f"{what} is not a PNG file"
            f"{' (it is empty)' if not data else ''}; Broden label planes are PNGs with "
            "label = R + 256 * G"
        )
    size = header_size(data, what)
    if expect is None:
        check_pixels(*size, what, MAX_PLANE_PIXELS)
    elif size != expect:
        raise DataError(f"{what} is {size[0]}x{size[1]}, but the row says sh x sw = "
                        f"{expect[0]}x{expect[1]}")
    arr = decode_image(data, cv2.IMREAD_UNCHANGED, what)
    if arr.shape[:2] != size:
        raise DataError(f"{what} decodes to {arr.shape[0]}x{arr.shape[1]} pixels, but its "
                        f"header says {size[0]}x{size[1]}: the file is corrupt")
    if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        # bytes G (channel 1), R (channel 2) side by side: big-endian G * 256 + R
        return arr[:, :, 1:3].view(">u2")[:, :, 0]
    raise DataError(
        f"{what} has shape {arr.shape} and dtype {arr.dtype}; "
        "expected 8-bit RGB with label = R + 256 * G"
    )


def encode_label_png(labels: np.ndarray) -> np.ndarray:
    """Encode an ``(H, W)`` label array as the BGR uint8 image that ``cv2.imwrite`` saves.

    The saved PNG has ``R = label % 256``, ``G = label // 256``, ``B = 0``.

    Raises
    ------
    DataError
        If a label is negative or above 65535 (not representable in R + 256 * G).
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise DataError(
            f"label numbers must lie in [0, 65535] for Broden PNGs, got "
            f"[{labels.min()}, {labels.max()}]"
        )
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[:, :, 2] = labels & 255
    out[:, :, 1] = labels >> 8
    return out


class Broden(Dataset):
    """The Broden concept dataset, read exactly as published (a :class:`ConceptDataset`).

    Parameters
    ----------
    root
        The Broden folder (holding ``index.csv`` and ``images/``).
    split
        Keep only the rows of ``index.csv`` with this split (e.g. ``"train"``, ``"val"``);
        ``None`` keeps all.
    categories
        Keep only these categories (in ``category.csv`` order); ``None`` keeps all.
        Concepts are the labels that the kept categories' ``c_<category>.csv`` list.
    transform
        Applied to each ``(3, H, W)`` float RGB image in [0, 1]; settable later as
        ``ds.transform``.

    Attributes
    ----------
    categories : list of str
        Kept categories, in ``category.csv`` order.
    concepts : list of Concept
        One per label, sorted by number. A label's category is its primary category: the kept
        category whose ``c_<category>.csv`` gives it the largest coverage (ties: the later one in
        ``category.csv``), as the original NetDissect decides it.
    labels : dict of int to BrodenLabel
        Every row of ``label.csv``.
    splits : list of str
        The split of each item.

    Notes
    -----
    Items are dicts as described by :class:`~dissect.datasets.ConceptDataset`. Pixel-label planes
    come in ``categories`` order, then in cell order; image-level labels likewise. An image-level
    label 0 (some published rows give scene 0, a label in no table) is dropped as "no label" with
    one warning. Errors in the CSV files are raised when the dataset is opened; missing or
    malformed images and PNGs when the item is read. Every error names the file and the line of
    ``index.csv`` (or of the CSV file at fault).

    Raises
    ------
    DataError
        For a missing or malformed file, an unknown split or category, or a label number that is
        absent from ``label.csv``: a CSV file that is not UTF-8, cut short, with a missing or
        repeated column, a row of the wrong length or a number out of range (label numbers
        above 65535 cannot be stored in a label PNG); a path in ``index.csv`` that is absolute
        or climbs out of the folder; sizes above :data:`MAX_IMAGE_PIXELS` /
        :data:`MAX_PLANE_PIXELS`, or a PNG whose header disagrees with ``sh x sw`` (checked
        before it is decoded); a directory, pipe or device where a file should be; a file the
        OS refuses (its error is given), or one that is corrupt or truncated.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        categories: list[str] | None = None,
        transform: Callable | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            state = "is not a folder" if self.root.exists() else "does not exist"
            raise DataError(f"Broden folder {shown(self.root)} {state}")
        self.transform = transform
        self.split = split
        self.labels = self._read_labels()
        all_categories = self._read_category_names()
        if categories is not None:
            unknown = [c for c in categories if c not in all_categories]
            if unknown:
                raise DataError(
                    f"unknown categories {unknown} for {self.root}; "
                    f"category.csv lists {all_categories}"
                )
            keep = set(categories)
            all_categories = [c for c in all_categories if c in keep]
        self.categories: list[str] = all_categories
        self.concepts: list[Concept] = self._read_concepts()
        self._images_dir = str(self.root / "images")
        self._index_shown = shown(self.root / "index.csv")
        self._known = np.zeros(MAX_LABEL + 1, dtype=bool)  # every number a PNG can hold
        self._known[0] = True
        self._known[list(self.labels)] = True
        self._known_upto = np.logical_and.accumulate(self._known)  # all of 0..n known
        self._rows = self._read_index()
        self.splits = [r.split for r in self._rows]

    # ---------------------------------------------------------------- metadata files

    def _read_labels(self) -> dict[int, BrodenLabel]:
        path = self.root / "label.csv"
        labels: dict[int, BrodenLabel] = {}
        for line, row in read_csv(path, ("number", "name", "category", "frequency",
                                          "coverage", "syns")):
            number = parse_int(row["number"], path, line, "number")
            if number == 0:  # "-" placeholder, never a concept
                continue
            if number in labels:
                raise DataError(f"{path} line {line}: label number {number} appears twice")
            cats: dict[str, int] = {}
            for entry in filter(None, (e.strip() for e in row["category"].split(";"))):
                match = _CATEGORY_ENTRY.fullmatch(entry)
                if match is None:
                    raise DataError(
                        f"{path} line {line}: malformed row: category "
                        f"{short(row['category'])}; expected entries like "
                        "'material(36);object(3)'"
                    )
                cats[match.group(1).strip()] = int(match.group(2))
            labels[number] = BrodenLabel(
                number=number,
                name=row["name"],
                categories=cats,
                frequency=parse_float(row["frequency"], path, line, "frequency"),
                coverage=parse_float(row["coverage"], path, line, "coverage"),
                syns=tuple(s for s in row["syns"].split(";") if s),
            )
        if not labels:
            raise DataError(f"{path} lists no labels")
        return labels

    def _read_category_names(self) -> list[str]:
        path = self.root / "category.csv"
        names: list[str] = []
        for line, row in read_csv(path, ("name",)):
            name = row["name"].strip()
            if (not name or name in INDEX_COLUMNS or name in names
                    or any(c in name for c in "/\\\0")):
                raise DataError(
                    f"{path} line {line}: bad or repeated category name {short(name)} (a "
                    "category name is a distinct word, without '/' or '\\', used in "
                    "c_<category>.csv)"
                )
            names.append(name)
        if not names:
            raise DataError(f"{path} lists no categories")
        return names

    def _read_concepts(self) -> list[Concept]:
        coverage: dict[int, list[tuple[float, int]]] = {}
        for position, cat in enumerate(self.categories):
            path = self.root / f"c_{cat}.csv"
            seen: set[int] = set()
            # coverage decides each label's primary category: required, never assumed 0
            for line, row in read_csv(path, ("code", "number", "coverage")):
                parse_int(row["code"], path, line, "code", maximum=2**31 - 1)
                number = parse_int(row["number"], path, line, "number")
                if number == 0:
                    continue
                if number in seen:
                    raise DataError(f"{path} line {line}: label number {number} appears twice")
                seen.add(number)
                if number not in self.labels:
                    raise DataError(
                        f"{path} line {line}: label {number} is not in label.csv; "
                        "the c_*.csv files and label.csv disagree"
                    )
                cov = parse_float(row["coverage"], path, line, "coverage")
                coverage.setdefault(number, []).append((cov, position))
        for number, label in self.labels.items():  # listed in label.csv but in no c_ file
            if number not in coverage:
                cands = [(0.0, p) for p, c in enumerate(self.categories) if c in label.categories]
                if cands:
                    coverage[number] = cands
        concepts = []
        for number in sorted(coverage):
            _, position = max(coverage[number])
            concepts.append(Concept(number, self.labels[number].name, self.categories[position]))
        return concepts

    def _read_index(self) -> list[_Row]:
        path = self.root / "index.csv"
        rows: list[_Row] = []
        zero_labels: dict[str, int] = {}
        seen_splits: set[str] = set()
        table = read_csv(path, (*INDEX_COLUMNS, *self.categories))
        if not table:
            raise DataError(f"{path} lists no images (only its header): is it cut short?")
        for line, row in table:
            seen_splits.add(row["split"])
            if self.split is not None and row["split"] != self.split:
                continue
            image = row["image"].strip()
            if not image:
                raise DataError(f"{path} line {line}: malformed row: empty image path")
            check_path(image, path, line, "image")
            ih = parse_int(row["ih"], path, line, "ih", 1, MAX_IMAGE_PIXELS)
            iw = parse_int(row["iw"], path, line, "iw", 1, MAX_IMAGE_PIXELS)
            sh = parse_int(row["sh"], path, line, "sh", 1, MAX_PLANE_PIXELS)
            sw = parse_int(row["sw"], path, line, "sw", 1, MAX_PLANE_PIXELS)
            if ih * iw > MAX_IMAGE_PIXELS or sh * sw > MAX_PLANE_PIXELS:
                raise DataError(f"{path} line {line}: ih x iw = {ih}x{iw} or sh x sw = {sh}x{sw} "
                                f"is more than {MAX_IMAGE_PIXELS} or {MAX_PLANE_PIXELS} pixels")
            planes: list[tuple[str, str]] = []
            labels: list[tuple[str, int]] = []
            annotated: list[bool] = []
            for cat in self.categories:
                n_before = len(planes) + len(labels)
                for token in (t.strip() for t in row[cat].split(";")):
                    if not token:
                        continue
                    if token.isascii() and token.isdigit():
                        digits = token.lstrip("0") or "0"
                        number = int(digits) if len(digits) <= 5 else MAX_LABEL + 1
                        if number == 0:
                            zero_labels[cat] = zero_labels.get(cat, 0) + 1
                            continue
                        if number not in self.labels:
                            raise DataError(
                                f"{path} line {line}: {cat} label {digits[:20]} is not in "
                                "label.csv; fix the row or add the label to label.csv"
                            )
                        labels.append((cat, number))
                    elif _NUMBERLIKE.fullmatch(token):
                        raise DataError(
                            f"{path} line {line}: malformed row: {cat} entry {short(token)} "
                            "is neither a label number nor a PNG file name"
                        )
                    else:
                        check_path(token, path, line, cat)
                        planes.append((cat, token))
                annotated.append(len(planes) + len(labels) > n_before)
            if len(planes) * sh * sw > MAX_ITEM_LABEL_PIXELS:
                raise DataError(f"{path} line {line}: {len(planes)} label planes of {sh}x{sw} "
                                f"pixels are more than {MAX_ITEM_LABEL_PIXELS} pixel labels")
            rows.append(
                _Row(image, row["split"], ih, iw, sh, sw, line, tuple(planes), tuple(labels),
                     tuple(annotated))
            )
        if self.split is not None and not rows:
            raise DataError(
                f"{path} has no rows with split {self.split!r}; splits present: "
                f"{sorted(seen_splits)}"
            )
        for cat, count in zero_labels.items():
            log.warning(
                "%s: %d row(s) give %s label 0, which is in no table; treated as no label "
                "(a known quirk of the published Broden data)", path, count, cat,
            )
        return rows

    # ---------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self._rows)

    def filename(self, i: int) -> Path:
        """Path of the image file of item ``i``."""
        return self.root / "images" / self._rows[i].image

    def label_files(self, i: int) -> list[Path]:
        """Paths of the pixel-label PNGs of item ``i``, in plane order."""
        return [self.root / "images" / name for _, name in self._rows[i].planes]

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this dataset's annotations for the annotation cache
        (:mod:`dissect.datasets.annotation_cache`): the folder, split and categories, and the
        size and modification time of the CSV files and of every label PNG the rows name."""
        tables = ["index.csv", "category.csv", "label.csv"]
        tables += [f"c_{cat}.csv" for cat in self.categories]
        planes = [name for row in self._rows for _, name in row.planes]
        return {"dataset": "Broden", "root": str(self.root.resolve()), "split": self.split,
                "categories": self.categories, "items": len(self),
                "tables": file_stamps(self.root, tables),
                "planes": file_stamps(self._images_dir, planes)}

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        """The category of each pixel-label plane and each image-level label of item ``i``."""
        row = self._rows[i]
        return [c for c, _ in row.planes], [c for c, _ in row.labels]

    def read_image(self, i: int) -> np.ndarray:
        """The image of item ``i`` as an ``(ih, iw, 3)`` uint8 RGB array (no transform)."""
        row = self._rows[i]
        what = f"{self._where(row)}: image {shown(os.path.join(self._images_dir, row.image))}"
        data = read_file_bytes(os.path.join(self._images_dir, row.image), what)
        # the header's size before decoding (EXIF may turn a JPEG: compare sides as a set)
        size = header_size(data, what)
        if size is not None and sorted(size) != sorted((row.ih, row.iw)):
            raise DataError(f"{what} is {size[0]}x{size[1]}, but the row says ih x iw = "
                            f"{row.ih}x{row.iw}")
        bgr = decode_image(data, cv2.IMREAD_COLOR, what)
        if bgr.shape[:2] != (row.ih, row.iw):
            raise DataError(f"{what} is {bgr.shape[0]}x{bgr.shape[1]}, but the row says "
                            f"ih x iw = {row.ih}x{row.iw}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def read_pixel_labels(self, i: int) -> np.ndarray:
        """The pixel-label planes of item ``i`` as a ``(P, sh, sw)`` int64 array."""
        row = self._rows[i]
        if not row.planes:
            return np.empty((0, row.sh, row.sw), dtype=np.int64)
        out = None
        images = self._images_dir
        shape = (row.sh, row.sw)
        for k, (cat, name) in enumerate(row.planes):
            path = os.path.join(images, name)
            # the PNG header is checked against sh x sw before decoding or allocating
            plane = _read_label_plane(path, f"{self._where(row)}: {cat} label PNG {shown(path)}",
                                      shape)
            if out is None:
                out = np.empty((len(row.planes), *shape), dtype=np.int64)
            out[k] = plane  # the one cast to int64
            plane = out[k]
            # every number up to the largest known (the usual case): nothing to look up
            if not self._known_upto[int(plane.max())]:  # a PNG holds at most MAX_LABEL
                present = np.flatnonzero(np.bincount(plane.ravel()))
                bad = [int(v) for v in present if not self._known[v]]
                if bad:
                    raise DataError(
                        f"{self._where(row)}: {cat} label PNG {shown(path)} holds label number(s) "
                        f"{bad[:10]} that label.csv does not list"
                    )
        return out

    def _where(self, row: _Row) -> str:
        return f"{self._index_shown} line {row.line}"

    def annotations(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its image: ``pixel_labels``, ``image_labels``, ``annotated``,
        ``index`` (what scoring needs; skips decoding the photograph)."""
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        i %= len(self)
        row = self._rows[i]
        return {
            "pixel_labels": torch.from_numpy(self.read_pixel_labels(i)),
            "image_labels": torch.from_numpy(np.array([n for _, n in row.labels], dtype=np.int64)),
            "annotated": torch.from_numpy(np.array(row.annotated, dtype=bool)),
            "index": i,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.annotations(i)
        image = rgb_to_tensor(self.read_image(item["index"]))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, **item}

    def __repr__(self) -> str:
        split = "" if self.split is None else f", split={self.split!r}"
        return (
            f"Broden({str(self.root)!r}{split}: {len(self)} images, "
            f"{len(self.concepts)} concepts in {self.categories})"
        )
