"""Zeiler & Fergus's grid image: projections beside image patches, one block per unit (OpenCV)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.images import write_png
from .._plumbing.paths import unit_image_path
from ..errors import DataError
from .patches import TopPatches

BACKGROUND = 255
TILE_GAP = 2
BLOCK_GAP = 12
LABEL_HEIGHT = 16
MIN_TILE = 48
MAX_TILE = 128


def projection_image(projection: torch.Tensor | np.ndarray, *, scale: float | None = None,
                     clip: float = 99.5) -> np.ndarray:
    """Show a projection as a picture: zero is mid-gray, large magnitudes saturate.

    Parameters
    ----------
    projection
        ``(C, H, W)`` (3 channels shown as RGB; another count is summed to gray).
    scale
        The magnitude shown at full contrast. ``None``: the ``clip`` percentile of the
        projection's nonzero ``|p|``, each projection normalized on its own (as in Zeiler &
        Fergus's figures).
    clip
        Percentile used when ``scale`` is None: 100 scales by the maximum; the default lets a
        few extreme pixels saturate so that the rest of the pattern stays visible.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    p = projection.detach().float().cpu().numpy() if isinstance(projection, torch.Tensor) \
        else np.asarray(projection, dtype=np.float32)
    if p.ndim != 3:
        raise DataError(f"a (C, H, W) projection is needed, got shape {p.shape}")
    if p.shape[0] != 3:
        p = np.repeat(p.sum(axis=0, keepdims=True), 3, axis=0)
    if scale is None:
        magnitudes = np.abs(p[p != 0])
        top = float(np.percentile(magnitudes, clip)) if magnitudes.size else 0.0
    else:
        top = float(scale)
    shown = 0.5 + 0.5 * p / top if top > 0 else np.full_like(p, 0.5)
    return np.round(np.clip(shown, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)


def _denormalizer(denormalize: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from model inputs back to images in [0, 1]: a ``Preprocess``'s
    ``denormalize``, a callable, or ``None`` (stretch each patch to [0, 1])."""
    if denormalize is None:
        return None
    method = getattr(denormalize, "denormalize", None)  # a dissect.models.Preprocess
    if callable(method):
        return method
    if not callable(denormalize):
        raise DataError(f"denormalize must be a dissect.models.Preprocess or a callable on "
                        f"(C, H, W) model inputs, got {type(denormalize).__name__}")
    return denormalize


def _picture(image: torch.Tensor, denormalize: Callable | None) -> np.ndarray:
    """A model-input patch as uint8 RGB: denormalized, or stretched to [0, 1]."""
    x = image.detach().float().cpu()
    if denormalize is not None:
        x = denormalize(x)
    else:
        low, high = float(x.min()), float(x.max())
        x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    if x.shape[0] != 3:
        x = x.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return np.round(x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def tile_size(patches: TopPatches, tile: int | None) -> int:
    """``tile``, or for ``None`` the patches' own size: small ones enlarged by an integer
    factor to at least :data:`MIN_TILE` pixels, large ones reduced to :data:`MAX_TILE`."""
    if tile is not None:
        if tile < 4:
            raise DataError(f"tile must be >= 4 pixels, got {tile}")
        return int(tile)
    side = max(patches.images.shape[-2:])
    if side >= MAX_TILE:
        return MAX_TILE
    return side * max(1, math.ceil(MIN_TILE / side))


def _fit(picture: np.ndarray, tile: int) -> np.ndarray:
    """Resize to fit a ``tile`` square (aspect kept; nearest when enlarging), centred."""
    h, w = picture.shape[:2]
    factor = tile / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    method = cv2.INTER_NEAREST if factor >= 1 else cv2.INTER_AREA
    resized = cv2.resize(picture, size, interpolation=method)
    out = np.full((tile, tile, 3), BACKGROUND, dtype=np.uint8)
    y, x = (tile - resized.shape[0]) // 2, (tile - resized.shape[1]) // 2
    out[y:y + resized.shape[0], x:x + resized.shape[1]] = resized
    return out


def _block(tiles: list[np.ndarray], tile: int, columns: int) -> np.ndarray:
    rows = math.ceil(len(tiles) / columns)
    size = (rows * tile + (rows - 1) * TILE_GAP, columns * tile + (columns - 1) * TILE_GAP)
    out = np.full((*size, 3), BACKGROUND, dtype=np.uint8)
    for n, t in enumerate(tiles):
        r, c = divmod(n, columns)
        y, x = r * (tile + TILE_GAP), c * (tile + TILE_GAP)
        out[y:y + tile, x:x + tile] = t
    return out


def _unit_block(patches: TopPatches, n: int, denormalize: Callable | None, tile: int,
                label: bool) -> np.ndarray:
    """Unit ``patches.units[n]``: its projections' block beside its patches' block."""
    k = patches.k
    columns = math.ceil(math.sqrt(k))
    proj = _block([_fit(projection_image(p), tile) for p in patches.projections[n]], tile,
                  columns)
    imgs = _block([_fit(_picture(p, denormalize), tile) for p in patches.images[n]], tile,
                  columns)
    h, w = proj.shape[:2]
    top = LABEL_HEIGHT if label else 0
    out = np.full((h + top, 2 * w + BLOCK_GAP // 2, 3), BACKGROUND, dtype=np.uint8)
    out[top:, :w] = proj
    out[top:, w + BLOCK_GAP // 2:] = imgs
    if label:
        cv2.putText(out, f"unit {patches.units[n]}", (1, LABEL_HEIGHT - 4),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _positions(patches: TopPatches, units: Sequence[int] | None) -> list[int]:
    if units is None:
        return list(range(len(patches.units)))
    missing = [u for u in units if u not in patches.units]
    if missing:
        raise DataError(f"units {missing} are not in this result; it has {patches.units}")
    return [patches.units.index(u) for u in units]


@renamed_kwargs(transform="denormalize")
def patch_grid(
    patches: TopPatches,
    *,
    units: Sequence[int] | None = None,
    denormalize: Any = None,
    tile: int | None = None,
    columns: int = 4,
    labels: bool = True,
) -> np.ndarray:
    """Compose Zeiler & Fergus's grid: per unit, its projections beside its image patches.

    Parameters
    ----------
    patches
        What :func:`top_patches` returned.
    units
        Which of its units to show, in this order (``None``: all).
    denormalize
        How model inputs become pictures again: the model's preprocessing (from
        :func:`dissect.models.load_model`; its ``denormalize`` is used) or a callable on
        ``(C, H, W)`` patches. ``None``: each patch is stretched to [0, 1]. (``transform=`` is
        a deprecated alias, for one release.)
    tile
        Side of each tile in pixels (patches are resized to fit, keeping their aspect).
        ``None``: the patches' own size, small patches enlarged by a whole factor (nearest
        neighbour) to at least 48 px, patches larger than 128 px reduced to 128. Reducing
        averages away the fine checkerboard that deconvnet projections of strided networks
        carry, so keep tiles near the patch size when that matters.
    columns
        Unit blocks per row of the grid.
    labels
        Write ``unit N`` above each block.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    if columns < 1:
        raise DataError(f"columns must be >= 1, got {columns}")
    tile = tile_size(patches, tile)
    denorm = _denormalizer(denormalize)
    blocks = [_unit_block(patches, n, denorm, tile, labels)
              for n in _positions(patches, units)]
    if not blocks:
        raise DataError("no units to draw")
    bh, bw = blocks[0].shape[:2]
    columns = min(columns, len(blocks))
    rows = math.ceil(len(blocks) / columns)
    out = np.full((rows * bh + (rows + 1) * BLOCK_GAP, columns * bw + (columns + 1) * BLOCK_GAP,
                   3), BACKGROUND, dtype=np.uint8)
    for n, block in enumerate(blocks):
        r, c = divmod(n, columns)
        y, x = BLOCK_GAP + r * (bh + BLOCK_GAP), BLOCK_GAP + c * (bw + BLOCK_GAP)
        out[y:y + bh, x:x + bw] = block
    return out


