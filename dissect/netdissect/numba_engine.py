"""Network Dissection's counting on the CPU, fused into one compiled pass per image.

:class:`~dissect.netdissect.IoUTally` has two engines that count exactly the same thing. The
*torch* engine (:func:`.active_pixels.active_intervals`, then
:func:`.label_runs.interval_label_counts`) is vectorized torch code and runs on any
device. On the CPU its ~60 elementwise ops per batch each stream their operands through
memory; this module's *numba* engine does the same arithmetic in one loop per image, compiled
with numba (``cache=True``: compiled once per machine, ~2 s, then loaded in ~0.3 s):

1. the image's label planes are read once, row by row in runs of one label, adding to the
   concept areas ``L`` and noting whether any label occurs in two of its planes (only then can
   a pixel repeat a concept, which must count once);
2. for every unit whose map reaches its threshold, the cells whose largest corner does are
   visited row by row; along a cell row the bilinear value is linear in the column weight, and
   each pixel is classified from it in float64: *sure* (above ``T + m2``: its labels are counted
   while the image's planes are still in cache), *unsure* (within ``m2`` of ``T``), or out.

The margins are :mod:`.active_pixels`' (``m`` bounds any float32 implementation's
rounding; ``m2 = m (1 + 2**-20)`` dwarfs float64's), so sure pixels are exactly those that
``F.interpolate(maps, size, mode="bilinear", align_corners=False) > T`` marks away from the
threshold; the rare unsure pixels are settled by ``F.interpolate`` itself
(:func:`.active_pixels.settle`), and so are all pixels of a map holding a NaN or an infinity (or a
magnitude ``>= HUGE``): a pixel is active when its upsampled value is finite and above ``T``, as
:func:`.active_pixels.active_mask_dense` says. Images are split between ``torch.get_num_threads()``
threads (numba releases the GIL), each with its own count arrays, summed at the end: integer sums,
so the split cannot change a count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .active_pixels import HUGE, axis_ranges, margin_coefficient, settle

try:  # numba is a dependency; the torch engine still works where it cannot be imported
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None


def _jit(fn=None, **options):
    """``numba.njit(cache=True, nogil=True, **options)``, or the plain function without numba.

    Where numba finds no writable cache folder (next to this file, or the user's cache
    folder; ``NUMBA_CACHE_DIR`` sets one) it refuses ``cache=True``: then the kernels are
    compiled in every process instead.
    """
    if fn is None:
        return lambda f: _jit(f, **options)
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, **options)(fn)


def available() -> bool:
    """Whether numba could be imported (the ``"numba"`` engine needs it)."""
    return numba is not None


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
def _count_pixel(labels, b, y, x, lut, row, dedupe):  # pragma: no cover - compiled
    """Add the concepts of pixel ``(y, x)`` of image ``b`` (all planes) to ``row``."""
    nlut = lut.shape[0]
    for p in range(labels.shape[1]):
        lab = labels[b, p, y, x]
        if lab <= 0 or lab >= nlut:
            continue
        col = lut[lab]
        if col and not (dedupe and _repeats(labels, b, p, y, x, lab)):
            row[col - 1] += 1


@_jit(inline="always")
def _bounds(m_, t, coef):  # pragma: no cover - compiled
    """``(finite, T - m2, T + m2)`` for one ``(h, w)`` map and its threshold; ``finite`` is
    False for a map holding a NaN, an infinity or a magnitude ``>= HUGE`` (settled whole)."""
    h, w = m_.shape
    lo = np.float64(m_[0, 0])
    hi = lo
    zero = 0.0  # stays 0 unless a value is NaN or infinite (then NaN)
    for i in range(h):
        for j in range(w):
            v = np.float64(m_[i, j])
            zero += v * 0.0
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    scale = max(abs(hi), abs(lo))
    if zero != 0.0 or not scale < HUGE:
        return False, hi, hi
    m2 = (coef * scale + 1e-30) * (1 + 2.0**-20)
    if hi < t - m2:
        return True, np.inf, np.inf  # nothing reaches T - m2: no pixel to visit
    return True, t - m2, t + m2


@_jit(inline="always")
def _scan_map(m_, reach, sure, b, k, labels, lut, row, dedupe, count, out, n_out,
              ys, ye, wy, xs, xe, wx):  # pragma: no cover - compiled
    """Visit the cells of map ``(b, k)`` whose largest corner reaches ``reach``, row by row.

    When ``count``: sure pixels (value > ``sure``) add their concepts to ``row``. Unsure ones
    (``reach <= value <= sure``) are written to ``out[n_out:]`` while it has room. Returns the
    number of sure pixels and the new ``n_out`` (unsure pixels seen so far, written or not).
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
                            _count_pixel(labels, b, y, x, lut, row, dedupe)
                    elif v >= reach:
                        if n_out < out.shape[0]:
                            out[n_out, 0] = b
                            out[n_out, 1] = k
                            out[n_out, 2] = y
                            out[n_out, 3] = x
                        n_out += 1
    return cnt, n_out


@_jit
def _tally_images(maps, thr, labels, lut, coef, ys, ye, wy, xs, xe, wx,
                  inter, area, per_image, unsure, b0, b1):  # pragma: no cover - compiled
    """Count images ``b0 <= b < b1``: concept areas into ``area``, sure pixels into
    ``inter (K, C)`` and ``per_image (B, K)``, unsure pixels per map into ``unsure (B, K)``
    (-1: a map with a NaN, an infinity or a huge value, settled whole). ``coef``: the margin
    coefficient."""
    B, K, h, w = maps.shape
    seen = np.zeros(lut.shape[0], np.uint8)  # per label: bits of the planes it is in
    none = np.empty((0, 4), np.int64)
    for b in range(b0, b1):
        dedupe = _image_areas(labels, b, lut, area, seen)
        for k in range(K):
            finite, reach, sure = _bounds(maps[b, k], np.float64(thr[k]), coef)
            if not finite:
                unsure[b, k] = -1
                continue
            if reach == np.inf:
                continue
            cnt, nun = _scan_map(maps[b, k], reach, sure, b, k, labels, lut, inter[k], dedupe,
                                 True, none, 0, ys, ye, wy, xs, xe, wx)
            per_image[b, k] = cnt
            unsure[b, k] = nun


