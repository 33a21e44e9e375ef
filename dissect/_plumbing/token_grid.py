"""The layout of a token output: :class:`TokenGrid` (re-exported as ``dissect.hooks.TokenGrid``).

It lives in plumbing because both sides use it: the hooks read token outputs as maps with it,
and the store records and checks each layer's layout with it (:mod:`dissect.hooks.tokens`
says which models get which layout).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DissectError

__all__ = ["TokenGrid", "stored_layouts"]


@dataclass(frozen=True)
class TokenGrid:
    """How a token output becomes a ``(B, C, h, w)`` map.

    Parameters
    ----------
    prefix
        Leading tokens that are not patches (class token, register tokens, distillation
        token), set aside before the reshape. They stay available: :class:`~dissect.hooks.Trace`
        keeps them in ``tr.prefix[layer]`` and :func:`~dissect.capture` stores them under
        ``/prefix/<layer>`` (a probe's ``pool="cls"`` reads them).
    grid
        ``(h, w)``: the patch tokens are laid out row by row (row-major), ``h`` rows of ``w``
        patches. ``None``: a square grid, an error when ``N - prefix`` is not a square.
    channels_last
        The output is already a map, channels last, ``(B, H, W, C)`` (Swin, timm's NHWC
        stages): it is permuted to ``(B, C, H, W)``. ``prefix`` must then be 0 and ``grid``,
        when given, must match ``(H, W)``.
    class_token
        The first prefix token is a class token (torchvision's ViT, most timm ViTs). ``False``
        for prefix tokens that are all registers (timm's ``class_token=False``): then a
        probe's ``pool="cls"`` refuses the layer instead of reading a register token. Always
        ``False`` when ``prefix`` is 0.

    Examples
    --------
    >>> import torch
    >>> tokens = torch.arange(2 * 7 * 3.).reshape(2, 7, 3)   # 1 class token + 2x3 patches
    >>> TokenGrid(prefix=1, grid=(2, 3)).to_map(tokens).shape
    torch.Size([2, 3, 2, 3])
    >>> TokenGrid.nhwc().to_map(torch.zeros(2, 4, 5, 8)).shape
    torch.Size([2, 8, 4, 5])
    """

    prefix: int = 1
    grid: tuple[int, int] | None = None
    channels_last: bool = False
    class_token: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, int) or isinstance(self.prefix, bool) or self.prefix < 0:
            raise DissectError(f"TokenGrid(prefix=...) must be an int >= 0, got {self.prefix!r}")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or not all(
                    isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
                raise DissectError(f"TokenGrid(grid=...) must be (h, w) of positive ints or "
                                   f"None, got {self.grid!r}")
            object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))
        if not self.prefix:  # no prefix, no class token: one spelling of each layout
            object.__setattr__(self, "class_token", False)
        if self.channels_last and self.prefix:
            raise DissectError("TokenGrid(channels_last=True) reads (B, H, W, C) maps, which "
                               f"have no prefix tokens: use prefix=0, not {self.prefix}")

    @classmethod
    def nhwc(cls) -> TokenGrid:
        """The layout of channels-last maps ``(B, H, W, C)`` (Swin, timm's NHWC stages)."""
        return cls(prefix=0, grid=None, channels_last=True, class_token=False)

    def shape_of(self, n_tokens: int, layer: str = "") -> tuple[int, int]:
        """The grid ``(h, w)`` of ``n_tokens`` tokens (prefix included); an error if they do
        not fit it."""
        patches = n_tokens - self.prefix
        where = f"layer {layer!r}: " if layer else ""
        if patches < 1:
            raise DissectError(f"{where}{n_tokens} tokens leave no patch tokens after "
                               f"{self.prefix} prefix tokens: check TokenGrid(prefix=...)")
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != patches:
                raise DissectError(
                    f"{where}{n_tokens} tokens minus {self.prefix} prefix tokens are {patches} "
                    f"patch tokens, which do not fill the grid {self.grid} "
                    f"({self.grid[0] * self.grid[1]}): pass the right TokenGrid(prefix=..., "
                    "grid=(h, w))")
            return self.grid
        side = math.isqrt(patches)
        if side * side != patches:
            raise DissectError(
                f"{where}{patches} patch tokens ({n_tokens} minus {self.prefix} prefix tokens) "
                "are not a square, so the grid cannot be guessed: pass TokenGrid(prefix=..., "
                "grid=(h, w)) (or check the prefix: class, register and distillation tokens)")
        return side, side

    def to_map(self, t: torch.Tensor, layer: str = "") -> torch.Tensor:
        """``(B, N, C)`` tokens (or ``(B, H, W, C)`` when ``channels_last``) as ``(B, C, h, w)``.

        A view where possible (differentiable either way); the prefix tokens are dropped here
        (:meth:`prefix_tokens` returns them).
        """
        where = f"layer {layer!r}" if layer else "the output"
        if self.channels_last:
            if t.ndim != 4:
                raise DissectError(f"{where} is {tuple(t.shape)}, not a channels-last map "
                                   "(B, H, W, C); pass tokens={layer: None} to keep it as it is")
            if self.grid is not None and tuple(t.shape[1:3]) != self.grid:
                raise DissectError(f"{where} is {tuple(t.shape)}: its map is "
                                   f"{tuple(t.shape[1:3])}, not the TokenGrid's {self.grid}")
            return t.permute(0, 3, 1, 2)
        if t.ndim != 3:
            raise DissectError(f"{where} is {tuple(t.shape)}, not tokens (B, N, C): pass "
                               "tokens={layer: None} to keep it as it is, or a TokenGrid that "
                               "fits it")
        h, w = self.shape_of(t.shape[1], layer)
        return t[:, self.prefix:].transpose(1, 2).unflatten(2, (h, w))

    def to_tokens(self, map_: torch.Tensor, raw: torch.Tensor, layer: str = "") -> torch.Tensor:
        """The inverse of :meth:`to_map`: the output ``raw`` with its patches replaced by
        ``map_``.

        Parameters
        ----------
        map_
            ``(B, C, h, w)``: a map of the shape :meth:`to_map` gives for ``raw`` (typically an
            edited copy of it).
        raw
            The output the map was read from: ``(B, N, C)`` tokens, or ``(B, H, W, C)`` when
            ``channels_last``. Its prefix tokens are kept as they are.
        layer
            The layer name, for messages.

        Returns
        -------
        torch.Tensor
            A new tensor shaped like ``raw`` (differentiable with respect to both inputs):
            ``to_map(to_tokens(m, raw))`` equals ``m``, and its prefix tokens equal ``raw``'s.
        """
        expected = tuple(self.to_map(raw, layer).shape)
        if tuple(map_.shape) != expected:
            where = f"layer {layer!r}: " if layer else ""
            raise DissectError(f"{where}a map of shape {tuple(map_.shape)} cannot replace the "
                               f"patches of an output read as {expected}")
        if self.channels_last:
            return map_.permute(0, 2, 3, 1).to(raw.dtype)
        patches = map_.flatten(2).transpose(1, 2).to(raw.dtype)
        return torch.cat([raw[:, : self.prefix], patches], dim=1)

    def prefix_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The prefix tokens of a ``(B, N, C)`` output, ``(B, prefix, C)``."""
        return t[:, : self.prefix]

    def to_json(self) -> str:
        """The layout as the JSON a store records in its layer's ``tokens`` attribute."""
        return json.dumps({"prefix": self.prefix,
                           "grid": None if self.grid is None else list(self.grid),
                           "channels_last": self.channels_last,
                           "class_token": self.class_token})

    @classmethod
    def from_json(cls, text: str | bytes) -> TokenGrid:
        """The layout :meth:`to_json` wrote."""
        try:
            d = json.loads(text)
            return cls(prefix=int(d["prefix"]),
                       grid=None if d["grid"] is None else tuple(d["grid"]),
                       channels_last=bool(d["channels_last"]),
                       class_token=bool(d.get("class_token", True)))
        except (ValueError, TypeError, KeyError) as exc:
            raise DissectError(f"not a TokenGrid layout: {text!r:.80}") from exc


def stored_layouts(store: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{layer: layout}`` of the layers of an :class:`~dissect.ActivationStore` read from
    token outputs, as JSON-ready dicts (:meth:`TokenGrid.to_json`) with the grid the store's
    maps have: what results record so a report can say a layer was read from tokens."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        layout = store.layout(name)
        if layout is None:
            continue
        found = json.loads(layout.to_json())
        if store[name].ndim == 4:
            found["grid"] = [int(v) for v in store[name].shape[2:]]
        out[name] = found
    return out
