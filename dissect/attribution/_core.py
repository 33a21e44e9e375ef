"""Shared by the attribution methods: targets, scores, baselines, gradients of row chunks."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from .._plumbing.chunks import row_chunks
from .._plumbing.device import PreparedModel
from ..errors import DissectError

log = logging.getLogger("dissect.attribution")

Target = int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
"""What to explain: a class index, one index per input, a callable on the output, or ``None``."""

DEFAULT_BATCH_SIZE = 64


def check_target(target: Target, batch: int) -> Target:
    """Validate ``target`` against a batch of ``batch`` inputs; return a normalized form.

    Integers stay integers, sequences become an int64 CPU tensor of length ``batch``,
    callables and ``None`` are returned as they are.
    """
    if target is None or (callable(target) and not isinstance(target, torch.Tensor)):
        return target
    if isinstance(target, bool):
        raise DissectError(f"target must be a class index, not the bool {target!r}")
    if isinstance(target, numbers.Integral):
        return int(target)
    if isinstance(target, torch.Tensor) and target.ndim == 0:
        if target.is_floating_point() or target.dtype == torch.bool:
            return _bad_target(target)
        return int(target.item())
    try:
        values = torch.as_tensor(target if isinstance(target, torch.Tensor) else list(target))
    except (TypeError, ValueError, RuntimeError):
        return _bad_target(target)
    if values.ndim != 1 or values.is_floating_point() or values.dtype == torch.bool:
        return _bad_target(target)
    if len(values) != batch:
        raise DissectError(
            f"target has {len(values)} class indices for {batch} inputs: give one index per "
            "input, a single int for all of them, or a callable on the output"
        )
    return values.to(torch.int64).cpu()


def _bad_target(target: Any) -> NoReturn:
    raise DissectError(
        f"target must be a class index (int), a list of ints (one per input) or a callable "
        f"on the model output; got {type(target).__name__} {target!r:.80}"
    )


def scores(output: Any, target: Target, samples: torch.Tensor | None = None) -> torch.Tensor:
    """Select one score per row of a model output.

    Parameters
    ----------
    output
        The model output for ``N`` rows (a tensor, or a tuple whose first element is one).
    target
        As returned by :func:`check_target`.
    samples
        ``(N,)`` index of the input each row belongs to (needed for per-input targets);
        ``None`` when the rows are the inputs themselves.

    Returns
    -------
    torch.Tensor
        ``(N,)`` scores.
    """
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise DissectError(
            f"the model returned {type(output).__name__}, not a tensor: pass a callable target "
            "that maps the output to one score per input"
        )
    n = output.shape[0] if output.ndim else 0
    if callable(target) and not isinstance(target, torch.Tensor):
        value = target(output)
        if not isinstance(value, torch.Tensor):
            raise DissectError(
                f"the target callable returned {type(value).__name__}; it must return a "
                "tensor with one score per row of the output, shape (N,)"
            )
        if value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.shape != (n,):
            raise DissectError(
                f"the target callable returned shape {tuple(value.shape)} for an output of "
                f"shape {tuple(output.shape)}: it must return one score per row, shape ({n},)"
            )
        return value
    if target is None:
        if output.ndim == 2 and output.shape[1] == 1:
            return output[:, 0]
        if output.ndim == 1:
            return output
        raise DissectError(
            f"target=None needs one output per input, but the model returned shape "
            f"{tuple(output.shape)}: give a class index, a list of them or a callable"
        )
    if output.ndim != 2:
        raise DissectError(
            f"a class-index target needs (N, classes) outputs, the model returned shape "
            f"{tuple(output.shape)}: pass a callable target that picks one score per row"
        )
    classes = output.shape[1]
    if isinstance(target, int):
        if not -classes <= target < classes:
            raise DissectError(f"target {target} is out of range for {classes} outputs")
        return output[:, target]
    index = target if samples is None else target[samples.cpu()]
    if index.numel() and (int(index.min()) < -classes or int(index.max()) >= classes):
        raise DissectError(f"target indices {target.tolist()} out of range for {classes} outputs")
    index = index.to(output.device) % classes
    return output.gather(1, index[:, None])[:, 0]


def as_baseline(baseline: Any, x: torch.Tensor, what: str = "baseline") -> torch.Tensor:
    """Broadcast a scalar or tensor baseline to ``x``'s shape, dtype and device (a view)."""
    if baseline is None:
        baseline = 0.0
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.full((1,) * x.ndim, float(baseline), dtype=x.dtype, device=x.device).expand(
            x.shape
        )
    if not isinstance(baseline, torch.Tensor):
        raise DissectError(
            f"{what} must be a number or a tensor, got {type(baseline).__name__}"
        )
    b = baseline.detach().to(device=x.device, dtype=x.dtype)
    if b.ndim == x.ndim - 1:
        b = b[None]
    try:
        return b.expand(x.shape)
    except RuntimeError:
        raise DissectError(
            f"{what} of shape {tuple(baseline.shape)} does not fit inputs of shape "
            f"{tuple(x.shape)}: give a number, one input's shape {tuple(x.shape[1:])}, or the "
            "inputs' shape"
        ) from None


