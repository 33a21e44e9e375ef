"""Grad-CAM (Selvaraju et al., 2017): a layer's maps weighted by their pooled gradients.

Token layers (Vision Transformers, Swin) are explained like convolutions: the layer is traced
with :class:`dissect.hooks.Trace`, which reads a token output ``(B, N, C)`` as a map
``(B, C, h, w)`` (prefix tokens set aside) and its gradient the same way, so Grad-CAM weights
the patch tokens' channels by their pooled gradients. After the last block of a class-token
ViT the head reads only the class token: the patch tokens' gradients there are exactly 0 and
the map is empty. :func:`grad_cam` warns when that happens, and :func:`last_spatial_layer`
returns the last layer the output depends on through its maps (for a torchvision ViT the last
block's ``ln_1``, whose patch tokens feed the last attention's keys and values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._plumbing.checks import batched_input
from .._plumbing.device import as_module, prepared
from ..errors import DissectError
from ..hooks import TokenGrid, Trace, first_tensor
from ..hooks.outputs import sequence_first
from ..hooks.select import Selector
from ..hooks.tokens import TokensSpec, resolve_tokens, to_map
from ._core import Target, check_target, log, scores, to_device

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "linear", "trilinear")


def _layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise DissectError(
            f"the {type(layer).__name__} module given as layer is not a submodule of the model; "
            "pass its dotted name (see dissect.hooks.layer_names)"
        )
    return layer


def _warn_if_empty(name: str, grads: torch.Tensor, layout: TokenGrid | None,
                   input_grads: torch.Tensor | None) -> None:
    """Warn when the gradient reaching ``name``'s maps is exactly 0 for some inputs: their
    Grad-CAM maps are then all zeros, whatever the layer's activations. ``input_grads``: the
    score's gradient with respect to the inputs (it tells a constant score apart)."""
    dead = (grads.flatten(1) == 0).all(1)
    if not bool(dead.any()):
        return
    constant = input_grads is not None and bool(
        (input_grads.flatten(1)[dead.to(input_grads.device)] == 0).all())
    if constant:
        why = ("the target score does not depend on the input there either (its gradient "
               "with respect to the input is 0 too): is the output constant? (an untrained "
               "torchvision ViT's head is initialized to zeros)")
    elif layout is not None and layout.prefix:
        why = (f"the output depends on this token layer only through its {layout.prefix} "
               "prefix token(s), not its patch tokens. After the last block of a class-token "
               "ViT the head reads only the class token, so the patch tokens' gradients are "
               "exactly 0 there. Explain an earlier layer whose patch tokens still reach the "
               "class token: the last block's first norm (torchvision: "
               "'encoder.layers.encoder_layer_<last>.ln_1', timm: 'blocks.<last>.norm1') or an "
               "earlier block; dissect.attribution.last_spatial_layer(model, x) finds it")
    else:
        why = ("the target does not depend on this layer's maps at those inputs; choose a "
               "layer nearer the output (dissect.attribution.last_spatial_layer(model, x) "
               "finds the last one the output depends on)")
    log.warning("Grad-CAM of layer %r is empty (all zeros) for %d of %d input(s): the gradient "
                "reaching its maps is exactly 0, because %s", name, int(dead.sum()),
                len(dead), why)


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    layer: str | nn.Module,
    *,
    relu: bool = True,
    interpolation: str | None = "bilinear",
    device: str | torch.device | None = None,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> torch.Tensor:
    """Grad-CAM: ``relu(sum_c mean_hw(dy/dA_c) * A_c)`` for a layer's output ``A``.

    The map before upsampling equals captum's
    ``LayerGradCam(model, layer).attribute(x, target, relu_attributions=relu)`` (without its
    channel dim); the upsampled map equals captum's
    ``LayerAttribution.interpolate(cam, x.shape[2:], interpolate_mode=interpolation)``, i.e.
    ``torch.nn.functional.interpolate`` with ``align_corners=False``. Note captum's
    ``relu_attributions`` defaults to ``False`` and its ``interpolate`` to ``"nearest"``; the
    paper's map applies the ReLU, and bilinear upsampling is the usual way to show it.

    The layer is traced with :class:`dissect.hooks.Trace` (hooks are removed on exit, also on
    errors); a module called several times in one forward contributes its first call.

    **Token layers** (a ViT block, a Swin stage) are read as maps by ``tokens=``: the patch
    tokens ``(B, N, C)`` become ``(B, C, h, w)`` and so do their gradients, the prefix tokens
    (class, register tokens) are left out. A class-token ViT's head reads only the class token
    after the last block, so the patch tokens' gradients of the last block (and of the final
    norm) are exactly 0 and the map is empty: a warning says so. Explain an inner layer, such
    as the last block's first norm (:func:`last_spatial_layer` returns it).

    Parameters
    ----------
    model, x, target, device
        As for :func:`dissect.attribution.saliency`; ``x`` is ``(B, C, H, W)`` for images.
    layer
        The layer's dotted name (``"layer4"``, ``"features.18"``,
        ``"encoder.layers.encoder_layer_10"``; see :func:`dissect.hooks.layer_names`) or the
        module itself. Its output must have spatial dims, ``(B, K, h, w)``, or be a token
        output read as a map (``tokens=``).
    relu
        Keep only the positive evidence (the paper's Grad-CAM).
    interpolation
        ``torch.nn.functional.interpolate`` mode used to upsample the map to ``x``'s spatial
        size (``"bilinear"``, ``"nearest"``, ``"bicubic"``, ...); ``None`` returns the map at
        the layer's resolution ``(B, h, w)``.
    tokens
        How a token output becomes a map (:mod:`dissect.hooks.tokens`): ``"auto"`` (default:
        torchvision's and timm's ViTs and Swin are recognized, another 3-D output is refused
        with a message saying what to pass), a :class:`~dissect.hooks.TokenGrid`, ``None``
        (the output as it is) or ``{layer: TokenGrid | None}``.
    select
        Which tensor of a module returning several is the layer's output
        (:mod:`dissect.hooks.select`): the first (default), an index, a key or a callable.

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` (``x``'s spatial size), or ``(B, h, w)`` when ``interpolation`` is
        ``None``; on ``x``'s device.
    """
    x = batched_input(x)
    target = check_target(target, x.shape[0])
    name = _layer_name(as_module(model), layer)
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise DissectError(f"unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}")
    with prepared(model, device) as run:
        model = run.module
        xd = to_device(x, run).requires_grad_(True)
        with Trace(model, name, grads=True, tokens=tokens, select=select) as tr:
            values = scores(model(xd), target)
            input_grads = None
            if name in tr.outputs and values.requires_grad:
                (input_grads,) = torch.autograd.grad(values.sum(), xd)
        if name not in tr.outputs:
            raise DissectError(
                f"layer {name!r} did not run in the forward pass (an unused module?)"
            )
        acts = tr.outputs[name]
        grads = tr.grads.get(name)
        if grads is None:
            raise DissectError(
                f"no gradient reached layer {name!r}: the target does not depend on it"
            )
        if acts.ndim < 3:
            raise DissectError(
                f"Grad-CAM needs a layer with spatial maps (B, K, h, w), but {name!r} outputs "
                f"shape {tuple(acts.shape)}: choose a convolutional layer (e.g. the last one) "
                "or a transformer block (dissect.attribution.last_spatial_layer finds one)"
            )
        _warn_if_empty(name, grads, tr.layouts.get(name), input_grads)
        spatial = tuple(range(2, acts.ndim))
        cam = torch.sum(torch.mean(grads, dim=spatial, keepdim=True) * acts, dim=1, keepdim=True)
        if relu:
            cam = F.relu(cam)
        if interpolation is not None:
            size = tuple(x.shape[2:])
            if len(size) != len(spatial):
                raise DissectError(
                    f"cannot upsample a {len(spatial)}-D map of layer {name!r} to inputs of shape "
                    f"{tuple(x.shape)}; use interpolation=None"
                )
            cam = F.interpolate(cam, size, mode=interpolation)
    return cam[:, 0].detach().to(x.device)


