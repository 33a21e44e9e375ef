"""Label runs and interval counts equal a pixel-by-pixel count."""

from __future__ import annotations

import pytest
import torch

from dissect.netdissect.label_runs import drop_repeated_labels, interval_label_counts, label_runs


@pytest.mark.parametrize("run_length", [1, 3, 40], ids=["noise", "short-runs", "long-runs"])
def test_interval_counts_equal_pixel_counts(run_length):
    g = torch.Generator().manual_seed(run_length)
    B, P, sh, sw, K, n_labels = 3, 2, 9, 50, 4, 6
    # labels constant over stretches of run_length columns
    coarse = torch.randint(0, n_labels, (B, P, sh, -(-sw // run_length)), generator=g)
    labels = coarse.repeat_interleave(run_length, dim=3)[..., :sw].contiguous()
    m = 200
    b = torch.randint(0, B, (m,), generator=g)
    k = torch.randint(0, K, (m,), generator=g)
    y = torch.randint(0, sh, (m,), generator=g)
    x0 = torch.randint(0, sw, (m,), generator=g)
    x1 = torch.minimum(x0 + torch.randint(1, 30, (m,), generator=g), torch.tensor(sw))
    runs = label_runs(labels)
    got = interval_label_counts(runs, b, k, y, x0, x1, K, n_labels)
    want = torch.zeros(K, n_labels, dtype=torch.int64)
    for i in range(m):
        for p in range(P):
            for x in range(int(x0[i]), int(x1[i])):
                want[k[i], labels[b[i], p, y[i], x]] += 1
    assert torch.equal(got, want)
    hist = torch.stack([torch.bincount(labels[:, p].reshape(-1), minlength=n_labels)
                        for p in range(P)])
    assert torch.equal(runs.histograms(n_labels), hist)


def test_runs_never_cross_rows_and_empty_planes():
    labels = torch.tensor([[[[1, 1], [1, 1]]]])  # same label on both rows: two runs
    runs = label_runs(labels)
    assert runs.start.tolist() == [0, 2] and runs.end.tolist() == [2, 4]
    empty = label_runs(torch.zeros(2, 0, 3, 3, dtype=torch.int64))
    assert empty.start.numel() == empty.end.numel() == 0
    assert empty.histograms(5).shape == (0, 5)


def test_drop_repeated_labels():
    labels = torch.tensor([[[[3, 0, 2]], [[3, 3, 2]], [[1, 3, 2]]]])  # (1, 3, 1, 3)
    out = drop_repeated_labels(labels)
    assert out.tolist() == [[[[3, 0, 2]], [[0, 3, 0]], [[1, 0, 0]]]]
    assert labels[0, 1, 0, 0] == 3  # the input is not modified
