"""In-memory tracing of layer outputs (and their gradients) for one forward pass."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .._plumbing.deprecation import renamed_kwargs
from ..errors import DissectError
from .layers import LayerSelector, resolve_layers
from .outputs import sequence_first
from .select import Selector, first_tensor, select_output, selector_for
from .tokens import TokenGrid, TokensSpec, resolve_tokens, to_map

__all__ = ["Trace", "StopForward", "first_tensor"]

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; :class:`Trace` swallows it.

    It deliberately does not derive from :class:`~dissect.DissectError`: it is control flow,
    not an error. Code that runs a forward pass itself under ``stop=True`` may catch it.
    """


def _clone(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


class Trace:
    """Record the outputs (and optionally gradients) of chosen layers during a forward pass.

    A context manager: hooks are registered on entry and always removed on exit, also when the
    body raises. Outputs are detached copies taken when the module returns, so a later in-place
    operation (``nn.ReLU(inplace=True)``) cannot change them.

    Parameters
    ----------
    model
        The model to trace.
    layers
        A layer name, a list of names or a predicate on names (see
        :func:`dissect.hooks.layer_names`). Unknown names raise
        :class:`~dissect.errors.LayerNotFoundError` listing the closest valid ones.
    grads
        Also record the gradient of whatever is back-propagated inside the block with respect to
        each traced output (``tr.grads[name]``). The output must require grad.
    stop
        End the forward pass as soon as every requested layer has produced its output: the
        rest of the network is not computed. The internal :class:`StopForward` is swallowed on
        exit, so the forward call should be the last statement of the block.
    record
        Optional ``(name, tensor) -> value``: what to keep of each output instead of the
        default detached copy (e.g. to pool or cast on the device). It receives the live
        output and must not return a view of it if in-place operations may follow.
        (``transform=`` is a deprecated alias, for one release.)
    tokens
        How token outputs become maps (:mod:`dissect.hooks.tokens`): ``"auto"`` (default)
        reads recognized transformer layers (torchvision's and timm's ViTs, Swin) as
        ``(B, C, h, w)`` maps and refuses other 3-D outputs (it does not guess which axis is
        the channel); a :class:`~dissect.hooks.TokenGrid` for every layer; ``None`` keeps
        every output as the module returns it; or ``{layer: TokenGrid | None}``. The
        outputs, gradients and ``record=`` all see the map; the prefix tokens (class,
        register tokens) of a token layer are kept in ``tr.prefix[name]`` ``(B, P, C)``, and
        each layer's layout in ``tr.layouts[name]``.
    select
        Which tensor of a module returning several is the layer's output
        (:mod:`dissect.hooks.select`): ``None`` (default) the first tensor, an index, a key or a
        callable, for every layer or as ``{layer: selector}``.

    Notes
    -----
    **A module called more than once in one forward** (torchvision's ``BasicBlock`` calls its
    ``relu`` twice): the *first* call is recorded, later calls are ignored and counted in
    ``tr.calls[name]``. This keeps ``stop=True`` well defined (the trace is finished when every
    layer has run once) and keeps the one value that is not also the output of another module
    (the second ``relu`` of a ``BasicBlock`` *is* the block's output). To see a later call, trace
    the enclosing module.

    Examples
    --------
    >>> with Trace(model, ["layer3", "layer4"], grads=True) as tr:   # doctest: +SKIP
    ...     model(x)[:, 281].sum().backward()
    >>> tr.outputs["layer4"].shape, tr.grads["layer4"].shape         # doctest: +SKIP
    """

    @renamed_kwargs(transform="record")
    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector,
        grads: bool = False,
        stop: bool = False,
        *,
        record: Callable[[str, torch.Tensor], Any] | None = None,
        tokens: TokensSpec = "auto",
        select: Selector | dict[str, Selector] | None = None,
    ) -> None:
        if grads and stop:
            raise DissectError(
                "Trace(grads=True, stop=True) cannot work: stopping the forward pass early "
                "leaves no output to back-propagate from"
            )
        self.model = model
        self.layers: list[str] = resolve_layers(model, layers)
        self.grads_enabled = grads
        self.stop = stop
        self._record = record or _clone
        if isinstance(select, dict):
            for key in select:
                resolve_layers(model, key)
        self._select = select
        found = resolve_tokens(model, self.layers, tokens)
        self._layouts = found
        #: each layer's layout: its TokenGrid, or None for outputs kept as they are
        self.layouts: dict[str, TokenGrid | None] = {
            n: g if isinstance(g, TokenGrid) else None for n, g in found.items()}
        self.prefix: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, Any] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Trace:
        self.outputs, self.grads, self.prefix = {}, {}, {}
        self.calls = {name: 0 for name in self.layers}
        modules = dict(self.model.named_modules())
        try:
            for name in self.layers:
                hook = partial(self._forward_hook, name)
                self._handles.append(modules[name].register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def remove(self) -> None:
        """Remove every hook this trace registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _forward_hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        self.calls[name] += 1
        if self.calls[name] > 1:
            if self.calls[name] == 2:
                log.debug("layer %r ran more than once; keeping its first output", name)
            return
        raw = select_output(output, name, selector_for(self._select, name))
        layout = self._layouts[name]
        seq_first = isinstance(layout, TokenGrid) and sequence_first(module)
        tensor = to_map(name, module, raw, layout, seq_first)
        if isinstance(layout, TokenGrid) and layout.prefix:
            rows = raw.transpose(0, 1) if seq_first else raw
            self.prefix[name] = layout.prefix_tokens(rows).detach().clone()
        self.outputs[name] = self._record(name, tensor)
        if self.grads_enabled:
            if not tensor.requires_grad:
                raise DissectError(
                    f"layer {name!r}: its output does not require grad, so no gradient can be "
                    "recorded; run the forward with gradients enabled (not under torch.no_grad "
                    "or inference_mode) and with parameters or an input that require grad"
                )
            # A hook registered before a later in-place op receives the gradient with respect
            # to the value the module returned, which is what we record.
            convert = partial(to_map, name, module, layout=layout, seq_first=seq_first)
            raw.register_hook(partial(self._grad_hook, name, convert))
        if self.stop and len(self.outputs) == len(self.layers):
            raise StopForward()

    def _grad_hook(self, name: str, convert: Callable, grad: torch.Tensor) -> None:
        grad = convert(grad)
        if name not in self.grads:
            self.grads[name] = grad.detach().clone()
        else:  # several backward passes inside one block accumulate, like .grad does
            self.grads[name] = self.grads[name] + grad.detach()
