"""Argument checks shared by the analyses: every failure is a :class:`DissectError`."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DissectError


def positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (bools refused), else a :class:`DissectError`.

    Parameters
    ----------
    value
        What the caller passed.
    name
        The argument's name, for the message.
    minimum
        The smallest accepted value (``0`` for counts that may be zero).

    Returns
    -------
    int
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise DissectError(f"{name} must be {what}, got {value!r}")
    return int(value)


def one_of(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`DissectError` naming them
    (``name='x'`` -> "x='y': choose one of a, b")."""
    if value not in choices:
        raise DissectError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def optional_positive_int(value: Any, name: str) -> int | None:
    """``None`` (no limit), or a positive int as :func:`positive_int` checks it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DissectError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def batched_input(x: Any, what: str = "x") -> torch.Tensor:
    """Check that ``x`` is a non-empty batched floating tensor ``(B, ...)`` and return it."""
    if not isinstance(x, torch.Tensor):
        raise DissectError(
            f"{what} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}"
        )
    if x.ndim < 2:
        raise DissectError(
            f"{what} must be batched, shape (B, ...), got shape {tuple(x.shape)}: "
            "use x[None] for a single input"
        )
    if not x.is_floating_point():
        raise DissectError(f"{what} must be a floating point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise DissectError(f"{what} is an empty batch")
    return x


def unit_list(units: int | Sequence[int] | torch.Tensor) -> list[int]:
    """Normalize ``units`` (an int, a sequence or a 1-D tensor of ints) to a list of ints."""
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


def units_in_range(units: Sequence[int], channels: int, layer: str) -> None:
    """Raise a :class:`DissectError` if a unit is not a channel of the layer's output."""
    bad = [u for u in units if u >= channels]
    if bad:
        raise DissectError(
            f"unit {bad[0]} is out of range: layer {layer!r} has {channels} units "
            f"(channels 0..{channels - 1})"
        )
