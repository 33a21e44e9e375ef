"""Device resolution shared by every analysis (``device=`` arguments)."""

from __future__ import annotations

import torch

from .errors import DissectError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on.

    Parameters
    ----------
    device
        ``None`` picks CUDA when it is available and the CPU otherwise; a string or
        ``torch.device`` is used as given (``"cuda:1"``, ``"cpu"``, ``"mps"``).

    Returns
    -------
    torch.device
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DissectError(
            f"unknown device {device!r}: use e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DissectError(f"device {device!r} asked for but CUDA is not available here; use 'cpu'")
    return dev
