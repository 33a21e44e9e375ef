"""Shared by the deconvnet modules: the method names and one layer's output (as a map)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._plumbing.device import as_module
from ..errors import DissectError
from ..hooks import StopForward, resolve_layers
from ..hooks.outputs import sequence_first
from ..hooks.select import Selector, select_output, selector_for
from ..hooks.tokens import UNRECOGNIZED, TokenGrid, TokensSpec, resolve_tokens, to_map

METHODS = ("deconvnet", "guided", "gradient")


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a :class:`DissectError`."""
    if method not in METHODS:
        raise DissectError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method


@dataclass(frozen=True)
class Layer:
    """One layer to project from: its name, module, token layout and output selector.

    Attributes
    ----------
    name, module
        The dotted name and the module of ``model.named_modules()``.
    layout
        How its output becomes a map (:func:`dissect.hooks.resolve_tokens`): a
        :class:`~dissect.hooks.TokenGrid`, ``None`` (kept as it is) or
        :data:`~dissect.hooks.tokens.UNRECOGNIZED` (kept, a 3-D output refused).
    selector
        Which tensor of a module returning several is the output (``None``: the first).
    """

    name: str
    module: nn.Module
    layout: TokenGrid | None | str
    selector: Selector | None

    @property
    def is_tokens(self) -> bool:
        """Whether the output is read as a token grid (a transformer layer)."""
        return isinstance(self.layout, TokenGrid)

    def read(self, output: Any) -> torch.Tensor:
        """The layer's output as the analyses see it: the selected tensor, as a map."""
        raw = select_output(output, self.name, self.selector)
        seq_first = self.is_tokens and sequence_first(self.module)
        return to_map(self.name, self.module, raw, self.layout, seq_first)

    def with_layout(self, layout: TokenGrid | None | str) -> Layer:
        """The same layer read with another layout."""
        return Layer(self.name, self.module, layout, self.selector)


def one_layer(model: nn.Module, layer: str, tokens: TokensSpec = "auto",
              select: Selector | dict[str, Selector] | None = None) -> Layer:
    """Resolve a single layer name (closest names on a typo), its layout and its selector.

    Parameters
    ----------
    model
        The model (or a :class:`~dissect.PreparedModel`).
    layer
        One layer name.
    tokens, select
        As in :class:`dissect.hooks.Trace`.

    Returns
    -------
    Layer
    """
    if not isinstance(layer, str):
        raise DissectError(f"give one layer name (a str), not {type(layer).__name__}")
    model = as_module(model)
    (name,) = resolve_layers(model, layer)
    if isinstance(select, dict):
        for key in select:
            resolve_layers(model, key)
    layout = resolve_tokens(model, [name], tokens)[name]
    return Layer(name, dict(model.named_modules())[name], layout, selector_for(select, name))


def same_layout(a: TokenGrid | None | str, b: TokenGrid | None | str) -> bool:
    """Whether two layouts read an output alike (a grid left to be inferred fits any grid)."""
    a = None if a == UNRECOGNIZED else a
    b = None if b == UNRECOGNIZED else b
    if not isinstance(a, TokenGrid) or not isinstance(b, TokenGrid):
        return a is None and b is None
    return (a.prefix == b.prefix and a.channels_last == b.channels_last
            and (a.grid is None or b.grid is None or a.grid == b.grid))


class LayerOutput:
    """Hold the output of one layer (as a map) during a forward pass, then stop the pass.

    A context manager: the hook is removed on exit (also on exceptions), and the internal
    :class:`~dissect.hooks.StopForward` that ends the pass right after the layer is swallowed.
    The output is kept live (with its autograd graph): nothing after the layer runs, so no
    later in-place operation can change it. A token layer's output is its ``(B, C, h, w)``
    map (:meth:`Layer.read`), a differentiable view of the tokens.
    """

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.output: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> LayerOutput:
        self.output = None
        self._handle = self.layer.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc_type is not None and issubclass(exc_type, StopForward)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = self.layer.read(output)
        raise StopForward()

    def result(self) -> torch.Tensor:
        """The captured output; an error if the forward pass never reached the layer."""
        if self.output is None:
            raise DissectError(
                f"layer {self.layer.name!r} did not run during the forward pass: choose a "
                "layer that the model's forward uses (see dissect.hooks.layer_names)"
            )
        return self.output


def run_to_layer(model: nn.Module, layer: Layer, x: torch.Tensor,
                 mode: Any = None) -> torch.Tensor:
    """Run ``model(x)`` up to ``layer`` (under ``mode`` if given) and return its output."""
    grab = LayerOutput(layer)
    with contextlib.ExitStack() as stack:
        if mode is not None:
            stack.enter_context(mode)
        stack.enter_context(grab)
        model(x)
    return grab.result()
