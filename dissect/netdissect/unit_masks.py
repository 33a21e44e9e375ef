"""Each unit's top images with the pixels it marks active, for figures such as the paper's.

Network Dissection's figures show a unit's most activating images with the region where its
upsampled activation exceeds ``T_k``. This module computes those regions with the semantics
the IoU uses (bilinear upsampling, ``align_corners=False``, finite and strictly greater than
``T_k``), at each image's own resolution; :func:`dissect.report.render_unit_images` only draws them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._plumbing.images import rgb_uint8
from ..errors import DissectError
from ..store import ActivationStore


def active_mask(amap: np.ndarray | torch.Tensor, threshold: float,
                size: tuple[int, int]) -> np.ndarray:
    """Where a unit's map, upsampled to ``size``, exceeds its threshold.

    Parameters
    ----------
    amap
        ``(h, w)`` activation map of one unit on one image.
    threshold
        The unit's ``T_k``.
    size
        ``(H, W)`` to upsample to (bilinear, ``align_corners=False``, as the IoU is scored).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool: ``upsampled > threshold`` where the upsampled value is finite (a
        pixel reading a NaN or an infinity is never active, as the IoU counts it).
    """
    up = F.interpolate(torch.as_tensor(np.asarray(amap), dtype=torch.float32)[None, None],
                       size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return ((up > threshold) & torch.isfinite(up)).numpy()


@dataclass(frozen=True)
class UnitTopImages:
    """One unit's top images and the pixels it marks active on each.

    Attributes
    ----------
    layer, unit
        The unit.
    threshold
        Its ``T_k``.
    indices
        Dataset indices of the images, strongest first (images outside the store are skipped).
    images
        ``(H, W, 3)`` uint8 RGB, as the dataset holds them (its ``transform`` switched off).
    masks
        ``(H, W)`` bool per image: :func:`active_mask` at the image's size.
    """

    layer: str
    unit: int
    threshold: float
    indices: list[int]
    images: list[np.ndarray]
    masks: list[np.ndarray]


@contextlib.contextmanager
def raw_images(dataset: Any) -> Iterator[Any]:
    """The dataset with its ``transform`` removed (images as stored), restored on exit."""
    saved = getattr(dataset, "transform", None)
    if hasattr(dataset, "transform"):
        dataset.transform = None
    try:
        yield dataset
    finally:
        if hasattr(dataset, "transform"):
            dataset.transform = saved


def chosen_units(result: Any, layer: str, units: dict[str, Sequence[int]] | int | None
                 ) -> list[int]:
    """The units of ``layer`` to show: listed per layer, or the ``n`` with the highest IoU
    (``None``: every unit, best first)."""
    if isinstance(units, dict):
        return [int(u) for u in units.get(layer, [])]
    best = [u.unit for u in sorted(result.units(layer), key=lambda u: -u.iou)]
    return best if units is None else best[:units]


def unit_top_images(
    result: Any,
    store: ActivationStore,
    dataset: Any,
    todo: Sequence[tuple[str, int]],
    *,
    k: int = 5,
    cache_size: int = 4096,
) -> Iterator[UnitTopImages]:
    """Yield :class:`UnitTopImages` for each ``(layer, unit)`` of ``todo``.

    Parameters
    ----------
    result
        A :class:`~dissect.netdissect.DissectionResult` (thresholds and top images).
    store
        The store it was computed from: the activation maps, read row by row.
    dataset
        The dataset the store was captured over (``dataset[i]["image"]``); its ``transform``
        is switched off while images are read.
    todo
        ``(layer, unit)`` pairs, in the order to yield them.
    k
        Images per unit.
    cache_size
        Decoded images kept in memory between units (units share top images).
    """
    rows = {int(i): r for r, i in enumerate(store.index)}
    for layer in dict.fromkeys(layer for layer, _ in todo):
        if layer not in store:
            raise DissectError(f"layer {layer!r} is not in the store {store.path}")
        if store[layer].ndim != 4:
            raise DissectError(
                f"layer {layer!r} was captured pooled, shape {store[layer].shape}: unit "
                "images need spatial maps (capture without pool)")
    with raw_images(dataset) as raw:
        cache: dict[int, np.ndarray] = {}
        for layer, unit in todo:
            threshold = float(result.thresholds(layer)[unit])
            indices, images, masks = [], [], []
            for index in result.top_images(layer, k)[unit]:
                index = int(index)
                if index not in rows:
                    continue
                if index not in cache:
                    if len(cache) >= cache_size:
                        cache.clear()
                    cache[index] = rgb_uint8(raw[index]["image"])
                image = cache[index]
                amap = np.asarray(store[layer][rows[index], unit], dtype=np.float32)
                indices.append(index)
                images.append(image)
                masks.append(active_mask(amap, threshold, image.shape[:2]))
            yield UnitTopImages(layer, unit, threshold, indices, images, masks)
