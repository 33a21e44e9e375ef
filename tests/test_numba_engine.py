"""The numba engine: exact counts against a dense per-pixel reference, and the same tallies as
the torch engine."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dissect import DissectError
from dissect.datasets import Concept
from dissect.netdissect import IoUTally
from dissect.netdissect.active_pixels import active_mask_dense
from dissect.netdissect.numba_engine import count_batch


def _reference(maps, thr, labels, lut, n_concepts):
    """Dense: F.interpolate > T per pixel, each pixel's concepts (repeats across planes once)."""
    B, K = maps.shape[:2]
    P, sh, sw = labels.shape[1:]
    mask = active_mask_dense(maps, thr, (sh, sw)).numpy()  # (B, K, sh, sw)
    lab = labels.numpy().copy()
    for p in range(1, P):  # a label already in an earlier plane of the pixel counts once
        lab[:, p][(lab[:, p : p + 1] == lab[:, :p]).any(axis=1)] = 0
    lut = lut.numpy()
    inside = (lab > 0) & (lab < len(lut))
    codes = np.where(inside, lut[np.where(inside, lab, 0)], 0)  # column + 1, 0: none
    hot = np.zeros((B, sh, sw, n_concepts + 1), dtype=np.int64)
    for p in range(P):
        np.add.at(hot, (*np.indices((B, sh, sw)), codes[:, p]), 1)
    hot = hot[..., 1:]
    inter = np.einsum("bkyx,byxc->kc", mask.astype(np.int64), hot)
    return inter, hot.sum(axis=(0, 1, 2)), mask.sum(axis=(2, 3))


