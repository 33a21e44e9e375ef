"""The fingerprint that identifies a model's weights (stores record it; reuse checks it)."""

from __future__ import annotations

import hashlib

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
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():  # hash the tensor's own buffer, no bytes copy
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
