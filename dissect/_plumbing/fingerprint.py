"""The fingerprint that identifies a model's weights (stores record it; reuse checks it)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def fingerprint(model: nn.Module) -> str:
    """Hash a model's architecture and weights (class, names, shapes, dtypes and values).

    Every tensor of the state dict is read once (tensors on an accelerator are copied to the
    host first): about a second per GB of weights on a CPU core. An analysis computes it at
    most once per call; :func:`dissect.prepare_model` keeps it for a whole chain of calls.

    Parameters
    ----------
    model
        Any module.

    Returns
    -------
    str
        A hex SHA-256 digest; two models with the same class and state dict share it.
    """
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():  # hash the tensor's own buffer, no bytes copy
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
