"""Which tensor of a module's output is "the layer's output".

Most modules return a tensor. Others return several things: ``nn.MultiheadAttention`` returns
``(output, weights)``, ``nn.LSTM`` returns ``(output, (h, c))``, Hugging Face models return
``ModelOutput`` dicts, some modules return dataclasses. By default the *first tensor* is the
layer's output (depth first, in order: tuple and list items, dict values in insertion order,
dataclass fields in declaration order); a selector chooses another one explicitly:

- an ``int``: that item of a tuple or list;
- a ``str``: that key of a dict (or ``ModelOutput``), or that attribute of an object;
- a callable ``output -> tensor``.

Every entry point that traces layers takes ``select=``: one selector for every layer, or
``{layer: selector}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import DissectError

__all__ = ["Selector", "first_tensor", "select_output", "selector_for"]

Selector = int | str | Callable[[Any], torch.Tensor]


def _first(output: Any, depth: int = 0) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if depth > 4:
        return None
    if isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return None
    for item in items:
        found = _first(item, depth + 1)
        if found is not None:
            return found
    return None


def first_tensor(output: Any, name: str) -> torch.Tensor:
    """The tensor a module produced: the output itself, or its first tensor (module docstring).

    Parameters
    ----------
    output
        What the module's ``forward`` returned.
    name
        The layer name, for the error message.

    Returns
    -------
    torch.Tensor
    """
    found = _first(output)
    if found is None:
        raise DissectError(
            f"layer {name!r} returned {type(output).__name__}, which holds no tensor: trace "
            "one of its submodules instead (see dissect.hooks.layer_names)"
        )
    return found


def select_output(output: Any, name: str, selector: Selector | None = None) -> torch.Tensor:
    """The tensor ``selector`` picks from layer ``name``'s ``output`` (default: the first).

    Raises
    ------
    DissectError
        When the selector does not fit the output (an index out of range, a missing key) or
        picks something that is not a tensor.
    """
    if selector is None:
        return first_tensor(output, name)
    kind = type(output).__name__
    if callable(selector):
        value = selector(output)
        what = "the select= callable"
    elif isinstance(selector, bool) or not isinstance(selector, (int, str)):
        raise DissectError(f"select= for layer {name!r} must be an index, a key or a "
                           f"callable, got {selector!r:.60}")
    elif isinstance(selector, int):
        if not isinstance(output, (tuple, list)) or not -len(output) <= selector < len(output):
            size = len(output) if isinstance(output, (tuple, list)) else "no"
            raise DissectError(f"select={selector} for layer {name!r}: its output is a {kind} "
                               f"with {size} items")
        value, what = output[selector], f"item {selector}"
    elif isinstance(output, Mapping):
        if selector not in output:
            raise DissectError(f"select={selector!r} for layer {name!r}: its output ({kind}) "
                               f"has the keys {list(output)}")
        value, what = output[selector], f"key {selector!r}"
    elif hasattr(output, selector):
        value, what = getattr(output, selector), f"attribute {selector!r}"
    else:
        raise DissectError(f"select={selector!r} for layer {name!r}: its output ({kind}) has "
                           "no such key or attribute")
    if not isinstance(value, torch.Tensor):
        raise DissectError(f"{what} of layer {name!r}'s output is {type(value).__name__}, not "
                           "a tensor")
    return value


def selector_for(select: Selector | Mapping[str, Selector] | None, name: str
                 ) -> Selector | None:
    """Layer ``name``'s selector from a ``select=`` argument (one for all, or per layer)."""
    if isinstance(select, Mapping):
        return select.get(name)
    return select
