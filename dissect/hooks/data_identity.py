"""What identifies the data a store was captured from, so stale activations are never reused.

A store records (root attributes ``data_source``, ``data_transform``, ``data_rows``,
``data_hash``):

- the data-source spec when it is known (``capture(..., dataset="synthetic:1000")``, the CLI's
  ``--data``; compared only when both the store and the call know one);
- a description of the dataset's ``transform`` (its ``repr`` when that is stable, else its
  qualified name: never a memory address);
- a SHA-256 of the inputs of a few fixed rows: the first, quarter, middle, three-quarter and last
  row of a dataset or tensor (read directly, five items); the first row of a ``DataLoader``
  (it cannot seek).

Reusing or resuming a store checks all of them against the current data and refuses a
mismatch with the list of differences, as it does for the model.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch

from .._plumbing.fingerprint import hash_tensor
from .source import BatchSource

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_transform(transform: Any) -> str:
    """A stable description of a dataset's ``transform`` (``""`` when there is none)."""
    if transform is None:
        return ""
    text = repr(transform)
    if _ADDRESS.search(text) or text.startswith("<"):
        kind = transform if callable(transform) and hasattr(transform, "__qualname__") \
            else type(transform)
        text = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"
    return _ADDRESS.sub("", text)


def _digest(rows: list[tuple[int, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for row, x in rows:
        hash_tensor(h, row, x)
    return h.hexdigest()


def data_identity(source: BatchSource, spec: str | None) -> dict[str, str]:
    """The ``data_*`` root attributes of a capture of ``source`` (see the module docstring)."""
    data = source.data
    inner = getattr(data, "dataset", data)  # a DataLoader's dataset
    rows = source.identity_rows()
    return {
        "data_source": spec or "",
        "data_transform": describe_transform(getattr(inner, "transform", None)),
        "data_rows": json.dumps([r for r, _ in rows]),
        "data_hash": _digest(rows),
    }


def data_differences(stored: dict[str, Any], current: dict[str, str]) -> list[str]:
    """How the data a store records differs from ``current`` (empty: the same data)."""
    diffs = []
    known = stored.get("data_source") and current["data_source"]
    if known and stored.get("data_source") != current["data_source"]:
        diffs.append(f"data source: file {stored.get('data_source')!r}, this call "
                     f"{current['data_source']!r}")
    if stored.get("data_transform") != current["data_transform"]:
        diffs.append(f"transform: file {stored.get('data_transform')!r}, this call "
                     f"{current['data_transform']!r}")
    if stored.get("data_hash") != current["data_hash"]:
        diffs.append(f"the inputs of rows {json.loads(current['data_rows'])} differ (another "
                     "dataset, another order, or random augmentation)")
    return diffs
