"""Segmentation label planes as runs, and exact label counts under row intervals.

Network Dissection counts, for every unit and concept, the active pixels that carry the
concept's label. The active pixels come as row intervals
(:func:`.active_pixels.active_intervals`); the label planes are cut into *runs*: maximal
stretches of one row with one label. An interval overlaps the runs
``run_id[x0] .. run_id[x1 - 1]`` of its row in each plane and adds each overlap's length to that
run's label. Intervals are a few pixels long and runs tens, so most intervals overlap a single
run: the work is per interval and plane, not per pixel, and the label planes are read densely
only once (to find the runs), which also gives every plane's histogram.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .active_pixels import flat_nonzero, spans


@dataclass(frozen=True)
class LabelRuns:
    """The runs of a ``(B, P, sh, sw)`` label tensor, over its flattened elements.

    Every tensor is int32 below 2**31 elements (int64 above).

    Attributes
    ----------
    shape
        ``(B, P, sh, sw)``.
    start, end
        ``(R,)`` flat index of each run's first element and one past its last (a run never
        crosses a row).
    label
        ``(R,)`` the run's label number.
    run_id
        ``(B * P * sh * sw,)`` the run of every element.
    """

    shape: tuple[int, int, int, int]
    start: torch.Tensor
    end: torch.Tensor
    label: torch.Tensor
    run_id: torch.Tensor

    def histograms(self, n_labels: int) -> torch.Tensor:
        """``(P, n_labels)`` int64: how many pixels of each plane carry each label."""
        B, P, sh, sw = self.shape
        plane = torch.div(self.start, sh * sw, rounding_mode="floor") % P
        counts = torch.bincount(plane * n_labels + self.label,
                                weights=(self.end - self.start).double(),
                                minlength=P * n_labels)
        return counts.double().round().long().view(P, n_labels)


def label_runs(labels: torch.Tensor) -> LabelRuns:
    """Cut every row of every plane of ``(B, P, sh, sw)`` int64 labels into runs."""
    B, P, sh, sw = labels.shape
    flat = labels.reshape(-1)
    begins = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    if flat.numel():
        torch.ne(flat[1:], flat[:-1], out=begins[1:])
        begins.view(-1, sw)[:, 0] = True  # every row starts a run
    it = torch.int32 if flat.numel() < 2**31 else torch.int64
    start = flat_nonzero(begins)
    label = flat.index_select(0, start).to(it)
    start = start.to(it)
    end = torch.cat([start[1:], start.new_tensor([flat.numel()])]) if len(start) else start
    run_id = torch.cumsum(begins, 0, dtype=it).sub_(1)
    return LabelRuns((B, P, sh, sw), start, end, label, run_id)


@dataclass(frozen=True)
class LabelBatch:
    """A batch's pixel labels, ready for counting (shared by every layer scored on it).

    Attributes
    ----------
    runs
        :func:`label_runs` of the labels (after :func:`drop_repeated_labels` when needed).
    hist
        ``(P, n_labels)`` int64 pixels per plane and label.
    n_labels
        One more than the largest label number (at least the ``min_labels`` asked for).
    """

    runs: LabelRuns
    hist: torch.Tensor
    n_labels: int


def label_batch(pixel_labels: torch.Tensor, device: torch.device | str = "cpu",
                min_labels: int = 1) -> LabelBatch:
    """Runs and histograms of ``(B, P, sh, sw)`` label numbers (0 or negative: no label).

    A concept present in two planes of one pixel counts once: when some label number occurs in
    two planes of the batch (the histograms tell), the planes are compared pixel by pixel and
    the repeats dropped (:func:`drop_repeated_labels`); otherwise no pixel can repeat one.
    """
    labels = pixel_labels.to(device, torch.int64)
    runs = label_runs(labels)
    if runs.label.numel() and int(runs.label.min()) < 0:
        labels = labels.clamp(min=0)
        runs = label_runs(labels)
    top = int(runs.label.max()) if runs.label.numel() else 0
    n_labels = max(min_labels, top + 1)
    hist = runs.histograms(n_labels)
    if bool(((hist[:, 1:] > 0).sum(0) > 1).any()):
        runs = label_runs(drop_repeated_labels(labels))
        hist = runs.histograms(n_labels)
    return LabelBatch(runs, hist, n_labels)


def drop_repeated_labels(labels: torch.Tensor) -> torch.Tensor:
    """A copy of ``(B, P, sh, sw)`` labels where a label already present at the same pixel in
    an earlier plane is set to 0 (a concept in two planes of one pixel counts once)."""
    labels = labels.clone()
    for p in range(1, labels.shape[1]):
        dup = (labels[:, p : p + 1] == labels[:, :p]).any(dim=1) & (labels[:, p] > 0)
        labels[:, p].masked_fill_(dup, 0)
    return labels


def interval_label_counts(
    runs: LabelRuns,
    b: torch.Tensor,
    k: torch.Tensor,
    y: torch.Tensor,
    x0: torch.Tensor,
    x1: torch.Tensor,
    units: int,
    n_labels: int,
) -> torch.Tensor:
    """``(K, n_labels)`` exact counts of each label under each unit's row intervals.

    Parameters
    ----------
    runs
        :func:`label_runs` of the batch's ``(B, P, sh, sw)`` labels.
    b, k, y, x0, x1
        The intervals (:func:`.active_pixels.active_intervals`): pixels
        ``x0 <= x < x1`` of row ``y`` of image ``b`` are active for unit ``k``.
    units
        ``K``.
    n_labels
        One more than the largest label number.

    Returns
    -------
    torch.Tensor
        ``(K, n_labels)`` int64; column 0 counts unlabelled pixels.
    """
    B, P, sh, sw = runs.shape
    dev = b.device
    # index arithmetic in the run ids' dtype: int32 below 2**31 elements, several times
    # faster than int64 on CPU
    it = runs.run_id.dtype
    planes = torch.arange(P, device=dev, dtype=it)
    base = (((b.to(it) * P)[:, None] + planes) * sh + y.to(it)[:, None]) * sw  # (M, P) rows
    lo, hi = (base + x0.to(it)[:, None]).reshape(-1), (base + x1.to(it)[:, None]).reshape(-1)
    r0 = runs.run_id.index_select(0, lo)
    kk = (k.to(it) * n_labels).repeat_interleave(P)
    # the first run under each interval ...
    keys = [kk + runs.label.index_select(0, r0)]
    weights = [torch.minimum(hi, runs.end.index_select(0, r0)) - lo]
    # ... and, for the few intervals that cross run boundaries, the following runs
    n_more = runs.run_id.index_select(0, hi - 1) - r0
    many = flat_nonzero(n_more != 0)
    if len(many):
        local, run = spans(r0.index_select(0, many).long() + 1,
                           n_more.index_select(0, many).long())
        owner = many.index_select(0, local)
        part = torch.minimum(hi.index_select(0, owner), runs.end.index_select(0, run))
        keys.append(kk.index_select(0, owner) + runs.label.index_select(0, run))
        weights.append(part - runs.start.index_select(0, run))
    counts = torch.bincount(torch.cat(keys), weights=torch.cat(weights).double(),
                            minlength=units * n_labels)
    # .double(): on empty input a weighted bincount returns int64
    return counts.double().round().long().view(units, n_labels)
