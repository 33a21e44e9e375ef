"""Settling: the pixels within rounding of a threshold get the value ``F.interpolate`` computes,
bit for bit (see :mod:`.active_pixels` for the method and the exactness argument).

:func:`kernel_emulation` finds, once per layer geometry, device and thread mode, the float32
formula PyTorch's upsampling kernel uses for each channel (verified bit for bit on real and
adversarial maps); :func:`settle` then decides pixels from their four corners with it, and
falls back to ``F.interpolate`` (:func:`_settle_by_interpolate`) for channels no candidate
reproduces and for maps holding a NaN, an infinity or a huge value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._grid import HUGE, flat_nonzero

log = logging.getLogger(__name__)


# --- PyTorch's float32 kernel, emulated --------------------------------------------------------
#
# A pixel within the rounding margin of T is decided by the value ``F.interpolate`` computes, bit
# for bit. Rather than upsampling whole maps for a few such pixels, the value is recomputed from
# the pixel's four corners with the kernel's own float32 arithmetic: its source coordinates and
# weights (``compute_source_index_and_lambda``), and its sum of products, whose association and
# fused multiply-adds depend on the build and on the code path PyTorch picks for the shape (a
# generic loop for large outputs; a channels-last loop for small ones, vectorized over channels
# with a scalar tail). Which formula a layer's channels get is not assumed: every candidate below
# is checked bit for bit against ``F.interpolate`` on maps mixing the layer's first image with
# ties, plateaus, subnormal and widely spread values (:func:`kernel_emulation`, once per shape,
# size, device and thread mode); channels no candidate matches are settled by ``F.interpolate``.

FORMULAS = (
    # 0-8: the generic loop, ``t = a0 w0 + a1 w1`` along x then along y, each sum either plain
    # (mode 0) or fused on its first (1) or second (2) product: id = 3 * inner + outer
    "generic-00", "generic-01", "generic-02", "generic-10", "generic-11", "generic-12",
    "generic-20", "generic-21", "generic-22",
    # 9-14: the channels-last loop, products with ``w_yx = wy * wx``: vector lanes
    # ``p00 + (p01 + (p10 + p11))`` and the scalar tail ``((p00 + p01) + p10) + p11``, fused
    # as GCC contracts them, or plain
    "lanes-fma", "lanes-fma2", "lanes-plain", "tail-fma", "tail-fma2", "tail-plain",
)
# the order in which candidates are tried (PyTorch 2.x on x86: generic-11, lanes-fma, tail-fma)
_TRY_ORDER = (4, 9, 12, 0, 11, 14, 8, 10, 13, 1, 2, 3, 5, 6, 7)
_VERIFY_ELEMENTS = 1 << 21  # output values emulated at once while verifying


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` rounded once to float32 (a fused multiply-add), exactly, for float32 arrays
    (broadcast together).

    ``a * b`` is exact in float64, and ``s = a * b + c`` rounded to float64 is off by ``e``
    (found exactly, TwoSum). Rounding ``s`` to float32 rounds ``a * b + c`` correctly unless
    ``s`` lies exactly halfway between two float32 values (the 29 bits float64 has beyond
    float32's are ``100...0``) while ``e`` is not 0: then the value lies on ``e``'s side of the
    halfway point. Only those candidates (and values below ``2**-125``, where float32 is
    subnormal and the halfway bit moves; an exact 0 is exact) are looked at closely.
    """
    p = np.asarray(a, np.float32).astype(np.float64, order="C")
    p = np.multiply(p, np.asarray(b, np.float32), order="C")
    c64 = np.asarray(c, np.float32).astype(np.float64, order="C")
    s = np.add(p, c64, order="C")
    r = np.asarray(s.astype(np.float32))
    low = s.view(np.uint64) & np.uint64((1 << 29) - 1)
    tiny = np.abs(s) < 2.0**-125
    cand = np.flatnonzero((low == np.uint64(1 << 28)) | (tiny & (s != 0)))
    if len(cand):
        shape = s.shape
        pc = np.broadcast_to(p, shape).reshape(-1)[cand]
        cc = np.broadcast_to(c64, shape).reshape(-1)[cand]
        sc = s.reshape(-1)[cand]
        t = sc - pc
        e = (pc - (sc - t)) + (cc - t)
        rc = r.reshape(-1)[cand]
        r64 = rc.astype(np.float64)
        up = sc > r64
        nb = np.nextafter(rc, np.where(up, np.float32(np.inf), np.float32(-np.inf)))
        fix = (e != 0) & (sc == (r64 + nb.astype(np.float64)) * 0.5) & ((e > 0) == up)
        if fix.any():
            r = r.copy()
            r.reshape(-1)[cand[fix]] = nb[fix]
    return r


