"""The files of a :class:`~dissect.datasets.SegmentationFolder`, read and checked.

:func:`scan_folder` reads ``labels.csv`` and ``image_labels.csv`` and lists ``images/`` and
``masks/`` (everything that is checked when the folder is opened); :func:`read_mask` reads one
label-mask PNG and :func:`check_mask_labels` checks its label numbers (when an item is read).
Every error is a :class:`~dissect.DataError` naming the file and, for a CSV file, the line.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from ..errors import DataError
from .broden import INDEX_COLUMNS, MAX_PLANE_PIXELS
from .broden_csv import MAX_LABEL, parse_int, read_csv, short
from .concepts import Concept
from .images import PNG_SIGNATURE, check_pixels, decode_image, header_size, read_file_bytes, shown

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
"""Image file suffixes of ``images/`` (any letter case)."""
FORMAT_HINT = ("a segmentation folder holds labels.csv (number,name,category), "
               "images/<id>.png|jpg, masks/<id>.<category>.png and, optionally, "
               "image_labels.csv (image,number)")
_BAD_CATEGORY_CHARS = frozenset("./\\;")
_PNG_COLOR_TYPES = {0: "gray", 2: "RGB", 3: "palette", 4: "gray + alpha", 6: "RGBA"}


class FolderScan(NamedTuple):
    """What :func:`scan_folder` found (everything but the pixels).

    Attributes
    ----------
    root
        The folder.
    categories
        Categories in order of first appearance in ``labels.csv``.
    concepts
        One :class:`Concept` per row of ``labels.csv``, sorted by number.
    ids
        Item ids, sorted (plain string sort).
    image_files
        The file name under ``images/`` of each item.
    masks
        Per item, the categories that have a mask file, in ``categories`` order.
    mask_files
        Per item, the file name under ``masks/`` of each of those masks.
    image_labels
        Per item, ``(category, number)`` of its image-level labels, in ``categories`` order
        and, within a category, by number.
    mask_size
        ``(sh, sw)`` from the header of the first mask, or ``None`` when there is no mask.
    """

    root: Path
    categories: list[str]
    concepts: list[Concept]
    ids: list[str]
    image_files: list[str]
    masks: list[tuple[str, ...]]
    mask_files: list[tuple[str, ...]]
    image_labels: list[tuple[tuple[str, int], ...]]
    mask_size: tuple[int, int] | None


def _check_category(name: str, path: Path, line: int) -> None:
    bad = sorted({c for c in name if c in _BAD_CATEGORY_CHARS or not c.isprintable()})
    if not name or bad or name != name.strip() or name in INDEX_COLUMNS:
        reason = (f"holds {bad}" if bad else "is empty" if not name
                  else "is a column name of Broden's index.csv" if name in INDEX_COLUMNS
                  else "starts or ends with a space")
        raise DataError(f"{shown(path)} line {line}: category {short(name)} {reason}; a "
                        "category name is a word without '.', '/', '\\' or ';' (it is part of "
                        "mask file names masks/<id>.<category>.png), and not one of "
                        f"{list(INDEX_COLUMNS)}")


def read_labels(root: Path) -> tuple[list[str], list[Concept]]:
    """``labels.csv``: the categories (in order of first appearance) and the concepts."""
    path = root / "labels.csv"
    if not path.exists():
        raise DataError(f"{shown(path)} is missing: {FORMAT_HINT}")
    lines: dict[int, int] = {}
    seen: dict[tuple[str, str], int] = {}
    categories: list[str] = []
    concepts: list[Concept] = []
    for line, row in read_csv(path, ("number", "name", "category"), missing_hint=f": {FORMAT_HINT}",
                              origin="a segmentation folder", whole_lines=False):
        number = parse_int(row["number"], path, line, "number", 1, MAX_LABEL)
        if number in lines:
            raise DataError(f"{shown(path)} line {line}: label number {number} appears twice "
                            f"(also on line {lines[number]}); each label has one number")
        name, category = row["name"].strip(), row["category"].strip()
        if not name:
            raise DataError(f"{shown(path)} line {line}: label {number} has an empty name")
        _check_category(category, path, line)
        if (name, category) in seen:
            raise DataError(f"{shown(path)} line {line}: label {short(name)} of category "
                            f"{short(category)} appears twice (also on line "
                            f"{seen[name, category]}, as another number)")
        lines[number] = seen[name, category] = line
        if category not in categories:
            categories.append(category)
        concepts.append(Concept(number, name, category))
    if not concepts:
        raise DataError(f"{shown(path)} lists no labels (only its header)")
    return categories, sorted(concepts)


def _list_images(root: Path) -> dict[str, str]:
    """id -> file name of every image under ``images/``."""
    folder = root / "images"
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "is missing"
        raise DataError(f"{shown(folder)} {state}: {FORMAT_HINT}")
    files: dict[str, str] = {}
    ignored: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_EXTENSIONS or entry.is_dir():
                ignored.append(name)
                continue
            if stem in files:
                first, second = sorted((files[stem], name))
                raise DataError(f"{shown(folder / second)}: image id {short(stem)} also has "
                                f"{shown(folder / first)}; keep one image per id")
            files[stem] = name
    if ignored:
        log.warning("%s: ignored %d entries that are not .png/.jpg image files, e.g. %s",
                    shown(folder), len(ignored), ", ".join(sorted(ignored)[:3]))
    if not files:
        raise DataError(f"{shown(folder)} holds no .png or .jpg images: {FORMAT_HINT}")
    return files


def _list_masks(root: Path, categories: list[str], images: dict[str, str]) -> dict:
    """``{id: {category: file name}}`` of every mask under ``masks/``."""
    folder = root / "masks"
    if not folder.exists():
        return {}
    if not folder.is_dir():
        raise DataError(f"{shown(folder)} is not a folder: {FORMAT_HINT}")
    known = set(categories)
    masks: dict[str, dict[str, str]] = {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if name.startswith("."):
                continue
            path = folder / name
            if entry.is_dir() or not name.lower().endswith(".png"):
                raise DataError(f"{shown(path)} is not a mask file: masks are PNG files named "
                                "<id>.<category>.png (8- or 16-bit single-channel PNGs of label "
                                "numbers)")
            image, dot, category = name[:-4].rpartition(".")
            if not dot or not image or not category:
                raise DataError(f"{shown(path)}: the file name has no category: name masks "
                                "<id>.<category>.png, e.g. 0001.object.png")
            if category not in known:
                raise DataError(f"{shown(path)}: category {short(category)} is not in "
                                f"labels.csv (its categories: {categories})")
            if image not in images:
                raise DataError(f"{shown(path)}: no image images/{image}.png or .jpg for id "
                                f"{short(image)}; add the image or remove the mask")
            per_image = masks.setdefault(image, {})
            if category in per_image:
                raise DataError(f"{shown(path)}: id {short(image)} already has the "
                                f"{category} mask {per_image[category]}; keep one")
            per_image[category] = name
    return masks


def _read_image_labels(root: Path, images: dict[str, str], concepts: list[Concept],
                       pixel_masks: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
    """``{id: [(category, number), ...]}`` from ``image_labels.csv`` (if present); its
    ``image`` column holds an image's ``<id>`` or its file name (``<id>.png``)."""
    path = root / "image_labels.csv"
    if not path.exists():
        return {}
    lookup = {c.number: c for c in concepts}
    seen: dict[tuple[str, int], int] = {}
    labels: dict[str, list[tuple[str, int]]] = {}
    by_file = {name: image for image, name in images.items()}
    for line, row in read_csv(path, ("image", "number"), missing_hint=f": {FORMAT_HINT}",
                              origin="a segmentation folder", whole_lines=False):
        image = row["image"].strip()
        if image not in images and image in by_file:  # the file name: images/<id>.png
            image = by_file[image]
        if image not in images:
            stem = os.path.splitext(image)[0]
            hint = (f"; the image of id {short(stem)} is images/{images[stem]}"
                    if stem in images else "")
            raise DataError(f"{shown(path)} line {line}: image {short(image)} is neither an "
                            f"<id> nor a file name of images/{hint}")
        number = parse_int(row["number"], path, line, "number", 1, MAX_LABEL)
        if number not in lookup:
            raise DataError(f"{shown(path)} line {line}: label {number} is not in labels.csv")
        category = lookup[number].category
        if category in pixel_masks:
            raise DataError(
                f"{shown(path)} line {line}: label {number} ({short(lookup[number].name)}) is "
                f"of category {short(category)}, which has pixel masks (e.g. "
                f"masks/{pixel_masks[category]}); a category is annotated either by masks or "
                "by image_labels.csv, not both")
        if (image, number) in seen:
            raise DataError(f"{shown(path)} line {line}: image {short(image)} has label "
                            f"{number} twice (also on line {seen[image, number]})")
        seen[image, number] = line
        labels.setdefault(image, []).append((category, number))
    return labels


