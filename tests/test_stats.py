"""Exact statistics: top-k and quantiles equal numpy on the full data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dissect.stats import TopK, exact_quantiles, key_to_float, quantile_ranks, sortable_keys


def _batches(data: np.ndarray, width: int):
    starts = range(0, data.shape[1], width)
    return lambda: (torch.from_numpy(data[:, i : i + width]) for i in starts)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("memory", [10**9, 1])  # one-pass top-k, and the bounded radix path
@pytest.mark.parametrize("level", [0.995, 0.5, 0.0, 1.0, 0.9])
def test_exact_quantiles_equal_numpy(dtype, memory, level):
    rng = np.random.default_rng(int(level * 1000))
    data = rng.standard_normal((6, 997)).astype(dtype)
    data[1] = np.maximum(data[1], 0)  # ReLU-like: many ties at zero
    data[2] = 3.0  # all equal
    data[3, :500] = -data[3, :500] * 1e-3
    got = exact_quantiles(_batches(data, 100), 6, 997, level, dtype=dtype, memory_values=memory)
    expected = np.quantile(data, level, axis=1)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_quantile_of_relu_map_with_many_zeros():
    data = np.zeros((2, 1000), dtype=np.float32)
    data[0, :3] = [5.0, 4.0, 3.0]
    got = exact_quantiles(_batches(data, 64), 2, 1000, 0.995, memory_values=1)
    np.testing.assert_array_equal(got, np.quantile(data, 0.995, axis=1))


def test_sortable_keys_roundtrip_and_order():
    vals = torch.tensor([-np.inf, -3.5, -1e-30, 0.0, 1e-30, 2.0, np.inf], dtype=torch.float32)
    keys = sortable_keys(vals)
    assert torch.all(keys[1:] > keys[:-1])
    np.testing.assert_array_equal(key_to_float(keys.numpy()), vals.numpy())


def test_quantile_ranks():
    assert quantile_ranks(1, 0.995) == (0, 0, 0.0)
    lo, hi, g = quantile_ranks(201, 0.995)
    assert (lo, hi) == (199, 200) and abs(g - 0.995 * 200 + 199) < 1e-12


def test_topk_add_merge_state():
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.standard_normal((3, 5000)).astype(np.float32))
    a, b = TopK(3, 7), TopK(3, 7)
    for i in range(0, 2500, 300):
        a.add(data[:, i : min(i + 300, 2500)])
    b.add(data[:, 2500:])
    restored = TopK(3, 7)
    restored.load_state_dict(a.state_dict())
    restored.merge(b)
    expected = data.sort(dim=1, descending=True).values[:, :7]
    torch.testing.assert_close(restored.result(), expected, rtol=0, atol=0)
    assert restored.count == 5000


def test_nonfinite_keys_fall_in_their_own_top_digits():
    # the radix path drops the non-finite values by their top digit: none is a finite one's
    from dissect.stats import NONFINITE_TOP_DIGITS, RADIX_DIGITS

    shift = RADIX_DIGITS[0][0]
    low_end, high_start = NONFINITE_TOP_DIGITS
    bad = torch.tensor([np.inf, -np.inf, np.nan, -np.nan], dtype=torch.float32)
    bad = torch.cat([bad, torch.tensor([0x7F800001, 0x7FFFFFFF, -1, -0x7FFFFF],
                                       dtype=torch.int32).view(torch.float32)])  # NaN bits
    assert bool(torch.isnan(bad[4:]).all())
    top = sortable_keys(bad) >> shift
    assert bool(((top < low_end) | (top >= high_start)).all())
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).smallest_subnormal
    finite = torch.tensor([-big, -1.0, -tiny, 0.0, tiny, 1.0, big], dtype=torch.float32)
    top = sortable_keys(finite) >> shift
    assert bool(((top >= low_end) & (top < high_start)).all())


def test_radix_path_reads_the_batches_three_times():
    data = np.random.default_rng(3).standard_normal((3, 500)).astype(np.float32)
    data[1, ::7] = np.nan
    calls = []
    batches = _batches(data, 128)

    def counted():
        calls.append(1)
        return batches()

    got = exact_quantiles(counted, 3, 500, 0.99, memory_values=1)
    assert len(calls) == 3  # one pass per digit, both order statistics at once
    finite = [row[np.isfinite(row)] for row in data]
    np.testing.assert_array_equal(got, [np.quantile(f, 0.99) for f in finite])


def test_topk_drops_values_below_its_floor_exactly():
    """Once k values are kept, later batches are filtered against the k-th largest so far:
    the kept multiset must equal a full sort, ties and -inf included."""
    from dissect.stats import TopK

    rng = np.random.default_rng(7)
    for k in (1, 5, 70, 300):
        top = TopK(3, k)
        seen = []
        for _ in range(12):
            batch = torch.from_numpy(rng.integers(0, 6, (3, int(rng.integers(1, 400))))
                                     .astype(np.float32))
            batch[0, ::7] = -math.inf
            top.add(batch)
            seen.append(batch)
        full = torch.cat(seen, dim=1).sort(dim=1, descending=True).values[:, :k]
        assert torch.equal(top.result(), full)


def test_radix_order_statistics_with_different_high_digits():
    """The two order statistics of numpy's interpolation may differ in their high digits
    (then both histograms share one bincount): still exact."""
    from dissect.stats import exact_quantiles

    values = np.concatenate([np.full(50, 1.0), np.full(50, 2.0 ** 40)]).astype(np.float32)
    rows = np.stack([values, -values, np.random.default_rng(0).permutation(values)])
    level = 0.5  # ranks 49 and 50: 1.0 and 2**40
    got = exact_quantiles(lambda: [torch.from_numpy(rows)], 3, 100, level, memory_values=1)
    np.testing.assert_array_equal(got, np.quantile(rows, level, axis=1).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_topk_equals_a_full_sort_through_every_path(dtype):
    """Buffer compactions, the filter's narrow and wide pieces, batches larger than the buffer,
    merges and a resumed state: always the k largest of everything added (bfloat16: the torch
    path the other devices take)."""
    rng = np.random.default_rng(11)
    for rows, k in ((1, 1), (3, 5), (4, 700), (2, 3000)):
        tops = [TopK(rows, k, dtype=dtype) for _ in range(2)]
        seen = []
        for i in range(40):
            width = int(rng.choice([1, 50, 900, 5000]))
            values = rng.integers(-20, 20, (rows, width)) * float(rng.choice([1.0, 0.01]))
            batch = torch.from_numpy(values).to(dtype)
            if i % 7 == 3:
                batch = torch.full_like(batch, -math.inf)
            tops[i % 2].add(batch.clone())
            seen.append(batch)
            if i == 20:
                state = tops[0].state_dict()
                tops[0] = TopK(rows, k, dtype=dtype)
                tops[0].load_state_dict(state)
        tops[0].merge(tops[1])
        full = torch.cat(seen, dim=1).sort(dim=1, descending=True).values[:, :k]
        assert tops[0].count == sum(b.shape[1] for b in seen)
        assert torch.equal(tops[0].result(), full)
        assert torch.equal(tops[0].result(), full)  # sorting in place keeps the multiset