@_jit
def _unsure_pixels(maps, thr, labels, lut, coef, flagged, offsets, out,
                   ys, ye, wy, xs, xe, wx):  # pragma: no cover - compiled
    """Write the unsure pixels ``(b, k, y, x)`` of the ``flagged`` maps (pairs ``(b, k)``)
    into ``out[offsets[n]:offsets[n + 1]]``; maps settled whole give every pixel."""
    B, K, h, w = maps.shape
    sh, sw = ye[h - 1], xe[w - 1]  # the last cell ends the axis
    dummy = np.zeros(1, np.int64)
    for n in range(flagged.shape[0]):
        b, k = flagged[n, 0], flagged[n, 1]
        at = offsets[n]
        finite, reach, sure = _bounds(maps[b, k], np.float64(thr[k]), coef)
        if not finite:
            for y in range(sh):
                for x in range(sw):
                    out[at, 0] = b
                    out[at, 1] = k
                    out[at, 2] = y
                    out[at, 3] = x
                    at += 1
            continue
        _scan_map(maps[b, k], reach, sure, b, k, labels, lut, dummy, False, False,
                  out[: offsets[n + 1]], at, ys, ye, wy, xs, xe, wx)


@_jit
def _count_pixels(labels, lut, coords, inter, per_image):  # pragma: no cover - compiled
    """Add the settled active pixels ``coords (n, 4)`` rows ``(b, k, y, x)``."""
    for n in range(coords.shape[0]):
        b, k, y, x = coords[n, 0], coords[n, 1], coords[n, 2], coords[n, 3]
        per_image[b, k] += 1
        _count_pixel(labels, b, y, x, lut, inter[k], True)


def count_batch(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    pixel_labels: torch.Tensor,
    lut: torch.Tensor,
    n_concepts: int,
    cache: dict,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        :func:`.active_pixels.settle`'s rounding check).
    threads
        Threads to split the images between (default ``torch.get_num_threads()``).

    Returns
    -------
    intersection, area, active
        int64 tensors: ``(K, C)`` pixels of each unit's active area carrying each concept,
        ``(C,)`` pixels carrying each concept, ``(B, K)`` active pixels per image and unit.
        A pixel active for unit ``k`` is one whose value
        ``F.interpolate(maps, (sh, sw), mode="bilinear", align_corners=False)[b, k, y, x]`` is
        finite and ``> T[k]`` (:func:`.active_pixels.active_mask_dense`); a concept present in
        several planes of one pixel counts once.
    """
    maps = maps.detach().to("cpu", torch.float32).contiguous()
    B, K, h, w = maps.shape
    P, sh, sw = pixel_labels.shape[1:]
    thr = thresholds.detach().to("cpu", torch.float32).contiguous()
    labels = pixel_labels.to("cpu", torch.int64).contiguous()
    lut_np = lut.to("cpu", torch.int64).contiguous().numpy()
    inter = np.zeros((K, n_concepts), np.int64)
    area = np.zeros(n_concepts, np.int64)
    per_image = np.zeros((B, K), np.int64)
    if maps.numel() == 0 or sh * sw == 0:
        return torch.from_numpy(inter), torch.from_numpy(area), torch.from_numpy(per_image)
    key = ("numba axes", h, w, sh, sw)
    if key not in cache:
        cache[key] = axis_ranges(h, sh) + axis_ranges(w, sw)
    geometry = cache[key]
    m, t, lab = maps.numpy(), thr.numpy(), labels.numpy()
    coef = margin_coefficient(h, w)
    unsure = np.zeros((B, K), np.int64)
    n = max(1, min(threads or torch.get_num_threads(), B))
    if n == 1:
        _tally_images(m, t, lab, lut_np, coef, *geometry, inter, area, per_image, unsure,
                      0, B)
    else:  # each thread its own images and count arrays (integer sums: order cannot matter)
        cuts = np.linspace(0, B, n + 1).astype(np.int64)
        parts = [(inter if i == 0 else np.zeros_like(inter),
                  area if i == 0 else np.zeros_like(area)) for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda i: _tally_images(m, t, lab, lut_np, coef, *geometry, parts[i][0],
                                                  parts[i][1], per_image, unsure,
                                                  cuts[i], cuts[i + 1]), range(n)))
        for part_inter, part_area in parts[1:]:
            inter += part_inter
            area += part_area
    flagged = np.argwhere(unsure != 0)
    if len(flagged):
        sizes = unsure[flagged[:, 0], flagged[:, 1]]
        sizes = np.where(sizes < 0, sh * sw, sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        coords = np.empty((int(offsets[-1]), 4), np.int64)
        _unsure_pixels(m, t, lab, lut_np, coef, flagged, offsets, coords, *geometry)
        coords_t = torch.from_numpy(coords.T.copy())
        active = settle(maps, thr, (sh, sw), coords_t, cache).numpy()
        _count_pixels(lab, lut_np, coords[active], inter, per_image)
    return torch.from_numpy(inter), torch.from_numpy(area), torch.from_numpy(per_image)
