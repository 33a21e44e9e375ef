"""Attribution maps as pictures: OpenCV colormaps, overlays on the image, PNG files."""

from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .._plumbing.images import rgb_float, write_png
from ..errors import DataError

log = logging.getLogger("dissect.attribution")

SIGNS = ("absolute", "positive", "negative")


def colormap_code(colormap: str | int) -> int:
    """The OpenCV colormap constant for a name (``"jet"``, ``"inferno"``, ``"turbo"``, ...).

    Parameters
    ----------
    colormap
        The name of an OpenCV ``cv2.COLORMAP_*`` constant, case-insensitive, with or without
        the prefix (``"jet"``, ``"COLORMAP_JET"``), or the constant itself.

    Returns
    -------
    int
    """
    if isinstance(colormap, numbers.Integral) and not isinstance(colormap, bool):
        return int(colormap)
    name = str(colormap).upper().removeprefix("CV2.").removeprefix("COLORMAP_")
    code = getattr(cv2, f"COLORMAP_{name}", None)
    if code is None:
        names = sorted(n[9:].lower() for n in dir(cv2) if n.startswith("COLORMAP_"))
        raise DataError(f"unknown colormap {colormap!r}; OpenCV has: {', '.join(names)}")
    return int(code)


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


def normalize_map(
    attribution: Any, *, sign: str = "absolute", clip: float = 99.0,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Reduce an attribution to an ``(H, W)`` float32 map in [0, 1] for display.

    Parameters
    ----------
    attribution
        ``(H, W)`` or ``(C, H, W)`` tensor or array (one input's map). Channels are summed,
        as captum's ``visualize_image_attr`` does.
    sign
        ``"absolute"``: the magnitude ``|a|``; ``"positive"``: evidence for the target only;
        ``"negative"``: evidence against it only.
    clip
        Percentile of the map shown at full intensity (higher values saturate): 99 keeps a few
        extreme pixels from darkening the rest; 100 scales by the maximum.
    size
        ``(H, W)`` to resize to (bilinear), or ``None``.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` in [0, 1].
    """
    a = _to_numpy(attribution).astype(np.float32)
    while a.ndim > 3 and a.shape[0] == 1:  # a batch of one
        a = a[0]
    if a.ndim == 3:
        a = a.sum(axis=0)
    if a.ndim != 2:
        raise DataError(f"an (H, W) or (C, H, W) attribution is needed, got shape {a.shape}")
    if sign == "absolute":
        a = np.abs(a)
    elif sign == "positive":
        a = np.maximum(a, 0)
    elif sign == "negative":
        a = np.maximum(-a, 0)
    else:
        raise DataError(f"sign must be one of {SIGNS}, got {sign!r}")
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if not 0 < clip <= 100:
        raise DataError(f"clip is a percentile in (0, 100], got {clip!r}")
    top = float(np.percentile(a, clip))
    if top <= 0:
        top = float(a.max())
    a = np.clip(a / top, 0, 1) if top > 0 else np.zeros_like(a)
    if size is not None and a.shape != tuple(size):
        a = np.clip(cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_LINEAR), 0, 1)
    return a.astype(np.float32)


def heatmap(attribution: Any, colormap: str | int = "jet", **kwargs: Any) -> np.ndarray:
    """Color an attribution with an OpenCV colormap.

    Parameters
    ----------
    attribution
        ``(H, W)`` or ``(C, H, W)``; see :func:`normalize_map`.
    colormap
        OpenCV colormap name or constant (see :func:`colormap_code`).
    **kwargs
        ``sign``, ``clip`` and ``size`` of :func:`normalize_map`.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    m = normalize_map(attribution, **kwargs)
    bgr = cv2.applyColorMap(np.round(m * 255).astype(np.uint8), colormap_code(colormap))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_array(image: Any) -> np.ndarray:
    """An image as an ``(H, W, 3)`` float32 RGB array in [0, 1] (the forms
    :func:`dissect._plumbing.images.rgb_float` takes: ``(3, H, W)`` tensors, ``(H, W, 3)``
    arrays, uint8 or float in [0, 1]; a normalized model input must be denormalized first)."""
    return rgb_float(image)


def overlay(
    image: Any,
    attribution: Any,
    colormap: str | int = "jet",
    *,
    alpha: float = 0.5,
    sign: str = "absolute",
    clip: float = 99.0,
) -> np.ndarray:
    """Blend a colored attribution map over its image.

    Parameters
    ----------
    image
        The input as a picture: ``(3, H, W)`` tensor in [0, 1] or ``(H, W, 3)`` uint8 array
        (see :func:`image_array`).
    attribution
        That input's map: ``(C, H, W)`` (pixel attributions; channels are summed), or
        ``(h, w)`` (e.g. Grad-CAM; resized bilinearly to the image when smaller).
    colormap
        OpenCV colormap name (``"jet"``, ``"inferno"``, ``"viridis"``, ``"turbo"``, ...) or
        ``cv2.COLORMAP_*`` constant.
    alpha
        Weight of the colored map: ``(1 - alpha) * image + alpha * heatmap``.
    sign, clip
        See :func:`normalize_map`.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB; write it with :func:`save_png`.
    """
    if not 0 <= alpha <= 1:
        raise DataError(f"alpha must be in [0, 1], got {alpha!r}")
    rgb = image_array(image)
    colors = heatmap(attribution, colormap, sign=sign, clip=clip, size=rgb.shape[:2])
    blended = (1 - alpha) * rgb + alpha * (colors.astype(np.float32) / 255.0)
    return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def save_png(path: str | Path, image: Any) -> Path:
    """Write an RGB image (``(H, W, 3)`` uint8 array, or see :func:`image_array`) as PNG.

    Parameters
    ----------
    path
        The file; parent folders are created.
    image
        What :func:`overlay` or :func:`heatmap` returned, or any image :func:`image_array`
        takes.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    return write_png(path, image)
