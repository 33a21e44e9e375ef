"""Numpy arrays inside JSON documents, bit for bit (base64 of the raw little-endian bytes).

Result objects write one JSON file each (``to_json``); arrays too large to list as numbers
(image patches, optimized images) are stored as ``{"dtype", "shape", "base64"}`` objects, which
:func:`decode_array` turns back into the same array. Never a pickle.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from ..errors import DissectError

DTYPES = ("bool", "uint8", "int32", "int64", "float16", "float32", "float64")


def encode_array(array: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """``{"dtype": ..., "shape": [...], "base64": ...}`` holding ``array`` exactly."""
    if isinstance(array, torch.Tensor):
        if array.dtype not in (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16,
                               torch.float32, torch.float64):
            raise DissectError(f"cannot store a {array.dtype} tensor in JSON; convert it to "
                               f"one of {DTYPES}")
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.dtype.name not in DTYPES:
        raise DissectError(f"cannot store a {arr.dtype} array in JSON; use one of {DTYPES}")
    little = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    return {"dtype": arr.dtype.name, "shape": list(arr.shape),  # 0-d arrays keep shape ()
            "base64": base64.b64encode(little.tobytes()).decode("ascii")}


def decode_array(doc: Any, what: str = "array") -> np.ndarray:
    """The array an :func:`encode_array` object holds (a :class:`DissectError` if malformed)."""
    try:
        dtype = doc["dtype"]
        shape = tuple(doc["shape"])
        if (dtype not in DTYPES
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in shape)):
            raise ValueError(f"dtype {dtype!r}, shape {list(shape)}")
        raw = base64.b64decode(doc["base64"], validate=True)
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        return arr.astype(np.dtype(dtype), copy=True).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise DissectError(f"malformed {what} in the JSON document: {exc}") from exc
