"""The sparse active-pixel search equals dense bilinear upsampling + threshold exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dissect.netdissect.active_pixels import (
    KernelEmulation,
    _axis,
    _count_keys,
    active_intervals,
    active_mask_dense,
    active_pixels,
    flat_nonzero,
    kernel_emulation,
)


def _sparse_as_dense(maps, thr, size):
    b, k, y, x = active_pixels(maps, thr, size)
    out = torch.zeros(maps.shape[0], maps.shape[1], *size, dtype=torch.bool)
    out[b, k, y, x] = True
    assert len(b) == int(out.sum())  # no pixel reported twice
    return out


@pytest.mark.parametrize(
    "hw, size", [((7, 7), (112, 112)), ((13, 13), (113, 113)), ((5, 9), (37, 20)),
                 ((14, 14), (56, 56)), ((1, 1), (8, 8)), ((8, 8), (8, 8)), ((9, 9), (4, 4))]
)
def test_equals_dense_at_top_half_percent(hw, size):
    g = torch.Generator().manual_seed(sum(hw) + sum(size))
    maps = torch.relu(torch.randn(3, 16, *hw, generator=g))
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    thr = torch.quantile(up.transpose(0, 1).reshape(16, -1), 0.995, dim=1)
    dense = active_mask_dense(maps, thr, size)
    torch.testing.assert_close(_sparse_as_dense(maps, thr, size), dense)


def test_thresholds_equal_to_exact_pixel_values():
    # adversarial: each threshold is a value some upsampled pixel takes exactly
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, 8, 6, 6, generator=g)
    size = (50, 50)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    thr = torch.stack([up[k % 4, k].flatten()[(k * 997) % 2500] for k in range(8)])
    dense = active_mask_dense(maps, thr, size)
    torch.testing.assert_close(_sparse_as_dense(maps, thr, size), dense)
    # constant maps equal to the threshold: PyTorch's kernel rounds a few pixels one ulp above
    # the constant; the sparse search must reproduce exactly those
    flat = torch.full((1, 2, 4, 4), 0.3)
    thr = torch.tensor([0.3, 0.2])
    sparse = _sparse_as_dense(flat, thr, (9, 9))
    torch.testing.assert_close(sparse, active_mask_dense(flat, thr, (9, 9)))
    assert sparse[0, 1].all()


@pytest.mark.parametrize("hw, size", [((7, 7), (112, 112)), ((5, 9), (37, 20)), ((9, 9), (4, 4))])
def test_intervals_are_disjoint_non_empty_and_cover_the_dense_mask(hw, size):
    g = torch.Generator().manual_seed(11)
    maps = torch.randn(3, 8, *hw, generator=g)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    thr = torch.quantile(up.transpose(0, 1).reshape(8, -1), 0.9, dim=1)
    b, k, y, x0, x1 = active_intervals(maps, thr, size)
    assert bool((x1 > x0).all()) and bool((x0 >= 0).all()) and bool((x1 <= size[1]).all())
    cover = torch.zeros(3, 8, *size, dtype=torch.int64)
    for i in range(len(b)):  # test-side reference: paint every interval
        cover[b[i], k[i], y[i], x0[i] : x1[i]] += 1
    assert int(cover.max()) == 1  # disjoint
    torch.testing.assert_close(cover.bool(), active_mask_dense(maps, thr, size))


def test_no_active_pixels():
    maps = torch.zeros(2, 3, 4, 4)
    b, k, y, x = active_pixels(maps, torch.ones(3), (8, 8))
    assert b.numel() == k.numel() == y.numel() == x.numel() == 0


def test_maps_with_nan_or_infinity_equal_dense():
    # such maps are settled whole by F.interpolate (whose NaN pixels compare False)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4, 5, 5, generator=g)
    maps[0, 0, 2, 2] = float("nan")
    maps[0, 1, 0, 4] = float("inf")
    maps[1, 2, 4, 0] = float("-inf")
    thr = torch.tensor([0.5, 0.5, -0.5, 0.0])
    dense = active_mask_dense(maps, thr, (20, 20))
    assert dense[0, 0].any() and not dense[0, 0].all()  # the NaN spoils only nearby pixels
    torch.testing.assert_close(_sparse_as_dense(maps, thr, (20, 20)), dense)


@pytest.mark.parametrize("shape, size", [((2, 8, 6, 6), (50, 50)), ((2, 16, 7, 7), (112, 112)),
                                         ((2, 19, 5, 5), (37, 37))])
@pytest.mark.parametrize("emulated", [True, False])
def test_settling_modes(shape, size, emulated):
    # thresholds equal to upsampled values force settling; every settle path must be exact: the
    # emulated kernel, and F.interpolate of single maps or (where single maps round differently,
    # as for 19 channels at 37x37) of whole images, for channels without a verified formula
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(*shape, generator=g)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    thr = torch.stack([up[0, k].flatten()[(k * 31) % 400] for k in range(shape[1])])
    cache: dict = {}
    emu = kernel_emulation(maps, thr, size, cache)
    assert bool((emu.formula >= 0).all())  # this build's kernel is among the candidates
    if not emulated:
        key = next(key for key in cache if key[0] == "emulation")
        cache[key] = KernelEmulation(np.full(shape[1], -1), emu.axes, emu.fused)
    b, k, y, x = active_pixels(maps, thr, size, cache)
    out = torch.zeros(*shape[:2], *size, dtype=torch.bool)
    out[b, k, y, x] = True
    torch.testing.assert_close(out, active_mask_dense(maps, thr, size))
    assert any(key[0] == "single" for key in cache) == (not emulated)


@pytest.mark.parametrize("seed", range(8))
def test_random_geometries_ties_and_exact_thresholds(seed):
    # random map and output sizes, ReLU zeros, quantized ties, nearly constant maps, and
    # thresholds equal to values some upsampled pixel takes exactly
    g = torch.Generator().manual_seed(seed)
    for it in range(6):
        h, w = (int(v) for v in torch.randint(1, 12, (2,), generator=g))
        sh, sw = (int(v) for v in torch.randint(1, 120, (2,), generator=g))
        maps = torch.randn(2, 6, h, w, generator=g)
        maps = [maps, torch.relu(maps), (maps * 4).round() / 4, maps * 1e-3 + 5][it % 4]
        up = F.interpolate(maps, size=(sh, sw), mode="bilinear", align_corners=False)
        if it % 3 == 0:
            thr = torch.stack([up[k % 2, k].flatten()[(k * 7919) % (sh * sw)] for k in range(6)])
        else:
            q = [0.5, 0.9, 0.995][it % 3]
            thr = torch.quantile(up.transpose(0, 1).reshape(6, -1), q, dim=1)
        torch.testing.assert_close(_sparse_as_dense(maps, thr, (sh, sw)),
                                   active_mask_dense(maps, thr, (sh, sw)))


@pytest.mark.parametrize("n_in, n_out", [(7, 112), (7, 113), (14, 112), (3, 5), (5, 3), (1, 9),
                                          (9, 1), (13, 97), (112, 112), (2, 1000), (30, 17)])
def test_count_keys_equals_searchsorted(n_in, n_out):
    """The closed-form count of axis coordinates equals a binary search, ties included."""
    g = torch.Generator().manual_seed(n_in * 1000 + n_out)
    ax = _axis(n_in, n_out, torch.device("cpu"))
    n = 2000
    pick = torch.randint(0, n_out, (n,), generator=g)
    cell = torch.cat([torch.randint(0, n_in, (n,), generator=g),
                      (ax.keys[pick] / 4).floor().long()])  # the cell of an exact weight
    x = torch.cat([torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1, ax.w1[pick]])
    x = torch.cat([x, torch.tensor([-1.0, -0.5, -1e-300, 0.0, 1.0, 2.0], dtype=torch.float64)
                   .repeat_interleave(n_in)])
    cell = torch.cat([cell, torch.arange(n_in).repeat(6)])
    below, above = (torch.tensor(v, dtype=torch.float64) for v in (-float("inf"), float("inf")))
    x = torch.cat([x, torch.nextafter(x, below), torch.nextafter(x, above)]).clamp(-1, 2)
    cell = cell.repeat(3)
    start = ax.start[cell]
    got = _count_keys(ax, cell, cell.double(), start, start + ax.count[cell], x)
    want = torch.searchsorted(ax.keys, 4.0 * cell.double() + x, right=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [0, 1000, (1 << 20) + 7])
def test_flat_nonzero_equals_torch_nonzero(n, threads):
    """numpy's one pass gives torch.nonzero's indices, at any size and thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.1
        got = flat_nonzero(mask)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.nonzero(mask).squeeze(1))
    finally:
        torch.set_num_threads(before)


