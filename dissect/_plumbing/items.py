"""Data items and batches: what the model input of an item is, and stacking items.

Every analysis that reads a dataset accepts the same item forms: a tensor (or numpy array),
a tuple/list whose first element is the input, or a dict with ``"image"`` (and optionally
``"index"``, the item's dataset index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import DataError

TRANSFORM_HINT = ("give the dataset a transform that returns a float tensor (e.g. the "
                  "transform from dissect.models.load_model)")


def split_item(item: Any, index: Any, *, batched: bool = False,
               float_only: bool = False) -> tuple[torch.Tensor, Any]:
    """The model input of a data item (or batch) and its index.

    Parameters
    ----------
    item
        A tensor or array, a non-empty tuple/list (the first element is the input), or a dict
        with ``"image"`` (and optionally ``"index"``).
    index
        The index to return when the item names none (its position, or ``None``).
    batched
        ``item`` is a whole batch (only changes the wording of errors).
    float_only
        Refuse inputs that are not floating point (images for gradient-based analyses).

    Returns
    -------
    (torch.Tensor, object)
        The input and the item's index (``item["index"]`` when present, else ``index``).

    Raises
    ------
    DataError
        For a dict without ``"image"``, an empty tuple, or an input that is not a tensor.
    """
    what = "a batch" if batched else "a data item"
    if isinstance(item, dict):
        if "image" not in item:
            raise DataError(f"{what} is a dict without an 'image' key (keys: {sorted(item)})")
        x = item["image"]
        index = item.get("index", index)
    elif isinstance(item, (tuple, list)):
        if not item:
            raise DataError(f"{what} is an empty {type(item).__name__}")
        x = item[0]
    else:
        x = item
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise DataError(f"the input of {what} is a {type(x).__name__}, not a tensor: "
                        f"{TRANSFORM_HINT}")
    if float_only and not x.is_floating_point():
        raise DataError(f"the input of {what} is a {x.dtype} tensor, not a float one: "
                        f"{TRANSFORM_HINT}")
    return x, index


def stack_inputs(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Stack single inputs into a batch; items of different shapes are a :class:`DataError`."""
    if not inputs:
        raise DataError("no data items to stack: the batch is empty")
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) > 1:
        raise DataError(
            f"data items have different shapes {sorted(shapes)}: resize them to one size "
            "(e.g. set the dataset's transform)"
        )
    return torch.stack(inputs)
