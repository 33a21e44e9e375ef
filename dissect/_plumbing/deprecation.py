"""Keyword arguments renamed for one vocabulary, kept as deprecated aliases for one release."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import DissectError

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**old_to_new: str) -> Callable[[F], F]:
    """Accept ``old=`` for ``new=`` with a :class:`DeprecationWarning` (one release).

    Parameters
    ----------
    **old_to_new
        ``old_name="new_name"`` pairs.

    Returns
    -------
    callable
        A decorator. Giving both names is a :class:`~dissect.DissectError`.

    Examples
    --------
    >>> @renamed_kwargs(batch="batch_size")
    ... def run(*, batch_size=None):
    ...     return batch_size
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     run(batch=4)
    4
    """

    def decorate(fn: F) -> F:
        where = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise DissectError(f"{where}: give {new}= (or its deprecated alias "
                                       f"{old}=), not both")
                warnings.warn(f"{where}({old}=...) is deprecated and will be removed in "
                              f"the next release: use {new}=", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
