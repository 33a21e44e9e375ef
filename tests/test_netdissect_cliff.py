"""Exact counting where a margin cannot decide: T = 0 on ReLU maps (the sign rule), plateaus at
T (settled by the emulated kernel), constant, dead and subnormal maps; both engines against the
dense reference ``F.interpolate > T``. Also NetDissect-Lite's area rule and the threaded split."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dissect import DissectError
from dissect.datasets import Concept
from dissect.netdissect import IoUTally
from dissect.netdissect import active_pixels as ap
from dissect.netdissect import numba_engine as ne
from dissect.netdissect import settle as st
from dissect.netdissect.active_pixels import (
    FORMULAS,
    active_mask_dense,
    active_pixels,
    emulate,
    fma32,
    kernel_axis,
    kernel_emulation,
    support_ranges,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps (see conftest)

SIZES = [((7, 7), (112, 112)), ((7, 7), (113, 113)), ((5, 5), (37, 37)), ((14, 14), (112, 112)),
         ((5, 9), (37, 20)), ((1, 1), (3, 3)), ((2, 2), (6, 6))]
CASES = ["relu_t0", "relu6_at_6", "float16_ties", "dead", "constant", "subnormal"]
B = 2


def _units(size: tuple[int, int]) -> int:
    """19 units for small outputs (PyTorch's channels-last loop: vector lanes and a scalar tail),
    4 for large ones (its generic loop, the same for every channel): keeps the tests fast."""
    return 19 if sum(size) <= 128 else 4


def _case(name: str, hw: tuple[int, int], seed: int, K: int = 19
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K, h, w)`` maps and ``(K,)`` thresholds of one hard case."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, *hw, generator=g)
    if name == "relu_t0":  # ReLU zeros with T = 0 (a few units at a positive quantile)
        maps = torch.relu(x - 1.0)
        thr = torch.zeros(K)
        thr[::4] = torch.quantile(maps.transpose(0, 1).reshape(K, -1)[::4], 0.9, dim=1)
    elif name == "relu6_at_6":  # ReLU6 capped at 6, T = 6 on most units
        maps = (x * 5).clamp(0, 6)
        thr = torch.full((K,), 6.0)
        thr[::5] = 3.0
    elif name == "float16_ties":  # float16-rounded, coarse: ties, and T equal to a value
        maps = ((x * 3).round() / 3).half().float()
        thr = maps[0].reshape(K, -1).median(dim=1).values
    elif name == "dead":  # all-zero units, units <= 0, T = 0
        maps = torch.zeros(B, K, *hw)
        maps[:, 1::2] = -torch.relu(x[:, 1::2])
        thr = torch.zeros(K)
    elif name == "constant":  # constant maps: == T (0.3, 6, 0) and != T
        c = torch.tensor([0.3, 0.3, 6.0, 2.5, 0.0, 1 / 3] * 4)[:K]  # K <= 24
        maps = c.view(1, K, 1, 1).expand(B, K, *hw).contiguous()
        thr = c.clone()
        thr[1::6] = 0.2
        thr[3::6] = 2.75
    else:  # subnormal positives: whole maps (1e-40, or the smallest float32 2**-149 and
        # twice it, whose products with weights < 1 round to 0 or not), and a few among normal
        # values; T = 0
        maps = torch.relu(x)
        maps[:, ::6] *= 1e-40
        maps[:, 3::6] = (maps[:, 3::6] > 0) * torch.where(maps[:, 3::6] > 1, 2.0**-148,
                                                          2.0**-149)
        tiny = torch.rand(B, K, *hw, generator=g) < 0.2
        maps[:, 1::3] = torch.where(tiny[:, 1::3], torch.full_like(x[:, 1::3], 3e-39),
                                    maps[:, 1::3])
        maps[:, 2::3] *= 2.0**-90  # positives near the sign rule's bound
        thr = torch.zeros(K)
    return maps.contiguous(), thr


_CACHES: dict = {}


def _cache(maps: torch.Tensor, size: tuple[int, int]) -> dict:
    """One layer cache per geometry, shared by the tests of that geometry: the one-time check of
    the kernel emulation (:func:`kernel_emulation`) is then made once, not per test."""
    return _CACHES.setdefault((tuple(maps.shape[1:]), tuple(size)), {})


def _sparse_as_dense(maps, thr, size, cache=None):
    b, k, y, x = active_pixels(maps, thr, size, cache)
    out = torch.zeros(maps.shape[0], maps.shape[1], *size, dtype=torch.bool)
    out[b, k, y, x] = True
    assert len(b) == int(out.sum())  # no pixel reported twice
    return out


@pytest.mark.parametrize("hw, size", SIZES)
@pytest.mark.parametrize("case", CASES)
def test_torch_engine_equals_dense(case, hw, size):
    maps, thr = _case(case, hw, sum(hw) + sum(size), _units(size))
    torch.testing.assert_close(_sparse_as_dense(maps, thr, size, _cache(maps, size)),
                               active_mask_dense(maps, thr, size))


def _labels(g, size, top):
    """Two planes of labels 1..top-1 (plane 1 odd numbers, so no pixel repeats a label)."""
    coarse = torch.randint(0, top, (B, 2, size[0], (size[1] + 2) // 3), generator=g)
    labels = coarse.repeat_interleave(3, dim=3)[..., : size[1]].contiguous()
    labels[:, 0] = labels[:, 0] // 2 * 2
    labels[:, 1] = labels[:, 1] // 2 * 2 + 1
    return labels % top


def _dense_tally(maps, thr, labels, image_labels, annotated, numbers):
    """The per-pixel reference of IoUTally's counts (annotated-area rule)."""
    sh, sw = labels.shape[2:]
    mask = active_mask_dense(maps, thr, (sh, sw)).long()  # (B, K, sh, sw)
    hot = torch.stack([(labels == n).any(1) for n in numbers], -1).long()  # (B, sh, sw, C)
    img = torch.stack([(image_labels == n).any(1) for n in numbers], -1).long()  # (B, C)
    per_image = mask.sum((2, 3))  # (B, K)
    inter = torch.einsum("bkyx,byxc->kc", mask, hot) + per_image.T @ img
    active = per_image.T @ annotated.long()
    area = hot.sum((0, 1, 2)) + img.sum(0) * sh * sw
    return {"intersection": inter, "active": active, "area": area}


@pytest.mark.parametrize("hw, size", SIZES)
@pytest.mark.parametrize("case", CASES)
def test_engines_count_like_dense_reference(case, hw, size):
    K = _units(size)
    maps, thr = _case(case, hw, 100 + sum(hw) + sum(size), K)
    g = torch.Generator().manual_seed(5)
    labels = _labels(g, size, 6)
    image_labels = torch.tensor([[4], [0]])
    annotated = torch.tensor([[True, True], [True, False]])
    concepts = [Concept(n, f"c{n}", ["a", "b"][n % 2]) for n in range(1, 6)]
    ref = _dense_tally(maps, thr, labels, image_labels, annotated, range(1, 6))
    for engine in ("torch", "numba"):
        tally = IoUTally(K, concepts, ["b", "a"], engine=engine)
        tally._geometry = _cache(maps, size)
        tally.add(maps, thr, labels, image_labels, annotated)
        for key, value in tally.state_dict().items():
            assert torch.equal(value, ref[key]), (engine, key)


def _count_settled(monkeypatch):
    """Record the pixels given to settle (both engines) and forbid F.interpolate settling."""
    settled: list[int] = []
    real = ap.settle

    def spy(maps, thr, size, coords, cache):
        settled.append(coords.shape[1])
        return real(maps, thr, size, coords, cache)

    def forbidden(*args, **kwargs):
        raise AssertionError("F.interpolate settled pixels")

    monkeypatch.setattr(ap, "settle", spy)
    monkeypatch.setattr(ne, "settle", spy)
    monkeypatch.setattr(st, "_settle_by_interpolate", forbidden)
    return settled


@pytest.mark.parametrize("hw, size", [((7, 7), (112, 112)), ((5, 5), (37, 37))])
def test_sign_rule_settles_no_whole_maps(monkeypatch, hw, size):
    # ReLU maps with T = 0: every exact zero lies within any relative margin of T, yet no map is
    # upsampled: 7 -> 112 has no source coordinate on an integer, so nothing is settled; 5 -> 37
    # has one per axis (output 18), whose pixels next to a positive value are emulated
    g = torch.Generator().manual_seed(3)
    K = 19
    maps = torch.relu(torch.randn(4, K, *hw, generator=g) - 1.0)
    thr = torch.zeros(K)
    settled = _count_settled(monkeypatch)
    want = active_mask_dense(maps, thr, size)
    torch.testing.assert_close(_sparse_as_dense(maps, thr, size), want)
    band = 4 * K * (size[0] + size[1])  # pixels in a band row or column, over all maps
    assert sum(settled) <= (0 if size == (112, 112) else band)
    assert sum(settled) < 0.05 * want.numel()
    settled.clear()
    labels = torch.ones(4, 1, *size, dtype=torch.int64)
    cache: dict = {}
    inter, area, per_image = ne.count_batch(maps, thr, labels, torch.arange(2), 1, cache)
    emu = kernel_emulation(maps, thr, size, cache)  # made by count_batch: the cached one
    if bool((emu.formula >= 0).all()):  # the numba engine emulates the band pixels inline
        assert sum(settled) == 0
    torch.testing.assert_close(per_image, want.sum((2, 3)))


def test_dead_and_nonpositive_maps_are_skipped(monkeypatch):
    settled = _count_settled(monkeypatch)
    maps = -torch.rand(2, 19, 7, 7)
    maps[0] = 0
    thr = torch.zeros(19)
    b, k, y, x = active_pixels(maps, thr, (112, 112))
    assert b.numel() == 0 and sum(settled) == 0


def _exact_fma32(a, b, c):
    """Round ``a * b + c`` to float32 with rational arithmetic (ties to even)."""
    v = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    lo = np.float32(float(v))  # nearest double, then float32: bracket and fix exactly below
    cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    best = min(cands, key=lambda r: (abs(Fraction(float(r)) - v),
                                     int(np.array(r).view(np.uint32)) & 1))
    return best


def test_fma32_is_exactly_rounded():
    rng = np.random.default_rng(0)
    n = 3000
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.random(n).astype(np.float32)
    c = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    # sums that round to a float32 halfway point in float64 (the double-rounding trap):
    # (1 + 2^-18) * 2^-24 (1 - 2^-18) + (1 + 2^-23) = 1 + 2^-23 + 2^-24 - 2^-60
    mid = np.float32
    a = np.concatenate([a, [mid(1 + 2**-18), mid(1 + 2**-18), mid(3e-39), mid(0.0)]])
    b = np.concatenate([b, [mid(2**-24 * (1 - 2**-18)), mid(-(2**-24) * (1 - 2**-18)),
                            mid(0.5), mid(1.0)]])
    c = np.concatenate([c, [mid(1 + 2**-23), mid(1 + 2**-23), mid(1e-45), mid(-0.0)]])
    got = fma32(a, b, c)
    want = np.array([_exact_fma32(*v) for v in zip(a, b, c, strict=True)], np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[n] == mid(1 + 2**-23)  # not float32(float64 sum), which ties to 1 + 2^-22


@pytest.mark.parametrize("n_in, n_out", [(7, 112), (7, 113), (5, 37), (14, 112), (9, 20), (1, 3),
                                          (2, 6), (3, 9), (13, 97), (2, 1000), (30, 17), (9, 4),
                                          (8, 8), (100, 999), (3, 47), (7, 41), (2, 206), (7, 25)])
def test_support_ranges_cover_the_kernels_weights(n_in, n_out):
    # the indices PyTorch reads with a nonzero weight (impulses through F.interpolate, whatever
    # its formula) lie within the possible range, and the surely read ones are among them; the
    # same for both emulated weight computations, whose sure weights are >= wmin
    slo, shi, plo, phi, wmin = support_ranges(n_in, n_out)
    eye = torch.eye(n_in).view(n_in, 1, 1, n_in)
    weights = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False)
    nonzero = weights[:, 0, 0].T.numpy() != 0  # (n_out, n_in)
    idx = np.arange(n_in)
    assert not (nonzero & ((idx < plo[:, None]) | (idx > phi[:, None]))).any()
    assert nonzero[np.arange(n_out), slo].all() and nonzero[np.arange(n_out), shi].all()
    for fused in (True, False):
        i0, i1, l0, l1 = kernel_axis(n_in, n_out, fused)
        w = np.zeros((n_out, n_in))
        np.add.at(w, (np.arange(n_out), i0), l0)
        np.add.at(w, (np.arange(n_out), i1), l1)
        assert not ((w != 0) & ((idx < plo[:, None]) | (idx > phi[:, None]))).any()
        for s in (slo, shi):
            assert (w[np.arange(n_out), s] >= wmin).all()


def test_nonzero_float32_weights_can_be_below_2_pow_24():
    # with the fused source coordinate, 1 -> 3 and 2 -> 6 read their second index with weight
    # fl(fl(1/3) * 1.5 - 0.5) ~ 1.5e-8 < 2**-24: the sign rule bounds products by the band's
    # sure weight (~1) instead, and leaves those possible reads to the emulation
    for n_in in (1, 2):
        i0, i1, l0, l1 = kernel_axis(n_in, 3 * n_in, fused=True)
        assert 0 < l1[1] < 2.0**-24
        slo, shi, plo, phi, _ = support_ranges(n_in, 3 * n_in)
        assert slo[1] == shi[1] == 0 and phi[1] == min(1, n_in - 1)


@pytest.mark.parametrize("formula", range(len(FORMULAS)))
def test_numba_emulation_equals_numpy(formula):
    g = torch.Generator().manual_seed(formula)
    maps = ((torch.randn(3, 2, 5, 6, generator=g) * 4).round() / 4).numpy()
    maps[0, 1] = 0.3  # a plateau
    kern = kernel_axis(5, 37, True) + kernel_axis(6, 20, True)
    i0y, i1y, l0y, l1y, i0x, i1x, l0x, l1x = kern
    flat = maps.reshape(-1, 5, 6)
    r0, r1 = flat[:, i0y], flat[:, i1y]
    want = emulate(formula, r0[:, :, i0x], r0[:, :, i1x], r1[:, :, i0x], r1[:, :, i1x],
                   l0y[:, None], l1y[:, None], l0x, l1x)
    have = np.ascontiguousarray(maps.transpose(1, 0, 2, 3))  # (V=2, K=3, h, w)
    same = ne._check(formula, have, np.ascontiguousarray(
        want.reshape(3, 2, 37, 20).transpose(1, 0, 2, 3)), np.arange(3), kern)
    assert same.all()


@pytest.mark.parametrize("shape, size", [((2, 19, 7, 7), (113, 113)), ((2, 19, 5, 9), (37, 20)),
                                         ((2, 3, 1, 1), (9, 9)), ((3, 35, 9, 9), (4, 4))])
def test_verified_emulation_reproduces_fresh_data(shape, size):
    g = torch.Generator().manual_seed(1)
    maps = torch.relu(torch.randn(*shape, generator=g))
    emu = kernel_emulation(maps, torch.rand(shape[1], generator=g), size, {})
    fresh = ((torch.randn(*shape, generator=g) * 3).round() / 3).half().float()
    up = F.interpolate(fresh, size=size, mode="bilinear", align_corners=False)
    coords = torch.stack([c.reshape(-1) for c in torch.meshgrid(
        *(torch.arange(n) for n in (shape[0], shape[1], *size)), indexing="ij")])
    ok = torch.from_numpy(emu.formula >= 0)[coords[1]]
    got = ap.emulate_pixels(fresh, coords[:, ok], emu)
    np.testing.assert_array_equal(got, up.reshape(-1)[ok].numpy())


# --- NetDissect-Lite's area rule ------------------------------------------------------------


def _lite_case():
    """2 images, 2 units, 2x2 maps at 2x2 (copied, so active = map > 0.5), two categories."""
    maps = torch.tensor([[[[1.0, 0], [0, 0]], [[0, 1], [0, 0]]],
                         [[[1.0, 1], [0, 0]], [[0, 0], [1, 0]]]])
    labels = torch.tensor([[[[1, 0], [2, 2]], [[0, 3], [0, 0]]],   # 3: not a scored concept
                           [[[0, 0], [1, 2]], [[0, 0], [0, 0]]]])
    image_labels = torch.tensor([[0], [2]])  # image 1: wheel, a "part" image-level label
    annotated = torch.tensor([[True, True], [True, False]])
    concepts = [Concept(1, "red", "color"), Concept(2, "wheel", "part")]
    return maps, torch.tensor([0.5, 0.5]), labels, image_labels, annotated, concepts


@pytest.mark.parametrize("engine", ["torch", "numba"])
def test_lite_area_rule_hand_computed(engine):
    # unit 0: image 0's active pixel is red (color); image 1's two are unlabelled, but the image
    # has wheel (part) as an image-level label. unit 1: image 0's pixel carries only label 3,
    # not scored; image 1's is red, and the image-level wheel counts too.
    maps, thr, labels, image_labels, annotated, concepts = _lite_case()
    counts = {}
    for area in ("annotated", "lite"):
        tally = IoUTally(2, concepts, ["color", "part"], engine=engine, area=area)
        tally.add(maps, thr, labels, image_labels, annotated)
        counts[area] = tally
    assert counts["annotated"].active.tolist() == [[3, 1], [2, 1]]
    assert counts["lite"].active.tolist() == [[1, 2], [1, 1]]
    for t in counts.values():
        assert t.intersection.tolist() == [[1, 2], [1, 1]]
        assert t.area.tolist() == [2, 7]
    np.testing.assert_allclose(counts["lite"].result(), [[1 / 2, 2 / 7], [1 / 2, 1 / 7]])
    np.testing.assert_allclose(counts["annotated"].result(), [[1 / 4, 1 / 3], [1 / 3, 1 / 7]])


def test_lite_engines_agree_on_random_data():
    concepts = [Concept(1, "red", "color"), Concept(3, "edge", "part"), Concept(4, "rim", "part"),
                Concept(6, "beach", "scene"), Concept(8, "sky", "scene")]
    cats = ["color", "part", "scene"]
    tallies = {e: IoUTally(6, concepts, cats, engine=e, area="lite") for e in ("numba", "torch")}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        maps = torch.relu(torch.randn(9, 6, 4, 5, generator=g))
        labels = torch.randint(0, 10, (9, 2, 19, 23), generator=g)
        image_labels = torch.randint(0, 10, (9, 2), generator=g) * (torch.rand(9, 2) < 0.3)
        annotated = torch.rand(9, 3, generator=g) < 0.7
        thr = torch.quantile(maps.transpose(0, 1).reshape(6, -1), 0.8, dim=1)
        thr[0] = 0  # a unit decided by the sign rule
        for t in tallies.values():
            t.add(maps, thr, labels, image_labels, annotated)
    states = {e: t.state_dict() for e, t in tallies.items()}
    for key in states["numba"]:
        assert torch.equal(states["numba"][key], states["torch"][key]), key
    annotated_rule = IoUTally(6, concepts, cats, engine="numba")
    assert annotated_rule.state_dict()["active"].shape == states["numba"]["active"].shape
    assert int(states["numba"]["active"].sum()) > 0


def test_area_rule_is_validated():
    concepts = [Concept(1, "red", "color")]
    with pytest.raises(DissectError, match="choose one of annotated, lite"):
        IoUTally(1, concepts, ["color"], area="union")
    lite, annotated = (IoUTally(1, concepts, ["color"], area=a) for a in ("lite", "annotated"))
    with pytest.raises(DissectError, match="cannot merge"):
        annotated.merge(lite)
    lite.merge(IoUTally(1, concepts, ["color"], area="lite"))


# --- the threaded split ---------------------------------------------------------------------


def test_chunked_threads_count_alike():
    g = torch.Generator().manual_seed(2)
    maps = torch.relu(torch.randn(13, 7, 5, 5, generator=g) - 0.5)
    thr = torch.quantile(maps.transpose(0, 1).reshape(7, -1), 0.9, dim=1)
    thr[:2] = 0
    labels = torch.randint(0, 6, (13, 2, 21, 17), generator=g)
    cat = torch.tensor([0, 1, 0, 1, 1])
    runs = [ne.count_batch(maps, thr, labels, torch.arange(6), 5, {}, threads=n,
                           concept_category=cat, n_categories=2) for n in (1, 2, 3, 5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
    assert int(runs[0][2].sum()) == int(active_mask_dense(maps, thr, (21, 17)).sum())


@pytest.mark.parametrize("hw, size", [((1, 2), (3, 6)), ((3, 3), (9, 9)), ((5, 5), (37, 37)),
                                      ((7, 7), (113, 113)), ((13, 9), (97, 20)),
                                      ((2, 30), (1000, 17)), ((3, 7), (47, 41)),
                                      ((2, 7), (206, 25))])
def test_sign_rule_on_impulses(hw, size):
    # one positive value per map (1, or a tiny 2**-80) on zeros, T = 0: the active pixels are
    # exactly those that read it with a nonzero float32 weight, tiny weights included (3 -> 47,
    # 7 -> 41, 2 -> 206, 7 -> 25 put a float32 source coordinate a rounding error away from the
    # float64 one's integer: without the band around integers the rule would misjudge them)
    # (impulses 3 apart in both axes never share a pixel: 9 maps hold them all)
    h, w = hw
    maps = torch.zeros(2, 9, h, w)
    for k in range(9):
        maps[:, k, k // 3 :: 3, k % 3 :: 3] = torch.tensor([1.0, 2.0**-80]).view(2, 1, 1)
    thr = torch.zeros(9)
    want = active_mask_dense(maps, thr, size)
    torch.testing.assert_close(_sparse_as_dense(maps, thr, size), want)
    labels = torch.ones(2, 1, *size, dtype=torch.int64)
    per_image = ne.count_batch(maps, thr, labels, torch.arange(2), 1, {})[2]
    torch.testing.assert_close(per_image, want.sum((2, 3)))