def kernel_axis(in_size: int, out_size: int, fused: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's float32 source indices and weights along one axis (``align_corners=False``).

    Emulates ``compute_source_index_and_lambda``: ``scale = float(in) / out``,
    ``src = scale * (o + 0.5) - 0.5`` (one rounding when ``fused``, as GCC contracts it into a
    fused multiply-add; two otherwise), clamped at 0; ``i0 = min(floor(src), in - 1)``,
    ``l1 = clamp(src - i0, 0, 1)``, ``i1 = i0 + (i0 < in - 1)``, ``l0 = 1 - l1``; an unchanged
    size copies (``i0 = i1 = o``, ``l0 = 1``, ``l1 = 0``).

    Returns
    -------
    i0, i1, l0, l1
        ``(out_size,)`` int64 indices and float32 weights.
    """
    o = np.arange(out_size, dtype=np.int64)
    if in_size == out_size:
        return o, o.copy(), np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    f32 = np.float32
    scale = np.full(out_size, f32(in_size) / f32(out_size), np.float32)
    x = o.astype(np.float32) + f32(0.5)
    if fused:
        src = fma32(scale, x, np.full(out_size, -0.5, np.float32))
    else:
        src = scale * x - f32(0.5)
    src = np.where(src < 0, f32(0), src).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    l1 = np.clip(src - i0.astype(np.float32), f32(0), f32(1)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (f32(1) - l1).astype(np.float32), l1


def _lin(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray, mode: int) -> np.ndarray:
    """``a * wa + b * wb`` in float32: plain (mode 0), or fused on the first (1) or second (2)
    product."""
    if mode == 0:
        return a * wa + b * wb
    if mode == 1:
        return fma32(a, wa, b * wb)
    return fma32(b, wb, a * wa)


def emulate(formula: int, a00: np.ndarray, a01: np.ndarray, a10: np.ndarray, a11: np.ndarray,
            ly0: np.ndarray, ly1: np.ndarray, lx0: np.ndarray, lx1: np.ndarray) -> np.ndarray:
    """One of :data:`FORMULAS` in float32 on broadcastable float32 arrays: corners ``a_yx``
    (``y``, ``x``: 0 for the index ``i0``, 1 for ``i1``) and the axes' weights."""
    if formula < 9:
        inner, outer = divmod(formula, 3)
        t0 = _lin(a00, lx0, a01, lx1, inner)
        t1 = _lin(a10, lx0, a11, lx1, inner)
        return _lin(t0, ly0, t1, ly1, outer)
    w00, w01, w10, w11 = ly0 * lx0, ly0 * lx1, ly1 * lx0, ly1 * lx1
    p00, p01, p10, p11 = a00 * w00, a01 * w01, a10 * w10, a11 * w11
    if formula == 9:  # a00 w00 + (a01 w01 + (a10 w10 + a11 w11)), fused from the right
        return fma32(a00, w00, fma32(a01, w01, fma32(a11, w11, p10)))
    if formula == 10:
        return fma32(a00, w00, fma32(a01, w01, fma32(a10, w10, p11)))
    if formula == 11:
        return p00 + (p01 + (p10 + p11))
    if formula == 12:  # ((a00 w00 + a01 w01) + a10 w10) + a11 w11, fused from the left
        return fma32(a11, w11, fma32(a10, w10, fma32(a00, w00, p01)))
    if formula == 13:
        return fma32(a11, w11, fma32(a10, w10, fma32(a01, w01, p00)))
    return ((p00 + p01) + p10) + p11


@dataclass(frozen=True)
class KernelEmulation:
    """How ``F.interpolate`` computes one layer geometry's values, as verified.

    Attributes
    ----------
    formula
        ``(K,)`` int64: each channel's index into :data:`FORMULAS`, or -1 where no candidate
        matched (those channels are settled by ``F.interpolate``).
    axes
        ``(i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x)``: :func:`kernel_axis` of both axes.
    fused
        Whether the source coordinates are computed with a fused multiply-add.
    """

    formula: np.ndarray
    axes: tuple[np.ndarray, ...]
    fused: bool


def _emulate_maps(formula: int, m: np.ndarray, axes: tuple[np.ndarray, ...]) -> np.ndarray:
    """Every upsampled value of the ``(n, h, w)`` float32 maps ``m`` by one formula."""
    i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x = axes
    ly0, ly1 = l0y[:, None], l1y[:, None]
    if formula < 9:  # separable: along x for every input row, then along y
        inner, outer = divmod(formula, 3)
        t = _lin(np.ascontiguousarray(m[:, :, i0x]), l0x, np.ascontiguousarray(m[:, :, i1x]), l1x,
                 inner)  # (n, h, sw)
        return _lin(t[:, i0y], ly0, t[:, i1y], ly1, outer)
    rows0, rows1 = m[:, i0y], m[:, i1y]
    corners = (np.ascontiguousarray(r[:, :, i]) for r, i in
               ((rows0, i0x), (rows0, i1x), (rows1, i0x), (rows1, i1x)))
    return emulate(formula, *corners, ly0, ly1, l0x, l1x)


_VERIFY_VALUES = 128  # input values per channel the check aims at (small maps: more images)
_VERIFY_OUTPUTS = 4096  # and output values per channel (small outputs: more images)
_VERIFY_BUDGET = 1 << 20  # output values compared (beyond one image)
_VERIFY_FULL = 32  # channels at each end compared on every pixel when rows are sampled


def _verification_maps(maps: torch.Tensor, thr: torch.Tensor, size: tuple[int, int]
                       ) -> torch.Tensor:
    """``(V, K, h, w)`` float32 maps to check the emulation on, each 2x2 block of one kind: the
    batch's first image (real data; a map holding a non-finite or huge value is replaced by
    random values); random values at the channel's scale; a plateau (of the unit's threshold, of
    0 or of a coarse quantized value: ties); subnormal values (small multiples of 2**-149 and
    values around 1e-40, where a kernel that flushes them to zero would show); or magnitudes
    spread over 60 decades (where the order of the sums matters most). One image, more for
    small maps or outputs (aiming at ``_VERIFY_VALUES`` input and ``_VERIFY_OUTPUTS`` output
    values per channel) while their outputs stay within ``_VERIFY_BUDGET``: ``F.interpolate``
    of the check costs about one image's for large layers."""
    _, K, h, w = maps.shape
    g = torch.Generator().manual_seed(12345)
    real = maps[0].float().cpu()
    bad = ~(real.abs() < HUGE).reshape(K, -1).all(1)  # NaN compares False
    if bool(bad.any()):
        real = torch.where(bad.view(K, 1, 1), torch.randn(K, h, w, generator=g), real)
    scale = real.abs().reshape(K, -1).amax(1)
    scale = torch.where(scale > 2.0**-60, scale, torch.ones_like(scale)).view(K, 1, 1)
    t = torch.where(torch.isfinite(thr), thr, torch.zeros_like(thr)).float().cpu().view(K, 1, 1)
    hh, ww = (h + 1) // 2, (w + 1) // 2
    n = max(1, min(max(-(-_VERIFY_VALUES // (h * w)), -(-_VERIFY_OUTPUTS // (size[0] * size[1]))),
                   _VERIFY_BUDGET // (K * size[0] * size[1])))
    full, half = (n, K, h, w), (n, K, hh, ww)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (n, K, hh, ww) -> (n, K, h, w): 2x2 blocks
        return x.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :h, :w]

    random = torch.randn(full, generator=g) * scale
    coarse = (torch.randn(half, generator=g) * 2).round() / 4 * scale
    pick = torch.rand(half, generator=g)
    coarse = torch.where(pick < 0.4, t.expand(half), coarse)
    plateau = blocks(torch.where(pick > 0.8, torch.zeros_like(coarse), coarse))
    steps = torch.randint(0, 9, full, generator=g).float() * 2.0**-149
    subnormal = torch.where(torch.rand(full, generator=g) < 0.5, steps,
                            torch.rand(full, generator=g) * 2e-40)
    decades = torch.randn(full, generator=g) * 10.0 ** (torch.rand(full, generator=g) * 60 - 30)
    kind = blocks(torch.randint(0, 5, half, generator=g))
    image = torch.where(kind == 0, real.expand(full), random)
    image = torch.where(kind == 2, plateau, image)
    image = torch.where(kind == 3, subnormal, image)
    image = torch.where(kind == 4, decades, image)
    return image.contiguous().to(maps.device)


def _check_numpy(formula: int, have: np.ndarray, want: np.ndarray, channels: np.ndarray,
                 axes: tuple[np.ndarray, ...]) -> np.ndarray:
    """Which of the ``channels`` of the ``(V, K, h, w)`` maps ``have`` upsample to ``want``
    ``(V, K, sh, sw)`` bit for bit under ``formula`` (``(len(channels),)`` bool)."""
    V, K, h, w = have.shape
    sh, sw = want.shape[2:]
    n = len(channels)
    # a cheap look at the first output row first, then every pixel of the survivors
    first = tuple(a[:1] for a in axes[:4]) + tuple(axes[4:])
    got = _emulate_maps(formula, have[:, channels].reshape(-1, h, w), first)
    same = (got.reshape(V, n, -1) == want[:, channels, :1].reshape(V, n, -1)).all((0, 2))
    todo = np.flatnonzero(same)
    step = max(1, _VERIFY_ELEMENTS // (V * sh * sw))
    for s in range(0, len(todo), step):
        part = todo[s : s + step]
        got = _emulate_maps(formula, have[:, channels[part]].reshape(-1, h, w), axes)
        same[part] = (got.reshape(V, len(part), -1)
                      == want[:, channels[part]].reshape(V, len(part), -1)).all((0, 2))
    return same


# The verdicts of :func:`kernel_emulation`, kept for the process: they depend only on the
# PyTorch build, the shape, the output size, the device and the thread mode (the key), not on
# the data, so a later dissection of the same geometry skips the check (about 0.35 s for 512
# channels at 7 -> 112), as numba's compiled kernels are kept. A cache, never a result.
_VERDICTS: dict[tuple, KernelEmulation] = {}

Check = Callable[[int, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]], np.ndarray]


def kernel_emulation(maps: torch.Tensor, thr: torch.Tensor, size: tuple[int, int],
                     cache: dict, check: Check | None = None) -> KernelEmulation:
    """The verified emulation of ``F.interpolate(maps, size, mode="bilinear",
    align_corners=False)`` for this layer geometry (made once, kept in ``cache``).

    Each channel gets the first of :data:`FORMULAS` (under the source coordinates computed with a
    fused multiply-add, else without) whose values equal ``F.interpolate``'s bit for bit on every
    pixel of :func:`_verification_maps` (``(n, K, h, w)`` calls, on the maps' device). PyTorch's
    CPU kernel picks its loop from the shape, the output size and, for 3 channels, whether one
    thread runs, so the check is kept per ``(K, h, w, size, device, one thread)``.

    Parameters
    ----------
    maps, thr, size
        A batch of the layer (its first image is checked), the ``(K,)`` thresholds (synthetic
        ties are made at them) and the output size.
    cache
        Dict kept by the caller across batches of the layer.
    check
        ``check(formula, have, want, channels, axes)``: which ``channels`` of the
        ``(V, K, h, w)`` float32 maps ``have`` the formula upsamples to ``want``
        ``(V, K, sh, sw)`` exactly (default: with numpy; the numba engine passes its compiled
        emulation, which it then uses).
    """
    B, K, h, w = maps.shape
    key = ("emulation", K, h, w, tuple(size), str(maps.device), torch.get_num_threads() == 1)
    if key in cache:
        return cache[key]
    known = (*key, torch.__version__, check is None)
    if known in _VERDICTS:  # this process checked the geometry before (another call, layer)
        cache[key] = _VERDICTS[known]
        return cache[key]
    check = _check_numpy if check is None else check
    sh, sw = size
    ver = _verification_maps(maps, thr.to(maps.device, torch.float32), size)
    V = len(ver)
    # every channel is compared on some output rows (all of them when that fits the budget),
    # and the first and last channels on every pixel: every output coordinate of both axes, so
    # every weight, is compared, and every formula on many different corners
    rows = np.arange(sh)
    if V * K * sh * sw > _VERIFY_BUDGET:
        rows = np.unique(np.linspace(0, sh - 1, max(1, _VERIFY_BUDGET // (V * K * sw)))
                         .round().astype(np.int64))
    full = np.arange(K)
    if len(rows) < sh:
        full = np.unique(np.concatenate([np.arange(min(K, _VERIFY_FULL)),
                                         np.arange(max(0, K - _VERIFY_FULL), K)]))
    step = max(1, _VERIFY_BUDGET // (K * sh * sw))  # images per F.interpolate call
    want_rows, want_full = [], []
    rows_t, full_t = torch.from_numpy(rows).to(maps.device), torch.from_numpy(full).to(maps.device)
    for i in range(0, V, step):
        up = F.interpolate(ver[i : i + step], size=size, mode="bilinear", align_corners=False)
        want_rows.append(up.index_select(2, rows_t).cpu().numpy())
        want_full.append(up.index_select(1, full_t).cpu().numpy())
    want = np.concatenate(want_rows)
    want_f = np.concatenate(want_full)
    have = ver.cpu().numpy()
    have_f = np.ascontiguousarray(have[:, full])
    where_full = np.full(K, -1, np.int64)
    where_full[full] = np.arange(len(full))
    best: KernelEmulation | None = None
    for fused in (True, False):
        axes = kernel_axis(h, sh, fused) + kernel_axis(w, sw, fused)
        axes_rows = tuple(a[rows] for a in axes[:4]) + axes[4:]
        formula = np.full(K, -1, np.int64)
        for fid in _TRY_ORDER:
            todo = np.flatnonzero(formula < 0)
            if not len(todo):
                break
            same = np.asarray(check(fid, have, want, todo, axes_rows), bool)
            if len(rows) < sh:  # the channels compared on every pixel too
                pos = where_full[todo]
                sel = np.flatnonzero(same & (pos >= 0))
                if len(sel):
                    same[sel] = np.asarray(check(fid, have_f, want_f, pos[sel], axes), bool)
            formula[todo[same]] = fid
        if best is None or (formula >= 0).sum() > (best.formula >= 0).sum():
            best = KernelEmulation(formula, axes, fused)
        if bool((formula >= 0).all()):
            break
    assert best is not None
    if not bool((best.formula >= 0).all()):
        log.info("bilinear emulation: %d of %d channels of %s -> %s match no formula; "
                 "F.interpolate settles them", int((best.formula < 0).sum()), K, (h, w), size)
    cache[key] = _VERDICTS[known] = best
    return best


def emulate_pixels(maps: torch.Tensor, coords: torch.Tensor, emu: KernelEmulation
                   ) -> np.ndarray:
    """``F.interpolate(maps, size, mode="bilinear", align_corners=False)[b, k, y, x]`` for the
    ``(4, n)`` pixels ``coords`` (rows ``b, k, y, x``) of channels with a verified formula, as
    float32 numpy, by :func:`emulate` (maps must be finite, below ``HUGE``)."""
    B, K, h, w = maps.shape
    i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x = emu.axes
    b, k, y, x = (c.cpu().numpy() for c in coords)
    plane = (b * K + k) * (h * w)
    flat = maps.reshape(-1)
    idx = np.stack([plane + i0y[y] * w + i0x[x], plane + i0y[y] * w + i1x[x],
                    plane + i1y[y] * w + i0x[x], plane + i1y[y] * w + i1x[x]])
    corners = flat.index_select(0, torch.from_numpy(idx.reshape(-1)).to(maps.device))
    a00, a01, a10, a11 = corners.cpu().numpy().reshape(4, -1)
    fid = emu.formula[k]
    out = np.empty(len(b), np.float32)
    for f in np.unique(fid):
        sel = np.flatnonzero(fid == f)
        out[sel] = emulate(int(f), a00[sel], a01[sel], a10[sel], a11[sel], l0y[y[sel]],
                           l1y[y[sel]], l0x[x[sel]], l1x[x[sel]])
    return out


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
    by the value ``F.interpolate`` computes.

    A pixel of a channel with a verified emulation (:func:`kernel_emulation`) whose map is
    finite and below ``HUGE`` is recomputed from its four corners (:func:`emulate_pixels`);
    the others are read from ``F.interpolate`` of their maps (:func:`_settle_by_interpolate`).

    Parameters
    ----------
    maps, thr, size
        The ``(B, K, h, w)`` float32 maps, ``(K,)`` float32 thresholds and output size.
    coords
        ``(4, n)`` long rows ``b, k, y, x``: the pixels to decide.
    cache
        As for :func:`active_pixels` (holds the one-time checks).

    Returns
    -------
    torch.Tensor
        ``(n,)`` bool for each pixel: its value ``v = F.interpolate(maps, size,
        mode="bilinear", align_corners=False)[b, k, y, x]`` is finite and ``v > thr[k]``
        (a pixel whose interpolation touches a NaN or an infinity with nonzero weight is
        NaN or infinite, so never active).
    """
    B, K, h, w = maps.shape
    dev = maps.device
    n = coords.shape[1]
    active = torch.zeros(n, dtype=torch.bool, device=dev)
    if n == 0:
        return active
    emu = kernel_emulation(maps, thr, size, cache)
    tame = (maps.reshape(B * K, h * w).abs() < HUGE).all(1)  # per map; NaN compares False
    verified = torch.from_numpy(emu.formula >= 0).to(dev)
    by_value = (tame.index_select(0, coords[0] * K + coords[1])
                & verified.index_select(0, coords[1]))
    sel = flat_nonzero(by_value)
    if sel.numel():
        part = coords[:, sel]
        value = emulate_pixels(maps, part, emu)
        limit = thr.float().cpu().numpy()[part[1].cpu().numpy()]
        active[sel] = torch.from_numpy(value > limit).to(dev)
    rest = flat_nonzero(~by_value)
    if rest.numel():
        active[rest] = _settle_by_interpolate(maps, thr, size, coords[:, rest], cache)
    return active


def _settle_by_interpolate(
    maps: torch.Tensor,
    thr: torch.Tensor,
    size: tuple[int, int],
    coords: torch.Tensor,
    cache: dict,
) -> torch.Tensor:
    """:func:`settle` with ``F.interpolate`` itself: of the affected single maps when they
    round like whole images (:func:`_single_maps_round_alike`), of the affected images'
    ``(1, K, h, w)`` tensors otherwise."""
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
