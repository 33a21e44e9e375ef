"""Images as arrays and PNG files: the one conversion to uint8 RGB and the one PNG writer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger("dissect")


def rgb_float(image: Any) -> np.ndarray:
    """An image as an ``(H, W, 3)`` float32 RGB array in [0, 1].

    Parameters
    ----------
    image
        A ``(3, H, W)`` or ``(H, W)`` tensor (float in [0, 1], or uint8), or an ``(H, W, 3)``
        or ``(H, W)`` array (uint8, or float in [0, 1]); a leading batch dim of 1 is
        dropped, one channel is repeated to three and a fourth (alpha) is dropped. A
        normalized model input is not an image: undo the normalization first
        (``transform.denormalize(x)``); values outside [0, 1] are clipped with a warning,
        NaN shows as 0.

    Returns
    -------
    numpy.ndarray
    """
    channels_first = isinstance(image, torch.Tensor)  # torch's layout; numpy's is (H, W, C)
    arr = image.detach().cpu().numpy() if channels_first else np.asarray(image)
    while arr.ndim > 3 and arr.shape[0] == 1:  # a batch of one
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and (
        channels_first or arr.shape[2] not in (1, 3, 4)
    ):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DataError(f"an RGB image (3, H, W) or (H, W, 3) is needed, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        log.warning(
            "image values span [%.2f, %.2f], outside [0, 1]: clipped; pass the unnormalized "
            "image (e.g. transform.denormalize(x))", float(arr.min()), float(arr.max())
        )
    return np.clip(arr, 0, 1)


def rgb_uint8(image: Any) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8 RGB (any form :func:`rgb_float` takes; uint8 RGB
    arrays pass through unchanged). Floats are rounded: ``round(255 * value)``."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
            and image.shape[2] == 3:
        return image
    return np.round(rgb_float(image) * 255).astype(np.uint8)


def batch_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` (or one ``(3, H, W)``) images in [0, 1] -> ``(N, H, W, 3)`` uint8 RGB.

    NaN becomes 0; values are clipped to [0, 1] and rounded, as in :func:`rgb_uint8`.
    """
    arr = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else (
        np.asarray(images, dtype=np.float32))
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise DataError(f"images must be (N, 3, H, W) in [0, 1], got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0)
    return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_png(path: str | Path, image: Any) -> Path:
    """Write an RGB image as PNG (OpenCV); parent folders are created.

    Parameters
    ----------
    path
        The file (it should end in ``.png``).
    image
        ``(H, W, 3)`` uint8 RGB, or any image :func:`rgb_float` takes.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    DataError
        When the file cannot be written (a read-only folder, a parent that is a file, an
        unknown extension).
    """
    path = Path(path)
    rgb = rgb_uint8(image)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ok = cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    except (OSError, cv2.error) as exc:
        raise DataError(f"could not write {path}: {exc}") from exc
    if not ok:
        raise DataError(f"could not write {path}: check the folder is writable and ends in .png")
    return path