def scan_folder(root: str | Path) -> FolderScan:
    """Read and check everything of a segmentation folder except the pixels.

    Raises
    ------
    DataError
        For a missing ``labels.csv`` or ``images/``, a malformed CSV file (naming the line), a
        mask file name without a known category or image, an id with two images, or a first
        mask that is not a readable PNG.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"segmentation folder {shown(root)} {state}")
    categories, concepts = read_labels(root)
    images = _list_images(root)
    masks = _list_masks(root, categories, images)
    pixel_masks: dict[str, str] = {}
    for per_image in masks.values():
        for category, name in per_image.items():
            pixel_masks.setdefault(category, name)
    image_labels = _read_image_labels(root, images, concepts, pixel_masks)
    ids = sorted(images)
    position = {c: k for k, c in enumerate(categories)}
    item_masks: list[tuple[str, ...]] = []
    item_files: list[tuple[str, ...]] = []
    mask_size = None
    for image in ids:
        own = masks.get(image, {})
        cats = tuple(sorted(own, key=position.__getitem__))
        item_masks.append(cats)
        item_files.append(tuple(own[c] for c in cats))
        if mask_size is None and cats:
            mask_size = mask_header_size(root / "masks" / own[cats[0]])
    item_labels = [tuple(sorted(image_labels.get(image, ()),
                                key=lambda t: (position[t[0]], t[1]))) for image in ids]
    return FolderScan(root, categories, concepts, ids, [images[i] for i in ids], item_masks,
                      item_files, item_labels, mask_size)


def mask_header_size(path: Path) -> tuple[int, int]:
    """``(sh, sw)`` from a mask PNG's header (nothing decoded)."""
    what = f"mask {shown(path)}"
    data = read_file_bytes(path, what)
    _check_png(data, what)
    size = header_size(data, what)
    check_pixels(*size, what, MAX_PLANE_PIXELS)
    return size