def _labels(g, B, P, sh, sw, top):
    """Random label planes with runs, repeats across planes, negatives and unknown numbers."""
    coarse = torch.randint(-1, top + 3, (B, P, sh, (sw + 3) // 4), generator=g)
    labels = coarse.repeat_interleave(4, dim=3)[..., :sw].contiguous()
    labels[:, 1:][torch.rand(labels[:, 1:].shape, generator=g) < 0.2] = 2  # repeats of 2
    return labels


def _check(maps, thr, labels, lut, C, threads=1):
    inter, area, per_image = count_batch(maps, thr, labels, lut, C, {}, threads=threads)
    ref = _reference(maps, thr, labels, lut, C)
    np.testing.assert_array_equal(inter.numpy(), ref[0])
    np.testing.assert_array_equal(area.numpy(), ref[1])
    np.testing.assert_array_equal(per_image.numpy(), ref[2])


@pytest.mark.parametrize("seed", range(6))
def test_counts_equal_dense_reference_on_random_geometries(seed):
    # random map and label sizes (down- and upsampling, 1-pixel axes), ReLU zeros, quantized
    # ties, nearly constant maps, thresholds equal to values an upsampled pixel takes exactly,
    # NaN and infinite values
    g = torch.Generator().manual_seed(seed)
    lut = torch.tensor([0, 1, 0, 2, 3, 0, 4])  # numbers 2 and 5 are not scored, >= 7 unknown
    for it in range(5):
        h, w = (int(v) for v in torch.randint(1, 10, (2,), generator=g))
        sh, sw = (int(v) for v in torch.randint(1, 60, (2,), generator=g))
        B, K, P = 3, 5, int(torch.randint(0, 4, (1,), generator=g))
        maps = torch.randn(B, K, h, w, generator=g)
        maps = [maps, torch.relu(maps), (maps * 4).round() / 4, maps * 1e-3 + 5][it % 4]
        up = F.interpolate(maps, size=(sh, sw), mode="bilinear", align_corners=False)
        if it % 2:
            thr = torch.stack([up[k % B, k].flatten()[(k * 7919) % (sh * sw)] for k in range(K)])
        else:
            thr = torch.quantile(up.transpose(0, 1).reshape(K, -1), [0.5, 0.9, 0.995][it % 3],
                                 dim=1)
        if it == 4:  # maps holding a NaN or an infinity are settled whole by F.interpolate
            maps[0, 0, h // 2, w // 2] = float("nan")
            maps[1, 1, 0, 0] = float("inf")
            maps[2, 2, -1, -1] = float("-inf")
        _check(maps, thr, _labels(g, B, P, sh, sw, 7), lut, 4, threads=1 + it % 3)


def test_layer4_geometry_at_top_half_percent():
    # the benchmark's shape: 7x7 maps, 112x112 labels, four planes
    g = torch.Generator().manual_seed(3)
    maps = torch.relu(torch.randn(6, 16, 7, 7, generator=g))
    up = F.interpolate(maps, size=(112, 112), mode="bilinear", align_corners=False)
    thr = torch.quantile(up.transpose(0, 1).reshape(16, -1), 0.995, dim=1)
    lut = torch.arange(12)
    _check(maps, thr, _labels(g, 6, 4, 112, 112, 12), lut, 11, threads=2)


def test_more_planes_than_repeat_bits():
    # past 8 planes every pixel is checked for repeats
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(2, 3, 4, 4, generator=g)
    _check(maps, torch.zeros(3), _labels(g, 2, 10, 12, 12, 5), torch.arange(5), 4, threads=2)


def test_no_active_pixels_and_empty_shapes():
    lut = torch.arange(4)
    _check(torch.zeros(2, 3, 4, 4), torch.ones(3), torch.ones(2, 1, 8, 8, dtype=torch.int64),
           lut, 3)
    inter, area, per_image = count_batch(torch.zeros(0, 3, 4, 4), torch.ones(3),
                                         torch.ones(0, 1, 8, 8, dtype=torch.int64), lut, 3, {})
    assert inter.shape == (3, 3) and area.shape == (3,) and per_image.shape == (0, 3)


def _tally_inputs(seed, n=20):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, 6, 4, 5, generator=g)
    labels = _labels(g, n, 3, 19, 23, 8)
    image_labels = torch.randint(0, 9, (n, 2), generator=g)
    annotated = torch.rand(n, 3, generator=g) < 0.7
    return maps, labels, image_labels, annotated


def test_engines_give_identical_tallies():
    concepts = [Concept(1, "red", "color"), Concept(3, "edge", "part"), Concept(4, "rim", "part"),
                Concept(6, "beach", "scene"), Concept(8, "sky", "scene")]
    tallies = {e: IoUTally(6, concepts, ["color", "part", "scene"], engine=e)
               for e in ("numba", "torch")}
    assert {e: t.engine for e, t in tallies.items()} == {"numba": "numba", "torch": "torch"}
    for seed in range(3):
        maps, labels, image_labels, annotated = _tally_inputs(seed)
        thr = torch.quantile(maps.transpose(0, 1).reshape(6, -1), 0.8, dim=1)
        for t in tallies.values():
            t.add(maps, thr, labels, image_labels, annotated)
    numba_state, torch_state = (tallies[e].state_dict() for e in ("numba", "torch"))
    for key in numba_state:
        torch.testing.assert_close(numba_state[key], torch_state[key], rtol=0, atol=0)
    assert int(numba_state["intersection"].sum()) > 0


def test_engine_choice():
    concepts = [Concept(1, "red", "color")]
    assert IoUTally(1, concepts, ["color"]).engine == "numba"
    assert IoUTally(1, concepts, ["color"], "meta").engine == "torch"
    with pytest.raises(DissectError, match="CPU only"):
        IoUTally(1, concepts, ["color"], "meta", engine="numba")
    with pytest.raises(DissectError, match="choose one of"):
        IoUTally(1, concepts, ["color"], engine="fast")


@pytest.mark.slow
def test_kernels_compile_where_numba_cannot_cache(tmp_path):
    # numba refuses cache=True when no cache folder is writable; the module must still import
    # and count (here numba is made to find no cache locator at all)
    code = ("import torch\n"
            "from dissect.netdissect.numba_engine import count_batch\n"
            "inter, area, act = count_batch(torch.ones(1, 1, 2, 2), torch.zeros(1),\n"
            "    torch.ones(1, 1, 4, 4, dtype=torch.int64), torch.arange(2), 1, {})\n"
            "print(int(inter.sum()), int(area.sum()), int(act.sum()))\n")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "NoSuchLocator"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["16", "16", "16"]


def test_counts_with_infinities_and_huge_values_equal_dense_reference():
    # pixels whose upsampled value is +inf (above any threshold), NaN or -inf are never
    # active; maps of huge finite values are settled whole like maps holding an infinity
    g = torch.Generator().manual_seed(9)
    maps = torch.randn(4, 5, 6, 7, generator=g)
    maps[0, 0, 1:3, 1:3] = float("inf")
    maps[1, 1, 0, :] = float("-inf")
    maps[2, 2, 3, 3] = float("nan")
    maps[3, 3] = maps[3, 3] * 3e38
    maps[0, 4] = maps[0, 4] * 1e38
    thr = torch.tensor([-3.0, -3.0, 0.0, 0.5, 1e37])
    labels = _labels(g, 4, 2, 29, 31, 7)
    _check(maps, thr, labels, torch.tensor([0, 1, 0, 2, 3, 0, 4]), 4, threads=2)
    concepts = [Concept(1, "red", "color"), Concept(3, "edge", "part")]
    tallies = {e: IoUTally(5, concepts, ["color", "part"], engine=e) for e in ("numba", "torch")}
    for t in tallies.values():
        t.add(maps, thr, labels, torch.zeros(4, 1, dtype=torch.int64),
              torch.ones(4, 2, dtype=torch.bool))
    for key, value in tallies["numba"].state_dict().items():
        assert torch.equal(value, tallies["torch"].state_dict()[key]), key


def test_finite_maps_whose_upsampling_overflows():
    big = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(0)
    maps = big * (1 - torch.rand(5, 8, 5, 6, generator=g) * 1e-6)
    up = F.interpolate(maps, size=(23, 17), mode="bilinear", align_corners=False)
    assert not bool(torch.isfinite(up).all())  # a few pixels round to +inf
    _check(maps, torch.zeros(8), _labels(g, 5, 2, 23, 17, 7), torch.arange(7), 6, threads=2)
