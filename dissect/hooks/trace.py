"""In-memory tracing of layer outputs (and their gradients) for one forward pass."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping
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

__all__ = ["Trace", "StopForward", "first_tensor", "EditFn", "trace"]

log = logging.getLogger(__name__)

#: An edit of a layer's output: ``fn(name, output_map) -> replacement`` (or ``None``: keep it).
EditFn = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; :class:`Trace` swallows it.

    It deliberately does not derive from :class:`~dissect.DissectError`: it is control flow,
    not an error. Code that runs a forward pass itself under ``stop=True`` may catch it.
    """


def _clone(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _swap(output: Any, old: torch.Tensor, new: torch.Tensor, depth: int = 0
          ) -> tuple[Any, bool]:
    """``output`` with the tensor ``old`` (found by identity, where :func:`first_tensor` and
    the selectors look: mapping values, tuple and list items, dataclass fields) replaced by
    ``new``; containers are copied, never changed in place. Also whether ``old`` was found."""
    if output is old:
        return new, True
    if depth > 4:
        return output, False
    if isinstance(output, Mapping):
        for key, value in output.items():
            swapped, found = _swap(value, old, new, depth + 1)
            if found:
                out = copy.copy(output)
                out[key] = swapped
                return out, True
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            swapped, found = _swap(value, old, new, depth + 1)
            if found:
                items = list(output)
                items[i] = swapped
                if isinstance(output, list):
                    return items, True
                return (type(output)(*items) if hasattr(output, "_fields")
                        else type(output)(items)), True
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            swapped, found = _swap(getattr(output, f.name), old, new, depth + 1)
            if found:
                out = copy.copy(output)
                object.__setattr__(out, f.name, swapped)  # frozen dataclasses too
                return out, True
    return output, False


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
        rest of the network is not computed. **Trap:** this works by raising
        :class:`StopForward` from the last layer's hook; the exception leaves the model call
        *and the rest of the* ``with`` *block*, and is swallowed on exit. Every statement
        after the model call inside the block silently does not run (and the call returns
        nothing). Use :meth:`run` (``tr = Trace(model, layers, stop=True).run(x)``) or
        :func:`trace`, which have no such trap; or make the model call the last statement of
        the block.
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
    edit
        Replace layers' outputs inside the forward pass (ablation, patching): one function
        ``fn(name, output_map) -> replacement`` for every traced layer, or ``{layer: fn}`` for
        some of them (each must be a traced layer). ``fn`` receives the output as the trace
        sees it (the map of a token layer, the selected tensor of a tuple or dict output) and
        returns a tensor of the same shape, or ``None`` to leave the output as it is. The
        replacement is written back where it came from: into the tuple, dict or dataclass
        the module returned (copied, not changed in place), and into the tokens of a token
        layer (the patch tokens are replaced, the prefix tokens such as the class token are
        kept: :meth:`TokenGrid.to_tokens <dissect.hooks.TokenGrid.to_tokens>`); the rest of
        the network then computes with it. What the trace records (``outputs``, ``grads``,
        ``prefix``) is the edited output. ``fn`` may change the map in place (it is the live
        output, or a view of it) but should rather return a new tensor: a module such as
        ``nn.Identity`` returns its input, which other code may still use. The edit is
        removed with the other hooks when the block ends, also when it raises.

    Notes
    -----
    **A module called more than once in one forward** (torchvision's ``BasicBlock`` calls its
    ``relu`` twice): the *first* call is recorded, later calls are ignored and counted in
    ``tr.calls[name]`` (an ``edit`` applies to every call). This keeps ``stop=True`` well
    defined (the trace is finished when every layer has run once) and keeps the one value that
    is not also the output of another module (the second ``relu`` of a ``BasicBlock`` *is* the
    block's output). To see a later call, trace
    the enclosing module.

    Examples
    --------
    >>> import torch, torchvision
    >>> model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 224, 224)
    >>> with Trace(model, ["layer3", "layer4"], grads=True) as tr:
    ...     model(x)[:, 281].sum().backward()
    >>> tr.outputs["layer4"].shape, tr.grads["layer4"].shape
    (torch.Size([2, 512, 7, 7]), torch.Size([2, 512, 7, 7]))

    Only the outputs, computing no further than ``layer3`` (one call, hooks removed after):

    >>> tr = Trace(model, "layer3", stop=True).run(x)
    >>> tr.outputs["layer3"].shape
    torch.Size([2, 256, 14, 14])

    Zero channel 7 of ``layer3`` and see what the model says then:

    >>> def zero7(name, x):
    ...     x = x.clone()
    ...     x[:, 7] = 0
    ...     return x
    >>> with torch.no_grad(), Trace(model, "layer3", edit=zero7):
    ...     ablated = model(x)
    >>> ablated.shape
    torch.Size([2, 1000])
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
        edit: EditFn | Mapping[str, EditFn] | None = None,
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
        self._edit = self._edits(edit)
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

    def _edits(self, edit: EditFn | Mapping[str, EditFn] | None) -> dict[str, EditFn]:
        if edit is None:
            return {}
        if isinstance(edit, Mapping):
            names = resolve_layers(self.model, list(edit))
            missing = [n for n in names if n not in self.layers]
            if missing:
                raise DissectError(f"edit= names {missing}, which are not traced layers "
                                   f"({self.layers}): trace every layer you edit")
            fns = dict(edit)
        else:
            fns = {name: edit for name in self.layers}
        for name, fn in fns.items():
            if not callable(fn):
                raise DissectError(f"edit for layer {name!r} must be a function "
                                   f"(name, output) -> output, got {type(fn).__name__}")
        return fns

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

    def run(self, *args: Any, **kwargs: Any) -> Trace:
        """Run ``self.model(*args, **kwargs)`` inside this trace and return the trace.

        The form without the ``stop=True`` trap: the trace enters itself, calls the model,
        and exits (every hook removed, also when the model raises); a :class:`StopForward`
        raised by ``stop=True`` ends only the model call, and the caller's next statement
        runs as usual. Each call starts afresh (``outputs``, ``grads``, ``prefix`` and
        ``calls`` are reset). It runs no backward pass: for ``grads=True`` use the ``with``
        block and back-propagate inside it.

        Parameters
        ----------
        *args, **kwargs
            The model's inputs, passed to ``self.model`` as they are (moved nowhere: put them
            where the model is).

        Returns
        -------
        Trace
            ``self``: the recorded outputs in ``.outputs`` (and ``.prefix``, ``.layouts``,
            ``.calls``).

        Examples
        --------
        >>> import torch, torchvision
        >>> model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 224, 224)
        >>> tr = Trace(model, ["layer3", "layer4"], stop=True).run(x)
        >>> tr.outputs["layer4"].shape
        torch.Size([2, 512, 7, 7])
        """
        with self:
            self.model(*args, **kwargs)
        return self

    def remove(self) -> None:
        """Remove every hook this trace registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _forward_hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> Any:
        self.calls[name] += 1
        first = self.calls[name] == 1
        if not first and name not in self._edit:
            if self.calls[name] == 2:
                log.debug("layer %r ran more than once; keeping its first output", name)
            return None
        raw = select_output(output, name, selector_for(self._select, name))
        layout = self._layouts[name]
        seq_first = isinstance(layout, TokenGrid) and sequence_first(module)
        tensor = to_map(name, module, raw, layout, seq_first)
        replaced = None
        if name in self._edit:
            replaced, raw, tensor = self._apply_edit(name, module, output, raw, tensor,
                                                     layout, seq_first)
        if not first:
            return replaced
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
        return replaced

    def _apply_edit(self, name: str, module: nn.Module, output: Any, raw: torch.Tensor,
                    tensor: torch.Tensor, layout: Any, seq_first: bool
                    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Run layer ``name``'s edit: the new module output (``None``: unchanged), the new
        selected tensor and its map."""
        new = self._edit[name](name, tensor)
        if new is None:
            return None, raw, tensor
        if not isinstance(new, torch.Tensor) or new.shape != tensor.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise DissectError(f"the edit of layer {name!r} returned {got}; it must return a "
                               f"tensor of the output's shape {tuple(tensor.shape)} (or None)")
        new = new.to(device=raw.device, dtype=raw.dtype)
        if isinstance(layout, TokenGrid):
            rows = raw.transpose(0, 1) if seq_first else raw
            new_raw = layout.to_tokens(new, rows, name)
            if seq_first:
                new_raw = new_raw.transpose(0, 1)
        else:
            new_raw = new
        replaced, found = _swap(output, raw, new_raw)
        if not found:
            raise DissectError(
                f"cannot write the edit of layer {name!r} back: the tensor select= picks is not "
                f"an element of the {type(output).__name__} the module returned (a select= "
                "callable that computes a new tensor?); select it by index or key instead")
        return replaced, new_raw, to_map(name, module, new_raw, layout, seq_first)

    def _grad_hook(self, name: str, convert: Callable, grad: torch.Tensor) -> None:
        grad = convert(grad)
        if name not in self.grads:
            self.grads[name] = grad.detach().clone()
        else:  # several backward passes inside one block accumulate, like .grad does
            self.grads[name] = self.grads[name] + grad.detach()


def trace(model: nn.Module, x: Any, layers: LayerSelector, *, stop: bool = True,
          **kwargs: Any) -> dict[str, Any]:
    """The outputs of ``layers`` for the input ``x``: one forward pass, no hooks left behind.

    ``Trace(model, layers, stop=stop, **kwargs).run(x).outputs``, run under
    :func:`torch.no_grad` (no graph is kept: the outputs are detached copies anyway). By
    default the forward pass stops after the last requested layer (``stop=True``), and, unlike
    inside a ``with Trace(..., stop=True)`` block, nothing of the caller's code is skipped.

    Parameters
    ----------
    model
        The model to trace (it runs as it is: put it in eval mode and ``x`` on its device).
    x
        The model's input, passed as ``model(x)``.
    layers
        A layer name, a list of names or a predicate on names.
    stop
        End the forward pass once every requested layer has run (default ``True``).
    **kwargs
        Any other keyword argument of :class:`Trace`: ``record``, ``tokens``, ``select``,
        ``edit``. (Not ``grads``: no backward pass is run; use ``with Trace(..., grads=True)``.)

    Returns
    -------
    dict
        Layer name -> its recorded output (a detached copy, or what ``record=`` returned),
        in the order of the resolved layer names.

    Raises
    ------
    DissectError
        When ``grads=True`` is passed, and as :class:`Trace` for bad layers or arguments.

    Examples
    --------
    >>> import torch, torchvision
    >>> model, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 224, 224)
    >>> feats = trace(model, x, ["layer3", "layer4"])
    >>> feats["layer4"].shape
    torch.Size([2, 512, 7, 7])
    """
    if kwargs.get("grads"):
        raise DissectError("trace() runs no backward pass, so it records no gradients: use "
                           "`with Trace(model, layers, grads=True) as tr:` and back-propagate "
                           "inside the block")
    kwargs.pop("grads", None)
    tr = Trace(model, layers, stop=stop, **kwargs)
    with torch.no_grad():
        tr.run(x)
    return {name: tr.outputs[name] for name in tr.layers if name in tr.outputs}
