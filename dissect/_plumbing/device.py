"""Device resolution shared by every analysis (``device=`` arguments)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import DissectError
from .batchnorm_grad import FastBatchNormGrad


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on.

    Parameters
    ----------
    device
        ``None`` picks CUDA when it is available and the CPU otherwise; a string or
        ``torch.device`` is used as given (``"cuda:1"``, ``"cpu"``, ``"mps"``).

    Returns
    -------
    torch.device
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DissectError(
            f"unknown device {device!r}: use e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DissectError(f"device {device!r} asked for but CUDA is not available here; use 'cpu'")
    return dev


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` if it has neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def model_run_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where to run ``model``: ``device`` if given; else the accelerator it is on; else
    :func:`resolve_device`'s choice (so ``cuda:1`` stays there, a CPU model moves to CUDA)."""
    if not isinstance(model, nn.Module):
        raise DissectError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dev = model_device(model) if device is None else None
    return dev if dev is not None and dev.type != "cpu" else resolve_device(device)


@contextlib.contextmanager
def prepared(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Move ``model`` to its run device (:func:`model_run_device`) in eval mode, with
    gradients enabled (also under a caller's ``no_grad`` or ``inference_mode``); every
    module's training mode is restored on exit, also on errors.

    Parameter ``.grad`` fields are never touched by the analyses that use this: they take
    gradients with ``torch.autograd.grad`` with respect to their inputs only. That is also why
    eval-mode BatchNorm may skip its weight-gradient reductions inside the block
    (:class:`~dissect._batchnorm_grad.FastBatchNormGrad`: same bits, faster on the CPU).
    """
    dev = model_run_device(model, device)
    model.to(dev)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), FastBatchNormGrad():
            yield dev
    finally:
        for module, training in modes:
            module.training = training