def test_non_finite_upsampled_pixels_are_never_active():
    # +inf exceeds any threshold, yet a pixel whose upsampled value is not finite is never
    # active; maps of huge finite values (where float32 upsampling may overflow) are settled
    # by F.interpolate too
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(2, 5, 6, 6, generator=g)
    maps[0, 0, 2:4, 2:4] = float("inf")
    maps[0, 1, 0, 0] = float("inf")
    maps[1, 2, 5, 5] = float("nan")
    maps[1, 3] = maps[1, 3] * 3e38  # overflows to +-inf in places when upsampled
    maps[1, 4] = maps[1, 4] * 1e38
    thr = torch.tensor([-5.0, -5.0, -5.0, 0.0, 1e38])
    size = (23, 17)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    dense = active_mask_dense(maps, thr, size)
    torch.testing.assert_close(dense, (up > thr.view(1, -1, 1, 1)) & torch.isfinite(up))
    assert bool(((up > thr.view(1, -1, 1, 1)) & ~dense).any())  # inf pixels: left out
    assert not bool(dense[~torch.isfinite(up)].any())
    torch.testing.assert_close(_sparse_as_dense(maps, thr, size), dense)


def test_finite_maps_whose_upsampling_overflows():
    # values a hair below float32's largest: a few upsampled pixels round to +inf, and those
    # are not active (the maps are settled by F.interpolate, as maps holding an infinity)
    big = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(0)
    maps = big * (1 - torch.rand(5, 8, 5, 6, generator=g) * 1e-6)
    up = F.interpolate(maps, size=(23, 17), mode="bilinear", align_corners=False)
    assert bool(torch.isfinite(maps).all()) and not bool(torch.isfinite(up).all())
    thr = torch.zeros(8)
    torch.testing.assert_close(_sparse_as_dense(maps, thr, (23, 17)),
                               active_mask_dense(maps, thr, (23, 17)))