def last_spatial_layer(
    model: nn.Module,
    x: torch.Tensor,
    device: str | torch.device | None = None,
    *,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> str:
    """The layer Grad-CAM usually explains: the last one with spatial maps the output depends on.

    Runs a forward pass on ``x`` to find the modules whose output is a map ``(B, K, h, w)``
    with ``h * w > 1``, a convolution's or a token output read as one (``tokens=``), in the
    order they finish; then a forward and backward pass of a fixed random projection of the
    model output, and returns the last of them whose maps receive a gradient that is not
    exactly 0 (``"layer4"`` for torchvision's ResNets, ``"features"`` for MobileNetV2).

    The gradient matters for class-token Vision Transformers: the head reads only the class
    token, so the patch tokens of the last block (and of the final norm) get no gradient and
    their Grad-CAM is empty. The layer returned is then the last block's first norm
    (``"encoder.layers.encoder_layer_<last>.ln_1"`` for torchvision's ViT, ``"blocks.<last>.
    norm1"`` for timm's), whose patch tokens feed the keys and values the class token attends
    to. When no map receives a gradient, the last map is returned, with a warning.

    Parameters
    ----------
    model
        The network (run in eval mode; its mode is restored).
    x
        A batch of inputs, e.g. ``x[:1]``.
    device
        Where to run; see :func:`dissect.attribution.saliency`.
    tokens, select
        How token outputs become maps and which tensor of a module's output is its output;
        see :func:`grad_cam`. Under ``"auto"`` a 3-D output no rule recognizes is left out
        (it is not a map) rather than refused.

    Returns
    -------
    str
    """
    from ..hooks import layer_names

    x = batched_input(x)
    order: list[str] = []
    with prepared(model, device) as run:
        model = run.module
        names = layer_names(model)
        layouts = {n: g if isinstance(g, TokenGrid) else None
                   for n, g in resolve_tokens(model, names, tokens).items()}
        modules = dict(model.named_modules())

        def info(name: str, t: torch.Tensor) -> tuple[tuple[int, ...] | None, bool]:
            order.append(name)
            layout = layouts[name]
            try:  # the map this output becomes, or None when it is no map
                shape = tuple(to_map(name, modules[name], t, layout,
                                     layout is not None and sequence_first(modules[name])).shape)
            except DissectError:
                shape = None
            return shape, t.requires_grad

        xd = to_device(x, run).requires_grad_(True)
        with Trace(model, names, record=info, tokens=None, select=select) as tr:
            model(xd)
        spatial = [n for n in order if (s := tr.outputs[n][0]) is not None and len(s) == 4
                   and s[2] * s[3] > 1]
        if not spatial:
            raise DissectError("the model has no layer with (B, K, h, w) outputs (or token "
                               "outputs read as maps) for Grad-CAM")
        live = [n for n in spatial if tr.outputs[n][1]]
        reached = _reached(model, xd, live, layouts, select) if live else set()
    found = [n for n in spatial if n in reached]
    if not found:
        log.warning("no layer's maps receive a gradient from the output: returning the last "
                    "layer with maps, %r", spatial[-1])
        return spatial[-1]
    return found[-1]


def _reached(model: nn.Module, xd: torch.Tensor, layers: list[str],
             layouts: dict[str, TokenGrid | None],
             select: Selector | dict[str, Selector] | None) -> set[str]:
    """The ``layers`` whose maps get a gradient that is not exactly 0 from a fixed random
    projection of the model output (one forward and one backward pass)."""
    with Trace(model, layers, grads=True, record=lambda n, t: None,
               tokens={n: layouts[n] for n in layers}, select=select) as tr:
        out = first_tensor(model(xd), "the model output")
        if not out.is_floating_point() or not out.requires_grad:
            return set()
        gen = torch.Generator().manual_seed(0)
        weights = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
        torch.autograd.grad((out * weights).sum(), xd, allow_unused=True)
    return {n for n, g in tr.grads.items() if bool((g != 0).any())}
