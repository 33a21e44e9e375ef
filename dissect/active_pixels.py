"""Which pixels of a bilinearly upsampled activation map exceed a threshold, sparsely and exactly.

Network Dissection upsamples each unit's map to the segmentation size and keeps the pixels above
the unit's threshold: the top 0.5%, so a sparse set. A bilinear value is a convex combination of
the four corner values of its cell, so it can only exceed ``T`` inside cells whose largest corner
does; only those cells' pixels are evaluated (a few percent of the image area). Values are
computed in float64 and compared with a margin that bounds any float32 implementation's rounding
(the weights' error grows with the input size); the rare pixels inside the margin are settled by
``F.interpolate`` itself on their image's maps, so the result always equals
``F.interpolate(maps, size, mode="bilinear", align_corners=False) > T`` exactly, on any device.
(PyTorch's CPU kernel rounds differently depending on the tensor's shape, so the settling call
uses the same ``(b, K, h, w)`` shape per image as a dense reference does; a per-image call gives
the same bits as a call on the whole batch.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS32 = 2.0**-23
CHUNK_PIXELS = 1 << 22


@dataclass(frozen=True)
class _Axis:
    """For one axis: each output coordinate's cell, weights, and each cell's output coordinates."""

    cell: torch.Tensor  # (S,) lower source index of every output coordinate
    upper: torch.Tensor  # (S,) upper source index (clamped at the border)
    w1: torch.Tensor  # (S,) weight of the upper index, float64
    members: torch.Tensor  # (s, R) output coordinates of each cell, -1 padded


def _axis(in_size: int, out_size: int, device: torch.device) -> _Axis:
    scale = in_size / out_size
    out = torch.arange(out_size, dtype=torch.float64, device=device)
    src = ((out + 0.5) * scale - 0.5).clamp(min=0)
    cell = src.floor().long().clamp(max=in_size - 1)
    upper = (cell + 1).clamp(max=in_size - 1)
    w1 = src - cell.double()
    counts = torch.bincount(cell, minlength=in_size)
    width = int(counts.max())
    members = torch.full((in_size, width), -1, dtype=torch.long, device=device)
    start = torch.cumsum(counts, 0) - counts
    offset = torch.arange(out_size, device=device) - start[cell]
    members[cell, offset] = torch.arange(out_size, device=device)
    return _Axis(cell, upper, w1, members)


def active_pixels(
    maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinates of the upsampled pixels above each unit's threshold.

    Parameters
    ----------
    maps
        ``(B, K, h, w)`` activation maps (float32, any device).
    thresholds
        ``(K,)`` thresholds ``T_k``.
    size
        Output size ``(sh, sw)``.

    Returns
    -------
    b, k, y, x
        1-D long tensors: the pixels where
        ``F.interpolate(maps, size, mode="bilinear", align_corners=False)[b, k, y, x] > T[k]``,
        exactly that set (in no particular order).
    """
    maps = maps.float()
    B, K, h, w = maps.shape
    sh, sw = size
    dev = maps.device
    thr = thresholds.to(dev, torch.float32)
    ay, ax = _axis(h, sh, dev), _axis(w, sw, dev)
    # largest corner of every cell (cells at the border repeat their last row/column)
    padded = F.pad(maps, (0, 1, 0, 1), mode="replicate")
    cell_max = F.max_pool2d(padded, kernel_size=2, stride=1)
    scale = padded.abs().amax(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    margin = EPS32 * (2 * (max(h, w) + 1) + 8) * scale + 1e-30
    cand = cell_max >= thr.view(1, K, 1, 1) - margin
    cb, ck, ci, cj = torch.nonzero(cand, as_tuple=True)
    if cb.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return empty, empty, empty, empty
    rows = ay.members[ci]  # (n, R)
    cols = ax.members[cj]  # (n, C)
    per_cell = rows.shape[1] * cols.shape[1]
    step = max(1, CHUNK_PIXELS // per_cell)
    out: list[list[torch.Tensor]] = [[], [], [], []]
    ambiguous: list[torch.Tensor] = []
    flat_maps = maps.double()
    for s in range(0, cb.numel(), step):
        b, k, i, j = cb[s : s + step], ck[s : s + step], ci[s : s + step], cj[s : s + step]
        r, c = rows[s : s + step], cols[s : s + step]
        i1, j1 = ay.upper[ay.members[i, 0]], ax.upper[ax.members[j, 0]]
        a00 = flat_maps[b, k, i, j][:, None, None]
        a01 = flat_maps[b, k, i, j1][:, None, None]
        a10 = flat_maps[b, k, i1, j][:, None, None]
        a11 = flat_maps[b, k, i1, j1][:, None, None]
        wy = ay.w1[r.clamp(min=0)][:, :, None]
        wx = ax.w1[c.clamp(min=0)][:, None, :]
        top = a00 * (1 - wx) + a01 * wx
        bottom = a10 * (1 - wx) + a11 * wx
        value = top * (1 - wy) + bottom * wy  # (n, R, C)
        valid = (r >= 0)[:, :, None] & (c >= 0)[:, None, :]
        t = thr[k].double()[:, None, None]
        m = margin[b, k, 0, 0].double()[:, None, None]
        sure = valid & (value > t + m)
        unsure = valid & (value >= t - m) & ~sure
        for target, mask in ((out, sure), (None, unsure)):
            n_idx, ry, cx = torch.nonzero(mask, as_tuple=True)
            if n_idx.numel() == 0:
                continue
            coords = (b[n_idx], k[n_idx], r[n_idx, ry], c[n_idx, cx])
            if target is None:
                ambiguous.append(torch.stack(coords))
            else:
                for lst, v in zip(target, coords, strict=True):
                    lst.append(v)
    if ambiguous:
        amb = torch.cat(ambiguous, dim=1)
        keep = _settle(maps, thr, size, amb)
        for lst, v in zip(out, amb[:, keep], strict=True):
            lst.append(v)
    if not out[0]:
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return empty, empty, empty, empty
    b, k, y, x = (torch.cat(lst) for lst in out)
    return b, k, y, x


def _settle(
    maps: torch.Tensor, thr: torch.Tensor, size: tuple[int, int], coords: torch.Tensor
) -> torch.Tensor:
    """Decide pixels too close to call with F.interpolate itself on their images' maps."""
    b, k, y, x = coords
    uniq, inverse = torch.unique(b, return_inverse=True)
    dense = F.interpolate(maps[uniq], size=size, mode="bilinear", align_corners=False)
    return dense[inverse, k, y, x] > thr[k]


def active_mask_dense(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]):
    """The dense reference: ``F.interpolate(...) > T`` as a ``(B, K, sh, sw)`` bool tensor."""
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return up > thresholds.to(up).view(1, -1, 1, 1)