def save_patch_grid(patches: TopPatches, path: str | Path, **options: Any) -> Path:
    """Write :func:`patch_grid` as a PNG (OpenCV); options as there.

    Returns
    -------
    pathlib.Path
        The path written (parent folders are created).
    """
    return write_png(path, patch_grid(patches, **options))


@renamed_kwargs(directory="out_dir", transform="denormalize")
def save_unit_grids(
    patches: TopPatches,
    out_dir: str | Path,
    *,
    denormalize: Any = None,
    tile: int | None = None,
    labels: bool = False,
) -> dict[int, Path]:
    """Write one PNG per unit, ``out_dir/<layer>/unit_<k:04d>.png``: projections and patches.

    For reports that show one unit at a time.

    Parameters
    ----------
    patches
        What :func:`top_patches` returned.
    out_dir
        The output folder; a subfolder named after the layer is created
        (:func:`dissect._plumbing.paths.unit_image_path`).
    denormalize, tile, labels
        As in :func:`patch_grid`.

    Returns
    -------
    dict
        ``unit -> path`` of each file written.
    """
    tile = tile_size(patches, tile)
    denorm = _denormalizer(denormalize)
    written = {}
    for n, unit in enumerate(patches.units):
        block = _unit_block(patches, n, denorm, tile, labels)
        written[unit] = write_png(unit_image_path(out_dir, patches.layer, unit), block)
    return written
