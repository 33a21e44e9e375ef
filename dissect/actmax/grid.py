"""Writing optimized images: one PNG grid, or one PNG per unit for reports (OpenCV)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .._plumbing.images import batch_uint8, write_png
from .._plumbing.paths import unit_image_path
from ..errors import DataError

PAD_VALUE = 255  # white gutters between tiles


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
    tiles = batch_uint8(images)
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
    return write_png(path, make_grid(images, ncol=ncol, labels=labels, pad=pad))


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
    tiles = batch_uint8(images)
    units = [int(u) for u in units]
    if len(units) != len(tiles):
        raise DataError(f"{len(units)} units for {len(tiles)} images: give one unit per image")
    return {u: write_png(unit_image_path(out_dir, layer, u), t)
            for u, t in zip(units, tiles, strict=True)}
