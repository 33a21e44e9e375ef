"""PyTorch's float32 upsampling kernel emulated in compiled code, for the numba engine: the
same formulas as :func:`.settle.emulate` (:data:`.settle.FORMULAS`), used to decide pixels within
rounding of a threshold inside the counting loop, and to verify a formula on a layer's maps."""

from __future__ import annotations

import numpy as np

from ._numba import _jit


@_jit
def _fma32(a, b, c):  # pragma: no cover - compiled
    """``a * b + c`` rounded once to float32, exactly (as :func:`.active_pixels.fma32`)."""
    p = np.float64(a) * np.float64(b)  # exact
    c64 = np.float64(c)
    s = p + c64
    t = s - p
    e = (p - (s - t)) + (c64 - t)
    r = np.float32(s)
    r64 = np.float64(r)
    if e != 0.0 and s != r64:
        up = s > r64
        nb = np.float32(np.nextafter(r, np.float32(np.inf) if up else np.float32(-np.inf)))
        if s == (r64 + np.float64(nb)) * 0.5 and (e > 0.0) == up:
            return nb
    return r


@_jit
def _lin(a, wa, b, wb, mode):  # pragma: no cover - compiled
    """``a * wa + b * wb`` in float32: plain (0), fused on the first (1) or second (2) product."""
    if mode == 0:
        return a * wa + b * wb
    if mode == 1:
        return _fma32(a, wa, b * wb)
    return _fma32(b, wb, a * wa)


@_jit
def _kernel_value(m_, y, x, fid, kern):  # pragma: no cover - compiled
    """``F.interpolate``'s float32 value at output pixel ``(y, x)`` of the map ``m_`` by
    formula ``fid`` of :data:`.active_pixels.FORMULAS` (the same arithmetic as
    :func:`.active_pixels.emulate`); ``kern``: the axes of :func:`.active_pixels.kernel_axis`."""
    i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x = kern
    r0, r1, c0, c1 = i0y[y], i1y[y], i0x[x], i1x[x]
    a00, a01, a10, a11 = m_[r0, c0], m_[r0, c1], m_[r1, c0], m_[r1, c1]
    ly0, ly1, lx0, lx1 = l0y[y], l1y[y], l0x[x], l1x[x]
    if fid < 9:
        inner = fid // 3
        outer = fid - 3 * inner
        t0 = _lin(a00, lx0, a01, lx1, inner)
        t1 = _lin(a10, lx0, a11, lx1, inner)
        return _lin(t0, ly0, t1, ly1, outer)
    w00, w01, w10, w11 = ly0 * lx0, ly0 * lx1, ly1 * lx0, ly1 * lx1
    if fid == 9:
        return _fma32(a00, w00, _fma32(a01, w01, _fma32(a11, w11, a10 * w10)))
    if fid == 10:
        return _fma32(a00, w00, _fma32(a01, w01, _fma32(a10, w10, a11 * w11)))
    if fid == 11:
        return a00 * w00 + (a01 * w01 + (a10 * w10 + a11 * w11))
    if fid == 12:
        return _fma32(a11, w11, _fma32(a10, w10, _fma32(a00, w00, a01 * w01)))
    if fid == 13:
        return _fma32(a11, w11, _fma32(a10, w10, _fma32(a01, w01, a00 * w00)))
    return ((a00 * w00 + a01 * w01) + a10 * w10) + a11 * w11


@_jit
def _check_formula(fid, have, want, channels, kern):  # pragma: no cover - compiled
    """Which ``channels`` of the ``(V, K, h, w)`` maps ``have`` formula ``fid`` upsamples to
    ``want`` ``(V, K, sh, sw)`` bit for bit (bool per channel; stops at its first
    difference)."""
    V = have.shape[0]
    sh, sw = want.shape[2:]
    same = np.ones(channels.shape[0], np.bool_)
    for n in range(channels.shape[0]):
        c = channels[n]
        for v in range(V):
            if not same[n]:
                break
            for y in range(sh):
                if not same[n]:
                    break
                for x in range(sw):
                    if _kernel_value(have[v, c], y, x, fid, kern) != want[v, c, y, x]:
                        same[n] = False
                        break
    return same


def _check(formula: int, have: np.ndarray, want: np.ndarray, channels: np.ndarray,
           axes: tuple[np.ndarray, ...]) -> np.ndarray:
    """:func:`.active_pixels.kernel_emulation`'s ``check`` by the compiled emulation."""
    return _check_formula(formula, np.ascontiguousarray(have), np.ascontiguousarray(want),
                          np.ascontiguousarray(channels, np.int64), axes)
