"""How captured maps are reduced before they are stored: ``pool=`` of :func:`capture`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DissectError

Pool = None | str | tuple[int, int]


def check_pool(pool: Any) -> Pool:
    """Normalize a ``pool=`` argument: ``None``, ``"mean"``, ``"max"`` or ``(h, w)``.

    An int ``n`` means ``(n, n)``. Anything else is a :class:`DissectError`.
    """
    if pool is None or pool in ("mean", "max"):
        return pool
    if isinstance(pool, int) and not isinstance(pool, bool) and pool > 0:
        return (pool, pool)
    if (
        isinstance(pool, (tuple, list))
        and len(pool) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pool)
    ):
        return (int(pool[0]), int(pool[1]))
    raise DissectError(
        f"pool must be None, 'mean', 'max', an output size n or (h, w); got {pool!r}"
    )


def apply_pool(t: torch.Tensor, pool: Pool, name: str) -> torch.Tensor:
    """Pool ``(N, C, ...)`` outputs of layer ``name`` over their spatial axes."""
    if pool is None or t.ndim <= 2:
        return t
    dims = tuple(range(2, t.ndim))
    if pool == "mean":
        return t.mean(dim=dims)
    if pool == "max":
        return t.amax(dim=dims)
    if t.ndim != 4:
        raise DissectError(f"layer {name!r}: pooling to a size needs (N, C, H, W) outputs, "
                           f"got shape {tuple(t.shape)}; use pool='mean' or 'max'")
    return F.adaptive_avg_pool2d(t, pool)
