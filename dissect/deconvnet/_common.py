"""Plumbing shared by the deconvnet modules: argument checks, model state, one layer's output."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DissectError
from ..hooks import StopForward, resolve_layers
from ..hooks.trace import first_tensor

METHODS = ("deconvnet", "guided", "gradient")
PROGRESS_DELAY_S = 1.0  # bars appear only for work that lasts longer than this


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a :class:`DissectError`."""
    if method not in METHODS:
        raise DissectError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def one_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """Resolve a single layer name to ``(name, module)`` (closest names on a typo)."""
    if not isinstance(layer, str):
        raise DissectError(f"give one layer name (a str), not {type(layer).__name__}")
    (name,) = resolve_layers(model, layer)
    return name, dict(model.named_modules())[name]


def check_units(units: int | Sequence[int] | torch.Tensor) -> list[int]:
    """Normalize ``units`` (an int, a sequence or a 1-D tensor of ints) to a list."""
    if isinstance(units, torch.Tensor):
        units = units.reshape(-1).tolist()
    if isinstance(units, numbers.Integral) and not isinstance(units, bool):
        units = [int(units)]
    try:
        out = list(units)
    except TypeError:
        raise DissectError(
            f"units must be an int or a list of ints, not {type(units).__name__}") from None
    if not out:
        raise DissectError("no units given: pass at least one unit (channel) index")
    for u in out:
        if isinstance(u, bool) or not isinstance(u, numbers.Integral) or u < 0:
            raise DissectError(f"units must be non-negative ints; got {u!r}")
    return [int(u) for u in out]


def check_unit_range(units: list[int], channels: int, layer: str) -> None:
    """Raise if a unit is not a channel of the layer's output."""
    bad = [u for u in units if u >= channels]
    if bad:
        raise DissectError(
            f"unit {bad[0]} is out of range: layer {layer!r} has {channels} units "
            f"(channels 0..{channels - 1})"
        )


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, else a :class:`DissectError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DissectError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class LayerOutput:
    """Hold the first output of one module during a forward pass, then stop the pass.

    A context manager: the hook is removed on exit (also on exceptions), and the internal
    :class:`~dissect.hooks.StopForward` that ends the pass right after the layer is swallowed.
    The output is kept live (with its autograd graph): nothing after the layer runs, so no
    later in-place operation can change it.
    """

    def __init__(self, model: nn.Module, module: nn.Module, name: str) -> None:
        self.model, self.module, self.name = model, module, name
        self.output: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> LayerOutput:
        self.output = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc_type is not None and issubclass(exc_type, StopForward)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = first_tensor(output, self.name)
        raise StopForward()

    def result(self) -> torch.Tensor:
        """The captured output; an error if the forward pass never reached the layer."""
        if self.output is None:
            raise DissectError(
                f"layer {self.name!r} did not run during the forward pass: choose a layer "
                "that the model's forward uses (see dissect.hooks.layer_names)"
            )
        return self.output


def run_to_layer(model: nn.Module, module: nn.Module, name: str, x: torch.Tensor,
                 mode: Any = None) -> torch.Tensor:
    """Run ``model(x)`` up to ``module`` (under ``mode`` if given) and return its output."""
    grab = LayerOutput(model, module, name)
    with contextlib.ExitStack() as stack:
        if mode is not None:
            stack.enter_context(mode)
        stack.enter_context(grab)
        model(x)
    return grab.result()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "batch") -> tqdm:
    """A tqdm bar shown only if the work lasts a while and ``enabled``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total < 2,
                delay=PROGRESS_DELAY_S, leave=False)


def check_input(x: Any) -> torch.Tensor:
    """Check that ``x`` is a non-empty batched floating tensor ``(B, ...)``."""
    if not isinstance(x, torch.Tensor):
        raise DissectError(f"x must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise DissectError(
            f"x must be a non-empty batch, shape (B, ...), got shape {tuple(x.shape)}: "
            "use x[None] for a single input"
        )
    if not x.is_floating_point():
        raise DissectError(f"x must be a floating point tensor, got {x.dtype}")
    return x
