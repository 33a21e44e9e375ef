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
"""

from __future__ import annotations

import csv
import logging
import math
import operator
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .concepts import Concept, rgb_to_tensor

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_INT = re.compile(r"\d+")
_NUMBERLIKE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_CATEGORY_ENTRY = re.compile(r"([^()]+)\((\d+)\)")


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
        If the file is missing, unreadable, or not an 8-bit RGB(A)/8- or 16-bit gray PNG.
    """
    return _read_label_plane(path).astype(np.int64)


def _read_label_plane(path: str | Path) -> np.ndarray:
    """:func:`read_label_png` before the int64 cast: a uint8/uint16 array or a big-endian
    uint16 view of the decoded bytes (cast once, when copied where it goes)."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        if not os.path.isfile(path):
            raise DataError(f"label PNG {path} is missing")
        raise DataError(f"label PNG {path} is not a readable image")
    if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        # bytes G (channel 1), R (channel 2) side by side: big-endian G * 256 + R
        return arr[:, :, 1:3].view(">u2")[:, :, 0]
    raise DataError(
        f"label PNG {path} has shape {arr.shape} and dtype {arr.dtype}; "
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


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row dict)`` of a CSV file, checking header and row lengths."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing: a Broden folder needs index.csv, category.csv, label.csv "
            "and c_<category>.csv (download broden1_224, or write one with write_broden)"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty: expected a header with columns {list(required)}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{path} line 1: header {header} lacks the columns {missing}; "
                "is this a Broden folder?"
            )
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {reader.line_num}: malformed row with {len(row)} fields, "
                    f"expected {len(header)} ({','.join(header)}); fix or remove the row"
                )
            yield reader.line_num, dict(zip(header, row, strict=True))


def _parse_int(value: str, path: Path, line: int, column: str, minimum: int = 0) -> int:
    value = value.strip()
    if not _INT.fullmatch(value) or int(value) < minimum:
        raise DataError(
            f"{path} line {line}: malformed row: column {column!r} is {value!r}, "
            f"expected an integer >= {minimum}"
        )
    return int(value)


def _parse_float(value: str, path: Path, line: int, column: str) -> float:
    value = value.strip()
    if not value:
        return 0.0
    try:
        out = float(value)
    except ValueError:
        out = math.nan
    if not math.isfinite(out):
        raise DataError(f"{path} line {line}: malformed row: column {column!r} is {value!r}")
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
        absent from ``label.csv``.
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
            raise DataError(f"Broden folder {self.root} does not exist")
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
        known_max = max([65535, *self.labels])
        self._images_dir = str(self.root / "images")
        self._known = np.zeros(known_max + 1, dtype=bool)
        self._known[0] = True
        self._known[list(self.labels)] = True
        self._known_upto = np.logical_and.accumulate(self._known)  # all of 0..n known
        self._rows = self._read_index()
        self.splits = [r.split for r in self._rows]

    # ---------------------------------------------------------------- metadata files

    def _read_labels(self) -> dict[int, BrodenLabel]:
        path = self.root / "label.csv"
        labels: dict[int, BrodenLabel] = {}
        for line, row in _read_csv(path, ("number", "name", "category")):
            number = _parse_int(row["number"], path, line, "number")
            if number == 0:  # "-" placeholder, never a concept
                continue
            if number in labels:
                raise DataError(f"{path} line {line}: label number {number} appears twice")
            cats: dict[str, int] = {}
            for entry in filter(None, (e.strip() for e in row["category"].split(";"))):
                match = _CATEGORY_ENTRY.fullmatch(entry)
                if match is None:
                    raise DataError(
                        f"{path} line {line}: malformed row: category {row['category']!r}; "
                        "expected entries like 'material(36);object(3)'"
                    )
                cats[match.group(1).strip()] = int(match.group(2))
            labels[number] = BrodenLabel(
                number=number,
                name=row["name"],
                categories=cats,
                frequency=_parse_float(row.get("frequency", ""), path, line, "frequency"),
                coverage=_parse_float(row.get("coverage", ""), path, line, "coverage"),
                syns=tuple(s for s in row.get("syns", "").split(";") if s),
            )
        if not labels:
            raise DataError(f"{path} lists no labels")
        return labels

    def _read_category_names(self) -> list[str]:
        path = self.root / "category.csv"
        names: list[str] = []
        for line, row in _read_csv(path, ("name",)):
            name = row["name"].strip()
            if not name or name in INDEX_COLUMNS or name in names:
                raise DataError(f"{path} line {line}: bad or repeated category name {name!r}")
            names.append(name)
        if not names:
            raise DataError(f"{path} lists no categories")
        return names

    def _read_concepts(self) -> list[Concept]:
        coverage: dict[int, list[tuple[float, int]]] = {}
        for position, cat in enumerate(self.categories):
            path = self.root / f"c_{cat}.csv"
            for line, row in _read_csv(path, ("code", "number")):
                _parse_int(row["code"], path, line, "code")
                number = _parse_int(row["number"], path, line, "number")
                if number == 0:
                    continue
                if number not in self.labels:
                    raise DataError(
                        f"{path} line {line}: label {number} is not in label.csv; "
                        "the c_*.csv files and label.csv disagree"
                    )
                cov = _parse_float(row.get("coverage", ""), path, line, "coverage")
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
        checked_header = False
        for line, row in _read_csv(path, INDEX_COLUMNS):
            if not checked_header:
                missing = [c for c in self.categories if c not in row]
                if missing:
                    raise DataError(
                        f"{path} line 1: no column for the categories {missing} that "
                        "category.csv lists"
                    )
                checked_header = True
            seen_splits.add(row["split"])
            if self.split is not None and row["split"] != self.split:
                continue
            image = row["image"].strip()
            if not image:
                raise DataError(f"{path} line {line}: malformed row: empty image path")
            ih, iw, sh, sw = (
                _parse_int(row[c], path, line, c, minimum=1) for c in ("ih", "iw", "sh", "sw")
            )
            planes: list[tuple[str, str]] = []
            labels: list[tuple[str, int]] = []
            annotated: list[bool] = []
            for cat in self.categories:
                n_before = len(planes) + len(labels)
                for token in (t.strip() for t in row[cat].split(";")):
                    if not token:
                        continue
                    if _INT.fullmatch(token):
                        number = int(token)
                        if number == 0:
                            zero_labels[cat] = zero_labels.get(cat, 0) + 1
                            continue
                        if number not in self.labels:
                            raise DataError(
                                f"{path} line {line}: {cat} label {number} is not in label.csv; "
                                "fix the row or add the label to label.csv"
                            )
                        labels.append((cat, number))
                    elif _NUMBERLIKE.fullmatch(token):
                        raise DataError(
                            f"{path} line {line}: malformed row: {cat} entry {token!r} is "
                            "neither a label number nor a PNG file name"
                        )
                    else:
                        planes.append((cat, token))
                annotated.append(len(planes) + len(labels) > n_before)
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

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        """The category of each pixel-label plane and each image-level label of item ``i``."""
        row = self._rows[i]
        return [c for c, _ in row.planes], [c for c, _ in row.labels]

    def read_image(self, i: int) -> np.ndarray:
        """The image of item ``i`` as an ``(ih, iw, 3)`` uint8 RGB array (no transform)."""
        row = self._rows[i]
        path = self.root / "images" / row.image
        where = f"{self.root / 'index.csv'} line {row.line}"
        if not path.is_file():
            raise DataError(f"{where}: image {path} is missing")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"{where}: image {path} is not a readable image file")
        if bgr.shape[:2] != (row.ih, row.iw):
            raise DataError(
                f"{where}: image {path} is {bgr.shape[0]}x{bgr.shape[1]}, but the row says "
                f"ih x iw = {row.ih}x{row.iw}"
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def read_pixel_labels(self, i: int) -> np.ndarray:
        """The pixel-label planes of item ``i`` as a ``(P, sh, sw)`` int64 array."""
        row = self._rows[i]
        out = np.empty((len(row.planes), row.sh, row.sw), dtype=np.int64)
        images = self._images_dir
        for k, (cat, name) in enumerate(row.planes):
            path = os.path.join(images, name)
            try:
                plane = _read_label_plane(path)
            except DataError as exc:
                raise DataError(f"{self._where(row)}: {cat} {exc}") from None
            if plane.shape != (row.sh, row.sw):
                raise DataError(
                    f"{self._where(row)}: {cat} label PNG {path} is {plane.shape[0]}x"
                    f"{plane.shape[1]}, but the row says sh x sw = {row.sh}x{row.sw}"
                )
            out[k] = plane  # the one cast to int64
            plane = out[k]
            top = int(plane.max())
            # every number up to the largest known (the usual case): nothing to look up
            if top >= len(self._known) or not self._known_upto[top]:
                present = np.flatnonzero(np.bincount(plane.ravel()))
                bad = [int(v) for v in present
                       if v >= len(self._known) or not self._known[v]]
                if bad:
                    raise DataError(
                        f"{self._where(row)}: {cat} label PNG {path} holds label number(s) "
                        f"{bad[:10]} that label.csv does not list"
                    )
        return out

    def _where(self, row: _Row) -> str:
        return f"{self.root / 'index.csv'} line {row.line}"

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
