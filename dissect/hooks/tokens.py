"""Token outputs as maps: how a transformer layer's ``(B, N, C)`` tokens become ``(B, C, h, w)``.

A Vision Transformer's block returns ``N`` tokens of ``C`` hidden dimensions: ``prefix``
leading tokens (the class token, register tokens, a distillation token) and then one token per
image patch, row by row. Swin-style models return channels-last maps ``(B, H, W, C)``. Every
analysis in this package reads a layer as ``(B, C, h, w)`` maps (channel first), so these
outputs are rearranged once, where they are hooked (:class:`~dissect.hooks.Trace`), and every
analysis downstream sees a map exactly like a convolution's.

- :class:`TokenGrid` says how: how many prefix tokens to set aside and the patch grid
  ``(h, w)``, or ``channels_last=True`` for ``(B, H, W, C)`` outputs.
- :func:`token_layout` recognizes the common models: torchvision's ``VisionTransformer`` and
  ``SwinTransformer``, timm's ViT family (``num_prefix_tokens``, ``patch_embed.grid_size``,
  register and distillation tokens) and timm's channels-last (``output_fmt="NHWC"``) models
  such as Swin. A recognized model may sit anywhere inside the traced model (a CLIP model's
  ``visual`` tower, a ``Sequential(normalize, vit)``).
- :func:`resolve_tokens` turns an entry point's ``tokens=`` argument (``"auto"``, a
  :class:`TokenGrid`, ``None`` or ``{layer: TokenGrid | None}``) into one layout per layer.
  ``"auto"`` never guesses: a layer whose output is 3-D, that no rule recognizes and that no
  ``TokenGrid`` describes, is an error saying how to pass one (a ``(B, N, C)`` token output
  and a ``(B, C, L)`` 1-D convolution map look alike). Modules known to return ``(B, C, L)``
  maps (``nn.Conv1d`` and the other ``*1d`` layers) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._plumbing.token_grid import TokenGrid
from ..errors import DissectError
from .layers import resolve_layers

__all__ = ["TokenGrid", "token_layout", "resolve_tokens", "known_layouts", "parse_tokens",
           "TokensSpec", "UNRECOGNIZED"]

#: The layout of a layer that ``tokens="auto"`` did not recognize: kept as it is, except that
#: a 3-D output is refused (:func:`to_map`).
UNRECOGNIZED = "unrecognized"

TokensSpec = str | TokenGrid | None | Mapping[str, TokenGrid | None]

# modules whose 3-D outputs are (B, C, L) maps, channels first: nothing to rearrange
_CHANNELS_FIRST_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d,
                      nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
                      nn.LPPool1d)


def _relative(name: str, root: str) -> str | None:
    """``name`` relative to the module ``root`` (``""`` for ``root`` itself), or None."""
    if not root:
        return name
    if name == root:
        return ""
    return name[len(root) + 1:] if name.startswith(root + ".") else None


def _under(rel: str, *prefixes: str) -> bool:
    return any(rel == p or rel.startswith(p + ".") for p in prefixes)


def _torchvision_vit(model: nn.Module, rel: str) -> TokenGrid | None:
    side = model.image_size // model.patch_size
    return TokenGrid(prefix=1, grid=(side, side)) if _under(rel, "encoder") else None


def _torchvision_swin(model: nn.Module, rel: str, module: nn.Module) -> TokenGrid | None:
    if _under(rel, "features", "norm") and not isinstance(module, nn.Conv2d):
        return TokenGrid.nhwc()
    return None


def _timm_vit(model: nn.Module, rel: str) -> TokenGrid | None:
    if getattr(model, "dynamic_img_size", False):
        return None  # the grid follows each input's size: no fixed layout to promise
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    if _under(rel, "patch_embed"):
        flat = getattr(model.patch_embed, "flatten", True)
        return TokenGrid(prefix=0, grid=grid) if flat and not _under(rel, "patch_embed.proj") \
            else None
    if _under(rel, "blocks", "norm", "norm_pre", "pos_drop", "patch_drop"):
        has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None)
                               is not None))
        return TokenGrid(prefix=int(model.num_prefix_tokens), grid=grid, class_token=has_cls)
    return None


def _nhwc(model: nn.Module) -> bool:
    fmt = getattr(model, "output_fmt", None)
    return str(getattr(fmt, "value", fmt)) == "NHWC"


def _timm_nhwc(model: nn.Module, rel: str, module: nn.Module) -> TokenGrid | None:
    if _under(rel, "head") or isinstance(module, nn.Conv2d) or rel == "":
        return None
    return TokenGrid.nhwc()


def _layout_in(root: nn.Module, rel: str, module: nn.Module) -> TokenGrid | None | bool:
    """The layout of ``module`` (at ``rel`` inside ``root``) when ``root`` is a recognized
    token model; ``False`` when ``root`` is not one."""
    cls = type(root)
    origin = cls.__module__
    if origin.startswith("torchvision.models"):
        if cls.__name__ == "VisionTransformer":
            return _torchvision_vit(root, rel)
        if cls.__name__ == "SwinTransformer":
            return _torchvision_swin(root, rel, module)
    if origin.startswith("timm."):
        if (isinstance(getattr(root, "num_prefix_tokens", None), int)
                and hasattr(getattr(root, "patch_embed", None), "grid_size")
                and hasattr(root, "blocks")):
            return _timm_vit(root, rel)
        if _nhwc(root):
            return _timm_nhwc(root, rel, module)
    return False


def token_layout(model: nn.Module, layer: str) -> TokenGrid | None:
    """The :class:`TokenGrid` that reads ``layer``'s output as a map, or ``None``.

    Recognized: torchvision's ``VisionTransformer`` (every module under ``encoder``: one class
    token, an ``image_size // patch_size`` square grid) and ``SwinTransformer`` (channels-last
    ``features`` and ``norm``); timm's ViT family (``blocks``, ``norm``: ``num_prefix_tokens``
    prefix tokens, class and register tokens alike, and ``patch_embed.grid_size``; the
    ``patch_embed`` output without prefix); timm models with ``output_fmt="NHWC"`` (Swin).
    The recognized model may be any submodule of ``model``: the innermost one holding
    ``layer`` decides. ``None`` for every other layer (convolutions, heads, models not
    recognized).

    Parameters
    ----------
    model
        The model.
    layer
        A dotted layer name (see :func:`dissect.hooks.layer_names`).

    Returns
    -------
    TokenGrid or None
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        resolve_layers(model, layer)  # the error listing close names
    module = modules[layer]
    parts = layer.split(".") if layer else []
    for cut in range(len(parts), -1, -1):
        root = ".".join(parts[:cut])
        found = _layout_in(modules[root], _relative(layer, root) or "", module)
        if found is not False:
            return found
    return None


