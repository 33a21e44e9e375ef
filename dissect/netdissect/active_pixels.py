"""Which pixels of a bilinearly upsampled activation map exceed a threshold, sparsely and exactly.

Network Dissection upsamples each unit's map to the segmentation size and keeps the pixels above
the unit's threshold: the top 0.5%, so a sparse set. A pixel is active when its upsampled value is
finite and above ``T``: a pixel whose interpolation reads a NaN or an infinity is never active (its
value is NaN or infinite; PyTorch's kernels multiply a neighbour even by a zero weight, so at a
non-finite value's zero-weight neighbours, e.g. along clamped borders, the value is NaN too, unless
the size is unchanged and ``F.interpolate`` copies). A bilinear value is a convex combination of
the four corner values of its cell, so it can only exceed ``T`` inside cells whose largest corner
does; only those cells are visited (a few percent of the image area). Within such a cell and one
output row the value is linear in the column weight, so the row's active pixels are one interval
computed in closed form: the work is per cell row (:func:`active_intervals` returns the intervals;
:func:`active_pixels` expands them), and the interval's ends are counted on the regular coordinate
grid in closed form too (:func:`_count_keys`, no binary search). Values are computed in float64 and
compared with a margin that bounds any float32 implementation's rounding (the weights' error grows
with the input size), widened by a relative 2**-20 so that float64 rounding (~1e-16 of the values)
can never matter: a pixel computed exactly on a bound may go either way. The rare pixels inside the
margin are settled by ``F.interpolate`` itself (:func:`settle`), and so is every pixel of a map
holding a NaN or an infinity, or a value of magnitude ``>= HUGE`` (where float32 upsampling may
overflow): no margin is meaningful there. So the result always equals :func:`active_mask_dense`,
``(up > T) & isfinite(up)`` with ``up = F.interpolate(maps, size, mode="bilinear",
align_corners=False)``, exactly, on any device. PyTorch's CPU kernel rounds differently for some
shapes (a ``(K, 1, h, w)`` call can differ from a ``(1, K, h, w)`` one in the last bit; a per-image
call matches the whole batch), so settling upsamples only the affected maps when a one-time check
on the layer's first image shows single maps round like whole images, and the affected images' full
``(1, K, h, w)`` tensors otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EPS32 = 2.0**-23
HUGE = 2.0**126  # maps reaching this magnitude are settled whole (float32 sums may overflow)
CHUNK_PIXELS = 1 << 16  # cell rows per step


@dataclass(frozen=True)
class _Axis:
    """For one axis: each output coordinate's weight and key, each cell's coordinate range."""

    upper: torch.Tensor  # (s,) upper source index of each cell (clamped at the border)
    w1: torch.Tensor  # (S,) weight of the upper index for every output coordinate, float64
    count: torch.Tensor  # (s,) number of output coordinates of each cell
    start: torch.Tensor  # (s,) first output coordinate of each cell
    keys: torch.Tensor  # (S,) 4 * cell + weight: ascending, each cell's weights in its own band
    padded: torch.Tensor  # (S + 2,) keys between -inf and +inf (for :func:`_count_keys`)
    ratio: float  # out_size / in_size


def _axis(in_size: int, out_size: int, device: torch.device) -> _Axis:
    scale = in_size / out_size
    out = torch.arange(out_size, dtype=torch.float64, device=device)
    src = ((out + 0.5) * scale - 0.5).clamp(min=0)
    cell = src.floor().long().clamp(max=in_size - 1)
    w1 = src - cell.double()
    counts = torch.bincount(cell, minlength=in_size)
    start = torch.cumsum(counts, 0) - counts
    upper = (torch.arange(in_size, device=device) + 1).clamp(max=in_size - 1)
    keys = 4.0 * cell.double() + w1
    inf = keys.new_tensor([float("inf")])
    padded = torch.cat([-inf, keys, inf])
    return _Axis(upper, w1, counts, start, keys, padded, out_size / in_size)


def margin_coefficient(h: int, w: int) -> float:
    """The rounding margin of an ``(h, w)`` map per unit of its largest magnitude:
    ``m = margin_coefficient(h, w) * max|map| + 1e-30`` bounds how far any float32
    implementation of the bilinear upsampling can round a value (the weights' error grows with
    the input size)."""
    return EPS32 * (2 * (max(h, w) + 1) + 8)


def axis_ranges(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis' geometry as numpy: each input cell's first output coordinate and one past its
    last (``(in_size,)`` int64 each), and every output coordinate's upper weight
    (``(out_size,)`` float64), exactly as :func:`active_intervals` uses them."""
    ax = _axis(in_size, out_size, torch.device("cpu"))
    return ax.start.numpy(), (ax.start + ax.count).numpy(), ax.w1.numpy()


