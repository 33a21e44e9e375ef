"""Choosing layers of an activation store: the one rule every store-reading analysis uses."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import DissectError, LayerNotFoundError

StoreLayers = str | Iterable[str] | Callable[[str], bool] | None


def store_layers(store: Any, layers: StoreLayers, *, what: str = "analyse") -> list[str]:
    """The layers of ``store`` that a selector chooses, in the order asked.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore` (its ``layers`` and ``path``).
    layers
        ``None`` for every layer of the store (its capture order, usually depth), a name, an
        iterable of names (order kept, repeats dropped), or a predicate on names.
    what
        The verb for messages (``"dissect"``, ``"probe"``).

    Returns
    -------
    list of str
        At least one layer.

    Raises
    ------
    LayerNotFoundError
        For a name the store does not hold; the message lists the closest ones.
    DissectError
        When the selector chooses nothing or has an unsupported type.
    """
    have = list(store.layers)
    if layers is None:
        return have
    if callable(layers) and not isinstance(layers, str):
        chosen = [name for name in have if layers(name)]
        if not chosen:
            raise DissectError(f"the layer predicate chose none of the layers of {store.path} "
                               f"({', '.join(have)})")
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    try:
        names = list(layers)
    except TypeError:
        raise DissectError(f"layers must be a name, a list of names, a predicate or None, not "
                           f"{type(layers).__name__}") from None
    if not names:
        raise DissectError(f"no layers to {what}: pass layer names, or None for all")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in have:
            close = difflib.get_close_matches(str(name), have, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LayerNotFoundError(
                f"layer {name!r} is not in {store.path} (it holds {', '.join(have)}){hint}")
        if name not in out:
            out.append(name)
    return out
