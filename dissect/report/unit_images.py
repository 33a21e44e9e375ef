"""Drawing each unit's top images with its active region outlined and the rest dimmed.

Network Dissection's figures show, for a unit, the images that excite it most with the region
where its upsampled activation exceeds the threshold ``T_k`` kept bright and outlined, and the
rest of each image dimmed. Which images and which pixels is analysis work
(:mod:`dissect.netdissect.unit_masks`); this module only draws the strips as PNG files, once,
at analysis time, and the report links them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .._plumbing.images import write_png
from .._plumbing.paths import unit_image_path
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ..netdissect.unit_masks import active_mask, chosen_units, unit_top_images
from ..store import ActivationStore

log = logging.getLogger(__name__)

DIM = 0.3  # brightness kept outside the active region
OUTLINE_RGB = (255, 221, 0)  # a yellow that reads on dark and light images


def outline_strip(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    threshold: float | None = None,
    *,
    size: int = 96,
    gap: int = 3,
) -> np.ndarray:
    """Tile images side by side, each dimmed outside its active region and outlined.

    Parameters
    ----------
    images
        ``(H, W, 3)`` uint8 RGB images.
    masks
        One ``(H, W)`` bool active region per image (see
        :func:`dissect.netdissect.unit_masks.active_mask`); or, with ``threshold``, one
        activation map ``(h, w)`` per image, made into that region here.
    threshold
        The unit's threshold ``T_k`` when ``masks`` are activation maps.
    size
        Side of each square thumbnail in pixels.
    gap
        White pixels between thumbnails.

    Returns
    -------
    numpy.ndarray
        ``(size, n * size + (n - 1) * gap, 3)`` uint8 RGB.
    """
    if len(images) != len(masks):
        raise DissectError(f"{len(images)} images but {len(masks)} activation masks")
    n = len(images)
    strip = np.full((size, max(1, n * size + (n - 1) * gap), 3), 255, dtype=np.uint8)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if threshold is not None:
            mask = active_mask(mask, threshold, image.shape[:2])
        active = np.asarray(mask, dtype=np.uint8)
        if active.shape != image.shape[:2]:
            raise DissectError(f"mask {i} is {active.shape}, its image {image.shape[:2]}")
        shown = image.astype(np.float32) * np.where(active[..., None] > 0, 1.0, DIM)
        thumb = cv2.resize(shown.clip(0, 255).astype(np.uint8), (size, size),
                           interpolation=cv2.INTER_AREA)
        small = cv2.resize(active, (size, size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumb, contours, -1, OUTLINE_RGB, 1, lineType=cv2.LINE_AA)
        x0 = i * (size + gap)
        strip[:, x0:x0 + size] = thumb
    return strip


def render_unit_images(
    result: Any,
    store: ActivationStore | str | Path,
    dataset: Any,
    out_dir: str | Path,
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
    out_dir
        Output folder: strips go to ``out_dir/<layer>/unit_<k:04d>.png``
        (:func:`dissect._plumbing.paths.unit_image_path`).
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
        todo = [(layer, u) for layer in (layers or result.layers)
                for u in chosen_units(result, layer, units)]
        written: dict[str, dict[int, Path]] = {}
        with progress_bar(len(todo), "unit images", progress, unit="unit") as bar:
            for top in unit_top_images(result, store, dataset, todo, k=k):
                strip = outline_strip(top.images, top.masks, size=size)
                path = write_png(unit_image_path(out_dir, top.layer, top.unit), strip)
                written.setdefault(top.layer, {})[top.unit] = path
                bar.update(1)
        log.info("wrote %d unit images to %s", len(todo), out_dir)
        return written
    finally:
        if opened:
            store.close()