def _check_grid(value: Any, what: str) -> TokenGrid | None | str:
    if value is None or isinstance(value, TokenGrid) or value == UNRECOGNIZED:
        return value
    raise DissectError(f"{what} must be a TokenGrid or None, got {type(value).__name__}")


def resolve_tokens(model: nn.Module, layers: list[str], tokens: TokensSpec = "auto"
                   ) -> dict[str, TokenGrid | None | str]:
    """One layout per layer from an entry point's ``tokens=`` argument.

    Parameters
    ----------
    model
        The model.
    layers
        The (resolved) layer names.
    tokens
        ``"auto"`` (:func:`token_layout` for each layer), a :class:`TokenGrid` for every
        layer, ``None`` (keep every output as it is) or ``{layer: TokenGrid | None}`` (the
        layers it names; ``"auto"`` for the others).

    Returns
    -------
    dict
        ``layer -> TokenGrid | None | UNRECOGNIZED``; :data:`UNRECOGNIZED` marks an ``"auto"``
        layer that no rule recognized (a 3-D output of it is refused by :func:`to_map`).
    """
    if tokens is None or isinstance(tokens, TokenGrid):
        return {name: tokens for name in layers}
    given: dict[str, TokenGrid | None | str] = {}
    if isinstance(tokens, Mapping):
        unknown = [key for key in tokens if key not in layers]
        if unknown:  # a name that is no layer is a typo: say so
            resolve_layers(model, unknown)
        for key, value in tokens.items():
            given[key] = _check_grid(value, f"tokens[{key!r}]")
    elif tokens != "auto":
        raise DissectError(f"tokens must be 'auto', a TokenGrid, None or {{layer: TokenGrid}}, "
                           f"got {tokens!r:.60}")
    out: dict[str, TokenGrid | None | str] = {}
    for name in layers:
        if name in given:
            out[name] = given[name]
        else:
            found = token_layout(model, name)
            out[name] = UNRECOGNIZED if found is None else found
    return out


def known_layouts(model: nn.Module, layers: list[str]) -> dict[str, TokenGrid | None]:
    """``{layer: token_layout(model, layer)}``: recognized layers as maps, the others as
    they are (no refusal). For code that surveys every layer (listing shapes, finding the
    last spatial layer), where an unrecognized 3-D output is simply not a map."""
    return {name: token_layout(model, name) for name in layers}


def parse_tokens(text: str) -> TokensSpec:
    """A ``tokens=`` value from text (the CLI's ``--tokens``): ``auto``, ``none``, ``nhwc``,
    ``P`` (``P`` prefix tokens, square grid) or ``P:HxW`` (e.g. ``1:14x14``, ``5:7x5``)."""
    low = text.strip().lower()
    if low in ("auto", "none", "nhwc"):
        return {"auto": "auto", "none": None, "nhwc": TokenGrid.nhwc()}[low]
    prefix, _, grid = low.partition(":")
    try:
        size = tuple(int(v) for v in grid.split("x")) if grid else None
        return TokenGrid(int(prefix), size if size is None or len(size) == 2 else (0, 0))
    except ValueError as exc:
        raise DissectError(f"tokens: expected auto, none, nhwc, P or P:HxW (e.g. 1:14x14), "
                           f"got {text!r}") from exc


def to_map(name: str, module: nn.Module, t: torch.Tensor, layout: TokenGrid | None | str,
           seq_first: bool = False) -> torch.Tensor:
    """``t`` (layer ``name``'s output) rearranged by its ``layout`` (see :func:`resolve_tokens`).

    A :class:`TokenGrid` reshapes (a sequence-first output is made batch-first before);
    ``None`` keeps ``t``; :data:`UNRECOGNIZED` keeps it too, but refuses a 3-D output unless
    ``module`` is known to return ``(B, C, L)`` maps.
    """
    if isinstance(layout, TokenGrid):
        if seq_first and t.ndim == 3:
            t = t.transpose(0, 1)
        return layout.to_map(t, name)
    if layout == UNRECOGNIZED and t.ndim == 3 and not isinstance(module, _CHANNELS_FIRST_1D):
        raise DissectError(
            f"layer {name!r} returns a 3-D output {tuple(t.shape)} and its layout is not "
            "recognized: it may be (batch, tokens, channels) from a transformer or (batch, "
            "channels, length), and reading the wrong axis as channels would be silently "
            "wrong. Say which: tokens=TokenGrid(prefix=P, grid=(h, w)) (or "
            f"tokens={{{name!r}: TokenGrid(...)}}) reads P prefix tokens and an h x w patch "
            "grid as a (C, h, w) map; tokens=None keeps the output as it is "
            "(dissect.hooks.TokenGrid, dissect.hooks.token_layout)")
    return t
