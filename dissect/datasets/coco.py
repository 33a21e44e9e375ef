"""COCO-style instance and panoptic annotations as a concept dataset (the ``coco`` extra).

Each COCO category is a concept, in category ``"object"``, or ``"stuff"`` when the JSON gives it
``"isthing": 0``. Polygons are rasterized by ``pycocotools.mask`` (as ``COCO.annToMask``) at the
image's size in the JSON; RLE masks (uncompressed lists, compressed strings) are checked (from a
short RLE pycocotools returns uninitialized memory) and expanded. Panoptic PNGs hold segment ids
``R + 256 * G + 256**2 * B``. Images are resized to ``size`` with ``INTER_AREA`` (``INTER_LINEAR``
when a side grows), labels by :func:`~dissect.datasets.images.nearest_centers`: each output
pixel takes the source pixel under its centre (exact integer arithmetic, as
``cv2.INTER_NEAREST_EXACT`` intends), never a blend, never shifted by half a pixel.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import operator
import os
import re
from collections import namedtuple
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, DissectError
from .annotation_cache import file_stamps
from .concepts import Concept, rgb_to_tensor
from .images import (
    MAX_IMAGE_PIXELS,
    PNG_SIGNATURE,
    check_pixels,
    decode_image,
    header_size,
    nearest_centers,
    read_file_bytes,
    read_utf8_text,
    resize_rgb,
    shown,
)

log = logging.getLogger(__name__)

EXTRA = "pip install 'torch-dissect[coco]'"
DECODING_VERSION = 2
"""Part of :meth:`CocoConcepts.cache_identity`: bump it when a change of the decoding code
changes any item's labels, so annotation caches made by older code are not read."""
POLYGON_SLACK = 2.0
"""How far (pixels) a polygon vertex may lie outside its image before the polygon is refused
as drawn for another image size (pycocotools clips what lies outside)."""
_MAX_SEGMENT_ID = (1 << 24) - 1


def coco_mask_api() -> Any:
    """``pycocotools.mask``, or a :class:`~dissect.DissectError` naming the ``coco`` extra."""
    try:  # honours sys.modules, so a test can hide the package
        return importlib.import_module("pycocotools.mask")
    except ImportError as exc:
        raise DissectError("CocoConcepts needs pycocotools, which is not installed: "
                           f"{EXTRA} (the 'coco' extra), or pip install pycocotools") from exc


_Image = namedtuple("_Image", "id file_name height width")
_Instance = namedtuple("_Instance", "id number segmentation")  # concept number; polygons or RLE
_Panoptic = namedtuple("_Panoptic", "file_name segments")  # {segment id: number (0: not kept)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_path(name: str) -> bool:
    """Whether a file name from the JSON is empty, absolute, or climbs out with '..'."""
    return (not name or "\0" in name or name[0] in "/\\" or bool(re.match(r"[A-Za-z]:", name))
            or ".." in re.split(r"[/\\]", name))