def _count_keys(ax: _Axis, cell: torch.Tensor, cell_f: torch.Tensor, start: torch.Tensor,
                end: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """How many of the axis' keys are ``<= 4 * cell + x``, for ``x`` in ``[-1, 2]``, without a
    search: the coordinate grid is regular, so the count is estimated in closed form (the output
    coordinates ``o`` with unclamped source ``(o + 0.5) / ratio - 0.5 <= cell + x``), clamped to
    the cell's coordinates ``[start, end)`` and corrected by one comparison with the exact key on
    each side (the estimate is off by at most one). Equals
    ``torch.searchsorted(ax.keys, 4 * cell + x, right=True)``; ``cell_f`` is ``cell`` as float64.
    """
    est = torch.floor((cell_f + x) * ax.ratio + (0.5 * ax.ratio + 0.5)).to(start.dtype)
    est = torch.minimum(torch.maximum(est, start), end)
    # below the cell's weights (all >= 0) nothing of the cell counts; the clamped source of the
    # first cell's leading coordinates (weight 0) would fool the estimate there
    est = torch.where(x < 0, start, est)
    v = 4.0 * cell_f + x
    return (est + (ax.padded.index_select(0, est + 1) <= v).to(est.dtype)
            - (ax.padded.index_select(0, est) > v).to(est.dtype))


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the nonzero elements of a 1-D tensor (``torch.nonzero(mask)[:, 0]``).

    On the CPU this goes through numpy's ``flatnonzero``: one pass where ``torch.nonzero``
    makes two (0.09 vs 0.48 ms on 150k elements, 3.2 vs 5.3 ms on 3.2M, one thread). Two torch
    threads halve ``torch.nonzero`` on large masks when timed alone, yet a whole
    ``IoUTally.add`` loop measured 5-7% slower with it than with numpy. Elsewhere:
    ``torch.nonzero``.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def spans(first: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand spans ``[first[i], first[i] + counts[i])`` into their elements, vectorized.

    Returns
    -------
    owner, value
        For every element: the index ``i`` of its span, and its value ``first[i] + j`` (``j``
        its position in the span). Spans come in order; empty spans add nothing.
    """
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    value = (first - starts).index_select(0, owner) + torch.arange(len(owner),
                                                                   device=counts.device)
    return owner, value


def _row_range(corners: torch.Tensor, ci: torch.Tensor, ay: _Axis
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """First output row and row count of each candidate cell worth visiting.

    ``corners`` is ``(n, 6)``: ``a00, a01, a10, a11, T, m``. Along a cell's left edge the value
    is ``a00 + (a10 - a00) wy``, along its right edge ``a01 + (a11 - a01) wy``; a row can hold
    a possible pixel only where one of them reaches ``T - m``. Each edge's rows where it reaches
    ``T - 2m`` form an interval of ``wy`` (the extra ``m`` dwarfs any float64 rounding, so ties
    may go either way); the result is the hull of both, widened by a row on each side.
    """
    a00, a01, a10, a11, t, m = corners.unbind(1)
    tau = t - 2 * m
    start = ay.start.index_select(0, ci).int()
    end = start + ay.count.index_select(0, ci).int()
    ci_f = ci.double()
    big = 1 << 30  # moves an empty range out of the hull's way
    los, his = [], []
    for e0, e1 in ((a00, a10), (a01, a11)):
        d = e1 - e0
        d = torch.where(d == 0, -1e-300, d)  # a flat edge counts as falling
        up = (d > 0).int()
        idx = _count_keys(ay, ci, ci_f, start, end, ((tau - e0) / d).clamp_(-1.0, 2.0))
        # rising edge: rows [idx, end) reach tau; falling: rows [start, idx)
        lo = start + up * (idx - start)
        hi = idx + up * (end - idx)
        empty = (hi <= lo).int() * big
        los.append(lo + empty)
        his.append(hi - empty)
    lo = torch.maximum(torch.minimum(los[0], los[1]) - 1, start)
    hi = torch.minimum(torch.maximum(his[0], his[1]) + 1, end)
    return lo, (hi - lo).clamp_(min=0)


def active_pixels(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    size: tuple[int, int],
    cache: dict | None = None,
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
    cache
        Optional dict kept by the caller across batches of one layer (geometry, and whether
        ``F.interpolate`` of single maps rounds like whole images for this shape).

    Returns
    -------
    b, k, y, x
        1-D long tensors: the pixels where
        ``up = F.interpolate(maps, size, mode="bilinear", align_corners=False)[b, k, y, x]``
        is finite and ``up > T[k]``, exactly that set (in no particular order;
        :func:`active_mask_dense` is the dense reference).
    """
    b, k, y, x0, x1 = active_intervals(maps, thresholds, size, cache)
    owner, x = spans(x0, x1 - x0)
    return b.index_select(0, owner), k.index_select(0, owner), y.index_select(0, owner), x


def active_intervals(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    size: tuple[int, int],
    cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active pixels as row intervals: what :func:`active_pixels` returns, unexpanded.

    Parameters
    ----------
    maps, thresholds, size, cache
        As for :func:`active_pixels`.

    Returns
    -------
    b, k, y, x0, x1
        1-D long tensors, one entry per interval: pixels ``(b, k, y, x)`` with
        ``x0 <= x < x1`` are active. Intervals are disjoint, non-empty and cover exactly the
        active pixels (a row may hold several; in no particular order).
    """
    maps = maps.float()
    B, K, h, w = maps.shape
    sh, sw = size
    dev = maps.device
    cache = {} if cache is None else cache
    thr = thresholds.to(dev, torch.float32)
    key = ("axes", h, w, sh, sw, str(dev))
    if key not in cache:
        cache[key] = (_axis(h, sh, dev), _axis(w, sw, dev))
    ay, ax = cache[key]
    # maps whose largest value reaches T - m (the margin m bounds float32 rounding; it grows
    # with the map's largest magnitude): only those can hold a possible pixel
    values = maps.reshape(B * K, h * w)
    low, high = torch.aminmax(values, dim=1)
    scale = torch.maximum(high.abs(), low.abs())  # max |map|
    margin = margin_coefficient(h, w) * scale.double() + 1e-30  # (B * K,)
    reach = thr.repeat(B) - margin.float()
    finite = scale < HUGE  # False for a NaN or an infinity too
    live = flat_nonzero((high >= reach) & finite)
    empty = torch.empty(0, dtype=torch.long, device=dev)
    unsure_parts: list[torch.Tensor] = []
    if not bool(finite.all()):  # a NaN, an infinity or a huge value: settle every pixel
        bad = flat_nonzero(~finite)
        n = bad.numel()
        yy, xx = torch.meshgrid(torch.arange(sh, device=dev), torch.arange(sw, device=dev),
                                indexing="ij")
        unsure_parts.append(torch.stack([(bad // K).repeat_interleave(sh * sw),
                                         (bad % K).repeat_interleave(sh * sw),
                                         yy.reshape(-1).repeat(n), xx.reshape(-1).repeat(n)]))
    sure_parts: list[torch.Tensor] = []
    if live.numel():
        _visit_live_maps(maps, thr, margin, reach, live, ay, ax, sure_parts, unsure_parts)
    found = torch.cat(sure_parts, dim=1) if sure_parts else empty.view(5, 0)
    if unsure_parts:
        amb = torch.cat(unsure_parts, dim=1)
        amb = amb[:, settle(maps, thr, size, amb, cache)]
        found = torch.cat([found, torch.cat([amb, amb[3:4] + 1])], dim=1)
    b, k, y, x0, x1 = found
    return b, k, y, x0, x1


def _visit_live_maps(
    maps: torch.Tensor,
    thr: torch.Tensor,
    margin: torch.Tensor,
    reach: torch.Tensor,
    live: torch.Tensor,
    ay: _Axis,
    ax: _Axis,
    sure_parts: list[torch.Tensor],
    unsure_parts: list[torch.Tensor],
) -> None:
    """The row stage of :func:`active_intervals` for the ``live`` maps (flat ``b * K + k``):
    appends ``(5, n)`` sure intervals ``b, k, y, x0, x1`` to ``sure_parts`` and ``(4, n)``
    unsure pixels ``b, k, y, x`` to ``unsure_parts``."""
    B, K, h, w = maps.shape
    values = maps.reshape(B * K, h * w)
    # largest corner of every cell of those maps (border cells repeat their last row/column)
    padded = F.pad(values.index_select(0, live).view(-1, 1, h, w), (0, 1, 0, 1),
                   mode="replicate")[:, 0]
    cell_max = torch.maximum(
        torch.maximum(padded[:, :-1, :-1], padded[:, 1:, :-1]),
        torch.maximum(padded[:, :-1, 1:], padded[:, 1:, 1:]),
    )
    mi, ci, cj = torch.nonzero(cell_max >= reach.index_select(0, live)[:, None, None],
                               as_tuple=True)
    if mi.numel() == 0:
        return
    mapid = live.index_select(0, mi)
    cb, ck = mapid // K, mapid % K
    # Within one cell and one output row the bilinear value is linear in the column weight wx,
    # and wx grows with the column: the row's active pixels form one interval, found in closed
    # form (:func:`_count_keys` on the axis' weights). The sure intervals are returned as they are;
    # only the few pixels within the rounding margin of T are materialized (and settled exactly
    # below).
    flat = maps.reshape(-1)
    plane = mapid * (h * w)
    top, bottom = plane + ci * w, plane + ay.upper[ci] * w
    ju = ax.upper[cj]
    corners = torch.cat([
        torch.stack([flat.index_select(0, top + cj), flat.index_select(0, top + ju),
                     flat.index_select(0, bottom + cj), flat.index_select(0, bottom + ju)],
                    dim=1).double(),
        torch.stack([thr.double().index_select(0, ck), margin.index_select(0, mapid)], dim=1),
    ], dim=1)
    # Rows of a cell whose two ends (wx = 0 and 1) are both below T - 2m hold no possible pixel
    # (the value is linear along a row): visit only each cell's hull of rows where an end can
    # reach T - 2m (one spare row each side; the extra m dwarfs any float64 rounding here).
    first_row, ny = _row_range(corners, ci, ay)
    row_ends = torch.cumsum(ny, 0)
    # per cell: along output row wy the value is base + slope * wx, with base = A + B wy and
    # slope = C + D wy; sure pixels exceed T + m2, possible ones reach T - m2 (m2 a hair above
    # m: float64 rounding here, ~1e-16 of the values, is dwarfed by m2 - m, so a pixel that
    # rounds onto either bound may go either way and comparisons need no tie rules)
    a00, a01, a10, a11, t, m = corners.unbind(1)
    m2 = m * (1 + 2.0**-20)
    coef = torch.stack([a00, a10 - a00, a01 - a00, (a11 - a10) - (a01 - a00), t + m2, t - m2,
                        cj.double()], dim=1)
    col_start = ax.start.index_select(0, cj)
    ints = torch.stack([cj, col_start, col_start + ax.count.index_select(0, cj)], dim=1).int()
    n_cells, s = cb.numel(), 0
    while s < n_cells:
        base = int(row_ends[s - 1]) if s else 0
        e = max(int(torch.searchsorted(row_ends, base + CHUNK_PIXELS, right=True)), s + 1)
        cell, row = spans(first_row[s:e], ny[s:e])
        cell += s
        a, by, c, d, t_sure, t_poss, col_f = coef.index_select(0, cell).unbind(1)
        col, c0, c1 = ints.index_select(0, cell).unbind(1)
        wy = ay.w1.index_select(0, row)
        value0 = torch.addcmul(a, by, wy)  # value at wx = 0
        slope = torch.addcmul(c, d, wy)  # d value / d wx
        slope = torch.where(slope == 0, -1e-300, slope)  # a flat row counts as falling
        up = (slope > 0).int()
        # the weight where the value crosses T +- m2 (weights lie in [0, 1]; clamping to
        # [-1, 2] keeps every comparison), then how many of the axis' coordinates lie at or
        # below it: rising rows are sure right of the first count and possible right of the
        # second, falling rows left of them; the unsure pixels lie between the two counts
        sure = _count_keys(ax, col, col_f, c0, c1, ((t_sure - value0) / slope).clamp_(-1.0, 2.0))
        poss = _count_keys(ax, col, col_f, c0, c1, ((t_poss - value0) / slope).clamp_(-1.0, 2.0))
        x0 = c0 + up * (sure - c0)
        x1 = sure + up * (c1 - sure)
        keep = flat_nonzero(x1 > x0)  # sure pixels: one interval per row
        if len(keep):
            c_idx = cell.index_select(0, keep)
            sure_parts.append(torch.stack([cb.index_select(0, c_idx), ck.index_select(0, c_idx),
                                           row.index_select(0, keep),
                                           x0.index_select(0, keep).long(),
                                           x1.index_select(0, keep).long()]))
        un_lo = torch.minimum(sure, poss)
        counts = torch.maximum(sure, poss) - un_lo  # the unsure pixels, one by one (a few)
        if bool((counts > 0).any()):
            owner, x = spans(un_lo.long(), counts.long())
            c_idx = cell.index_select(0, owner)
            unsure_parts.append(torch.stack([cb.index_select(0, c_idx),
                                             ck.index_select(0, c_idx),
                                             row.index_select(0, owner), x]))
        s = e


def _single_maps_round_alike(maps: torch.Tensor, size: tuple[int, int], cache: dict) -> bool:
    """Whether upsampling maps one at a time gives the same bits as a whole image's maps.

    PyTorch's CPU kernel picks its loop by shape, and for some shapes the rounding differs;
    this is checked once per layer geometry on a real image (the code path depends on the
    shape, not the values).
    """
    B, K, h, w = maps.shape
    key = ("single", K, h, w, size, str(maps.device))
    if key not in cache:
        one = maps[:1]
        whole = F.interpolate(one, size=size, mode="bilinear", align_corners=False)
        single = F.interpolate(one.reshape(K, 1, h, w), size=size, mode="bilinear",
                               align_corners=False)
        cache[key] = torch.equal(whole.reshape(K, *size), single[:, 0])
    return cache[key]


def settle(
    maps: torch.Tensor,
    thr: torch.Tensor,
    size: tuple[int, int],
    coords: torch.Tensor,
    cache: dict,
) -> torch.Tensor:
    """Decide pixels too close to call (and every pixel of a map holding a non-finite value)
    with ``F.interpolate`` itself.

    Parameters
    ----------
    maps, thr, size
        The ``(B, K, h, w)`` float32 maps, ``(K,)`` float32 thresholds and output size.
    coords
        ``(4, n)`` long rows ``b, k, y, x``: the pixels to decide.
    cache
        As for :func:`active_pixels` (holds the one-time rounding check).

    Returns
    -------
    torch.Tensor
        ``(n,)`` bool for each pixel: its value ``v = F.interpolate(maps, size,
        mode="bilinear", align_corners=False)[b, k, y, x]`` is finite and ``v > thr[k]``
        (a pixel whose interpolation touches a NaN or an infinity with nonzero weight is
        NaN or infinite, so never active).
    """
    B, K, h, w = maps.shape
    b, k, y, x = coords
    if _single_maps_round_alike(maps, size, cache):
        uniq, inverse = torch.unique(b * K + k, return_inverse=True)
        dense = F.interpolate(maps.reshape(B * K, 1, h, w)[uniq], size=size, mode="bilinear",
                              align_corners=False)[:, 0]
        value = dense[inverse, y, x]
    else:
        uniq, inverse = torch.unique(b, return_inverse=True)
        dense = F.interpolate(maps[uniq], size=size, mode="bilinear", align_corners=False)
        value = dense[inverse, k, y, x]
    return (value > thr[k]) & torch.isfinite(value)


def active_mask_dense(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]):
    """The dense reference: ``(up > T) & isfinite(up)`` as a ``(B, K, sh, sw)`` bool tensor,
    ``up = F.interpolate(maps, size, mode="bilinear", align_corners=False)``: a pixel is active
    when its upsampled value is finite and above its unit's threshold."""
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return (up > thresholds.to(up).view(1, -1, 1, 1)) & torch.isfinite(up)
