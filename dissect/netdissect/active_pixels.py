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
can never matter: a pixel computed exactly on a bound may go either way.

The rare pixels inside the margin are *settled* (:func:`settle`) by the value ``F.interpolate``
computes, bit for bit: recomputed from the pixel's four corners with PyTorch's own float32
arithmetic (:func:`kernel_emulation`: its source coordinates and weights, and the association and
fused multiply-adds of its sum, which depend on the build and on the loop PyTorch picks for the
shape and the channel; the candidates are checked bit for bit against ``F.interpolate`` once per
layer geometry, device and thread mode, on maps mixing the layer's first image with ties,
plateaus at ``T``, subnormal and widely spread values, and each channel keeps the first that
matches). The check is empirical: a formula that matches there is trusted everywhere (for
finite maps below ``HUGE``), and a flush-to-zero mode switched on later
(``torch.set_flush_denormal``) would not be seen. Channels no candidate reproduces (e.g. a GPU
kernel whose fused multiply-adds are not among them), and maps holding a NaN, an infinity or a
value of magnitude ``>= HUGE`` (where float32 upsampling may overflow; no margin is meaningful
there: every pixel is settled), are settled by ``F.interpolate`` itself: of the affected single
maps when a one-time check on the layer's first image shows they round like whole images
(PyTorch's CPU kernel rounds differently for some shapes: a ``(K, 1, h, w)`` call can differ
from a ``(1, K, h, w)`` one in the last bit, its channels-last loop summing vector lanes and the
scalar tail in different orders), of the affected images' ``(1, K, h, w)`` tensors otherwise.

*The sign rule.* A margin relative to a map's largest value makes every exact zero of a unit with
``T = 0`` (a unit firing on fewer than 0.5% of the positions, after a ReLU) unsure, so those maps
are decided without margin and without settling: a map whose values are all ``<= 0`` has no pixel
above 0 (each product of a value ``<= 0`` with a weight ``>= 0`` is ``<= 0``, and so is every
rounded sum or fused multiply-add of such terms). On a map whose values are all ``>= 0`` a pixel
is above 0 exactly when a corner it reads with a nonzero float32 weight is positive: every term is
``>= 0``, a zero weight or value gives an exact 0, and a positive value ``p`` times nonzero
weights ``wy, wx`` is at least ``p wy wx``; when that is ``>= 2**-125`` (a normal float32) for the
map's smallest positive value, no product underflows, whatever the order of the products and sums
and with or without fused multiply-adds (rounding is monotone and 2**-125 is a float32), so the
rounded sum is positive. Which weights are nonzero is decided in float64 (:func:`support_ranges`):
a float32 source coordinate is within ``3 * 2**-24 * in_size`` of the exact one, so away from a
band of ``2**-20 * (in_size + 1)`` around integers the float32 cell and the zero-ness of both
weights are those of the exact coordinate, and the nonzero weights are at least half the
coordinate's distance to an integer (which bounds the smallest positive value the rule accepts).
Within the band (an exactly integer coordinate, e.g. output 18 of 5 -> 37) a weight may be 0 or
tiny: with a fused multiply-add, output 1 of 1 -> 3 has ``src = fl(fl(1/3) * 1.5 - 0.5) = 1.5e-8``
(nonzero float32 weights are not ``>= 2**-24`` in general: only source coordinates ``>= 0.5``
are multiples of 2**-24). There a pixel is active when a corner it surely reads (weight ~1) is
positive, inactive when no corner it may read is, and settled otherwise. Maps whose smallest
positive value is too small for the bound (subnormal values, say), or that mix signs, take the
margin path; so do thresholds other than 0 (a plateau at ``T``, e.g. ReLU6 at 6, is settled
pixel by pixel by the emulated kernel).

