"""Occlusion (Zeiler & Fergus, 2014): how much the score drops when a patch is replaced."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .._plumbing.checks import batched_input, optional_positive_int
from .._plumbing.chunks import row_chunks
from .._plumbing.device import prepared
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ._core import (
    DEFAULT_BATCH_SIZE,
    Target,
    as_baseline,
    check_target,
    empty_rows,
    forward_scores,
    log,
    scores,
    segments,
    to_device,
)


def _window_shape(window: int | Sequence[int], dims: tuple[int, ...]) -> tuple[int, ...]:
    """Window over every non-batch dim; an int or a spatial-only tuple spans all channels."""
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        shape = (int(window),) * len(dims) if len(dims) == 1 else \
            (dims[0],) + (int(window),) * (len(dims) - 1)
    else:
        try:
            shape = tuple(int(w) for w in window)
        except (TypeError, ValueError):
            raise DissectError(
                f"window must be an int or a tuple of ints, got {window!r}"
            ) from None
        if len(shape) == len(dims) - 1 and len(dims) > 1:
            shape = (dims[0],) + shape
    if len(shape) != len(dims):
        raise DissectError(
            f"window {tuple(window) if not isinstance(window, int) else window} does not fit "
            f"inputs of shape (B, {', '.join(map(str, dims))}): give one size per dimension "
            f"{tuple(dims)} (like captum's sliding_window_shapes) or per spatial dimension"
        )
    for w, d in zip(shape, dims, strict=True):
        if not 1 <= w <= d:
            raise DissectError(
                f"window {shape} must be between 1 and the input size {tuple(dims)} in every "
                "dimension"
            )
    return shape


def _strides(stride: int | Sequence[int] | None, window: tuple[int, ...],
             dims: tuple[int, ...]) -> tuple[int, ...]:
    if stride is None:
        return window
    if isinstance(stride, numbers.Integral) and not isinstance(stride, bool):
        strides = (int(stride),) * len(dims)
    else:
        try:
            strides = tuple(int(s) for s in stride)
        except (TypeError, ValueError):
            raise DissectError(
                f"stride must be an int or a tuple of ints, got {stride!r}"
            ) from None
        if len(strides) == len(dims) - 1 and len(dims) > 1:
            strides = (1,) + strides
        if len(strides) != len(dims):
            raise DissectError(
                f"stride {strides} needs one value per input dimension {tuple(dims)}"
            )
    for s, w, d in zip(strides, window, dims, strict=True):
        if s < 1:
            raise DissectError(f"strides must be positive, got {strides}")
        if w < d and s > w:
            raise DissectError(
                f"stride {strides} is larger than the window {window} in a dimension the "
                "window does not cover: some inputs would never be occluded; use stride <= "
                "window"
            )
    return strides


def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    baseline: float | torch.Tensor = 0.0,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Occlusion: the drop of the target score when a sliding window is set to a baseline.

    Each input element gets the mean of ``f(x) - f(x with one window replaced)`` over the
    windows that cover it: captum's ``Occlusion(model).attribute(x, sliding_window_shapes=
    window, strides=stride, baselines=baseline, target=target)``. Along each dimension the
    window starts at ``0, s, 2s, ...``, ``ceil((D - w) / s) + 1`` positions, the last one
    clipped at the border, so every element is covered.

    Parameters
    ----------
    model, x, target, device
        As for :func:`dissect.attribution.saliency`.
    window
        Window shape over the non-batch dimensions ``(C, H, W)``, like captum's
        ``sliding_window_shapes``. Shortcuts: ``(h, w)`` or an int ``k`` (a ``k x k`` patch)
        span all channels.
    stride
        Step of the window: an int for every dimension or one per dimension (``(h, w)``
        spans the channels). ``None`` (default): equal to the window, non-overlapping patches.
        It may not exceed the window where the window is smaller than the input.
    baseline
        What occluded elements become: a number (0.0, the mean of normalized images) or a
        tensor of one input's shape or ``x``'s shape.
    batch_size
        Occluded inputs per forward pass (perturbations are batched: windows x inputs);
        memory is bounded by it. ``None`` runs every occluded input at once.
    progress
        Show a progress bar (only for work lasting more than about a second).

    Returns
    -------
    torch.Tensor
        Shaped like ``x``, on ``x``'s device.
    """
    x = batched_input(x)
    batch, dims = x.shape[0], tuple(x.shape[1:])
    target = check_target(target, batch)
    batch_size = optional_positive_int(batch_size, "batch_size")
    shape = _window_shape(window, dims)
    strides = _strides(stride, shape, dims)
    counts = [math.ceil((d - w) / s) + 1 for d, w, s in zip(dims, shape, strides, strict=True)]
    windows = list(itertools.product(*(range(c) for c in counts)))

    def region(k: int) -> tuple[slice, ...]:
        return (slice(None),) + tuple(
            slice(i * s, i * s + w) for i, s, w in zip(windows[k], strides, shape, strict=True)
        )

    with prepared(model, device) as run, torch.inference_mode():
        model, dev = run.module, run.device
        xd = to_device(x, run)
        base = as_baseline(baseline, xd)
        f_x = forward_scores(model, xd, target, batch_size)
        drops = torch.empty(len(windows) * batch, dtype=f_x.dtype, device=dev)
        chunks = row_chunks(len(windows) * batch, batch_size)
        log.debug("occlusion: %d windows x %d inputs in %d passes on %s", len(windows), batch,
                  len(chunks), dev)
        with progress_bar(len(chunks), "occlusion", progress) as bar:
            for start, stop in chunks:
                runs = list(segments(start, stop, batch))
                occluded = empty_rows(xd, stop - start)
                for k, b0, b1, offset in runs:
                    part = occluded[offset:offset + b1 - b0]
                    part.copy_(xd[b0:b1])
                    where = region(k)
                    part[where] = base[b0:b1][where]
                rows = torch.cat([torch.arange(b0, b1) for _, b0, b1, _ in runs])
                drops[start:stop] = f_x[rows.to(dev)] - scores(model(occluded), target, rows)
                bar.update()
        # total[b, p] = sum over windows covering p of drop[b, window]: the window indicator
        # is a product of 1-D indicators, so the sum is one small contraction per dimension
        total = drops.view(len(windows), batch).T.reshape(batch, *counts)
        coverage = torch.ones((), dtype=total.dtype, device=dev)
        for d, (count, s, w) in enumerate(zip(counts, strides, shape, strict=True)):
            start = torch.arange(count, device=dev)[:, None] * s
            pos = torch.arange(dims[d], device=dev)[None, :]
            indicator = ((pos >= start) & (pos < start + w)).to(total.dtype)
            total = torch.tensordot(total, indicator, dims=([1], [0]))
            coverage = coverage[..., None] * indicator.sum(0)
        attributions = total / coverage
    return attributions.to(x.dtype).to(x.device).clone()