def to_device(x: torch.Tensor, run: PreparedModel) -> torch.Tensor:
    """A plain (non-inference, detached) copy of ``x`` where the model takes its inputs (its
    device, and its floating dtype)."""
    return run.inputs(x.detach()).clone()


def empty_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialized ``(rows, *x.shape[1:])`` tensor in ``x``'s memory format.

    A channels-last input keeps its format through the perturbed rows, so the model runs its
    channels-last kernels (on CPU about 1.5x faster for MobileNetV2's forward and backward).
    """
    channels_last = (x.ndim == 4 and not x.is_contiguous()
                     and x.is_contiguous(memory_format=torch.channels_last))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


def gradient(model: nn.Module, xs: torch.Tensor, target: Target,
             samples: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the selected scores with respect to a batch of rows.

    Rows are independent in eval mode, so the gradient of the summed scores is each row's own
    gradient (what captum's ``torch.autograd.grad(torch.unbind(out), x)`` computes).

    Returns
    -------
    grads : torch.Tensor
        Shaped like ``xs``.
    values : torch.Tensor
        ``(N,)`` detached scores.
    """
    xs = xs.detach().requires_grad_(True)
    values = scores(model(xs), target, samples)
    if not values.requires_grad:
        raise DissectError(
            "the target scores do not depend on the input through a differentiable path "
            "(is the model detached, or the target callable returning a constant?)"
        )
    (grads,) = torch.autograd.grad(values.sum(), xs)
    return grads, values.detach()


def forward_scores(
    model: nn.Module, xs: torch.Tensor, target: Target, batch_size: int | None
) -> torch.Tensor:
    """Scores of ``target`` for each row of ``xs`` (rows are the inputs), without gradients."""
    out = []
    with torch.no_grad():
        for start, stop in row_chunks(xs.shape[0], batch_size):
            rows = torch.arange(start, stop)
            out.append(scores(model(xs[start:stop]), target, rows))
    return torch.cat(out)


def segments(start: int, stop: int, batch: int) -> Iterator[tuple[int, int, int, int]]:
    """Split rows ``[start, stop)`` of a step-major ``(steps * batch)`` layout into runs.

    Row ``r`` is step ``r // batch`` of input ``r % batch``. Yields
    ``(step, first_input, stop_input, offset_in_chunk)`` for each run of one step.
    """
    r = start
    while r < stop:
        step, b0 = divmod(r, batch)
        b1 = min(batch, b0 + stop - r)
        yield step, b0, b1, r - start
        r += b1 - b0


def accumulate(
    total: torch.Tensor,
    grads: torch.Tensor,
    runs: list[tuple[int, int, int, int]],
    weights: torch.Tensor | None = None,
) -> None:
    """Add each row's (weighted) gradient to its input's total, in place.

    ``runs`` are the :func:`segments` of the chunk whose gradients are ``grads``. Runs that
    cover every input of a step are summed over their steps first (``sum_k w_k * g_k``), the
    arithmetic of captum's ``IntegratedGradients`` (so equal chunks give equal bits); partial
    runs at the chunk's ends are added one by one.
    """
    batch = total.shape[0]
    full = [(k, off) for k, b0, b1, off in runs if b0 == 0 and b1 == batch]
    if full:
        (k0, off0), n = full[0], len(full)
        block = grads[off0:off0 + n * batch].reshape(n, batch, -1)
        if weights is not None:
            block = block * weights[k0:k0 + n].view(n, 1, 1)
        total.add_(block.sum(0).view(total.shape))
    for k, b0, b1, off in runs:
        if b0 == 0 and b1 == batch:
            continue
        part = grads[off:off + b1 - b0]
        total[b0:b1] += part if weights is None else part * weights[k]
