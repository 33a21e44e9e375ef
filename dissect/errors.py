"""The one exception family of torch-dissect.

Every error raised on purpose by this package is a :class:`DissectError` whose message says what
was wrong and what to do about it, so scripts can ``except dissect.DissectError`` once.
"""

from __future__ import annotations


class DissectError(Exception):
    """Base class of every error torch-dissect raises on purpose."""


class LayerNotFoundError(DissectError, KeyError):
    """A requested layer name is not a module of the model."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class StoreError(DissectError):
    """An activation store file is missing, unreadable, incompatible or unfinished."""


class ModelSpecError(DissectError):
    """A model spec string or weights file could not be resolved."""


class DataError(DissectError):
    """A data source or one of its items has an unsupported form."""