def _check_png(data: bytes, what: str) -> None:
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(f"{what} is not a PNG file{' (it is empty)' if not data else ''}; "
                        "masks are 8- or 16-bit single-channel PNGs of label numbers")


def read_mask(path: str | Path, what: str, expect: tuple[int, int]) -> np.ndarray:
    """A mask PNG as an ``(sh, sw)`` uint8/uint16 (or bool, for 1-bit) array of label numbers.

    The header is checked first (a PNG of ``expect`` pixels); then gray PNGs of 8 or 16 bits
    are decoded with OpenCV, and palette PNGs (as PASCAL VOC and ADE20K store class masks)
    and 1-bit gray PNGs with Pillow, as their palette indices (resp. 0/1), never as colors.

    Raises
    ------
    DataError
        If the file is missing, not a PNG, corrupt, of another size than ``expect``, RGB(A),
        gray with alpha, or gray of 2 or 4 bits.
    """
    data = read_file_bytes(path, what)
    _check_png(data, what)
    size = header_size(data, what)
    if size != expect:
        raise DataError(f"{what} is {size[0]}x{size[1]} pixels, but the folder's masks are "
                        f"{expect[0]}x{expect[1]} (the size of its first mask): every mask "
                        "has the segmentation size")
    depth, color = data[24], data[25]
    if color in (2, 4, 6):
        raise DataError(
            f"{what} is a {_PNG_COLOR_TYPES[color]} PNG; masks are single-channel PNGs whose "
            "pixel values are label numbers (8-bit, 16-bit or palette); convert it, e.g. with "
            "cv2.imwrite of a uint8/uint16 label array (Broden's R + 256 * G encoding belongs "
            "to Broden folders, read with dissect.datasets.Broden)")
    if color == 0 and depth in (8, 16):
        arr = decode_image(data, cv2.IMREAD_UNCHANGED, what)
        if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
            raise DataError(f"{what} decodes to shape {arr.shape} of {arr.dtype}; save it as "
                            "an 8- or 16-bit single-channel PNG without transparency")
    elif color == 3 or (color == 0 and depth == 1):
        arr = _pillow_indices(data, what)
    else:
        raise DataError(f"{what} is a {depth}-bit {_PNG_COLOR_TYPES.get(color, '?')} PNG; "
                        "save it as an 8- or 16-bit single-channel PNG")
    if arr.shape != size:
        raise DataError(f"{what} decodes to {arr.shape} pixels, but its header says "
                        f"{size[0]}x{size[1]}: the file is corrupt")
    return arr


def _pillow_indices(data: bytes, what: str) -> np.ndarray:
    """A palette PNG's indices (or a 1-bit PNG's 0/1) with Pillow, which keeps them."""
    from PIL import Image  # Pillow (install_requires): only palette and 1-bit masks need it

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("P", "1"):
                raise DataError(f"{what}: Pillow reads it as mode {image.mode}; save it as an "
                                "8- or 16-bit single-channel PNG")
            arr = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read {what}: Pillow refuses it: {exc}") from None
    return arr.astype(np.uint8) if arr.dtype == bool else arr


def check_mask_labels(plane: np.ndarray, k: int, category_of: np.ndarray,
                      categories: list[str], names: dict[int, str], what: str) -> None:
    """Refuse a mask of category ``categories[k]`` with a label that is not one of its own.

    ``category_of[v]``: the category position of label ``v`` in ``labels.csv`` (-1: none).
    One ``np.bincount`` of the plane finds the numbers present.
    """
    present = np.flatnonzero(np.bincount(plane.ravel(), minlength=1))
    present = present[present > 0]
    bad = present[category_of[present] != k]
    if not len(bad):
        return
    value = int(bad[0])
    more = f" (and {len(bad) - 1} other numbers)" if len(bad) > 1 else ""
    if category_of[value] < 0:
        raise DataError(f"{what} holds label {value}{more}, which labels.csv does not list: "
                        f"add it to labels.csv (category {categories[k]}) or set it to 0 "
                        "(no label) in the mask")
    raise DataError(f"{what} holds label {value} ({short(names[value])}){more}, which "
                    f"labels.csv puts in category {categories[category_of[value]]!r}, not "
                    f"{categories[k]!r}: a {categories[k]} mask holds {categories[k]} labels only")
