"""Layer addressing: dotted module names, lists of them, or a predicate on the name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from torch import nn

from ..errors import DissectError, LayerNotFoundError

LayerSelector = str | Iterable[str] | Callable[[str], bool]


def layer_names(model: nn.Module) -> list[str]:
    """List every addressable layer of ``model``.

    The names are the dotted names of ``model.named_modules()`` (``"layer4.1.conv2"``,
    ``"features.10"``) in registration order, without the root module itself.

    Parameters
    ----------
    model
        Any ``torch.nn.Module``.

    Returns
    -------
    list of str
    """
    return [name for name, _ in model.named_modules() if name]


def _unknown(name: object, valid: list[str]) -> LayerNotFoundError:
    close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return LayerNotFoundError(
        f"no layer named {name!r} in the model.{hint} "
        "See dissect.hooks.layer_names(model) (or `dissect layers MODEL`) for all names."
    )


def resolve_layers(model: nn.Module, layers: LayerSelector) -> list[str]:
    """Turn a layer selector into a list of valid layer names.

    Parameters
    ----------
    model
        The model whose modules are addressed.
    layers
        A dotted name, an iterable of names (order kept, duplicates dropped), or a callable
        ``name -> bool`` applied to :func:`layer_names` (like TransformerLens' ``names_filter``).

    Returns
    -------
    list of str
        At least one valid name.

    Raises
    ------
    LayerNotFoundError
        For a name that is not a module of ``model``; the message lists the closest valid names.
    DissectError
        When the selector selects nothing or has an unsupported type.
    """
    valid = layer_names(model)
    if callable(layers) and not isinstance(layers, str):
        chosen = [name for name in valid if layers(name)]
        if not chosen:
            raise DissectError("the layer predicate selected no layer of the model")
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    try:
        requested = list(layers)
    except TypeError as exc:
        raise DissectError(
            f"layers must be a name, a list of names or a predicate, not {type(layers).__name__}"
        ) from exc
    if not requested:
        raise DissectError("no layers requested: give at least one layer name")
    known = set(valid)
    out: list[str] = []
    for name in requested:
        if not isinstance(name, str) or name not in known:
            raise _unknown(name, valid)
        if name not in out:
            out.append(name)
    return out
