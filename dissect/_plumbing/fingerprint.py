"""The fingerprint that identifies a model's weights (stores record it; reuse checks it)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def fingerprint(model: nn.Module, *, legacy: bool = False) -> str:
    """Hash a model's architecture and weights (class name, names, shapes, dtypes and values).

    The class enters by its qualified name only, not its module: a model built by a
    ``path/file.py:factory`` lives in a module whose name changes from process to process,
    and the same weights must give the same fingerprint in every process (a rerun resumes).

    Every tensor of the state dict is read once (tensors on an accelerator are copied to the
    host first): about a second per GB of weights on a CPU core. An analysis computes it at
    most once per call; :func:`dissect.prepare_model` keeps it for a whole chain of calls.

    Parameters
    ----------
    model
        Any module.
    legacy
        The fingerprint of torch-dissect 0.1, which also hashed the class's module (stores it
        wrote are still recognized through it).

    Returns
    -------
    str
        A hex SHA-256 digest; two models with the same class name and state dict share it.
    """
    cls = type(model)
    name = f"{cls.__module__}.{cls.__qualname__}" if legacy else f"class:{cls.__qualname__}"
    h = hashlib.sha256(name.encode())
    for name, tensor in model.state_dict().items():
        hash_tensor(h, name, tensor)
    return h.hexdigest()


def hash_tensor(h: Any, key: object, tensor: torch.Tensor) -> None:
    """Feed ``key``, ``tensor``'s dtype and shape, and its bytes into the hash ``h``.

    The tensor's own buffer is hashed (a CPU tensor is not copied). Used by the weights
    fingerprint and by the hash of the rows that identify a store's data.
    """
    t = tensor.detach().cpu().contiguous()
    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
