"""Gradient attributions: saliency, gradient x input, SmoothGrad and Integrated Gradients."""

from __future__ import annotations

import math
import numbers

import numpy as np
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
    accumulate,
    as_baseline,
    check_target,
    empty_rows,
    forward_scores,
    gradient,
    log,
    segments,
    to_device,
)

IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
              "gausslegendre")


def saliency(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    abs: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Gradient of the target score with respect to the input (Simonyan et al., 2014).

    Equal to captum's ``Saliency(model).attribute(x, target, abs=abs)``.

    Parameters
    ----------
    model
        The network; it runs in eval mode (every module's mode is restored afterwards) and is
        moved to ``device``. Parameter ``.grad`` fields are left untouched.
    x
        ``(B, ...)`` floating point inputs (e.g. normalized images ``(B, 3, H, W)``).
    target
        What to explain: a class index (the same for every input), a list of class indices
        (one per input), or a callable mapping the model output ``(N, ...)`` to one score per
        row ``(N,)``; ``None`` when the model returns one value per input.
    abs
        Return the absolute value of the gradient (captum's default).
    device
        Where to compute. ``None``: the model's device if it is on an accelerator, else CUDA
        when available, else the CPU. The model is moved there (and stays).

    Returns
    -------
    torch.Tensor
        Shaped like ``x``, on ``x``'s device.
    """
    x = batched_input(x)
    target = check_target(target, x.shape[0])
    with prepared(model, device) as run:
        model = run.module
        grads, _ = gradient(model, to_device(x, run), target)
    return (grads.abs() if abs else grads).to(x.device)


def grad_x_input(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Gradient times input (Shrikumar et al., 2016); captum's ``InputXGradient``.

    Parameters
    ----------
    model, x, target, device
        As for :func:`saliency`.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``, on ``x``'s device.
    """
    x = batched_input(x)
    target = check_target(target, x.shape[0])
    with prepared(model, device) as run:
        model = run.module
        xd = to_device(x, run)
        grads, _ = gradient(model, xd, target)
    return (grads * xd).to(x.device)


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    n: int = 50,
    sigma: float = 0.15,
    seed: int = 0,
    abs: bool = True,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al., 2017): saliency averaged over noisy copies of each input.

    The map of input ``b`` is ``mean_i g(x_b + sigma_b * eps_i)`` over ``n`` draws, where ``g``
    is :func:`saliency` (absolute gradients when ``abs``, as in captum's
    ``NoiseTunnel(Saliency(model))``) and ``eps_i`` is standard normal noise. Gradients are
    taken in chunks of ``batch_size`` noisy rows and accumulated.

    **Sigma is relative**, as in the paper: ``sigma_b = sigma * (x_b.max() - x_b.min())``, a
    fraction of *each input's own* value range (over all its channels and pixels). captum's
    ``NoiseTunnel`` takes an absolute standard deviation instead, one for the whole batch: for
    one input ``x_b`` this function equals
    ``NoiseTunnel(Saliency(model)).attribute(x_b, nt_type="smoothgrad", nt_samples=n,
    stdevs=sigma * float(x_b.max() - x_b.min()))`` up to the random draws.

    Parameters
    ----------
    model, x, target, device
        As for :func:`saliency`.
    n
        Number of noisy samples per input.
    sigma
        Noise standard deviation as a fraction of each input's value range (0.15: the paper's
        10-20 %).
    seed
        Seed of the noise. The noise of an input depends only on ``seed``, the input's shape
        and its value range (draw ``i`` is the same standard normal tensor for every input,
        scaled by its ``sigma_b``), so a map does not depend on the other inputs of the batch
        nor on ``batch_size``. The same seed gives the same noise on the same kind of device.
    abs
        Average absolute gradients (captum's ``Saliency`` default); ``False`` averages raw
        gradients.
    batch_size
        Noisy rows per forward/backward pass: memory is bounded by ``batch_size`` rows whatever
        ``n`` is. ``None`` runs all ``n * B`` rows at once.
    progress
        Show a progress bar (only for work lasting more than about a second).

    Returns
    -------
    torch.Tensor
        Shaped like ``x``, on ``x``'s device.
    """
    x = batched_input(x)
    batch = x.shape[0]
    target = check_target(target, batch)
    batch_size = optional_positive_int(batch_size, "batch_size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DissectError(f"n (noisy samples per input) must be a positive integer, got {n!r}")
    if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise DissectError(
            f"sigma must be a finite fraction >= 0 of the value range, got {sigma!r}"
        )
    with prepared(model, device) as run:
        model, dev = run.module, run.device
        xd = to_device(x, run)
        flat = xd.reshape(batch, -1)
        spread = flat.amax(1) - flat.amin(1)
        stdev = (float(sigma) * spread).view((batch,) + (1,) * (x.ndim - 1))
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        drawn, eps = -1, xd[0]  # the newest draw; draws are made in order 0, 1, ..., n - 1
        total = torch.zeros_like(xd)
        chunks = row_chunks(n * batch, batch_size)
        log.debug("smoothgrad: %d noisy rows in %d passes on %s", n * batch, len(chunks), dev)
        with progress_bar(len(chunks), "smoothgrad", progress) as bar:
            for start, stop in chunks:
                runs = list(segments(start, stop, batch))
                rows = empty_rows(xd, stop - start)
                for step, b0, b1, offset in runs:
                    while drawn < step:
                        eps = torch.randn(x.shape[1:], generator=gen, device=dev, dtype=x.dtype)
                        drawn += 1
                    torch.add(xd[b0:b1], eps * stdev[b0:b1], out=rows[offset:offset + b1 - b0])
                samples = torch.cat([torch.arange(b0, b1) for _, b0, b1, _ in runs])
                grads, _ = gradient(model, rows, target, samples)
                accumulate(total, grads.abs() if abs else grads, runs)
                bar.update()
    return (total / n).to(x.device)


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Step sizes and alphas of an integration rule, exactly as captum defines them.

    ``riemann_left``/``right``/``middle``: ``steps`` equal steps of ``1 / steps`` at the left
    ends, right ends or midpoints of ``[0, 1]``'s subintervals; ``riemann_trapezoid``:
    ``steps`` points ``linspace(0, 1, steps)`` with step ``1 / steps`` (halved at both ends,
    so the steps sum to ``1 - 1 / steps``, as in captum); ``gausslegendre``: Gauss-Legendre
    nodes and weights mapped from ``[-1, 1]`` to ``[0, 1]``.

    Parameters
    ----------
    method
        One of ``riemann_left``, ``riemann_right``, ``riemann_middle``,
        ``riemann_trapezoid``, ``gausslegendre``.
    steps
        Number of points (at least 2 for the Riemann rules, 1 for Gauss-Legendre).

    Returns
    -------
    step_sizes, alphas : list of float
    """
    if method not in IG_METHODS:
        raise DissectError(f"unknown integration method {method!r}; use one of {IG_METHODS}")
    low = 1 if method == "gausslegendre" else 2
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < low:
        raise DissectError(f"steps must be an integer >= {low} for {method}, got {steps!r}")
    n = steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    sizes = [1 / n] * n
    if method == "riemann_trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:
        alphas = torch.linspace(1 / n, 1, n)
    return sizes, alphas.tolist()


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    baseline: float | torch.Tensor | None = None,
    steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    return_delta: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients (Sundararajan et al., 2017).

    ``(x - x') * sum_k w_k * grad f(x' + a_k (x - x'))`` over the ``steps`` points ``a_k`` and
    weights ``w_k`` of the integration rule (see :func:`quadrature`), the same computation,
    rules and point placement as captum's ``IntegratedGradients`` (``n_steps=steps``,
    ``method=method``). Where the output saturates the gradient at ``x`` is ~0, but the path
    from the baseline still credits the input that moved the output.

    Memory is bounded by ``batch_size``: the ``steps * B`` interpolated rows are never built at
    once (captum builds them all unless ``internal_batch_size`` is given); each chunk of at most
    ``batch_size`` rows is interpolated, back-propagated and accumulated.

    Parameters
    ----------
    model, x, target, device
        As for :func:`saliency`.
    baseline
        The reference input ``x'``: ``None`` (zeros), a number, one input's shape or ``x``'s
        shape.
    steps
        Number of integration points.
    method
        ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"`` or ``"riemann_trapezoid"``, as captum names them.
    batch_size
        Interpolated rows per forward/backward pass; ``None`` for all at once.
    return_delta
        Also return the completeness error.
    progress
        Show a progress bar (only for work lasting more than about a second).

    Returns
    -------
    attributions : torch.Tensor
        Shaped like ``x``, on ``x``'s device.
    delta : torch.Tensor
        Only with ``return_delta``: ``(B,)`` ``attributions[b].sum() - (f(x_b) - f(x'_b))``,
        captum's convergence delta. By completeness the attributions of an input sum to
        ``f(x) - f(x')`` up to this error, which shrinks as ``steps`` grows.
    """
    x = batched_input(x)
    batch = x.shape[0]
    target = check_target(target, batch)
    batch_size = optional_positive_int(batch_size, "batch_size")
    step_sizes, alphas = quadrature(method, steps)
    with prepared(model, device) as run:
        model, dev = run.module, run.device
        xd = to_device(x, run)
        base = as_baseline(baseline, xd)
        diff = xd - base
        total = torch.zeros_like(xd)
        # captum multiplies by float32 step sizes; so do we, for equal results
        weights = torch.tensor(step_sizes, dtype=torch.float32, device=dev)
        chunks = row_chunks(steps * batch, batch_size)
        log.debug("integrated gradients (%s): %d rows in %d passes on %s", method,
                  steps * batch, len(chunks), dev)
        with progress_bar(len(chunks), "integrated gradients", progress) as bar:
            for start, stop in chunks:
                runs = list(segments(start, stop, batch))
                rows = empty_rows(xd, stop - start)
                for k, b0, b1, offset in runs:  # baseline + alpha * (x - baseline), as captum
                    part = rows[offset:offset + b1 - b0]
                    torch.mul(diff[b0:b1], alphas[k], out=part)
                    part.add_(base[b0:b1])
                samples = torch.cat([torch.arange(b0, b1) for _, b0, b1, _ in runs])
                grads, _ = gradient(model, rows, target, samples)
                accumulate(total, grads, runs, weights)
                bar.update()
        attributions = total * diff
        if not return_delta:
            return attributions.to(x.device)
        f_x = forward_scores(model, xd, target, batch_size)
        f_base = forward_scores(model, base.contiguous(), target, batch_size)
        delta = attributions.reshape(batch, -1).sum(1) - (f_x - f_base)
    return attributions.to(x.device), delta.to(x.device)