def _rle_counts(counts: str | bytes, where: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string, as pycocotools' ``rleFrString`` reads
    them: 5-bit groups (character - 48; bit 5: more follow; bit 4 of the last: negative), each
    count after the second a difference from the count two before. A DataError when corrupt."""
    text = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = text[p] - 48 if p < n else -1
            if not 0 <= c < 64 or k > 12:
                raise DataError(f"{where}: the compressed RLE string is corrupt (a character "
                                "outside COCO's RLE encoding, or cut inside a number)")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _polygon(poly: list, h: int, w: int, where: str) -> list[float]:
    """A polygon's coordinates, checked: finite numbers inside the ``w x h`` image (give or take
    :data:`POLYGON_SLACK` pixels)."""
    ok = all(type(v) in (int, float) for v in poly)
    xy = np.asarray(poly if ok else [np.nan] * 2, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        raise DataError(f"{where}: a polygon holds a value that is not a finite number")
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    if (lo < -POLYGON_SLACK).any() or hi[0] > w + POLYGON_SLACK or hi[1] > h + POLYGON_SLACK:
        raise DataError(f"{where}: a polygon spans x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}..{hi[1]:g}, "
                        f"outside the {w}x{h} (width x height) image: drawn for another size?")
    return xy.ravel().tolist()


class CocoConcepts(Dataset):
    """COCO-style annotations as a concept dataset (a :class:`ConceptDataset`).

    Parameters
    ----------
    annotations_json
        A COCO instance JSON (``images``, ``categories``, ``annotations`` with ``segmentation``)
        or a COCO panoptic JSON (annotations with ``file_name`` and ``segments_info``).
    images_dir
        The folder the ``file_name`` of each ``images`` entry is relative to.
    size
        Size of images and of label planes (the same, not half as in Broden): an int (square)
        or ``(height, width)``.
    categories
        COCO categories to keep as concepts, by name or id (``None``: all). An unknown name is
        an error listing the close matches.
    transform
        Applied to each ``(3, h, w)`` float RGB image in [0, 1]; settable later.
    panoptic_dir
        The folder of the panoptic PNGs (required for a panoptic JSON, refused otherwise).

    Attributes
    ----------
    categories : list of str
        ``"object"`` and/or ``"stuff"``: those that kept concepts belong to.
    concepts : list of Concept
        One per kept COCO category (its COCO name), numbered 1..K in the order of COCO id.
    coco_ids : dict of int to int
        COCO category id -> concept number.
    image_ids : list of int
        COCO image id of each item (the order of the JSON ``images`` list).
    segmentation_size : tuple of int
        ``(height, width)`` of images and label planes: ``size``.
    panoptic : bool
        Whether the JSON is a panoptic one.

    Notes
    -----
    Instance JSON: every image listed is annotated for every category (COCO annotates its
    categories exhaustively), even one without instances: it then has one all-zero plane per
    category. Instances (``iscrowd`` regions included) are resized one by one and packed, in
    order of annotation id, into the first plane of their category whose pixels under the
    mask are 0 or already this concept; overlapping instances of one concept merge, of two
    concepts go to different planes, so no pixel loses a label. An instance too small to
    cover an output pixel vanishes. Degenerate polygons (fewer than 3 points) are dropped, as
    detectron2 does, with one warning.

    Panoptic JSON: segments never overlap, so each image has one plane per category
    (``"object"`` then ``"stuff"``); segment id 0 and segments of categories not kept are 0.
    An image without a panoptic annotation is not annotated (no planes). Pixel planes come in
    ``categories`` order; there are no image-level labels.

    Images are read in their stored pixel grid (EXIF orientation ignored, as pycocotools
    and ``torchvision.datasets.CocoDetection`` read them); the JSON ``height``/``width`` must be
    that grid.

    Raises
    ------
    DataError
        Naming the file (and the image or annotation id): unreadable or malformed JSON, a
        missing key, a repeated id or category name, an annotation for an unknown image or
        category, a polygon or RLE that does not fit its image's size, a corrupt RLE, an
        image, panoptic PNG or segment id that is missing or of the wrong size.
    DissectError
        If pycocotools is not installed (the message names the ``coco`` extra).
    """

    def __init__(
        self,
        annotations_json: str | Path,
        images_dir: str | Path,
        size: int | tuple[int, int] = 224,
        categories: Sequence[str | int] | None = None,
        transform: Callable | None = None,
        panoptic_dir: str | Path | None = None,
    ) -> None:
        coco_mask_api()  # fail at once when the extra is missing
        self.annotations_json = Path(annotations_json).expanduser()
        self.images_dir = Path(images_dir).expanduser()
        self.panoptic_dir = None if panoptic_dir is None else Path(panoptic_dir).expanduser()
        self.transform = transform
        pair = (size, size) if _is_int(size) else size
        if (not isinstance(pair, Sequence) or len(pair) != 2 or not all(
                _is_int(s) and s > 0 for s in pair) or pair[0] * pair[1] > MAX_IMAGE_PIXELS):
            raise DataError(f"size must be a positive int or (height, width) of positive ints, "
                            f"at most {MAX_IMAGE_PIXELS} pixels; got {size!r}")
        self.segmentation_size = (int(pair[0]), int(pair[1]))
        self._shown = shown(self.annotations_json)
        for what, folder in (("images_dir", self.images_dir), ("panoptic_dir", self.panoptic_dir)):
            if folder is not None and not folder.is_dir():
                state = "is not a folder" if folder.exists() else "does not exist"
                raise DataError(f"{what} {shown(folder)} {state}")
        data = self._load_json()
        self._images = images = self._read_images(data)
        self._read_categories(data, categories)
        first = data["annotations"][0] if data["annotations"] else None
        self.panoptic = isinstance(first, dict) and "segments_info" in first
        if self.panoptic and self.panoptic_dir is None:
            raise DataError(f"{self._shown} is a panoptic JSON (its annotations have "
                            "segments_info): pass panoptic_dir=, the folder of its PNGs")
        if not self.panoptic and self.panoptic_dir is not None:
            raise DataError(f"panoptic_dir is given, but {self._shown} is an instance JSON "
                            "(no segments_info): leave panoptic_dir out, or give the panoptic JSON")
        self.image_ids = [im.id for im in images]
        position = {im.id: k for k, im in enumerate(images)}
        if self.panoptic:
            self._panoptic = self._read_panoptic(data["annotations"], position)
        else:
            self._instances = self._read_instances(data["annotations"], position)
        self._last_planes: tuple[int, list[str]] | None = None

    def _load_json(self) -> dict[str, Any]:
        text = read_utf8_text(self.annotations_json, f"COCO JSON {self._shown}",
                              rule="COCO JSON files are UTF-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{self._shown} line {exc.lineno} column {exc.colno}: not valid "
                            f"JSON ({exc.msg}); is the file cut short?") from None
        if not isinstance(data, dict):
            raise DataError(f"{self._shown} holds a JSON {type(data).__name__}, not the object "
                            "of a COCO annotation file")
        missing = [k for k in ("images", "categories", "annotations")
                   if not isinstance(data.get(k), list)]
        if missing:
            raise DataError(f"{self._shown} lacks the lists {missing} (a COCO annotation file "
                            "has 'images', 'categories' and 'annotations')")
        return data

    def _get(self, entry: Any, key: str, where: str, kind: str = "int") -> Any:
        """``entry[key]``, checked: ``kind`` is "int" (>= 0), "size" (> 0), "list" or "path"."""
        if not isinstance(entry, dict):
            raise DataError(f"{self._shown}: {where} is not a JSON object")
        if key not in entry:
            raise DataError(f"{self._shown}: {where} lacks the key {key!r}")
        value = entry[key]
        ok = {"int": _is_int(value) and 0 <= value < 1 << 63,
              "size": _is_int(value) and 0 < value <= MAX_IMAGE_PIXELS,
              "path": isinstance(value, str) and not _bad_path(value),
              "list": isinstance(value, list), "segm": isinstance(value, list) or (
                  isinstance(value, dict) and "counts" in value and "size" in value)}[kind]
        if not ok:
            expected = {"int": "a non-negative integer", "size": "a positive integer",
                        "list": "a list", "path": "a file name relative to the folder, that "
                        "stays inside it (not absolute, no '..')", "segm": "a list of polygons "
                        "or an RLE object with 'counts' and 'size'"}[kind]
            raise DataError(f"{self._shown}: {where} has {key} = {str(value)[:60]!r}, "
                            f"expected {expected}")
        return value

    def _read_images(self, data: dict[str, Any]) -> list[_Image]:
        images, seen = [], set()
        for k, entry in enumerate(data["images"]):
            where = f"images[{k}]"
            image_id = self._get(entry, "id", where)
            where = f"image {image_id}"
            if image_id in seen:
                raise DataError(f"{self._shown}: image id {image_id} appears twice in 'images'")
            seen.add(image_id)
            name = self._get(entry, "file_name", where, "path")
            h, w = (self._get(entry, k, where, "size") for k in ("height", "width"))
            check_pixels(h, w, f"{self._shown}: {where}")
            images.append(_Image(image_id, name, h, w))
        if not images:
            raise DataError(f"{self._shown} lists no images")
        return images

    def _read_categories(self, data: dict[str, Any], keep: Sequence[str | int] | None) -> None:
        table: dict[int, tuple[str, str]] = {}
        names: dict[str, int] = {}
        for k, entry in enumerate(data["categories"]):
            cid = self._get(entry, "id", f"categories[{k}]")
            where = f"category {cid}"
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise DataError(f"{self._shown}: {where} has no name (a non-empty string)")
            if cid in table:
                raise DataError(f"{self._shown}: category id {cid} appears twice")
            if name in names:
                raise DataError(f"{self._shown}: the category name {name!r} is used by ids "
                                f"{names[name]} and {cid}; concept names must be distinct")
            isthing = entry.get("isthing", 1)
            if isthing not in (0, 1) or isinstance(isthing, bool):
                raise DataError(f"{self._shown}: {where} has isthing = {isthing!r}, expected "
                                "0 or 1")
            table[cid] = (name, "object" if isthing else "stuff")
            names[name] = cid
        if not table:
            raise DataError(f"{self._shown} lists no categories")
        if keep is None:
            kept = sorted(table)
        else:
            if isinstance(keep, str | int):
                keep = [keep]
            kept_set = set()
            for want in keep:
                if _is_int(want) and want in table:
                    kept_set.add(want)
                elif isinstance(want, str) and want in names:
                    kept_set.add(names[want])
                else:
                    close = difflib.get_close_matches(str(want), list(names), n=5)
                    hint = f"; close matches: {close}" if close else ""
                    raise DataError(f"unknown COCO category {want!r} for {self._shown}{hint} "
                                    f"(it lists {len(table)} categories)")
            kept = sorted(kept_set)
            if not kept:
                raise DataError("categories= keeps no COCO category; give at least one name")
        self.coco_ids: dict[int, int] = {cid: n for n, cid in enumerate(kept, start=1)}
        self.concepts: list[Concept] = [Concept(n, *table[cid]) for cid, n in self.coco_ids.items()]
        self.categories: list[str] = [c for c in ("object", "stuff")
                                      if any(x.category == c for x in self.concepts)]
        self._all_ids = set(table)
        # concept number -> position of its category in self.categories (-1: number 0)
        self._group = np.array([-1, *(self.categories.index(c.category) for c in self.concepts)],
                               dtype=np.int64)

    def _check_category(self, cid: Any, where: str) -> int:
        """The concept number of COCO category ``cid`` (0: not kept)."""
        if not _is_int(cid) or cid not in self._all_ids:
            raise DataError(f"{self._shown}: {where} has category_id {str(cid)[:30]}, which "
                            "'categories' does not list")
        return self.coco_ids.get(cid, 0)

    def _check_image(self, entry: dict, where: str, position: dict[int, int]) -> int:
        image_id = self._get(entry, "image_id", where)
        if image_id not in position:
            raise DataError(f"{self._shown}: {where} has image_id {image_id}, which 'images' "
                            "does not list")
        return position[image_id]

    def _read_instances(self, annotations: list, position: dict[int, int]) -> list[list]:
        per_image: list[list[_Instance]] = [[] for _ in self._images]
        seen: set[int] = set()
        dropped = 0
        for k, entry in enumerate(annotations):
            ann_id = self._get(entry, "id", f"annotations[{k}]")
            where = f"annotation {ann_id}"
            if ann_id in seen:
                raise DataError(f"{self._shown}: annotation id {ann_id} appears twice")
            seen.add(ann_id)
            row = self._check_image(entry, where, position)
            number = self._check_category(entry.get("category_id"), where)
            segm = self._get(entry, "segmentation", where, "segm")
            segm = self._check_segmentation(segm, self._images[row], where)
            if isinstance(segm, list) and len(segm) < len(entry["segmentation"]):
                dropped += len(entry["segmentation"]) - len(segm)
            if number and (not isinstance(segm, list) or segm):
                per_image[row].append(_Instance(ann_id, number, segm))
        if dropped:
            log.warning("%s: %d polygon(s) with fewer than 3 points dropped (they cover no "
                        "area)", self._shown, dropped)
        for instances in per_image:
            instances.sort(key=operator.attrgetter("id"))
        return per_image

    def _check_segmentation(self, segm: Any, image: _Image, where: str) -> Any:
        """Structure and size of a segmentation (coordinates and counts: when decoded)."""
        if isinstance(segm, list):
            if not all(isinstance(poly, list) and len(poly) % 2 == 0 for poly in segm):
                raise DataError(f"{self._shown}: {where} has a polygon that is not a flat "
                                "list of x, y coordinates (an even count of numbers)")
            return [poly for poly in segm if len(poly) >= 6]
        size = segm["size"]
        if (not isinstance(size, list) or len(size) != 2
                or [image.height, image.width] != size):
            raise DataError(f"{self._shown}: {where} has an RLE of size {str(size)[:40]}, but "
                            f"image {image.id} is {image.height}x{image.width} ([height, width])")
        if not isinstance(segm["counts"], list | str):
            raise DataError(f"{self._shown}: {where} has RLE counts that are neither a list "
                            "(uncompressed) nor a string (compressed)")
        return segm

    def _read_panoptic(self, annotations: list, position: dict[int, int]) -> list:
        per_image: list[_Panoptic | None] = [None] * len(self._images)
        for k, entry in enumerate(annotations):
            where = f"annotations[{k}]"
            row = self._check_image(entry, where, position)
            where = f"the panoptic annotation of image {self._images[row].id}"
            if per_image[row] is not None:
                raise DataError(f"{self._shown}: image {self._images[row].id} has two panoptic "
                                "annotations")
            name = self._get(entry, "file_name", where, "path")
            segments: dict[int, int] = {}
            for j, seg in enumerate(self._get(entry, "segments_info", where, "list")):
                seg_id = self._get(seg, "id", f"{where}, segments_info[{j}]")
                if not 0 < seg_id <= _MAX_SEGMENT_ID or seg_id in segments:
                    raise DataError(f"{self._shown}: {where} has segment id {seg_id}: repeated, "
                                    f"or outside 1..{_MAX_SEGMENT_ID}")
                segments[seg_id] = self._check_category(seg.get("category_id"),
                                                        f"{where}, segment {seg_id}")
            per_image[row] = _Panoptic(name, segments)
        return per_image

    def instance_mask(self, i: int, ann_id: int) -> np.ndarray:
        """The mask of annotation ``ann_id`` of item ``i`` at the image's original size, as
        pycocotools decodes it: ``(height, width)`` uint8 of 0/1 (instance JSON only)."""
        i = self._check_index(i)
        for inst in self._instances[i]:
            if inst.id == ann_id:
                return self._decode(inst, self._images[i])
        raise DataError(f"item {i} has no kept annotation {ann_id}")

    def _decode(self, inst: _Instance, image: _Image) -> np.ndarray:
        """An instance's ``(height, width)`` uint8 0/1 mask: polygons rasterized and merged by
        pycocotools (``annToMask``); an RLE's run lengths checked, then expanded."""
        h, w = image.height, image.width
        where = f"{self._shown}: annotation {inst.id} (image {image.id})"
        segm = inst.segmentation
        if isinstance(segm, list):
            api = coco_mask_api()
            rle = api.merge(api.frPyObjects([_polygon(p, h, w, where) for p in segm], h, w))
            return api.decode(rle)
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) for c in counts):
                raise DataError(f"{where}: RLE counts hold a value that is not an integer")
        else:
            counts = _rle_counts(counts, where)
        if any(c < 0 for c in counts) or sum(counts) != h * w:
            raise DataError(f"{where}: the RLE's run lengths (sum {sum(counts)}, smallest "
                            f"{min(counts, default=0)}) do not cover its {h}x{w} = {h * w} "
                            "pixels: it is corrupt or cut short")
        runs = np.asarray(counts, dtype=np.int64)
        values = (np.arange(len(runs)) % 2).astype(np.uint8)  # runs of 0, 1, 0, ...
        return np.repeat(values, runs).reshape((h, w), order="F")  # column-major, as COCO

    def _instance_planes(self, i: int) -> tuple[list[np.ndarray], list[str]]:
        image = self._images[i]
        sh, sw = self.segmentation_size
        rows, cols = nearest_centers(image.height, sh), nearest_centers(image.width, sw)
        planes: dict[str, list[np.ndarray]] = {c: [] for c in self.categories}
        for inst in self._instances[i]:
            mask = self._decode(inst, image)[np.ix_(rows, cols)].astype(bool)
            if not mask.any():
                continue
            number, group = inst.number, planes[self.categories[self._group[inst.number]]]
            for plane in group:
                under = plane[mask]
                if np.all((under == 0) | (under == number)):
                    plane[mask] = number
                    break
            else:
                plane = np.zeros((sh, sw), dtype=np.int64)
                plane[mask] = number
                group.append(plane)
        out, cats = [], []
        for cat in self.categories:
            group = planes[cat] or [np.zeros((sh, sw), dtype=np.int64)]
            out.extend(group)
            cats.extend([cat] * len(group))
        return out, cats

    def _panoptic_planes(self, i: int) -> tuple[list[np.ndarray], list[str]]:
        entry, image = self._panoptic[i], self._images[i]
        if entry is None:
            return [], []
        path = os.path.join(self.panoptic_dir, entry.file_name)
        what = f"{self._shown}: panoptic PNG {shown(path)} of image {image.id}"
        data = read_file_bytes(path, what)
        if not data.startswith(PNG_SIGNATURE):
            raise DataError(f"{what} is not a PNG file; panoptic segment ids are stored in "
                            "lossless PNGs")
        size = header_size(data, what)
        if size != (image.height, image.width):
            raise DataError(f"{what} is {size[0]}x{size[1]}, but the image entry says "
                            f"{image.height}x{image.width}")
        arr = decode_image(data, cv2.IMREAD_UNCHANGED, what)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise DataError(f"{what} has shape {arr.shape} and dtype {arr.dtype}; expected "
                            "8-bit RGB with segment id = R + 256 * G + 256**2 * B")
        ids = (arr[:, :, 2].astype(np.int64) + (arr[:, :, 1].astype(np.int64) << 8)
               + (arr[:, :, 0].astype(np.int64) << 16))
        present, inverse = np.unique(ids, return_inverse=True)
        unknown = [int(v) for v in present if v and int(v) not in entry.segments]
        if unknown:
            raise DataError(f"{what} holds segment ids {unknown[:10]} that its segments_info "
                            "does not list")
        numbers = np.array([entry.segments.get(int(v), 0) for v in present], dtype=np.int64)
        sh, sw = self.segmentation_size
        rows, cols = nearest_centers(image.height, sh), nearest_centers(image.width, sw)
        labels = numbers[inverse.reshape(ids.shape)[np.ix_(rows, cols)]]
        group = self._group[labels]
        planes = [np.where(group == k, labels, 0) for k in range(len(self.categories))]
        return planes, list(self.categories)

    def _planes(self, i: int) -> tuple[np.ndarray, list[str]]:
        planes, cats = (self._panoptic_planes(i) if self.panoptic
                        else self._instance_planes(i))
        self._last_planes = (i, cats)
        if not planes:
            return np.empty((0, *self.segmentation_size), dtype=np.int64), cats
        return np.stack(planes), cats

    def __len__(self) -> int:
        return len(self._images)

    def _check_index(self, i: int) -> int:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        return i % len(self)

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this dataset's annotations for the annotation cache
        (:mod:`dissect.datasets.annotation_cache`): the JSON file (path, size, modification
        time), the size, the kept COCO ids, the panoptic PNGs' stamps and
        :data:`DECODING_VERSION`."""
        path = self.annotations_json.resolve()
        pan = self.panoptic_dir
        return {"dataset": "CocoConcepts", "json": str(path), "items": len(self),
                "stamp": file_stamps(path.parent, [path.name]), "decoding": DECODING_VERSION,
                "size": list(self.segmentation_size), "coco_ids": list(self.coco_ids),
                "panoptic_dir": None if pan is None else str(pan.resolve()),
                "pngs": file_stamps(pan, [e.file_name for e in self._panoptic if e])
                if self.panoptic else None}

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        """The category of each pixel-label plane and each image-level label of item ``i``
        (decodes the item's masks, unless it is the item decoded last)."""
        i = self._check_index(i)
        last = self._last_planes
        if last is None or last[0] != i:
            self._planes(i)
            last = self._last_planes
        return list(last[1]), []

    def read_image(self, i: int) -> np.ndarray:
        """The image of item ``i`` as an ``(height, width, 3)`` uint8 RGB array, at its size
        in the JSON (no resize, no transform)."""
        image = self._images[self._check_index(i)]
        path = os.path.join(self.images_dir, image.file_name)
        what = f"{self._shown}: image {image.id} file {shown(path)}"
        data = read_file_bytes(path, what)
        size = header_size(data, what)
        expect = (image.height, image.width)
        if size is not None and size != expect:
            raise DataError(f"{what} is {size[0]}x{size[1]}, but the image entry says "
                            f"{expect[0]}x{expect[1]}")
        bgr = decode_image(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, what)
        if bgr.shape[:2] != expect:
            raise DataError(f"{what} is {bgr.shape[0]}x{bgr.shape[1]}, but the image entry "
                            f"says {expect[0]}x{expect[1]}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def annotations(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its image: ``pixel_labels``, ``image_labels``, ``annotated``,
        ``index`` (what scoring needs; skips decoding the photograph)."""
        i = self._check_index(i)
        planes, cats = self._planes(i)
        return {
            "pixel_labels": torch.from_numpy(planes),
            "image_labels": torch.zeros(0, dtype=torch.int64),
            "annotated": torch.tensor([c in cats for c in self.categories], dtype=torch.bool),
            "index": i,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.annotations(i)
        rgb, (sh, sw) = self.read_image(item["index"]), self.segmentation_size
        image = rgb_to_tensor(resize_rgb(rgb, (sh, sw)))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, **item}

    def __repr__(self) -> str:
        kind, (h, w) = "panoptic" if self.panoptic else "instances", self.segmentation_size
        return (f"CocoConcepts({str(self.annotations_json)!r}, {kind}: {len(self)} images, "
                f"{len(self.concepts)} concepts in {self.categories}, size {h}x{w})")