So the result always equals :func:`active_mask_dense`, ``(up > T) & isfinite(up)`` with
``up = F.interpolate(maps, size, mode="bilinear", align_corners=False)``, exactly, on any device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._grid import (  # noqa: F401 - EPS32, axis_ranges: public here since the first release
    EPS32,
    HUGE,
    _Axis,
    _axis,
    axis_ranges,
    flat_nonzero,
    margin_coefficient,
    spans,
)
from .settle import (  # noqa: F401 - the settling API, public here since the first release
    FORMULAS,
    KernelEmulation,
    emulate,
    emulate_pixels,
    fma32,
    kernel_axis,
    kernel_emulation,
    settle,
)

CHUNK_PIXELS = 1 << 16  # cell rows per step
SIGN_TOLERANCE = 2.0**-20  # per input size: band around integer source coordinates
SIGN_PRODUCT = 2.0**-125  # the sign rule needs p * wy * wx above this for positive p

log = logging.getLogger(__name__)



def support_ranges(in_size: int, out_size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """For every output coordinate of one axis, the input indices that its float32 bilinear
    weights surely make nonzero and those they possibly make nonzero (the sign rule's geometry,
    see the module docstring).

    With ``src = (o + 0.5) * in / out - 0.5`` in float64 and ``tol = SIGN_TOLERANCE * (in + 1)``
    (several times the float32 error of ``src``): a coordinate within ``tol`` of an integer ``n``
    surely reads ``n`` (weight ~1) and possibly ``n - 1`` and ``n + 1``; otherwise it reads
    exactly ``{0}`` left of the clamped border, ``{in - 1}`` in the last cell and
    ``{floor(src), floor(src) + 1}`` elsewhere, each weight nonzero. An unchanged size copies:
    ``{o}``.

    Returns
    -------
    slo, shi, plo, phi, wmin
        ``(out_size,)`` int64 each: the sure indices ``slo..shi`` and the possible ones
        ``plo..phi`` (ranges of one to three indices, ``plo <= slo <= shi <= phi``, all
        non-decreasing in ``o``); and a lower bound of every nonzero weight of a sure index.
    """
    o = np.arange(out_size, dtype=np.int64)
    if in_size == out_size:
        return o, o.copy(), o.copy(), o.copy(), 1.0
    src = (o + 0.5) * (in_size / out_size) - 0.5
    tol = SIGN_TOLERANCE * (in_size + 1)
    near = np.rint(src)
    band = np.abs(src - near) <= tol
    cell = np.minimum(np.floor(np.maximum(src, 0.0)), in_size - 1).astype(np.int64)
    inner = (src > 0) & (cell < in_size - 1) & ~band
    n = np.clip(near, 0, in_size - 1).astype(np.int64)
    slo = np.where(band, n, cell)
    shi = np.where(band, n, np.where(inner, cell + 1, cell))
    plo = np.where(band, np.maximum(n - 1, 0), slo)
    phi = np.where(band, np.minimum(n + 1, in_size - 1), shi)
    frac = (src - cell)[inner]
    dist = np.minimum(frac, 1.0 - frac)
    # a float32 weight is within tol / 5 of its float64 value, and dist > tol: >= 0.8 dist; the
    # band's sure weight is ~1, and the last cell's two weights (one index) sum to 1
    wmin = min(0.5, float(dist.min()) / 2) if dist.size else 0.5
    return slo, shi, plo, phi, wmin


@dataclass(frozen=True)
class SignGeometry:
    """:func:`support_ranges` of both axes of one layer geometry, for the sign rule.

    Attributes
    ----------
    y, x
        ``(slo, shi, plo, pmid, phi)`` per axis as int64 tensors on the maps' device
        (``pmid = min(plo + 1, phi)``: the possible indices are ``plo``, ``pmid``, ``phi``).
    bound
        The smallest positive value the rule accepts: ``SIGN_PRODUCT / (wmin_y * wmin_x)``.
    arrays
        The same ranges as numpy: ``(slo_y, shi_y, plo_y, phi_y, slo_x, shi_x, plo_x, phi_x)``.
    """

    y: tuple[torch.Tensor, ...]
    x: tuple[torch.Tensor, ...]
    bound: float
    arrays: tuple[np.ndarray, ...]


def sign_geometry(h: int, w: int, size: tuple[int, int], device: torch.device | str,
                  cache: dict) -> SignGeometry:
    """The :class:`SignGeometry` of ``(h, w)`` maps upsampled to ``size`` (kept in ``cache``)."""
    key = ("sign", h, w, tuple(size), str(device))
    if key not in cache:
        ry, rx = support_ranges(h, size[0]), support_ranges(w, size[1])
        axes = []
        for slo, shi, plo, phi, _ in (ry, rx):
            pmid = np.minimum(plo + 1, phi)
            axes.append(tuple(torch.from_numpy(a).to(device) for a in (slo, shi, plo, pmid, phi)))
        cache[key] = SignGeometry(axes[0], axes[1], SIGN_PRODUCT / (ry[4] * rx[4]),
                                  ry[:4] + rx[:4])
    return cache[key]


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
        Optional dict kept by the caller across batches of one layer (geometry, the verified
        kernel emulation, and whether ``F.interpolate`` of single maps rounds like whole images
        for this shape).

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
    thr_maps = thr.repeat(B)  # (B * K,) each map's threshold
    reach = thr_maps - margin.float()
    finite = scale < HUGE  # False for a NaN or an infinity too
    sure_parts: list[torch.Tensor] = []
    unsure_parts: list[torch.Tensor] = []
    # the sign rule (T = 0, see the module docstring): maps <= 0 hold no active pixel; maps
    # >= 0 whose positive values are not too small are decided by where they are positive
    signed = (thr_maps == 0) & finite & ((low >= 0) | (high <= 0))
    if bool(signed.any()):
        geo = sign_geometry(h, w, size, dev, cache)
        pos = flat_nonzero(signed & (high > 0))
        if pos.numel():
            v = values.index_select(0, pos)
            smallest = torch.where(v > 0, v, torch.full_like(v, float("inf"))).amin(1)
            small = pos[smallest.double() < geo.bound]
            signed[small] = False  # the margin path decides those
            by_sign = pos[smallest.double() >= geo.bound]
            if by_sign.numel():
                _visit_sign_maps(values, by_sign, K, (h, w), size, geo, sure_parts,
                                 unsure_parts)
        live = flat_nonzero((high >= reach) & finite & ~signed)
    else:
        live = flat_nonzero((high >= reach) & finite)
    empty = torch.empty(0, dtype=torch.long, device=dev)
    if not bool(finite.all()):  # a NaN, an infinity or a huge value: settle every pixel
        bad = flat_nonzero(~finite)
        n = bad.numel()
        yy, xx = torch.meshgrid(torch.arange(sh, device=dev), torch.arange(sw, device=dev),
                                indexing="ij")
        unsure_parts.append(torch.stack([(bad // K).repeat_interleave(sh * sw),
                                         (bad % K).repeat_interleave(sh * sw),
                                         yy.reshape(-1).repeat(n), xx.reshape(-1).repeat(n)]))
    if live.numel():
        _visit_live_maps(maps, thr, margin, reach, live, ay, ax, sure_parts, unsure_parts)
    found = torch.cat(sure_parts, dim=1) if sure_parts else empty.view(5, 0)
    if unsure_parts:
        amb = torch.cat(unsure_parts, dim=1)
        amb = amb[:, settle(maps, thr, size, amb, cache)]
        found = torch.cat([found, torch.cat([amb, amb[3:4] + 1])], dim=1)
    b, k, y, x0, x1 = found
    return b, k, y, x0, x1


def _visit_sign_maps(
    values: torch.Tensor,
    ids: torch.Tensor,
    K: int,
    hw: tuple[int, int],
    size: tuple[int, int],
    geo: SignGeometry,
    sure_parts: list[torch.Tensor],
    unsure_parts: list[torch.Tensor],
) -> None:
    """The sign rule for maps ``ids`` (flat ``b * K + k``, threshold 0, values ``>= 0``, the
    smallest positive one ``>= geo.bound``): a pixel is active when a corner it surely reads is
    positive, unsure when only a corner it possibly reads is. Appends ``(5, n)`` intervals
    ``b, k, y, x0, x1`` to ``sure_parts`` and ``(4, n)`` pixels ``b, k, y, x`` to
    ``unsure_parts``. The work is per output row reading a positive input row (``w`` input
    columns, then ``sw`` output pixels): it follows the active area, not the map's."""
    h, w = hw
    sh, sw = size
    slo_y, shi_y, plo_y, pmid_y, phi_y = geo.y
    slo_x, shi_x, plo_x, pmid_x, phi_x = geo.x
    pos = values.index_select(0, ids).view(-1, h, w) > 0  # (M, h, w)
    row_pos = pos.any(2)  # (M, h): input rows holding a positive value
    may = (row_pos.index_select(1, plo_y) | row_pos.index_select(1, pmid_y)
           | row_pos.index_select(1, phi_y))  # (M, sh): output rows possibly active
    rows = flat_nonzero(may.reshape(-1))
    flat = pos.view(-1, w)  # input rows
    step = max(1, (CHUNK_PIXELS * 16) // max(1, sw))
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        n = r.numel()
        m, oy = r // sh, r % sh
        base = m * h

        def read(idx: torch.Tensor, oy: torch.Tensor = oy, base: torch.Tensor = base
                 ) -> torch.Tensor:
            return flat.index_select(0, base + idx.index_select(0, oy))  # (n, w)

        # input columns positive in a surely / possibly read row, columns first: gathering
        # rows of a (w, n) tensor is many times faster than columns of an (n, w) one
        q_sure = (read(slo_y) | read(shi_y)).T.contiguous()
        q_poss = (read(plo_y) | read(pmid_y) | read(phi_y)).T.contiguous()
        sure = q_sure.index_select(0, slo_x) | q_sure.index_select(0, shi_x)  # (sw, n)
        poss = (q_poss.index_select(0, plo_x) | q_poss.index_select(0, pmid_x)
                | q_poss.index_select(0, phi_x))
        mapid = ids.index_select(0, m)
        # runs of sure pixels along each output row (a column of ``sure``): +1 where one
        # starts, -1 one past its end; row-major order pairs the i-th start with the i-th end
        padded = torch.zeros(n, sw + 2, dtype=torch.int8, device=sure.device)
        padded[:, 1:-1] = sure.T
        edge = (padded[:, 1:] - padded[:, :-1]).reshape(-1)  # (n * (sw + 1),)
        start = flat_nonzero(edge == 1)
        if start.numel():
            end = flat_nonzero(edge == -1)
            row = start // (sw + 1)
            owner = mapid.index_select(0, row)
            sure_parts.append(torch.stack([owner // K, owner % K, oy.index_select(0, row),
                                           start % (sw + 1), end % (sw + 1)]))
        un = flat_nonzero((poss & ~sure).T.reshape(-1))
        if un.numel():
            row = un // sw
            owner = mapid.index_select(0, row)
            unsure_parts.append(torch.stack([owner // K, owner % K, oy.index_select(0, row),
                                             un % sw]))


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




def active_mask_dense(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]):
    """The dense reference: ``(up > T) & isfinite(up)`` as a ``(B, K, sh, sw)`` bool tensor,
    ``up = F.interpolate(maps, size, mode="bilinear", align_corners=False)``: a pixel is active
    when its upsampled value is finite and above its unit's threshold."""
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return (up > thresholds.to(up).view(1, -1, 1, 1)) & torch.isfinite(up)
