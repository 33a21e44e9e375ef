"""Where a model and its inputs run: the one device policy of every analysis.

:func:`prepare_model` is called by every analysis that takes a model (``capture``,
``dissect(model, ...)``, deconvnet, activation maximization, attribution) and decides:

- **A model already on a device stays there.** ``device=None`` runs the model where its
  parameters are: a model on ``cuda:1`` stays on ``cuda:1``, a model on the CPU stays on the
  CPU (pass ``device="cuda"`` to move it; a log line says so when CUDA is available).
- **``device=`` moves the inputs, and the model only because you asked.** A model on one
  device is moved to ``device`` when it is elsewhere. ``"cuda"`` without an index means any CUDA
  device: a model on ``cuda:1`` stays there.
- **A model spread over several devices is never moved** (pipeline parallelism, Accelerate's
  ``device_map``): inputs go to ``device``, or to the device of its first parameter.
- **``nn.DataParallel`` is refused**: it runs forward hooks on per-GPU replicas in parallel
  threads, so a trace would race. Pass ``model.module`` (and ``torchrun`` for several GPUs).
- **Inputs take the model's floating dtype**: a float16 or bfloat16 model gets float16 or
  bfloat16 inputs (also when gradients are taken with respect to them).

The result, a :class:`PreparedModel`, also carries the model's weights fingerprint, computed
once: pass it instead of the model to several analyses (``dissect.prepare_model``) and the
weights are placed and hashed once for the whole chain of calls.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DissectError
from .batchnorm_grad import FastBatchNormGrad
from .fingerprint import fingerprint as weights_fingerprint

log = logging.getLogger("dissect")

Device = str | torch.device | None


def resolve_device(device: Device = None) -> torch.device:
    """Return the device to compute on when no model decides it (counting, probes).

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


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices of a model's parameters and buffers, in order of first use."""
    seen: dict[torch.device, None] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        seen.setdefault(tensor.device, None)
    return list(seen)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` if it has neither)."""
    devices = model_devices(model)
    return devices[0] if devices else None


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of a model's parameters (``None``: none, or several)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _same_place(asked: torch.device, actual: torch.device) -> bool:
    """``asked`` names ``actual``'s device (``"cuda"`` without an index: any CUDA device)."""
    if asked.type != actual.type:
        return False
    return asked.index is None or actual.index is None or asked.index == actual.index


def as_module(model: object) -> nn.Module:
    """The ``nn.Module`` of a model argument (a module or a :class:`PreparedModel`);
    ``nn.DataParallel`` and non-modules are a :class:`DissectError`."""
    if isinstance(model, PreparedModel):
        return model.module
    if isinstance(model, nn.DataParallel):
        raise DissectError(
            "nn.DataParallel runs forward hooks on per-GPU replicas in parallel threads, so "
            "torch-dissect cannot record its layers safely: pass model.module (one device), "
            "and launch with torchrun for several GPUs (see dissect.distributed)"
        )
    if not isinstance(model, nn.Module):
        raise DissectError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


@dataclass(eq=False)
class PreparedModel:
    """A model placed by the device policy (:func:`prepare_model`).

    Attributes
    ----------
    module
        The model itself (never a copy).
    device
        Where inputs go: the model's device, or its first parameter's for a model spread over
        several devices.
    dtype
        The floating dtype of its parameters (inputs are cast to it), ``None`` when they have
        none or several.
    spread
        The model's parameters live on several devices (it is never moved).
    """

    module: nn.Module
    device: torch.device
    dtype: torch.dtype | None
    spread: bool = False
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """The weights fingerprint (:func:`dissect.hooks.fingerprint`), computed on first use
        and then kept: the weights must not change while this object is used."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.module)
        return self._fingerprint

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on :attr:`device`, floating inputs in the model's :attr:`dtype`."""
        dtype = self.dtype if self.dtype is not None and x.is_floating_point() else None
        return x.to(device=self.device, dtype=dtype, non_blocking=True)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[PreparedModel]:
        """Eval mode inside the block; every module's own training flag is restored on exit,
        also on errors."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            yield self
        finally:
            for module, training in modes:
                module.training = training


def prepare_model(model: nn.Module | PreparedModel, device: Device = None) -> PreparedModel:
    """Place a model for an analysis by the one device policy (see the module docstring).

    Parameters
    ----------
    model
        An ``nn.Module`` or a :class:`PreparedModel` (returned as is unless ``device`` asks for
        another place).
    device
        ``None``: where the model is. Otherwise the inputs' device, and the model's too (it is
        moved there unless it is spread over several devices).

    Returns
    -------
    PreparedModel

    Raises
    ------
    DissectError
        For something that is not a module, ``nn.DataParallel``, an unknown device, or CUDA
        asked for where there is none.
    """
    if isinstance(model, PreparedModel) and (
        device is None or _same_place(resolve_device(device), model.device)
    ):
        return model
    module = as_module(model)
    asked = None if device is None else resolve_device(device)
    devices = model_devices(module)
    if len(devices) > 1:
        log.debug("the model is spread over %s: it stays there", devices)
        where = asked if asked is not None else devices[0]
        return PreparedModel(module, where, floating_dtype(module), spread=True)
    if not devices:  # no parameters or buffers: run where asked, else the default device
        return PreparedModel(module, asked or resolve_device(None), None)
    here = devices[0]
    if asked is not None and not _same_place(asked, here):
        log.info("moving the model from %s to %s (device=%s)", here, asked, device)
        module.to(asked)
        here = model_devices(module)[0]
    elif asked is None and here.type == "cpu" and torch.cuda.is_available():
        log.info("the model is on the CPU and stays there; pass device='cuda' to use the GPU")
    fp = model._fingerprint if isinstance(model, PreparedModel) else None
    return PreparedModel(module, here, floating_dtype(module), _fingerprint=fp)


def run_device(model: nn.Module, device: Device = None) -> torch.device:
    """Where :func:`prepare_model` would run ``model``, without moving it (for analyses that
    work on a private copy, such as activation maximization)."""
    module = as_module(model)
    if device is not None:
        return resolve_device(device)
    here = model_device(module)
    return here if here is not None else resolve_device(None)


@contextlib.contextmanager
def prepared(model: nn.Module | PreparedModel, device: Device) -> Iterator[PreparedModel]:
    """:func:`prepare_model` for gradient analyses: eval mode, with gradients enabled.

    Gradients are enabled inside also under a caller's ``no_grad`` or ``inference_mode``;
    every module's training mode is restored on exit, also on errors.

    Parameter ``.grad`` fields are never touched by the analyses that use this: they take
    gradients with ``torch.autograd.grad`` with respect to their inputs only. That is also why
    eval-mode BatchNorm may skip its weight-gradient reductions inside the block
    (:class:`~dissect._plumbing.batchnorm_grad.FastBatchNormGrad`: same bits, faster on the
    CPU).
    """
    run = prepare_model(model, device)
    with run.evaluating(), torch.inference_mode(False), torch.enable_grad(), FastBatchNormGrad():
        yield run
