"""Writing optimized images: one PNG grid, or one PNG per unit for reports (OpenCV)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import DataError

PAD_VALUE = 255  # white gutters between tiles


def _as_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` tensor / array in [0, 1] -> ``(N, H, W, 3)`` uint8 RGB."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else (
        np.asarray(images, dtype=np.float32))
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise DataError(f"images must be (N, 3, H, W) in [0, 1], got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0)
    return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: torch.Tensor | np.ndarray, ncol: int = 8, labels: Sequence[str] | None = None,
              pad: int = 2) -> np.ndarray:
    """Tile images row by row into one picture, optionally with a caption under each.

    Parameters
    ----------
    images
        ``(N, 3, H, W)`` in [0, 1] (what :func:`~dissect.actmax.visualize` returns).
    ncol
        Tiles per row.
    labels
        One caption per image (``None``: no captions).
    pad
        White gutter in pixels between tiles and around the grid.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    tiles = _as_uint8(images)
    n, h, w, _ = tiles.shape
    if n == 0:
        raise DataError("no images to put in a grid")
    if isinstance(ncol, bool) or not isinstance(ncol, int) or ncol < 1:
        raise DataError(f"ncol must be a positive integer, got {ncol!r}")
    if labels is not None and len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} images: give one per image")
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    font = max(0.3, min(1.0, w / 256))
    caption = 0 if labels is None else int(round(22 * font)) + 4
    cell_h, cell_w = h + caption + pad, w + pad
    grid = np.full((nrow * cell_h + pad, ncol * cell_w + pad, 3), PAD_VALUE, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        y, x = pad + r * cell_h, pad + c * cell_w
        grid[y:y + h, x:x + w] = tiles[k]
        if labels is not None:
            text = str(labels[k])
            (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
            while tw > w and len(text) > 4:  # shorten from the left: keep the unit number
                text = "~" + text[2:]
                (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
            cv2.putText(grid, text, (x, y + h + caption - 6), cv2.FONT_HERSHEY_SIMPLEX, font,
                        (0, 0, 0), 1, cv2.LINE_AA)
    return grid


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise DataError(f"could not write {path}: check the folder is writable and ends in .png")
    return path


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, ncol: int = 8,
              labels: Sequence[str] | None = None, pad: int = 2) -> Path:
    """Write images as one PNG grid (see :func:`make_grid`).

    Parameters
    ----------
    images
        ``(N, 3, H, W)`` in [0, 1].
    path
        The PNG file; parent folders are created.
    ncol, labels, pad
        See :func:`make_grid`.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    return _write(Path(path), make_grid(images, ncol=ncol, labels=labels, pad=pad))


def unit_image_path(out_dir: str | Path, layer: str, unit: int) -> Path:
    """``out_dir/<layer>/unit_<unit:04d>.png`` (path separators in the layer name become ``_``)."""
    safe = layer.replace("/", "_").replace("\\", "_") or "output"
    return Path(out_dir) / safe / f"unit_{unit:04d}.png"


def save_unit_images(images: torch.Tensor | np.ndarray, out_dir: str | Path, layer: str,
                     units: Sequence[int]) -> dict[int, Path]:
    """Write one PNG per unit as ``out_dir/<layer>/unit_<k:04d>.png`` (for layer reports).

    Parameters
    ----------
    images
        ``(N, 3, H, W)`` in [0, 1], image ``i`` showing ``units[i]``.
    out_dir
        Root folder; ``<layer>/`` is created inside.
    layer
        Layer name (the sub-folder).
    units
        The unit of each image.

    Returns
    -------
    dict
        ``{unit: path}`` in the order given.
    """
    tiles = _as_uint8(images)
    units = [int(u) for u in units]
    if len(units) != len(tiles):
        raise DataError(f"{len(units)} units for {len(tiles)} images: give one unit per image")
    return {u: _write(unit_image_path(out_dir, layer, u), t)
            for u, t in zip(units, tiles, strict=True)}
