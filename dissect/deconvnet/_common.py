"""Shared by the deconvnet modules: the method names and one layer's output."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .._plumbing.device import as_module
from ..errors import DissectError
from ..hooks import StopForward, resolve_layers
from ..hooks.trace import first_tensor

METHODS = ("deconvnet", "guided", "gradient")


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a :class:`DissectError`."""
    if method not in METHODS:
        raise DissectError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def one_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """Resolve a single layer name to ``(name, module)`` (closest names on a typo)."""
    if not isinstance(layer, str):
        raise DissectError(f"give one layer name (a str), not {type(layer).__name__}")
    model = as_module(model)
    (name,) = resolve_layers(model, layer)
    return name, dict(model.named_modules())[name]


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
