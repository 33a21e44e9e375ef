"""Network Dissection's counting on the CPU, fused into one compiled pass per image.

:class:`~dissect.netdissect.IoUTally` has two engines that count exactly the same thing. The
*torch* engine (:func:`.active_pixels.active_intervals`, then
:func:`.label_runs.interval_label_counts`) is vectorized torch code and runs on any
device. On the CPU its ~60 elementwise ops per batch each stream their operands through
memory; this module's *numba* engine does the same arithmetic in one loop per image, compiled
with numba (``cache=True``: compiled once per machine, ~4 s, then loaded in ~0.5 s):

1. the image's label planes are read once, row by row in runs of one label, adding to the
   concept areas ``L`` and noting whether any label occurs in two of its planes (only then can
   a pixel repeat a concept, which must count once);
2. for every unit whose map reaches its threshold, the cells whose largest corner does are
   visited row by row; along a cell row the bilinear value is linear in the column weight, and
   each pixel is classified from it in float64: *sure* (above ``T + m2``: its labels are counted
   while the image's planes are still in cache), *unsure* (within ``m2`` of ``T``), or out.
   Maps with ``T = 0`` whose values all have one sign are decided by :mod:`.active_pixels`'
   sign rule instead (:func:`_scan_sign_map`: only output rows reading a positive value are
   visited).

The margins are :mod:`.active_pixels`' (``m`` bounds any float32 implementation's
rounding; ``m2 = m (1 + 2**-20)`` dwarfs float64's), so sure pixels are exactly those that
``F.interpolate(maps, size, mode="bilinear", align_corners=False) > T`` marks away from the
threshold. Unsure pixels are decided in the same loop by the value PyTorch's kernel computes,
emulated in float32 (:func:`_kernel_value`, with the formula
:func:`.active_pixels.kernel_emulation` verified for the channel against ``F.interpolate``);
those of channels without a verified formula are settled by ``F.interpolate`` itself
(:func:`.active_pixels.settle`), and so are all pixels of a map holding a NaN or an infinity (or a
magnitude ``>= HUGE``): a pixel is active when its upsampled value is finite and above ``T``, as
:func:`.active_pixels.active_mask_dense` says.

Threads: ``torch.get_num_threads()`` of them (numba releases the GIL) pull chunks of a few images
one at a time, each thread with its own count arrays, summed at the end (integer sums, so the
split cannot change a count). On a machine shared with other jobs a thread can lose its core for
a scheduler time slice (milliseconds): with the images split in equal parts up front, the others
then wait for it at the end; with small chunks they take over its remaining work. The batch's
casts are numpy's, not torch's: a torch op large enough for an OpenMP parallel region waits at
its barrier for every team thread, and a descheduled one costs a time slice each time (an
800k-value float16 to float32 cast measured 0.17 ms with one thread and 6 ms with two on a
busy 2-core machine).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._numba import _jit, available  # noqa: F401 - available: tally asks numba_engine
from .active_pixels import (
    HUGE,
    axis_ranges,
    kernel_emulation,
    margin_coefficient,
    settle,
    sign_geometry,
)
from .numba_emulation import _check, _kernel_value


@_jit
def _image_areas(labels, b, lut, area, seen):  # pragma: no cover - compiled
    """Add image ``b``'s concept areas to ``area``; return whether a label occurs in two of
    its planes (then repeats are subtracted here, and the caller counts with repeat checks)."""
    _, P, sh, sw = labels.shape
    nlut = lut.shape[0]
    seen[:] = 0
    collide = P > 8  # more planes than bits: check every pixel for repeats
    for p in range(P):
        bit = np.uint8(1 << min(p, 7))
        for y in range(sh):
            prev = labels[b, p, y, 0]
            run = 0
            for x in range(sw + 1):  # runs of one label; x == sw ends the last one
                if x < sw:
                    lab = labels[b, p, y, x]
                    if lab == prev:
                        run += 1
                        continue
                if prev > 0 and prev < nlut:
                    if seen[prev] & ~bit:
                        collide = True
                    seen[prev] |= bit
                    col = lut[prev]
                    if col:
                        area[col - 1] += run
                if x < sw:
                    prev = lab
                    run = 1
    if collide:  # a concept in two planes of one pixel counts once
        for p in range(1, P):
            for y in range(sh):
                for x in range(sw):
                    lab = labels[b, p, y, x]
                    if (lab > 0 and lab < lut.shape[0] and lut[lab]
                            and _repeats(labels, b, p, y, x, lab)):
                        area[lut[lab] - 1] -= 1
    return collide


@_jit(inline="always")
def _repeats(labels, b, p, y, x, lab):  # pragma: no cover - compiled
    """Whether ``lab`` is already at pixel ``(y, x)`` of image ``b`` in a plane before ``p``."""
    for q in range(p):
        if labels[b, q, y, x] == lab:
            return True
    return False


@_jit(inline="always")
def _count_pixel(labels, b, y, x, lut, row, hit, cat_of, dedupe):  # pragma: no cover
    """Add the concepts of pixel ``(y, x)`` of image ``b`` (all planes) to ``row``; with
    ``cat_of`` (concept column -> category, empty when not wanted) flag their categories in
    ``hit``."""
    nlut = lut.shape[0]
    for p in range(labels.shape[1]):
        lab = labels[b, p, y, x]
        if lab <= 0 or lab >= nlut:
            continue
        col = lut[lab]
        if col and not (dedupe and _repeats(labels, b, p, y, x, lab)):
            row[col - 1] += 1
            if cat_of.shape[0]:
                hit[cat_of[col - 1]] = True



@_jit(inline="always")
def _bounds(m_, t, coef, bound):  # pragma: no cover - compiled
    """How to visit one ``(h, w)`` map with threshold ``t``: ``(kind, T - m2, T + m2)``.

    ``kind`` 0: the map holds a NaN, an infinity or a magnitude ``>= HUGE`` (settled whole);
    1: no pixel can be active; 2: the margin scan (:func:`_scan_map`); 3: the sign rule
    (:func:`_scan_sign_map`: ``t == 0``, values ``>= 0``, the smallest positive one
    ``>= bound``)."""
    h, w = m_.shape
    lo = np.float64(m_[0, 0])
    hi = lo
    smallest = np.inf  # smallest positive value
    zero = 0.0  # stays 0 unless a value is NaN or infinite (then NaN)
    for i in range(h):
        for j in range(w):
            v = np.float64(m_[i, j])
            zero += v * 0.0
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            if v > 0.0 and v < smallest:
                smallest = v
    scale = max(abs(hi), abs(lo))
    if zero != 0.0 or not scale < HUGE:
        return 0, hi, hi
    if t == 0.0:
        if hi <= 0.0:
            return 1, np.inf, np.inf  # no value above 0: no pixel above 0
        if lo >= 0.0 and smallest >= bound:
            return 3, 0.0, 0.0
    m2 = (coef * scale + 1e-30) * (1 + 2.0**-20)
    if hi < t - m2:
        return 1, np.inf, np.inf  # nothing reaches T - m2: no pixel to visit
    return 2, t - m2, t + m2


@_jit(inline="always")
def _unsure(out, n_out, b, k, y, x):  # pragma: no cover - compiled
    """Write pixel ``(b, k, y, x)`` at ``out[n_out]`` when there is room."""
    if n_out < out.shape[0]:
        out[n_out, 0] = b
        out[n_out, 1] = k
        out[n_out, 2] = y
        out[n_out, 3] = x


@_jit(inline="always")
def _scan_map(m_, reach, sure, b, k, labels, lut, row, hit, cat_of, dedupe, count, out, n_out,
              fid, t32, kern, ys, ye, wy, xs, xe, wx):  # pragma: no cover - compiled
    """Visit the cells of map ``(b, k)`` whose largest corner reaches ``reach``, row by row.

    Sure pixels (value > ``sure``) are active; unsure ones (``reach <= value <= sure``) are
    decided by the emulated kernel value when the channel's formula ``fid >= 0``, else written
    to ``out[n_out:]`` while it has room. When ``count``, active pixels add their concepts to
    ``row``. Returns the number of active pixels and the new ``n_out`` (unsure pixels left to
    settle so far, written or not).
    """
    h, w = m_.shape
    cnt = 0
    for i in range(h):
        iu = min(i + 1, h - 1)
        for j in range(w):
            ju = min(j + 1, w - 1)
            a00 = np.float64(m_[i, j])
            a01 = np.float64(m_[i, ju])
            a10 = np.float64(m_[iu, j])
            a11 = np.float64(m_[iu, ju])
            if max(max(a00, a01), max(a10, a11)) < reach:
                continue
            # along output row wy: value = v0 + s * wx, the formulas of active_intervals
            dy = a10 - a00
            c0 = a01 - a00
            d = (a11 - a10) - c0
            for y in range(ys[i], ye[i]):
                v0 = a00 + dy * wy[y]
                s = c0 + d * wy[y]
                if max(v0, v0 + s) < reach:  # wx lies in [0, 1]
                    continue
                for x in range(xs[j], xe[j]):
                    v = v0 + s * wx[x]
                    if v > sure:
                        cnt += 1
                        if count:
                            _count_pixel(labels, b, y, x, lut, row, hit, cat_of, dedupe)
                    elif v >= reach:
                        if fid >= 0:
                            if _kernel_value(m_, y, x, fid, kern) > t32:
                                cnt += 1
                                if count:
                                    _count_pixel(labels, b, y, x, lut, row, hit, cat_of,
                                                 dedupe)
                        else:
                            _unsure(out, n_out, b, k, y, x)
                            n_out += 1
    return cnt, n_out


@_jit(inline="always")
def _scan_sign_map(m_, b, k, labels, lut, row, hit, cat_of, dedupe, count, out, n_out,
                   fid, t32, kern, sign, qs, qp, rowpos):  # pragma: no cover - compiled
    """The sign rule on map ``(b, k)`` (threshold 0, values ``>= 0``, positive ones not too
    small; :mod:`.active_pixels`): a pixel is active when a corner it surely reads is positive,
    unsure when only a corner it possibly reads is (decided like :func:`_scan_map`'s unsure
    pixels). Only output rows that read a positive input row are visited. ``sign``: the ranges
    of :func:`.active_pixels.support_ranges` of both axes; ``qs``, ``qp``, ``rowpos``:
    scratch arrays of ``w``, ``w`` and ``h`` booleans. Returns as :func:`_scan_map`."""
    h, w = m_.shape
    slo_y, shi_y, plo_y, phi_y, slo_x, shi_x, plo_x, phi_x = sign
    sh, sw = slo_y.shape[0], slo_x.shape[0]
    for i in range(h):
        rowpos[i] = False
        for j in range(w):
            if m_[i, j] > 0:
                rowpos[i] = True
                break
    cnt = 0
    for y in range(sh):
        r0, r1 = plo_y[y], phi_y[y]
        reads = False
        for i in range(r0, r1 + 1):
            reads = reads or rowpos[i]
        if not reads:
            continue
        s0, s1 = slo_y[y], shi_y[y]
        for j in range(w):  # input columns positive in a surely / possibly read row
            qs[j] = False
            qp[j] = False
            for i in range(r0, r1 + 1):
                if m_[i, j] > 0:
                    qp[j] = True
                    if i >= s0 and i <= s1:
                        qs[j] = True
        for x in range(sw):
            c0, c1 = plo_x[x], phi_x[x]
            if qs[slo_x[x]] or qs[shi_x[x]]:
                cnt += 1
                if count:
                    _count_pixel(labels, b, y, x, lut, row, hit, cat_of, dedupe)
            elif qp[c0] or qp[c1] or qp[min(c0 + 1, c1)]:
                if fid >= 0:
                    if _kernel_value(m_, y, x, fid, kern) > t32:
                        cnt += 1
                        if count:
                            _count_pixel(labels, b, y, x, lut, row, hit, cat_of, dedupe)
                else:
                    _unsure(out, n_out, b, k, y, x)
                    n_out += 1
    return cnt, n_out


@_jit
def _tally_images(maps, thr, labels, lut, coef, bound, formula, kern, sign, cat_of, geometry,
                  inter, area, per_image, unsure, hits, b0, b1):  # pragma: no cover - compiled
    """Count images ``b0 <= b < b1``: concept areas into ``area``, active pixels into
    ``inter (K, C)`` and ``per_image (B, K)`` (and their categories into ``hits (B, K, n)``
    when ``cat_of`` is not empty), unsure pixels left to settle per map into ``unsure (B, K)``
    (-1: a map with a NaN, an infinity or a huge value, settled whole). ``coef``: the margin
    coefficient; ``bound``: the sign rule's smallest positive value; ``formula``: each channel's
    emulation (-1: none), on the axes ``kern``; ``geometry``: :func:`.active_pixels.axis_ranges`
    of both axes."""
    B, K, h, w = maps.shape
    ys, ye, wy, xs, xe, wx = geometry
    seen = np.zeros(lut.shape[0], np.uint8)  # per label: bits of the planes it is in
    none = np.empty((0, 4), np.int64)
    qs = np.empty(w, np.bool_)
    qp = np.empty(w, np.bool_)
    rowpos = np.empty(h, np.bool_)
    for b in range(b0, b1):
        dedupe = _image_areas(labels, b, lut, area, seen)
        for k in range(K):
            kind, reach, sure = _bounds(maps[b, k], np.float64(thr[k]), coef, bound)
            if kind == 0:
                unsure[b, k] = -1
                continue
            if kind == 1:
                continue
            if kind == 3:
                cnt, nun = _scan_sign_map(maps[b, k], b, k, labels, lut, inter[k], hits[b, k],
                                          cat_of, dedupe, True, none, 0, formula[k], thr[k],
                                          kern, sign, qs, qp, rowpos)
            else:
                cnt, nun = _scan_map(maps[b, k], reach, sure, b, k, labels, lut, inter[k],
                                     hits[b, k], cat_of, dedupe, True, none, 0, formula[k],
                                     thr[k], kern, ys, ye, wy, xs, xe, wx)
            per_image[b, k] = cnt
            unsure[b, k] = nun


@_jit
def _unsure_pixels(maps, thr, labels, lut, coef, bound, formula, kern, sign, geometry,
                   flagged, offsets, out):  # pragma: no cover - compiled
    """Write the unsure pixels left to settle ``(b, k, y, x)`` of the ``flagged`` maps (pairs
    ``(b, k)``) into ``out[offsets[n]:offsets[n + 1]]``; maps settled whole give every pixel."""
    B, K, h, w = maps.shape
    ys, ye, wy, xs, xe, wx = geometry
    sh, sw = ye[h - 1], xe[w - 1]  # the last cell ends the axis
    dummy = np.zeros(1, np.int64)
    hit = np.zeros(0, np.bool_)
    cat_of = np.zeros(0, np.int64)
    qs = np.empty(w, np.bool_)
    qp = np.empty(w, np.bool_)
    rowpos = np.empty(h, np.bool_)
    for n in range(flagged.shape[0]):
        b, k = flagged[n, 0], flagged[n, 1]
        at = offsets[n]
        kind, reach, sure = _bounds(maps[b, k], np.float64(thr[k]), coef, bound)
        if kind == 0:
            for y in range(sh):
                for x in range(sw):
                    _unsure(out, at, b, k, y, x)
                    at += 1
        elif kind == 3:
            _scan_sign_map(maps[b, k], b, k, labels, lut, dummy, hit, cat_of, False, False,
                           out[: offsets[n + 1]], at, formula[k], thr[k], kern, sign, qs, qp,
                           rowpos)
        elif kind == 2:
            _scan_map(maps[b, k], reach, sure, b, k, labels, lut, dummy, hit, cat_of, False,
                      False, out[: offsets[n + 1]], at, formula[k], thr[k], kern,
                      ys, ye, wy, xs, xe, wx)


@_jit
def _count_pixels(labels, lut, coords, inter, per_image, hits, cat_of):  # pragma: no cover
    """Add the settled active pixels ``coords (n, 4)`` rows ``(b, k, y, x)``."""
    for n in range(coords.shape[0]):
        b, k, y, x = coords[n, 0], coords[n, 1], coords[n, 2], coords[n, 3]
        per_image[b, k] += 1
        _count_pixel(labels, b, y, x, lut, inter[k], hits[b, k], cat_of, True)


def _numpy(x: torch.Tensor, dtype: type) -> np.ndarray:
    """``x`` as a C-contiguous numpy array of ``dtype`` on the CPU (a view when it already is
    one; otherwise numpy casts it, in one thread; bfloat16, which numpy lacks, goes through
    float32 exactly)."""
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return np.ascontiguousarray(x.numpy(), dtype=dtype)


def _count_in_chunks(n: int, B: int, count: Callable[[tuple, int, int], None],
                     totals: tuple[np.ndarray, ...]) -> None:
    """Run ``count(part, b0, b1)`` over images ``0..B`` in small chunks pulled by ``n`` threads
    (the caller's and ``n - 1`` more), each adding into its own ``part``: zeroed copies of the
    arrays ``totals`` (the caller's thread adds into ``totals`` itself), summed into ``totals``
    at the end (integer sums: the split cannot change a count).

    Chunks of about ``B / (8 n)`` images are handed out one at a time, so a thread the machine
    deschedules holds up at most its current chunk: the others take the rest.
    """
    size = max(1, -(-B // (8 * n)))
    starts = list(range(0, B, size))
    ticket = itertools.count()  # next() is atomic under the GIL
    parts = [totals] + [tuple(np.zeros_like(a) for a in totals) for _ in range(n - 1)]

    def work(i: int) -> None:
        part = parts[i]
        while (j := next(ticket)) < len(starts):
            count(part, starts[j], min(starts[j] + size, B))

    with ThreadPoolExecutor(n - 1) as pool:
        helpers = [pool.submit(work, i) for i in range(1, n)]
        work(0)
        for h in helpers:
            h.result()
    for part in parts[1:]:
        for total, a in zip(totals, part, strict=True):
            total += a


def count_batch(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    pixel_labels: torch.Tensor,
    lut: torch.Tensor,
    n_concepts: int,
    cache: dict,
    threads: int | None = None,
    *,
    concept_category: torch.Tensor | None = None,
    n_categories: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Exact Network Dissection counts of one batch, on the CPU.

    Parameters
    ----------
    maps
        ``(B, K, h, w)`` activations (CPU; cast to float32 as ``F.interpolate`` sees them).
    thresholds
        ``(K,)`` thresholds ``T_k`` (float32, as :func:`.active_pixels.active_intervals`
        uses them).
    pixel_labels
        ``(B, P, sh, sw)`` label numbers (0 or negative: no label).
    lut
        ``(N,)`` int64: label number -> concept column + 1 (0: not scored; numbers ``>= N``
        are not scored either).
    n_concepts
        ``C``, the number of concept columns.
    cache
        Dict kept by the caller across batches (geometry per shape, and
        :func:`.active_pixels.kernel_emulation`'s and :func:`.active_pixels.settle`'s checks).
    threads
        Threads to count with (default ``torch.get_num_threads()``).
    concept_category
        ``(C,)`` int64 category of each concept column: when given, a fourth tensor says which
        categories each unit's active pixels hit in each image.
    n_categories
        The number of categories (with ``concept_category``).

    Returns
    -------
    intersection, area, active[, hits]
        int64 tensors: ``(K, C)`` pixels of each unit's active area carrying each concept,
        ``(C,)`` pixels carrying each concept, ``(B, K)`` active pixels per image and unit;
        with ``concept_category``, ``(B, K, n_categories)`` bool: whether an active pixel of
        unit ``k`` in image ``b`` carries a concept of the category. A pixel active for unit
        ``k`` is one whose value
        ``F.interpolate(maps, (sh, sw), mode="bilinear", align_corners=False)[b, k, y, x]`` is
        finite and ``> T[k]`` (:func:`.active_pixels.active_mask_dense`); a concept present in
        several planes of one pixel counts once.
    """
    # numpy casts, not torch's: no OpenMP parallel region (see the module docstring)
    m = _numpy(maps, np.float32)
    maps = torch.from_numpy(m)
    B, K, h, w = m.shape
    P, sh, sw = pixel_labels.shape[1:]
    t = _numpy(thresholds, np.float32)
    thr = torch.from_numpy(t)
    lab = _numpy(pixel_labels, np.int64)
    lut_np = _numpy(lut, np.int64)
    inter = np.zeros((K, n_concepts), np.int64)
    area = np.zeros(n_concepts, np.int64)
    per_image = np.zeros((B, K), np.int64)
    if concept_category is None:
        cat_of = np.zeros(0, np.int64)
        hits = np.zeros((B, K, 0), np.bool_)
    else:
        cat_of = _numpy(concept_category, np.int64)
        hits = np.zeros((B, K, n_categories), np.bool_)

    def result() -> tuple[torch.Tensor, ...]:
        out = (torch.from_numpy(inter), torch.from_numpy(area), torch.from_numpy(per_image))
        return out if concept_category is None else out + (torch.from_numpy(hits),)

    if maps.numel() == 0 or sh * sw == 0:
        return result()
    key = ("numba axes", h, w, sh, sw)
    if key not in cache:
        cache[key] = axis_ranges(h, sh) + axis_ranges(w, sw)
    geometry = cache[key]
    emu = kernel_emulation(maps, thr, (sh, sw), cache, check=_check)
    sign = sign_geometry(h, w, (sh, sw), "cpu", cache)
    coef = margin_coefficient(h, w)
    unsure = np.zeros((B, K), np.int64)
    fixed = (m, t, lab, lut_np, coef, sign.bound, emu.formula, emu.axes, sign.arrays, cat_of,
             geometry)
    n = max(1, min(threads or torch.get_num_threads(), B))
    if n == 1:
        _tally_images(*fixed, inter, area, per_image, unsure, hits, 0, B)
    else:
        _count_in_chunks(n, B, lambda part, b0, b1: _tally_images(
            *fixed, part[0], part[1], per_image, unsure, hits, b0, b1), (inter, area))
    flagged = np.argwhere(unsure != 0)
    if len(flagged):
        sizes = unsure[flagged[:, 0], flagged[:, 1]]
        sizes = np.where(sizes < 0, sh * sw, sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        coords = np.empty((int(offsets[-1]), 4), np.int64)
        _unsure_pixels(m, t, lab, lut_np, coef, sign.bound, emu.formula, emu.axes, sign.arrays,
                       geometry, flagged, offsets, coords)
        coords_t = torch.from_numpy(coords.T.copy())
        active = settle(maps, thr, (sh, sw), coords_t, cache).numpy()
        _count_pixels(lab, lut_np, coords[active], inter, per_image, hits, cat_of)
    return result()
