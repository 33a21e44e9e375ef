"""Each unit's top images with its active region outlined and the rest dimmed.

Network Dissection's figures show, for a unit, the images that excite it most with the region
where its upsampled activation exceeds the threshold ``T_k`` kept bright and outlined, and the
rest of each image dimmed. :func:`render_unit_images` draws those strips once, at analysis time,
as PNG files; the report (:mod:`dissect.report`) only links them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DissectError
from ..store import ActivationStore

log = logging.getLogger(__name__)

DIM = 0.3  # brightness kept outside the active region
OUTLINE_RGB = (255, 221, 0)  # a yellow that reads on dark and light images


def unit_image_path(directory: str | Path, layer: str, unit: int) -> Path:
    """Where a unit's image of a layer lives: ``directory/<layer>/unit_<unit:04d>.png``."""
    return Path(directory) / layer / f"unit_{unit:04d}.png"


@contextlib.contextmanager
def _raw_images(dataset: Any) -> Iterator[Any]:
    """The dataset with its transform removed (images as RGB floats in [0, 1])."""
    saved = getattr(dataset, "transform", None)
    if hasattr(dataset, "transform"):
        dataset.transform = None
    try:
        yield dataset
    finally:
        if hasattr(dataset, "transform"):
            dataset.transform = saved


def outline_strip(
    images: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    threshold: float,
    *,
    size: int = 96,
    gap: int = 3,
) -> np.ndarray:
    """Tile images side by side, each dimmed outside ``map > threshold`` and outlined.

    Parameters
    ----------
    images
        ``(H, W, 3)`` uint8 RGB images.
    maps
        One activation map ``(h, w)`` per image; each is upsampled bilinearly
        (``align_corners=False``, as Network Dissection scores it) to its image's size.
    threshold
        The unit's threshold ``T_k``.
    size
        Side of each square thumbnail in pixels.
    gap
        White pixels between thumbnails.

    Returns
    -------
    numpy.ndarray
        ``(size, n * size + (n - 1) * gap, 3)`` uint8 RGB.
    """
    if len(images) != len(maps):
        raise DissectError(f"{len(images)} images but {len(maps)} activation maps")
    n = len(images)
    strip = np.full((size, max(1, n * size + (n - 1) * gap), 3), 255, dtype=np.uint8)
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        h, w = image.shape[:2]
        up = F.interpolate(torch.as_tensor(amap, dtype=torch.float32)[None, None], size=(h, w),
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        active = (up > threshold).astype(np.uint8)
        shown = image.astype(np.float32) * np.where(active[..., None] > 0, 1.0, DIM)
        thumb = cv2.resize(shown.clip(0, 255).astype(np.uint8), (size, size),
                           interpolation=cv2.INTER_AREA)
        small = cv2.resize(active, (size, size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumb, contours, -1, OUTLINE_RGB, 1, lineType=cv2.LINE_AA)
        x0 = i * (size + gap)
        strip[:, x0:x0 + size] = thumb
    return strip


def _as_uint8(image: Any) -> np.ndarray:
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else image
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def render_unit_images(
    result: Any,
    store: ActivationStore | str | Path,
    dataset: Any,
    directory: str | Path,
    *,
    layers: Sequence[str] | None = None,
    units: dict[str, Sequence[int]] | int | None = 64,
    k: int = 5,
    size: int = 96,
    progress: bool = True,
) -> dict[str, dict[int, Path]]:
    """Write each unit's top-``k`` images, active region outlined, as one PNG strip.

    Parameters
    ----------
    result
        A :class:`~dissect.netdissect.DissectionResult` (thresholds and top images).
    store
        The :class:`~dissect.store.ActivationStore` it was computed from (or its path): the
        activation maps, read row by row.
    dataset
        The dataset the store was captured over (``dataset[i]["image"]``); its ``transform``
        is switched off while images are read, so they are shown as they are.
    directory
        Output folder: strips go to ``directory/<layer>/unit_<k:04d>.png``.
    layers
        Layers to draw (default: all of ``result.layers``).
    units
        Per layer, the units to draw; an int ``n`` draws the ``n`` units with the highest IoU
        (``None``: every unit).
    k
        Images per unit.
    size
        Thumbnail side in pixels.
    progress
        Show a progress bar.

    Returns
    -------
    dict
        ``{layer: {unit: path}}`` of the written files.
    """
    opened = not isinstance(store, ActivationStore)
    store = ActivationStore(store) if opened else store
    try:
        rows = {int(i): r for r, i in enumerate(store.index)}
        written: dict[str, dict[int, Path]] = {}
        todo = []
        for layer in layers or result.layers:
            if layer not in store:
                raise DissectError(f"layer {layer!r} is not in the store {store.path}")
            if store[layer].ndim != 4:
                raise DissectError(
                    f"layer {layer!r} was captured pooled, shape {store[layer].shape}: unit "
                    "images need spatial maps (capture without --pool)")
            if isinstance(units, dict):
                chosen = [int(u) for u in units.get(layer, [])]
            else:
                best = [u.unit for u in sorted(result.units(layer), key=lambda u: -u.iou)]
                chosen = best if units is None else best[:units]
            todo += [(layer, u) for u in chosen]
        with _raw_images(dataset) as raw, tqdm(todo, desc="unit images", unit="unit",
                                               disable=not progress, leave=False) as bar:
            cache: dict[int, np.ndarray] = {}
            for layer, unit in bar:
                images, maps = [], []
                for index in result.top_images(layer, k)[unit]:
                    index = int(index)
                    if index not in rows:
                        continue
                    if index not in cache:
                        cache[index] = _as_uint8(raw[index]["image"])
                    images.append(cache[index])
                    maps.append(np.asarray(store[layer][rows[index], unit], dtype=np.float32))
                strip = outline_strip(images, maps, float(result.thresholds(layer)[unit]),
                                      size=size)
                path = unit_image_path(directory, layer, unit)
                path.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR)):
                    raise DissectError(f"could not write {path}")
                written.setdefault(layer, {})[unit] = path
                if len(cache) > 4096:
                    cache.clear()
        log.info("wrote %d unit images to %s", len(todo), directory)
        return written
    finally:
        if opened:
            store.close()
